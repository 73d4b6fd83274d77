"""Where rows come from: files named by a path, directory, glob or fsspec URL (JSON lines, Parquet, CSV, gzip'd or
not), read in chunks so memory stays bounded whatever the file size.

A JSON-lines file is read as raw byte blocks cut at line ends (the parsing happens in ``curation.harvest.chunks``, possibly
in worker processes); Parquet and CSV files as lists of row dicts; ``.json`` files as whole JSON documents (an
array is a row per element), or as JSON lines where the file is not one document.
"""

from __future__ import annotations

import csv
import hashlib
import io
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import orjson
from fsspec.implementations.local import LocalFileSystem

from curation.harvest.importers.common import BadRecord, Lenient, Parsed, loads_fallback, loads_row
from pipeline.config.harvest import Location

LOG_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz", ".parquet", ".csv", ".csv.gz")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd")
SAMPLE = 1 << 20  # bytes hashed at each end of a big file


class MissingExtra(ImportError, ValueError):
    """A location needs an optional dependency (an fsspec backend, a database driver) that is not installed."""


def _missing_extra(err: Exception, url: str) -> Exception:
    return MissingExtra(f"reading {url!r} needs an fsspec backend that is not installed ({err}). For s3:// "
                       "install the 'cloud' extra: pip install -c constraints.txt -e '.[cloud]'")


@dataclass(frozen=True)
class LogFile:
    fs: Any
    path: str

    @property
    def url(self) -> str:
        """The file as the user would name it (local paths stay paths)."""
        return self.path if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def compressed(self) -> bool:
        return self.path.endswith(COMPRESSED)

    def open(self) -> Any:
        return self.fs.open(self.path, "rb", compression="infer")

    def kind(self, file_format: str) -> str:
        if file_format != "auto":
            return file_format
        stem = self.path
        for c in COMPRESSED:
            stem = stem.removesuffix(c)
        if stem.endswith(".json"):
            return "json"  # JSON documents: an object, or an array of rows (JSON lines too, see json_rows)
        return "parquet" if stem.endswith(".parquet") else "csv" if stem.endswith(".csv") else "jsonl"

    def stamp(self) -> dict[str, Any]:
        """What identifies this version of the file cheaply: size, modification time (or ETag) and a hash of the
        first and last MiB."""
        info = self.fs.info(self.path)
        size = int(info.get("size") or 0)
        out: dict[str, Any] = {"size": size, "mtime": str(info.get("mtime") or info.get("LastModified") or ""),
                               "etag": str(info.get("ETag") or info.get("etag") or "")}
        if self.local:
            out["sample"] = sample_hash(self, size)
        return out

    def content_hash(self, full_below: int = 256 << 20) -> str:
        """sha256 of a local file (of its size and first and last MiB past 256 MiB); size and ETag elsewhere."""
        if not self.local:
            s = self.stamp()
            return f"{s['size']}:{s['etag'] or s['mtime']}"
        size = self.fs.size(self.path)
        if size > full_below:
            return f"{size}:{sample_hash(self, size)}"
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()


def sample_hash(f: LogFile, size: int, upto: int | None = None) -> str:
    """Hash of the first and the last MiB before ``upto`` (default: the end) of a file."""
    end = size if upto is None else upto
    h = hashlib.sha256()
    with f.fs.open(f.path, "rb") as fh:
        h.update(fh.read(min(SAMPLE, end)))
        if end > SAMPLE:
            fh.seek(max(SAMPLE, end - SAMPLE))
            h.update(fh.read(end - max(SAMPLE, end - SAMPLE)))
    return h.hexdigest()[:32]


def ends_a_line(f: LogFile, offset: int) -> bool:
    """Whether byte ``offset`` of a plain file starts a line: the start of the file, or just past a newline (else the
    last line read there was whole but had no newline yet, and what follows it first ends that line)."""
    if offset <= 0:
        return True
    with f.fs.open(f.path, "rb") as fh:
        fh.seek(offset - 1)
        return fh.read(1) == b"\n"


def list_files(loc: Location, what: str = "harvest.sources") -> list[LogFile]:
    """The files a location names (a file, a directory, a glob, an fsspec URL), sorted."""
    assert loc.path is not None
    try:
        fs, _, paths = fsspec.get_fs_token_paths(loc.path)
    except (ImportError, ValueError) as err:
        if "protocol" in str(err).lower() or isinstance(err, ImportError):
            raise _missing_extra(err, loc.path) from None
        raise
    if "*" in loc.path:  # a glob, as fsspec tells one; its expansion above keeps files only, the glob folders too
        paths = fs.glob(loc.path.rstrip("/"))
        if loc.path.endswith("/"):
            paths = [p for p in paths if fs.isdir(p)]
    # A folder, named or matched by a glob (several replicas' log folders: logs/*), is read whole; once per file
    # (logs/** matches every folder above a file too)
    paths = sorted({f for p in paths
                    for f in ([x for x in fs.find(p) if x.endswith(LOG_SUFFIXES)] if fs.isdir(p) else [p])})
    if not paths:
        raise FileNotFoundError(f"{what}: no files match {loc.path!r}")
    return [LogFile(fs, p) for p in paths]


# What reading a damaged file raises: a truncated or corrupt compressed stream, a file that is not what its suffix
# says (gzip.BadGzipFile is an OSError), an I/O error.
READ_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


@dataclass
class Block:
    """A run of whole lines of one file: ``data`` starts at line ``first_line`` and ends at byte ``end``."""

    data: bytes
    first_line: int
    lines: int
    end: int
    last: bool  # holds the end of the file (or of what could be read of it)
    damaged: str | None = None  # why the file could not be read past this block (the last one)


def _read_some(fh: Any, n: int) -> tuple[bytes, str | None]:
    """Up to n bytes, and None; from a damaged stream, the bytes decoded before the damage and why. read1 hands
    data over as it is decoded, so a truncated .gz keeps everything before the cut."""
    read1 = getattr(fh, "read1", None)
    parts: list[bytes] = []
    got = 0
    try:
        if read1 is None:
            return fh.read(n), None
        while got < n:
            part = read1(n - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    except READ_ERRORS as err:
        return b"".join(parts), f"{type(err).__name__}: {err}"[:200]
    return b"".join(parts), None


def line_blocks(f: LogFile, start: int = 0, first_line: int = 1, max_lines: int = 50_000,
                max_bytes: int = 32 << 20, read_size: int = 4 << 20) -> Iterator[Block]:
    """Blocks of whole lines from byte ``start`` of a (decompressed) file; at most about max_lines lines or
    max_bytes bytes each."""
    with f.open() as fh:
        if start:
            fh.seek(start)
        pending: list[bytes] = []
        pending_bytes = pending_lines = 0
        pos = start
        tail = b""
        while True:
            data, damaged = _read_some(fh, read_size)
            eof = not data or damaged is not None  # a damaged file ends where the damage starts
            buf = tail + data
            cut = buf.rfind(b"\n") + 1 if damaged or not eof else len(buf)
            whole, tail = buf[:cut], buf[cut:]
            if whole:
                pending.append(whole)
                pending_bytes += len(whole)
                pending_lines += whole.count(b"\n") + (0 if whole.endswith(b"\n") else 1)
            if (pending and (eof or pending_lines >= max_lines or pending_bytes >= max_bytes)) or damaged:
                blob = b"".join(pending)
                pos += len(blob)
                yield Block(blob, first_line, pending_lines, pos, eof, damaged)
                first_line += pending_lines
                pending, pending_bytes, pending_lines = [], 0, 0
            if eof:
                return


def json_rows(data: bytes) -> tuple[list[int], list[Any]]:
    """(row numbers, rows) of a ``.json`` file, read as a whole: one JSON document -- an array is a row per
    element (numbered from 1), anything else one row -- else, when the file is not one document, JSON lines
    (numbered by line). Rows are ``Parsed`` objects (``Lenient`` where read leniently), other JSON values, or the
    ``BadRecord`` of a line that is not JSON."""
    try:
        doc, lenient = orjson.loads(data), False
    except orjson.JSONDecodeError as err:
        try:
            doc, lenient = loads_fallback(data, err)
        except BadRecord:
            return _json_lines(data)
    wrap = Lenient if lenient else Parsed
    items = doc if isinstance(doc, list) else [doc]
    return list(range(1, len(items) + 1)), [wrap(x) if isinstance(x, dict) else x for x in items]


def _json_lines(data: bytes) -> tuple[list[int], list[Any]]:
    numbers: list[int] = []
    rows: list[Any] = []
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw or raw.isspace():
            continue
        numbers.append(i)
        try:
            row = orjson.loads(raw)
            rows.append(Parsed(row) if isinstance(row, dict) else row)
        except orjson.JSONDecodeError as err:
            try:
                row = loads_row(raw, err)
                rows.append(Parsed(row) if type(row) is dict else row)
            except BadRecord as bad:
                rows.append(bad)
    return numbers, rows


def row_batches(f: LogFile, kind: str, batch_rows: int = 10_000) -> Iterator[tuple[list[int], list[Any]]]:
    """(row numbers, rows) of a Parquet, CSV or JSON-document file: Parquet rows count from 1, CSV rows by the
    line where the row starts (the header is line 1), JSON documents as ``json_rows`` says."""
    if kind == "json":
        with f.open() as fh:
            numbers, rows = json_rows(fh.read())
        for i in range(0, len(rows), batch_rows):
            yield numbers[i:i + batch_rows], rows[i:i + batch_rows]
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        with f.open() as fh:
            row = 1
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows):
                rows = batch.to_pylist()
                yield list(range(row, row + len(rows))), rows
                row += len(rows)
        return
    with f.open() as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="replace", newline="")  # -sig: drop a BOM
        reader = csv.DictReader(text)
        numbers: list[int] = []
        rows: list[dict[str, Any]] = []
        start = 2
        for r in reader:
            numbers.append(start)
            start = reader.line_num + 1
            rows.append({k: (v if v != "" else None) for k, v in r.items() if k is not None})
            if len(rows) >= batch_rows:
                yield numbers, rows
                numbers, rows = [], []
        if rows:
            yield numbers, rows
