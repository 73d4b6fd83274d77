"""The run directory: stage folders, their manifests and fingerprints, atomic completion, and the lock.

A stage works in ``<run>/.partial/<stage>`` and, when done, writes ``manifest.json`` there and renames
the folder to ``<run>/<stage>``. Only a folder with a complete manifest counts as done, so a killed
stage leaves nothing that looks complete; the partial folder is kept for a rerun with the same
fingerprint (training resumes from its checkpoints) and wiped when the fingerprint changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pipeline import __version__


class RunLockedError(RuntimeError):
    """Another process holds the run directory."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksums(folder: Path, skip: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    """sha256 of every file under a folder, keyed by relative path (checkpoints/ excluded)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip and not rel.startswith("checkpoints/"):
            out[rel] = sha256_file(p)
    return out


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(config: Any, inputs: dict[str, str]) -> str:
    """Hash of a stage's config, its inputs' content hashes and the package version."""
    blob = json.dumps({"config": config, "inputs": inputs, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


class RunDir:
    """One recipe's run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def partial_dir(self, stage: str) -> Path:
        return self.path / ".partial" / stage

    def manifest(self, stage: str) -> dict[str, Any] | None:
        """The manifest of a completed stage, or None."""
        p = self.stage_dir(stage) / "manifest.json"
        if not p.is_file():
            return None
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None
        return m if m.get("status") == "complete" else None

    def partial_info(self, stage: str) -> dict[str, Any] | None:
        p = self.partial_dir(stage) / ".started.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def begin(self, stage: str, fp: str) -> Path:
        """Prepare the partial folder of a stage: kept if it belongs to the same fingerprint."""
        work = self.partial_dir(stage)
        info = self.partial_info(stage)
        if work.exists() and (info is None or info.get("fingerprint") != fp):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / ".started.json", {"fingerprint": fp, "started": time.time(), "pid": os.getpid()})
        return work

    def complete(self, stage: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (with output checksums) and move the partial folder into place."""
        work = self.partial_dir(stage)
        (work / ".started.json").unlink(missing_ok=True)
        outputs = checksums(work)
        sizes = {rel: (work / rel).stat().st_size for rel in outputs}
        manifest = {**manifest, "status": "complete", "outputs": outputs, "sizes": sizes}
        write_json_atomic(work / "manifest.json", manifest)
        final = self.stage_dir(stage)
        if final.exists():
            old = self.path / ".partial" / f"{stage}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(work, final)
            shutil.rmtree(old)
        else:
            os.replace(work, final)
        return manifest

    def damaged(self, stage: str, manifest: dict[str, Any], verify: bool = False) -> str | None:
        """Why a complete stage's outputs are not what its manifest recorded (None when they are): a file named
        in the manifest is missing or has another size, or (``verify``) another sha256. Manifests written before
        sizes were recorded are checked for presence (and sha256 when verifying)."""
        folder, sizes = self.stage_dir(stage), manifest.get("sizes") or {}
        for rel, sha in (manifest.get("outputs") or {}).items():
            path = folder / rel
            if not path.is_file():
                return f"{stage}/{rel} is missing"
            if rel in sizes and path.stat().st_size != sizes[rel]:
                return f"{stage}/{rel} has {path.stat().st_size:,} bytes, the manifest says {sizes[rel]:,}"
            if verify and sha256_file(path) != sha:
                return f"{stage}/{rel} does not match its sha256 in the manifest"
        return None

    def locked(self) -> bool:
        """Whether a process holds the run directory's lock now (a stage of it is running)."""
        lock_path = self.path / ".lock"
        if not lock_path.is_file():
            return False
        fd = os.open(lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing the descriptor releases a lock taken here
        return False

    @contextmanager
    def lock(self, command: str = "") -> Iterator[None]:
        """Hold an exclusive lock on the run directory; fail at once with who holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # the holder's text stays for the next one refused
            os.close(fd)
            holder = Path(lock_path).read_text().strip() or "another process"
            raise RunLockedError(
                f"run directory {self.path} is in use by {holder}. Wait for that run to finish "
                "(the lock is released as soon as its process exits)."
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(
                fd,
                f"pid {os.getpid()} on {socket.gethostname()} ({command or ' '.join(sys.argv)}), "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(),
            )
            yield
        finally:
            with suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
