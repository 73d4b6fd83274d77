"""One chunk of rows -> canonical records in a Parquet file: the unit of work of the harvest stage, run inline or
in worker processes.

A chunk is a block of JSON lines (raw bytes) or a list of row dicts (Parquet, CSV, SQL). Each row is parsed by
its source's importer; a row that fails is quarantined with its file, line and reason (never its text), and the
rest go on. Records at or before a SQL source's watermark are skipped here (files are not filtered by time); duplicates
against earlier chunks and batches are dropped by the caller, which sees every chunk's id hashes.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.harvest.importers import common
from curation.harvest.importers.common import (
    LENIENT,
    BadRecord,
    Lenient,
    NotACall,
    Parsed,
    decode_json_text,
    loads_row,
)
from curation.harvest.importers.formats import IMPORTERS, has_timestamps
from curation.harvest.importers.openai import fast_row
from pipeline.config.harvest import Source
from pipeline.pii import Redaction
from pipeline.record import record_row, rows_to_table

NOT_CALLS_PREFIX = "not_calls:"
ROW_GROUP = 10_000  # records converted and written at a time: bounds the memory of a chunk


def id_hash(rid: str) -> int:
    """A stable 64-bit hash of a record id (duplicate detection across chunks and nightly batches)."""
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little")


@dataclass
class Chunk:
    cfg: Source
    label: str  # file name or table, for record.source ("<label>:<line>")
    origin: str  # file URL or "sql:<table>", for quarantine lines
    data: bytes | list[dict[str, Any]]
    numbers: int | list[int]  # first line of a byte block, or each row's number
    default_ts: datetime  # for formats without a time per record (file modification time)
    out_path: str | None  # where the Parquet file goes (nothing is written for an empty chunk)
    watermark_ms: int | None = None  # skip records older than this (and at it, when their id was seen)
    watermark_ids: frozenset[str] = frozenset()
    may_be_growing: bool = False  # the block ends a plain file still being written: a partial last line waits
    file_range: tuple[str, int, int] | None = None  # (local path, start, end): a worker reads the bytes itself
    pii: Redaction | None = None  # redact PII and secrets before writing (the recipe's curate.pii; pipeline.pii)


@dataclass
class ChunkResult:
    out_path: str | None = None
    lines: int = 0
    records: int = 0
    quarantined: int = 0
    skipped_old: int = 0
    extra_choices: int = 0
    held_back: int = 0  # bytes of an unfinished last line left for the next run
    reasons: Counter[str] = field(default_factory=Counter)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    functions: Counter[str] = field(default_factory=Counter)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    max_ms: int | None = None
    ids_at_max: list[str] = field(default_factory=list)
    # What was kept but is worth knowing, per kind: "images" (image parts, kept in the messages' images),
    # "records_with_images", "lenient_json" (rows read leniently: raw control characters in strings), and
    # "coerced:<field>" (values of that record field dropped or truncated: importers.common.COERCED) and
    # "not_calls:<why>" (whole rows that hold no teacher call, on purpose: importers.common.NotACall)
    notes: Counter[str] = field(default_factory=Counter)


def _rows(chunk: Chunk):
    """(row number, parsed row or the BadRecord, is the unfinished last line) for every non-blank row."""
    if isinstance(chunk.data, bytes):
        lines = chunk.data.split(b"\n")
        last = len(lines) - 1
        first = chunk.numbers
        assert isinstance(first, int)
        for i, raw in enumerate(lines):
            if not raw or raw.isspace():
                continue
            try:
                yield first + i, orjson.loads(raw), False
            except orjson.JSONDecodeError as err:
                try:  # the failure path only: a byte order mark, raw control characters in strings
                    yield first + i, loads_row(raw, err), False
                except BadRecord as bad:
                    yield first + i, bad, chunk.may_be_growing and i == last
    else:
        assert isinstance(chunk.numbers, list)
        decode = chunk.cfg.format != "mapped"  # JSON text columns (CSV, SQL) hold the nested objects
        for n, row in zip(chunk.numbers, chunk.data, strict=True):
            if type(row) is dict:
                yield n, {k: decode_json_text(v) for k, v in row.items()} if decode else row, False
            elif type(row) is Parsed:  # a row of a JSON document: parsed already, nothing to decode
                yield n, dict(row), False
            else:  # a Lenient row, a BadRecord, or a JSON value that is not an object (the importer says so)
                yield n, row, False


def _parse(parse: Any, row: Any, where: str, cfg: Source, default_ts: datetime, notes: Counter[str]) -> list[tuple]:
    """The importer's records for one row, tagged where the row held image parts (``has_images``: how many) or
    was read leniently (``lenient_json``); the slow path, for rows ``fast_row`` does not take."""
    common.IMAGE_PARTS[0] = 0
    recs = parse(row, where, cfg, default_ts)
    images, lenient = common.IMAGE_PARTS[0], type(row) is Lenient
    if images or lenient:
        for rec in recs:
            tags = dict(rec.get("tags") or {})
            if images:
                tags["has_images"] = str(images)
            if lenient:
                tags["lenient_json"] = LENIENT
            rec["tags"] = tags
        if images:
            notes["images"] += images
            notes["records_with_images"] += len(recs)
        if lenient:
            notes["lenient_json"] += 1
    return [record_row(r) for r in recs]


def convert(chunk: Chunk) -> ChunkResult:
    """Parse, filter by watermark, and write one chunk; returns counts, quarantine lines and id hashes."""
    if chunk.file_range is not None:  # cheaper than sending the bytes through a pipe
        path, start, end = chunk.file_range
        with open(path, "rb") as f:
            f.seek(start)
            chunk = replace(chunk, data=f.read(end - start), file_range=None)
    enabled = gc.isenabled()
    gc.disable()  # millions of small dicts: the cyclic collector only slows this down
    try:
        return _convert(chunk)
    finally:
        if enabled:
            gc.enable()


def _quarantine(res: ChunkResult, chunk: Chunk, number: int, reason: str) -> None:
    """Count a row that gave no record and keep its source, file, line and reason (never its text)."""
    res.quarantined += 1
    res.reasons[reason.split(":")[0]] += 1
    res.quarantine.append({"source": chunk.cfg.name or chunk.cfg.label, "file": chunk.origin, "line": number,
                           "reason": reason})


def _no_record(res: ChunkResult, chunk: Chunk, number: int, err: BadRecord | NotACall) -> None:
    """A bad row is quarantined; a row that is whole but holds no teacher call is counted by its kind."""
    if isinstance(err, NotACall):
        res.notes[f"{NOT_CALLS_PREFIX}{err.kind}"] += 1
    else:
        _quarantine(res, chunk, number, str(err))


def _redact(table: pa.Table, chunk: Chunk, res: ChunkResult) -> pa.Table:
    """The records with PII and secrets redacted as the recipe's curate.pii says (none: as they are)."""
    if chunk.pii is None:
        return table
    table, found = chunk.pii.apply(table)
    res.notes["pii_redacted"] += len(found)
    return table


def _convert(chunk: Chunk) -> ChunkResult:
    cfg = chunk.cfg
    parse = IMPORTERS[cfg.format]
    fast = cfg.format == "openai" and cfg.function is None and cfg.choices == "all"
    filter_old = chunk.watermark_ms is not None and has_timestamps(cfg)
    wm, wm_ids = chunk.watermark_ms, chunk.watermark_ids
    res = ChunkResult()
    rows: list[tuple] = []
    hashes: list[int] = []
    top = -(1 << 62)
    at_top: list[str] = []
    writer: pq.ParquetWriter | None = None
    tmp = f"{chunk.out_path}.tmp"
    label, ffield, fbfield, default_ts = chunk.label, cfg.function_field, cfg.feedback_field, chunk.default_ts
    lines = skipped = extra = 0
    coerced = common.COERCED
    coerced.clear()

    def flush() -> None:
        nonlocal writer
        if rows:
            table = _redact(rows_to_table(rows), chunk, res)
            counts = pc.value_counts(table["function"])
            res.functions.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(),
                                          strict=True)))
            if chunk.out_path:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
        rows.clear()

    try:
        for number, row, unfinished in _rows(chunk):
            if unfinished:
                assert isinstance(chunk.data, bytes)
                res.held_back = len(chunk.data) - chunk.data.rfind(b"\n") - 1
                continue
            lines += 1
            where = f"{label}:{number}"
            try:
                if type(row) is BadRecord:
                    raise row
                one = fast_row(row, where, ffield, fbfield) if fast else None
                recs = (one,) if one is not None else _parse(parse, row, where, cfg, default_ts, res.notes)
            except (BadRecord, NotACall) as err:
                coerced.clear()  # the row gives no record: nothing of it was coerced into one
                _no_record(res, chunk, number, err)
                continue
            for k, v in coerced.items():
                res.notes[f"coerced:{k}"] += v
            coerced.clear()
            extra += len(recs) - 1
            for rec in recs:
                rid, t = rec[0], rec[2]
                if filter_old and (t < wm or (t == wm and rid in wm_ids)):
                    skipped += 1
                    continue
                if t > top:
                    top, at_top = t, [rid]
                elif t == top:
                    at_top.append(rid)
                rows.append(rec)
                hashes.append(id_hash(rid))
            if len(rows) >= ROW_GROUP:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    res.lines, res.skipped_old, res.extra_choices = lines, skipped, extra
    res.records = len(hashes)
    res.hashes = np.array(hashes, dtype=np.uint64)
    if hashes:
        res.max_ms, res.ids_at_max = top, at_top
        if writer is not None:
            os.replace(tmp, chunk.out_path)
            res.out_path = chunk.out_path
    return res
