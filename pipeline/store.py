"""The artefact store: immutable, versioned students in a folder or at an fsspec URL.

    <store>/<name>/v1/            the artefact files, README.md (model card) and manifest.json (sha256 of each file)
    <store>/<name>/v2/
    <store>/<name>/latest         one line naming the newest published version
    <store>/<name>/index.json     {version: sha256 of its manifest.json}: what pull checks the manifest against
    <store>/<name>/vN/manifest.sig  optional ed25519 signature of manifest.json (base64), by the publisher's key

A store is a local folder (``store``, ``/srv/models``, ``file:///srv/models``) or any fsspec URL
(``s3://bucket/models`` with the ``cloud`` extra, ``memory://models``). On a local filesystem a version is
written to a temporary sibling and renamed into place, and ``latest`` is replaced with an atomic rename. Object
stores have no rename: there the files are uploaded first and ``manifest.json`` last, and only a version folder
holding a manifest counts, so a half-uploaded version is never listed or pulled; ``latest`` is one object
written in one request. An existing version is never overwritten.

Pulling trusts nothing it did not check: the manifest must match its sha256 in the index (and, asked, a valid
signature by the platform team's public key), every file must match the manifest, names may not leave the version
folder, and links are refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.config.base import NAME_RE
from pipeline.rundir import checksums, sha256_file

VERSION_RE = re.compile(r"v(\d+)\Z")  # \Z, not $: "v3\n" is no version name


INDEX = "index.json"
SIGNATURE = "manifest.sig"
NOT_ARTEFACT = ("manifest.json", SIGNATURE)  # beside the artefact's files, not listed in the manifest


class ChecksumError(RuntimeError):
    """A pulled version does not match what the store recorded (files, manifest, index or signature)."""


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
    """The version ``latest`` names (None when nothing is published); a link or a line that is not a version
    name is refused without echoing what it holds."""
    fs, root = _fs(store)
    if fs is None and (root / _check_name(name) / "latest").is_symlink():
        raise ChecksumError(f"{name}/latest in store {store} is a link; a store's latest is a plain file")
    text = _read_text(store, _check_name(name), "latest")
    if not text:
        return None
    version = text.strip()
    if not VERSION_RE.match(version):
        raise ChecksumError(f"{name}/latest in store {store} does not name a version (expected v<N>)")
    return version


def manifest(store: str | Path, name: str, version: str) -> dict[str, Any]:
    text = _read_text(store, _check_name(name), version, "manifest.json")
    if text is None:
        raise FileNotFoundError(f"{name}@{version} has no manifest in store {store}")
    return _parse_manifest(text, f"{name}@{version} in store {store}")


def _parse_manifest(text: str, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ChecksumError(f"{where}: manifest.json is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta["files"].items()):
        raise ChecksumError(f"{where}: manifest.json has no 'files' map of name -> sha256")
    return meta


def read_index(store: str | Path, name: str) -> dict[str, str]:
    """{version: sha256 of its manifest.json} (empty for a store written before the index existed)."""
    text = _read_text(store, _check_name(name), INDEX)
    try:
        index = json.loads(text) if text else {}
    except ValueError:
        raise ChecksumError(f"{name}/{INDEX} in store {store} is not valid JSON") from None
    return index if isinstance(index, dict) else {}


def _write_index(store: str | Path, name: str, version: str, manifest_sha: str) -> None:
    fs, root = _fs(store)
    index = {**read_index(store, name), version: manifest_sha}
    data = json.dumps(index, indent=2, sort_keys=True) + "\n"
    if fs is None:
        tmp = root / name / f".{INDEX}.tmp-{os.getpid()}"
        tmp.write_text(data)
        os.replace(tmp, root / name / INDEX)
    else:
        fs.pipe_file(_join(root, name, INDEX), data.encode())


def sign(manifest_bytes: bytes, private_key_pem: bytes) -> str:
    """An ed25519 signature of a manifest, base64 (the key: PEM, e.g. `openssl genpkey -algorithm ed25519`)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key is not an ed25519 private key (make one with: openssl genpkey -algorithm ed25519)")
    return base64.b64encode(key.sign(manifest_bytes)).decode() + "\n"


def check_signature(folder: Path, public_key_pem: bytes, where: str | None = None) -> None:
    """Raise ChecksumError unless folder/manifest.sig is a valid ed25519 signature of folder/manifest.json."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key is not an ed25519 key (openssl pkey -in KEY -pubout gives it)")
    where = where or str(folder)
    sig = folder / SIGNATURE
    if not sig.is_file():
        raise ChecksumError(f"{where}: the version is not signed ({SIGNATURE} missing)")
    try:
        key.verify(base64.b64decode(sig.read_text().strip(), validate=True), (folder / "manifest.json").read_bytes())
    except (InvalidSignature, ValueError):
        raise ChecksumError(f"{where}: {SIGNATURE} is not a valid signature of manifest.json by this key") from None


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


def _clean_stale(folder: Path) -> None:
    """Remove temporaries left by a publish that was killed (their process is gone)."""
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running: another publisher's work in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _manifest_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=2) + "\n").encode()


def publish(store: str | Path, name: str, folder: Path, meta: dict[str, Any],
            signing_key: bytes | None = None) -> str:
    """Copy ``folder`` into the store as the next version with ``meta`` (plus file checksums) as its
    manifest.json, record the manifest's sha256 in the index, sign it when a key is given, and move ``latest``
    to it. Returns the version. If the newest version holds the same files, it is reused (idempotent)."""
    fs, root = _fs(store)
    _check_name(name)
    files = checksums(folder, skip=NOT_ARTEFACT)
    existing = versions(store, name)
    if existing and manifest(store, name, existing[-1]).get("files") == files:
        _set_latest(store, name, existing[-1])
        return existing[-1]
    n = _version_key(existing[-1]) + 1 if existing else 1
    if fs is None:
        (root / name).mkdir(parents=True, exist_ok=True)
        _clean_stale(root / name)
        while True:
            version = f"v{n}"
            tmp = root / name / f".{version}.tmp-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(folder, tmp)
            data = _manifest_bytes({**meta, "name": name, "version": version, "files": files})
            (tmp / "manifest.json").write_bytes(data)
            if signing_key is not None:
                (tmp / SIGNATURE).write_text(sign(data, signing_key))
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
        data = _manifest_bytes({**meta, "name": name, "version": version, "files": files})
        if signing_key is not None:
            fs.pipe_file(_join(dest, SIGNATURE), sign(data, signing_key).encode())
        fs.pipe_file(_join(dest, "manifest.json"), data)
        fs.rm_file(claim)
    _write_index(store, name, version, hashlib.sha256(data).hexdigest())
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


def _inside(folder: Path, rel: str) -> bool:
    """Whether a manifest's file name stays inside the version folder (no absolute paths, no '..')."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts and "\\" not in rel


def verify(folder: Path, manifest_sha256: str | None = None, public_key: bytes | None = None,
           label: str | None = None) -> dict[str, Any]:
    """Check folder/manifest.json (against its sha256 from the store's index and, given a public key, its
    signature) and every file it lists; raise ChecksumError on any difference, a link, or a name that leaves
    the folder. Messages name ``label`` (e.g. NAME@VERSION) instead of the folder when given."""
    where = label or str(folder)
    links = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink()]
    if links:
        raise ChecksumError(f"{where}: links are not allowed in a version ({', '.join(sorted(links)[:5])})")
    path = folder / "manifest.json"
    if not path.is_file():
        raise ChecksumError(f"{where}: manifest.json is missing")
    data = path.read_bytes()
    if manifest_sha256 is not None and hashlib.sha256(data).hexdigest() != manifest_sha256:
        raise ChecksumError(f"{where}: manifest.json does not match its sha256 in the store's index")
    if public_key is not None:
        check_signature(folder, public_key, where)
    meta = _parse_manifest(data.decode("utf-8", "replace"), where)
    problems = [f"{rel!r}: leaves the version folder" for rel in meta["files"] if not _inside(folder, rel)]
    if problems:
        raise ChecksumError(f"{where}: " + "; ".join(problems[:5]))
    for rel, digest in meta["files"].items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = set(checksums(folder, skip=NOT_ARTEFACT)) - set(meta["files"])
    problems += [f"{rel}: not in the manifest" for rel in sorted(extra)]
    if problems:
        raise ChecksumError(f"{where}: " + "; ".join(problems))
    return meta


def pull(store: str | Path, spec: str, dest: str | Path, public_key: bytes | None = None,
         require_signature: bool = False) -> Path:
    """Copy a published version to the local folder ``dest`` and verify it there (the manifest against the
    store's index, its signature when a public key is given, every file against the manifest); a mismatch leaves
    nothing at ``dest``. ``require_signature`` refuses a version without a valid signature."""
    if require_signature and public_key is None:
        raise ValueError("require_signature needs the publisher's public key")
    name, version = resolve(store, spec)
    expected = read_index(store, name).get(version)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"destination {dest} is not empty; pull into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.pull-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fs, root = _fs(store)
    if fs is None:
        src = root / name / version
        if src.is_symlink() or not src.resolve().is_relative_to((root / name).resolve()):
            raise ChecksumError(f"{name}@{version} in store {store} is a link out of the store; refusing to pull it")
        shutil.copytree(src, tmp, symlinks=True)
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
        verify(tmp, expected, public_key, f"{name}@{version} from {store}")
    except (ChecksumError, ValueError):
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
