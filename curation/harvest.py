"""The harvest stage: logged teacher traffic -> canonical records in Parquet.

Writes ``records-NNNNN.parquet`` and ``quarantine.jsonl`` (one line per unreadable log line: file, line
number and reason; the raw text is not copied, so no PII lands there).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from curation.openai_logs import BadRecord, parse_line
from pipeline.config.harvest import OpenAISource
from pipeline.recipe import Recipe
from pipeline.record import to_table
from pipeline.rundir import sha256_file
from pipeline.stages import StageContext, StageResult


def source_files(source: OpenAISource) -> list[fsspec.core.OpenFile]:
    """The files a source names (a path, a directory or a glob), sorted."""
    path = source.path
    fs, _, paths = fsspec.get_fs_token_paths(path)
    if len(paths) == 1 and fs.isdir(paths[0]):
        paths = sorted(p for p in fs.find(paths[0]) if p.endswith((".jsonl", ".jsonl.gz", ".json")))
    if not paths:
        raise FileNotFoundError(f"harvest.sources: no files match {path!r}")
    return [fsspec.open(p, mode="rb", compression="infer") for p in sorted(paths)]


def external_inputs(recipe: Recipe) -> dict[str, str]:
    """Content hash of every log file, so new or changed logs rerun harvest."""
    out = {}
    for source in recipe.harvest.sources:
        for f in source_files(source):
            if isinstance(f.fs, LocalFileSystem):
                out[f"file:{f.path}"] = sha256_file(Path(f.path))
            else:
                info = f.fs.info(f.path)
                out[f"file:{f.path}"] = json.dumps([info.get("size"), info.get("ETag") or info.get("mtime")], default=str)
    return out


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.harvest
    batch: list[dict[str, Any]] = []
    part = 0
    lines = kept = 0
    reasons: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    files = [(s, f) for s in cfg.sources for f in source_files(s)]

    def flush() -> None:
        nonlocal part, batch
        if batch:
            pq.write_table(to_table(batch), ctx.work / f"records-{part:05d}.parquet", compression="zstd")
            part += 1
            batch = []

    with open(ctx.work / "quarantine.jsonl", "w") as quarantine, Progress(
        TextColumn("harvest {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=ctx.console, transient=True,
    ) as progress:
        task = progress.add_task("files", total=len(files))
        for source, f in files:
            name = Path(f.path).name
            progress.update(task, description=name)
            with f as fh:
                for lineno, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    lines += 1
                    try:
                        try:
                            obj = json.loads(raw)
                        except (json.JSONDecodeError, UnicodeDecodeError) as err:
                            raise BadRecord(f"invalid JSON: {err.msg if hasattr(err, 'msg') else err}") from None
                        rec = parse_line(obj, f"{name}:{lineno}", source.function_field, source.feedback_field)
                    except BadRecord as err:
                        reasons[str(err).split(":")[0]] += 1
                        quarantine.write(json.dumps({"file": f.path, "line": lineno, "reason": str(err)}) + "\n")
                        continue
                    kept += 1
                    functions[rec["function"]] += 1
                    batch.append(rec)
                    if len(batch) >= cfg.batch_size:
                        flush()
            progress.advance(task)
        flush()
    if part == 0:  # keep an empty but typed table so downstream stages read a schema
        pq.write_table(to_table([]), ctx.work / "records-00000.parquet")
    quarantined = lines - kept
    summary = [
        ("files", str(len(files))),
        ("lines read", f"{lines:,}"),
        ("records", f"{kept:,}  ({', '.join(f'{k}: {v:,}' for k, v in functions.most_common())})"),
        ("quarantined", f"{quarantined:,}" + (f"  ({', '.join(f'{k}: {v}' for k, v in reasons.most_common())})"
                                              if quarantined else "")),
    ]
    if quarantined:
        summary.append(("see", str(ctx.run.stage_dir("harvest") / "quarantine.jsonl")))
    return StageResult(
        counts={"files": len(files), "lines": lines, "records": kept, "quarantined": quarantined,
                "quarantine_reasons": dict(reasons), "functions": dict(functions)},
        summary=summary,
    )
