"""The artefact store: a folder of immutable, versioned students.

    <store>/<name>/v1/            the artefact files plus manifest.json (sha256 of every file)
    <store>/<name>/v2/
    <store>/<name>/latest         a one-line file naming the newest published version (replaced atomically)

A version is written to a temporary sibling and renamed into place, so it never appears half-written,
and an existing version is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


def versions(store: str | Path, name: str) -> list[str]:
    folder = Path(store) / _check_name(name)
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
    return sorted(found, key=lambda v: int(VERSION_RE.match(v).group(1)))


def latest(store: str | Path, name: str) -> str | None:
    p = Path(store) / _check_name(name) / "latest"
    return p.read_text().strip() if p.is_file() else None


def publish(store: str | Path, name: str, folder: Path, manifest: dict[str, Any]) -> str:
    """Copy ``folder`` into the store as the next version with ``manifest`` (plus file checksums); move
    ``latest`` to it. Returns the version. If the newest version holds the same files, it is reused."""
    root = Path(store) / _check_name(name)
    root.mkdir(parents=True, exist_ok=True)
    files = checksums(folder)
    existing = versions(store, name)
    if existing:
        prev = json.loads((root / existing[-1] / "manifest.json").read_text())
        if prev.get("files") == files:
            _set_latest(root, existing[-1])
            return existing[-1]
    n = int(VERSION_RE.match(existing[-1]).group(1)) + 1 if existing else 1
    while True:
        version = f"v{n}"
        tmp = root / f".{version}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(folder, tmp)
        full = {**manifest, "name": name, "version": version, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
        try:
            os.rename(tmp, root / version)  # fails if another publisher took this version
            break
        except OSError:
            shutil.rmtree(tmp)
            n += 1
    _set_latest(root, version)
    return version


def _set_latest(root: Path, version: str) -> None:
    tmp = root / f".latest.tmp-{os.getpid()}"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / "latest")


def resolve(store: str | Path, spec: str) -> tuple[str, str]:
    """``NAME`` or ``NAME@VERSION`` to (name, version)."""
    name, _, version = spec.partition("@")
    _check_name(name)
    version = version or latest(store, name) or ""
    if not version:
        raise FileNotFoundError(f"no published versions of {name!r} in store {store}")
    if not VERSION_RE.match(version) or not (Path(store) / name / version).is_dir():
        have = ", ".join(versions(store, name)) or "none"
        raise FileNotFoundError(f"{name}@{version} is not in store {store} (versions: {have})")
    return name, version


def verify(folder: Path) -> dict[str, Any]:
    """Check every file listed in folder/manifest.json; raise ChecksumError on any difference."""
    manifest = json.loads((folder / "manifest.json").read_text())
    problems = []
    for rel, digest in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = set(checksums(folder)) - set(manifest["files"])
    problems += [f"{rel}: not in the manifest" for rel in sorted(extra)]
    if problems:
        raise ChecksumError(f"{folder}: " + "; ".join(problems))
    return manifest


def pull(store: str | Path, spec: str, dest: str | Path) -> Path:
    """Copy a published version to ``dest`` and verify every checksum there."""
    name, version = resolve(store, spec)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"destination {dest} is not empty; pull into a new folder")
    tmp = dest.with_name(f".{dest.name}.pull-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(store) / name / version, tmp)
    try:
        verify(tmp)
    except ChecksumError:
        shutil.rmtree(tmp)
        raise
    if dest.exists():
        dest.rmdir()
    os.rename(tmp, dest)
    return dest


def list_store(store: str | Path) -> list[tuple[str, list[str], str | None]]:
    root = Path(store)
    if not root.is_dir():
        raise FileNotFoundError(f"store {store} does not exist")
    return [(p.name, versions(store, p.name), latest(store, p.name))
            for p in sorted(root.iterdir()) if p.is_dir() and NAME_RE.match(p.name)]
