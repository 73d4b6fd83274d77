"""serve-router's logs: one JSON object per line, each line appended with one ``write`` on a file opened with
``O_APPEND`` under an exclusive ``flock``, so several proxy processes (``--processes``) can share a log folder
without interleaving lines, and a killed proxy leaves at most one torn last line. On a local file system: NFS does
not keep O_APPEND writes whole.

- ``<route>-<date>.jsonl`` (student, teacher): ``{id, timestamp, status_code, latency_ms, request, response,
  routing}``, harvest's format;
- ``errors-<date>.jsonl``: refused or failed requests, never their body;
- ``passthrough-<date>.jsonl``: calls passed to the teacher unchanged (``--pass-through``), never their body;
- ``live-<date>.jsonl``: the live loop's audit and shadow scores, dropped or failed background work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from export.route.audit import live_line
from export.route.jsonio import dumps


class CallLog:
    """The log files of one log folder (UTC dates in their names)."""

    def __init__(self, log_dir: Path):
        self.dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        end_torn_lines(log_dir)
        with _SPARE_LOCK:
            _take_spare()
        self.failures: dict[str, Any] = {"n": 0, "last": None, "at": None}  # /health's
        self._warned_at = 0.0
        self._lock = threading.Lock()

    def _append(self, path: Path, data: str | bytes) -> None:
        """Append a line; a line that cannot be written (disk full, folder unwritable) is counted and shown in
        /health and on stderr (once a minute), never raised: the client's answer exists, and an audit worker must
        not die on it."""
        try:
            append_line(path, data)
        except OSError as err:
            now = time.time()
            with self._lock:
                self.failures.update(n=self.failures["n"] + 1, last=f"{path.name}: {err}"[:300],
                                     at=datetime.now(timezone.utc).isoformat())
                warn = now - self._warned_at >= 60
                if warn:
                    self._warned_at = now
            if warn:  # stderr may be a file on the same full disk: that must not fail the request either
                with contextlib.suppress(OSError, ValueError):
                    print(f"distill serve-router: cannot write its log ({self.failures['n']} lines lost so far): "
                          f"{path}: {err}", file=sys.stderr, flush=True)

    def failing(self, within_s: float = 60.0) -> bool:
        """Whether a line could not be written within the last ``within_s`` seconds."""
        return lately(self.failures["at"], within_s)


    def error(self, request: web.Request, rid: str, resp: web.Response) -> None:
        """A refused or failed request, in errors-<date>.jsonl (never its body: it may hold anything)."""
        now = datetime.now(timezone.utc)
        try:
            message = json.loads(resp.body)["error"]["message"]
        except (TypeError, ValueError, KeyError):
            message = ""
        line = {"id": rid, "timestamp": now.isoformat(), "status_code": resp.status, "method": request.method,
                "path": request.path[:200], "error": message[:500]}
        self._append(self.dir / f"errors-{now:%Y-%m-%d}.jsonl", json.dumps(line, ensure_ascii=False) + "\n")

    def call(self, request: dict[str, Any], status: int, response: dict[str, Any], latency_ms: float,
             routing: dict[str, Any]) -> str:
        """One call in <route>-<date>.jsonl (harvest's format); returns its id."""
        now = datetime.now(timezone.utc)
        line = {"id": response.get("id") or f"distill-{uuid.uuid4().hex}", "timestamp": now.isoformat(),
                "status_code": status, "latency_ms": round(latency_ms, 1), "request": request, "response": response,
                "routing": routing}
        path = self.dir / f"{routing['route']}-{now:%Y-%m-%d}.jsonl"
        self._append(path, dumps(line, default=str) + b"\n")
        return line["id"]

    def passthrough(self, request: web.Request, rid: str, status: int, latency_ms: float, sent: int,
                    error: str = "") -> None:
        """A passed-through call in passthrough-<date>.jsonl (never its body or query: they may hold anything)."""
        now = datetime.now(timezone.utc)
        line = {"id": rid, "timestamp": now.isoformat(), "method": request.method, "path": request.path[:200],
                "status_code": status, "latency_ms": round(latency_ms, 1), "bytes_out": sent}
        if error:
            line["error"] = error[:500]
        self._append(self.dir / f"passthrough-{now:%Y-%m-%d}.jsonl", dumps(line) + b"\n")

    def live(self, record: dict[str, Any]) -> None:
        """One live-loop record (audit and shadow scores, dropped or failed work) in live-<date>.jsonl."""
        self._append(self.dir / f"live-{datetime.now(timezone.utc):%Y-%m-%d}.jsonl", live_line(record))


def lately(at: str | None, within_s: float) -> bool:
    """Whether the ISO time ``at`` (None: never) is within the last ``within_s`` seconds."""
    return at is not None and (datetime.now(timezone.utc) - datetime.fromisoformat(at)).total_seconds() < within_s


FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT
_SPARE: int | None = None  # a descriptor held back for a log line when the process has run out of them
_SPARE_LOCK = threading.Lock()


def _take_spare() -> None:
    global _SPARE
    if _SPARE is None:
        with contextlib.suppress(OSError):  # out of descriptors now: taken at the next line
            _SPARE = os.open(os.devnull, os.O_RDONLY)


def append_line(path: Path, line: str | bytes) -> None:
    """Append one line in one write on an O_APPEND descriptor. When the process is out of descriptors (EMFILE,
    or ENFILE for the system: too many connections at once), the spare one is given up for this line and taken back after, so a request
    that failed for want of a descriptor is still logged."""
    global _SPARE
    data = line.encode("utf-8") if isinstance(line, str) else line
    try:
        fd = os.open(path, FLAGS, 0o666)  # less the umask, as open() does
    except OSError as err:
        if err.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        with _SPARE_LOCK:
            if _SPARE is None:
                raise
            spare, _SPARE = _SPARE, None
            os.close(spare)
            try:
                _write(os.open(path, FLAGS, 0o666), data)
            finally:
                _take_spare()
        return
    _write(fd, data)
    if _SPARE is None:
        with _SPARE_LOCK:
            _take_spare()


LOG_KINDS = ("student-", "teacher-", "live-", "errors-", "passthrough-")


def end_torn_lines(log_dir: Path) -> int:
    """End the torn last line (a proxy killed mid-write) of every log file in ``log_dir``, so that harvest
    quarantines it as one bad line; returns how many. A later write ends today's file's anyway, but nothing is
    written to an earlier day's again: its torn line was held back as unfinished on every night for ever."""
    ended = 0
    for path in sorted(log_dir.glob("*.jsonl")):
        if not path.name.startswith(LOG_KINDS) or not path.is_file():
            continue
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a write in progress holds it: its line is not torn
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    os.write(fd, b"\n")
                    ended += 1
            finally:
                os.close(fd)
    return ended


def _write(fd: int, data: bytes) -> None:
    """Write under an exclusive lock, then close. A file that ends in a torn line (a proxy killed mid-write) gets
    a newline first: the torn line stays one bad line that harvest quarantines, instead of swallowing this one."""
    try:
        # Locked: without it, another process's write still in progress (the size grows page by page) would look
        # like a torn line here and get a stray newline.
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
