"""Reading what is new in one source into batch files: files (skipping unchanged ones, reading a grown log file on
from the last whole line read, re-reading a rewritten one whole) or SQL rows (after the watermark), chunked and
converted inline or by worker processes, deduplicated by id. Files are never filtered by time: a late row or a new
file of old rows is harvested, and the record ids keep every record to once."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from curation.harvest.chunks import Chunk, ChunkResult, convert
from curation.harvest.sources import READ_ERRORS, LogFile, ends_a_line, line_blocks, row_batches, sample_hash
from curation.harvest.watermarks import Seen, SourceState
from pipeline.columns import map_value
from pipeline.config.harvest import Source
from pipeline.pii import Redaction

AUTO_WORKERS_ABOVE = 32 << 20  # bytes to read before worker processes pay off


class Runner:
    """Runs chunk conversions inline or in a process pool; results are handed back in submission order, and at
    most two chunks per worker are in flight, so memory stays bounded."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.pool = ProcessPoolExecutor(workers, mp_context=_context()) if workers > 1 else None
        self.pending: deque[tuple[Future, Callable[[ChunkResult], None]]] = deque()

    def submit(self, chunk: Chunk, done: Callable[[ChunkResult], None]) -> None:
        if self.pool is None:
            done(convert(chunk))
            return
        self.pending.append((self.pool.submit(convert, chunk), done))
        while len(self.pending) > 2 * self.workers:
            self._pop()

    def _pop(self) -> None:
        fut, done = self.pending.popleft()
        done(fut.result())

    def finish(self) -> None:
        while self.pending:
            self._pop()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _context() -> multiprocessing.context.BaseContext:
    """Workers fork from a clean server process that has imported the converter once (fast to start, pages
    shared); spawn where there is no fork."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["curation.harvest.chunks", "pipeline.pii"])
        return ctx
    return multiprocessing.get_context("spawn")


def auto_workers(configured: int, nbytes: int) -> int:
    """Worker processes to use: as configured, or (0) one per core for big inputs; 1 means none."""
    if configured:
        return configured
    return min(os.cpu_count() or 1, 8) if nbytes > AUTO_WORKERS_ABOVE else 1


@dataclass
class Ingest:
    """One source's share of this run: new batch files, counts, updated watermark."""

    src: Source
    key: str
    state: SourceState
    seen: Seen
    batch: int
    folder: Path  # the batches/ folder in the stage's work dir
    quarantine: IO[str]
    progress: Callable[[int], None] = lambda n: None
    counts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    functions: Counter[str] = field(default_factory=Counter)
    new_batches: list[str] = field(default_factory=list)
    unchanged_files: int = 0
    files_read: int = 0
    # Unfinished last lines left for the next run, of this source's files as listed now: (file, bytes, read now)
    held_back: list[tuple[str, int, bool]] = field(default_factory=list)
    part: int = 0
    pii: Redaction | None = None  # what to redact in every record before it is written (recipe's curate.pii)

    def __post_init__(self) -> None:
        # Only a SQL source filters by time (its query can do nothing else); files go by position and id.
        sql = self.src.sql is not None
        self.watermark_ms = self.state.max_ms if sql else None
        self.watermark_ids = frozenset(self.state.ids_at_max) if sql else frozenset()

    def chunk(self, label: str, origin: str, data: Any, numbers: Any, default_ts: datetime,
              growing: bool = False, file_range: tuple[str, int, int] | None = None) -> Chunk:
        name = f"b{self.batch:05d}-{self.key}-{self.part:05d}.parquet"
        self.part += 1
        return Chunk(self.src, label, origin, b"" if file_range else data, numbers, default_ts,
                     str(self.folder / name), self.watermark_ms, self.watermark_ids, growing, file_range, self.pii)

    def damaged(self, f: LogFile, line: int, why: str) -> None:
        """Quarantine the unreadable rest of a damaged file (one entry, counted as one row): what came before it
        was harvested, and the night goes on."""
        entry = {"source": self.src.name or self.src.label, "file": f.url, "line": line,
                 "reason": f"file damaged: cannot be read from here on ({why}); the rows before it were harvested"}
        self.quarantine.write(orjson.dumps(entry).decode() + "\n")
        self.counts.update(lines=1, quarantined=1)
        self.reasons["file damaged"] += 1

    def done(self, res: ChunkResult) -> None:
        """Fold one converted chunk in: quarantine, counts, duplicates, watermark."""
        for q in res.quarantine:
            self.quarantine.write(orjson.dumps(q).decode() + "\n")
        self.counts.update(lines=res.lines, quarantined=res.quarantined, skipped_old=res.skipped_old,
                           extra_choices=res.extra_choices)
        self.reasons.update(res.reasons)
        self.progress(res.lines)
        if res.out_path is None:
            return
        path = Path(res.out_path)
        keep = self.seen.keep(res.hashes)
        dups = int((~keep).sum())
        if dups:
            self.counts["duplicates"] += dups
            if not keep.any():
                _count_images(res, None)
                path.unlink()
                return
            table = pq.read_table(path)
            table = table.filter(keep)
            _count_images(res, table)
            tmp = path.with_suffix(".tmp")
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, path)
            self.functions.update(Counter(table["function"].to_pylist()))
        else:
            self.functions.update(res.functions)
        np.save(path.with_suffix(".ids.npy"), res.hashes[keep])
        self.counts["records"] += int(keep.sum())
        self.new_batches.append(path.name)
        st = self.state
        if res.max_ms is not None:
            if st.max_ms is None or res.max_ms > st.max_ms:
                st.max_ms, st.ids_at_max = res.max_ms, list(res.ids_at_max)
            elif res.max_ms == st.max_ms:
                st.ids_at_max = sorted(set(st.ids_at_max) | set(res.ids_at_max))


def _count_images(res: ChunkResult, kept: pa.Table | None) -> None:
    """A chunk's image notes counted over the records it keeps (a file read again whole counts its rows again,
    its records as duplicates: their images are not new)."""
    if not res.notes.get("images"):
        return
    values = map_value(kept, "tags", "has_images").to_pylist() if kept is not None else []
    parts = [int(v) for v in values if isinstance(v, str) and v.isdigit()]  # a client's own tag: not ours
    res.notes["images"], res.notes["records_with_images"] = sum(parts), len(parts)


def _mtime(f: LogFile) -> datetime:
    info = f.fs.info(f.path)
    t = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(t, datetime):
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    if isinstance(t, (int, float)):
        return datetime.fromtimestamp(int(t), tz=timezone.utc)
    return datetime(1970, 1, 1, tzinfo=timezone.utc)


def plan_file(f: LogFile, kind: str, old: dict[str, Any] | None, incremental: bool) -> tuple[str, int, int]:
    """('skip' | 'resume' | 'all', start byte, first line) for one file, given what an earlier run read of it:
    skip it unchanged; read a plain JSON-lines file on from its last whole line read when the part read is
    unchanged (it only grew, or an unfinished last line changed); else read it whole (new, rewritten, compressed,
    or not JSON lines), its rows deduplicated by id."""
    if not old or not incremental:
        return "all", 0, 1
    size = int(f.fs.info(f.path).get("size") or 0)
    if f.local:
        if size == old["size"] and sample_hash(f, size) == old["sample"]:
            return "skip", 0, 1
        offset = old["offset"]
        if (kind == "jsonl" and not f.compressed and size > offset
                and sample_hash(f, size, upto=offset) == old["read_sample"]):
            # After a whole last line that had no newline yet, what follows first ends that line.
            return "resume", offset, old["lines"] + (1 if ends_a_line(f, offset) else 0)
        return "all", 0, 1
    stamp = f.stamp()
    if size == old["size"] and (stamp["etag"] or stamp["mtime"]) == old.get("version"):
        return "skip", 0, 1
    return "all", 0, 1


def ingest_files(ing: Ingest, runner: Runner, files: list[LogFile], batch_size: int, incremental: bool) -> None:
    src = ing.src
    for f in files:
        kind = f.kind(src.file_format)
        old = ing.state.files.get(f.url)
        action, start, first_line = plan_file(f, kind, old, incremental)
        if action == "skip":
            assert old is not None
            ing.unchanged_files += 1
            if old.get("held_back"):
                ing.held_back.append((f.url, old["held_back"], False))
            continue
        ing.files_read += 1
        default_ts = _mtime(f)
        size = int(f.fs.info(f.path).get("size") or 0)
        if kind == "jsonl":
            growing = f.local and not f.compressed
            read_any, last = False, None
            for block in line_blocks(f, start, first_line, max_lines=batch_size):
                last = block
                def finish(res: ChunkResult, block=block, f=f, growing=growing, size=size) -> None:
                    ing.done(res)
                    if block.last:
                        held = 1 if res.held_back else 0
                        if growing:  # read up to the last whole line; the rest waits
                            _record_file(ing, f, block.end, block.end - res.held_back,
                                         block.first_line + block.lines - 1 - held, res.held_back)
                        else:
                            _record_file(ing, f, size, size, block.first_line + block.lines - 1)

                # A worker reads a local plain file's byte range itself rather than get it through a pipe.
                where = (f.path, block.end - len(block.data), block.end) if growing and runner.pool else None
                runner.submit(ing.chunk(f.name, f.url, block.data, block.first_line, default_ts,
                                        growing and block.last, where), finish)
                read_any = True
            if not read_any:  # an empty file, or nothing after the resume point
                _record_file(ing, f, start if growing else size, start if growing else size,
                             old["lines"] if action == "resume" and old else 0)
            if last is not None and last.damaged:
                runner.finish()  # its rows first, so the quarantine's order does not depend on the workers
                ing.damaged(f, last.first_line + last.lines, last.damaged)
        else:
            rows_seen = 0
            try:
                for numbers, rows in _rebatch(row_batches(f, kind), batch_size):
                    runner.submit(ing.chunk(f.name, f.url, rows, numbers, default_ts), ing.done)
                    rows_seen = numbers[-1]
            except (*READ_ERRORS, ValueError) as err:  # ValueError: pyarrow's ArrowInvalid on a corrupt Parquet file
                runner.finish()
                ing.damaged(f, rows_seen + 1, f"{type(err).__name__}: {err}"[:200])
            _record_file(ing, f, size, size, rows_seen)


def _record_file(ing: Ingest, f: LogFile, size: int, offset: int, lines: int, held_back: int = 0) -> None:
    """How far a file was read: its size then and a hash of it (to skip it unchanged), the byte past the last
    whole line read (the whole size for compressed and non-JSON-lines files), the lines before it and a hash of
    that part (to read on from there), the bytes of an unfinished last line held back; for remote files their ETag
    or modification time."""
    stamp = f.stamp() if not f.local else {}
    sample = sample_hash(f, size) if f.local else ""
    ing.state.files[f.url] = {
        "size": size, "sample": sample, "offset": offset, "lines": lines,
        "read_sample": (sample if offset == size else sample_hash(f, offset)) if f.local else "",
        "held_back": held_back,
        "version": (stamp.get("etag") or stamp.get("mtime")) if stamp else "",
    }
    if held_back:
        ing.held_back.append((f.url, held_back, True))


def _rebatch(batches: Iterator[tuple[list[int], list[dict[str, Any]]]], size: int
             ) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
    numbers: list[int] = []
    rows: list[dict[str, Any]] = []
    for n, r in batches:
        numbers.extend(n)
        rows.extend(r)
        if len(rows) >= size:
            yield numbers, rows
            numbers, rows = [], []
    if rows:
        yield numbers, rows


def ingest_sql(ing: Ingest, runner: Runner, batch_size: int, incremental: bool) -> None:
    from curation.harvest.sql_source import encode_watermark, label, read_rows

    loc = ing.src.sql
    assert loc is not None
    since = ing.state.sql_max if incremental else None
    now = datetime.now(timezone.utc).replace(microsecond=0)
    name = label(loc)
    top = None
    for numbers, rows, newest in read_rows(loc, since, batch_rows=min(batch_size, 10_000)):
        runner.submit(ing.chunk(name, f"sql:{name}", rows, numbers, now), ing.done)
        top = newest
    runner.finish()
    if top is not None:
        ing.state.sql_max = encode_watermark(top)
    ing.files_read += 1

