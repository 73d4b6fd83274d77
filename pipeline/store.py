"""The artefact store: immutable, versioned students in a folder or at an fsspec URL.

    <store>/<name>/v1/            the artefact files, README.md (model card) and manifest.json (sha256 of each file)
    <store>/<name>/v2/
    <store>/<name>/latest         one line naming the newest published version

A store is a local folder (``store``, ``/srv/models``, ``file:///srv/models``) or any fsspec URL
(``s3://bucket/models`` with the ``cloud`` extra, ``memory://models``). On a local filesystem a version is
written to a temporary sibling and renamed into place, and ``latest`` is replaced with an atomic rename. Object
stores have no rename: there the files are uploaded first and ``manifest.json`` last, and only a version folder
holding a manifest counts, so a half-uploaded version is never listed or pulled; ``latest`` is one object
written in one request. An existing version is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.config.base import NAME_RE
from pipeline.rundir import checksums, sha256_file

VERSION_RE = re.compile(r"^v(\d+)$")


class ChecksumError(RuntimeError):
    """A pulled file does not match the manifest."""


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"invalid student name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def _fs(store: str | Path):
    """(fsspec filesystem or None for a local folder, root path)."""
    s = str(store)
    if "://" not in s:
        return None, Path(s)
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(s)
    if isinstance(fs, LocalFileSystem):
        return None, Path(root)
    return fs, root.rstrip("/")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def _version_key(v: str) -> int:
    return int(VERSION_RE.match(v).group(1))


def versions(store: str | Path, name: str) -> list[str]:
    """Complete versions of a student, oldest first."""
    fs, root = _fs(store)
    _check_name(name)
    if fs is None:
        folder = root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir()
                 if p.is_dir() and VERSION_RE.match(p.name) and (p / "manifest.json").is_file()]
    else:
        folder = _join(root, name)
        if not fs.isdir(folder):
            return []
        found = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(folder, detail=False)]
        found = [v for v in found if VERSION_RE.match(v) and fs.exists(_join(folder, v, "manifest.json"))]
    return sorted(found, key=_version_key)


def _read_text(store: str | Path, *parts: str) -> str | None:
    fs, root = _fs(store)
    if fs is None:
        p = root.joinpath(*parts)
        return p.read_text() if p.is_file() else None
    path = _join(root, *parts)
    return fs.cat_file(path).decode() if fs.isfile(path) else None


def latest(store: str | Path, name: str) -> str | None:
    text = _read_text(store, _check_name(name), "latest")
    return text.strip() if text else None


def manifest(store: str | Path, name: str, version: str) -> dict[str, Any]:
    text = _read_text(store, _check_name(name), version, "manifest.json")
    if text is None:
        raise FileNotFoundError(f"{name}@{version} has no manifest in store {store}")
    return json.loads(text)


def latest_manifest(store: str | Path, name: str) -> dict[str, Any] | None:
    """The manifest of the version ``latest`` names, or None when nothing is published."""
    v = latest(store, name)
    return manifest(store, name, v) if v else None


def _set_latest(store: str | Path, name: str, version: str) -> None:
    fs, root = _fs(store)
    if fs is None:
        tmp = root / name / f".latest.tmp-{os.getpid()}"
        tmp.write_text(version + "\n")
        os.replace(tmp, root / name / "latest")
    else:
        fs.pipe_file(_join(root, name, "latest"), (version + "\n").encode())


def publish(store: str | Path, name: str, folder: Path, meta: dict[str, Any]) -> str:
    """Copy ``folder`` into the store as the next version with ``meta`` (plus file checksums) as its
    manifest.json; move ``latest`` to it. Returns the version. If the newest version holds the same files, it
    is reused (publishing is idempotent)."""
    fs, root = _fs(store)
    _check_name(name)
    files = checksums(folder)
    existing = versions(store, name)
    if existing and manifest(store, name, existing[-1]).get("files") == files:
        _set_latest(store, name, existing[-1])
        return existing[-1]
    n = _version_key(existing[-1]) + 1 if existing else 1
    if fs is None:
        (root / name).mkdir(parents=True, exist_ok=True)
        while True:
            version = f"v{n}"
            tmp = root / name / f".{version}.tmp-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(folder, tmp)
            full = {**meta, "name": name, "version": version, "files": files}
            (tmp / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
            try:
                os.rename(tmp, root / name / version)  # fails if another publisher took this version
                break
            except OSError:
                shutil.rmtree(tmp)
                n += 1
    else:
        while fs.exists(_join(root, name, f"v{n}")):  # a version folder, even one being uploaded, is taken
            n += 1
        version = f"v{n}"
        dest = _join(root, name, version)
        claim = _join(dest, f".claim-{uuid.uuid4().hex}")
        fs.pipe_file(claim, b"")
        claims = [c for c in fs.ls(dest, detail=False) if c.rsplit("/", 1)[-1].startswith(".claim-")]
        if len(claims) > 1:
            fs.rm_file(claim)
            raise RuntimeError(f"another process is publishing {name}@{version} to {store}; run export again")
        for rel in files:
            fs.put_file(str(folder / rel), _join(dest, rel))
        full = {**meta, "name": name, "version": version, "files": files}
        fs.pipe_file(_join(dest, "manifest.json"), (json.dumps(full, indent=2) + "\n").encode())
        fs.rm_file(claim)
    _set_latest(store, name, version)
    return version


def resolve(store: str | Path, spec: str) -> tuple[str, str]:
    """``NAME`` or ``NAME@VERSION`` to (name, version)."""
    name, _, version = spec.partition("@")
    _check_name(name)
    version = version or latest(store, name) or ""
    if not version:
        raise FileNotFoundError(f"no published versions of {name!r} in store {store}")
    if not VERSION_RE.match(version) or version not in versions(store, name):
        have = ", ".join(versions(store, name)) or "none"
        raise FileNotFoundError(f"{name}@{version} is not in store {store} (versions: {have})")
    return name, version


def verify(folder: Path) -> dict[str, Any]:
    """Check every file listed in folder/manifest.json; raise ChecksumError on any difference."""
    meta = json.loads((folder / "manifest.json").read_text())
    problems = []
    for rel, digest in meta["files"].items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = set(checksums(folder)) - set(meta["files"])
    problems += [f"{rel}: not in the manifest" for rel in sorted(extra)]
    if problems:
        raise ChecksumError(f"{folder}: " + "; ".join(problems))
    return meta


def pull(store: str | Path, spec: str, dest: str | Path) -> Path:
    """Copy a published version to the local folder ``dest`` and verify every checksum there; a mismatch
    leaves nothing at ``dest``."""
    name, version = resolve(store, spec)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"destination {dest} is not empty; pull into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.pull-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fs, root = _fs(store)
    if fs is None:
        shutil.copytree(root / name / version, tmp)
    else:
        src = _join(root, name, version)
        for path in fs.find(src):
            if not path.startswith(src + "/"):
                raise RuntimeError(f"unexpected path {path} listed under {src}")
            rel = path[len(src) + 1 :]
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(local))
    try:
        verify(tmp)
    except ChecksumError:
        shutil.rmtree(tmp)
        raise
    if dest.exists():
        dest.rmdir()
    os.rename(tmp, dest)
    return dest


def describe(version: dict[str, Any] | Path) -> list[str]:
    """A few readable lines about a version: its artefacts, quality, gate and lineage (from a manifest, or a
    pulled folder holding one)."""
    meta = json.loads((version / "manifest.json").read_text()) if isinstance(version, Path) else version
    lines = []
    arts = meta.get("artefacts") or []
    if arts:
        lines.append("artefacts: " + ", ".join(
            f"{a['format']} ({a['bytes'] / 1e6:.1f} MB"
            + (f", {a['points_vs_master']:+.1f} pts" if a.get("points_vs_master") and a["format"] != "master" else "")
            + ")" for a in arts))
    scores = meta.get("scores") or {}
    fns = scores.get("functions") or {}
    shown = [f"{fn} {100 * s[k]:.1f}%" + ("" if k == "quality" else f" ({k})") for fn, s in fns.items()
             for k in [next((k for k in ("quality", "exact_match") if s.get(k) is not None), None)] if k]
    if shown:
        lines.append("quality vs teacher: " + ", ".join(shown))
    if meta.get("gate"):
        lines.append(f"gate: {'passed' if meta['gate'].get('passed') else 'failed'}")
    lineage = meta.get("lineage") or {}
    if lineage:
        lines.append(f"lineage: recipe {lineage.get('recipe')}, base {lineage.get('base_model')}, teacher "
                     f"{', '.join(lineage.get('teacher_models') or []) or '?'}, data "
                     f"{str(lineage.get('data_sha256'))[:12]}, published {meta.get('created_at', '?')}")
    return lines


def list_store(store: str | Path) -> list[tuple[str, list[str], str | None]]:
    """(name, versions, latest) of every student in a store."""
    fs, root = _fs(store)
    if fs is None:
        if not root.is_dir():
            raise FileNotFoundError(f"store {store} does not exist")
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name))
    else:
        if not fs.isdir(root):
            raise FileNotFoundError(f"store {store} does not exist")
        names = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False) if fs.isdir(n))
        names = [n for n in names if NAME_RE.match(n)]
    return [(n, versions(store, n), latest(store, n)) for n in names]
