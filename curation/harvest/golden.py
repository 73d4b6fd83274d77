"""Golden sets: a team's fixed requests with reviewed answers, in any format harvest reads (``evaluate.golden``).

The files are read whole with harvest's readers and importers (the same ``format``, ``fields`` and
``function_field`` settings as a harvest source) into canonical records, the reviewed answer as ``output``. Unlike
harvest, nothing is quarantined: a golden set is small and curated by hand, so a row that cannot be read or holds no
answer is an error naming the file and line. Golden records get harvest's redaction (``curate.pii`` and
``curate.max_record_bytes``, ``pipeline.pii``; :func:`golden_redaction`) where they are loaded, so decontamination
compares them with training text redacted the same way and no raw PII reaches the run directory. The evaluate stage scores the student on these records beside the test
split; the curate stage removes training records whose user turns overlap them (decontamination).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from curation.harvest.importers.common import BadRecord, NotACall
from curation.harvest.importers.formats import IMPORTERS
from curation.harvest.sources import LogFile, json_rows, list_files, row_batches
from pipeline.pii import Redaction, enabled
from pipeline.record import from_table, to_table
from pipeline.rundir import digest

FIELD = "evaluate.golden"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the time of a golden row that carries none


def golden_files(sources) -> list[tuple[int, Any, LogFile]]:
    """(index of the source, the source, a file it names) for every golden file, in order."""
    return [(i, src, f) for i, src in enumerate(sources) for f in list_files(src, f"{FIELD}[{i}].path")]


def _rows(f: LogFile, kind: str) -> Iterator[tuple[int, Any]]:
    if kind in ("jsonl", "json"):
        with f.open() as fh:
            numbers, rows = json_rows(fh.read())
        yield from zip(numbers, rows, strict=True)
        return
    for numbers, rows in row_batches(f, kind):
        yield from zip(numbers, rows, strict=True)


def _record(src, row: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(row, BadRecord):
        raise ValueError(f"{FIELD}: {where}: {row}")
    if isinstance(row, dict) and "routing" in row:  # reviewed: the answer is the reviewer's, whoever wrote it first
        row = {k: v for k, v in row.items() if k != "routing"}
    try:
        records = IMPORTERS[src.format](row, where, src, EPOCH)
    except BadRecord as bad:
        raise ValueError(f"{FIELD}: {where}: {bad}") from None
    except NotACall as why:
        raise ValueError(f"{FIELD}: {where}: not a reviewed call: one of the {why.kind}") from None
    for r in records:
        out = r.get("output") or {}
        if r.get("error") or not (out.get("content") or out.get("tool_calls")):
            why = r.get("error") or "no answer"
            raise ValueError(f"{FIELD}: {where}: a golden row needs a reviewed answer ({why})")
        if not any(m.get("role") == "user" for m in r["messages"]):
            raise ValueError(f"{FIELD}: {where}: a golden row needs a user turn")
    return records


def golden_redaction(recipe) -> Redaction | None:
    """The redaction harvest applies to every record it writes (the recipe's curate.pii and curate.max_record_bytes),
    for golden records; None when curate.pii looks for nothing."""
    cfg = recipe.curate.pii
    return Redaction(cfg, recipe.curate.max_record_bytes) if enabled(cfg) else None


def load_golden(sources, redaction: Redaction | None = None) -> list[dict[str, Any]]:
    """Every golden record of the sources, as canonical records (what the splits' Parquet files hold), tagged with
    the file they came from (``tags.golden_file``) and redacted by ``redaction`` (:func:`golden_redaction`) as
    harvest redacts training records. Raises ValueError naming the file and line of a bad row."""
    out: list[dict[str, Any]] = []
    for _, src, f in golden_files(sources):
        for number, row in _rows(f, f.kind(src.file_format)):
            for r in _record(src, row, f"{f.url}:{number}"):
                r["tags"] = {**(r.get("tags") or {}), "golden_file": f.name}
                r["split"] = "golden"
                out.append(r)
    if sources and not out:
        raise ValueError(f"{FIELD}: the files hold no records")
    seen: dict[str, int] = {}
    for r in out:  # ids name rows in predictions: a repeated one gets '#<n>'
        n = seen[r["id"]] = seen.get(r["id"], 0) + 1
        if n > 1:
            r["id"] = f"{r['id']}#{n}"
    table = to_table(out)
    if redaction is not None:  # 'drop' redacts too; a golden record is never dropped
        table, _ = redaction.apply(table)
    return from_table(table)


def golden_inputs(sources) -> dict[str, str]:
    """Content hashes of the golden files, for a stage fingerprint (new or changed files rerun the stage)."""
    if not sources:
        return {}
    return {f"{FIELD}[{i}]:{f.url}": f.content_hash() for i, _, f in golden_files(sources)} | {
        FIELD: digest([s.model_dump(mode="json") for s in sources])}
