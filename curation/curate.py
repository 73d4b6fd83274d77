"""The curate stage: harvested records -> train/val/test splits, with an audit of every drop.

Writes ``train.parquet``, ``val.parquet``, ``test.parquet``, ``rejected.parquet`` (each dropped record with
the operator and reason) and ``report.json`` (per-operator counts, timings and example ids; no record text,
so no PII reaches the report). Records in = kept + rejected.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.filters import chain
from pipeline.config.curate import SplitConfig
from pipeline.record import from_table, input_key, to_table
from pipeline.rundir import write_json_atomic
from pipeline.stages import StageContext, StageResult

SPLITS = ("train", "val", "test")


def assign_split(key: str, cfg: SplitConfig) -> str:
    """Stable split of an input key: the same input lands in the same split on every run."""
    bucket = int(hashlib.sha256(f"{cfg.salt}\x00{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if bucket < cfg.test_fraction:
        return "test"
    if bucket < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def read_records(folder: Path) -> list[dict[str, Any]]:
    files = sorted(folder.glob("records-*.parquet"))
    return from_table(pa.concat_tables([pq.read_table(f) for f in files])) if files else []


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.curate
    records = read_records(ctx.inputs["harvest"])
    n_in = len(records)
    rejected: list[dict[str, Any]] = []
    per_op: dict[str, dict[str, Any]] = {}
    for name, op in chain(cfg):
        t0 = time.perf_counter()
        records, reasons = op(records, cfg)
        kept = []
        examples = []
        for r, reason in zip(records, reasons, strict=True):
            if reason is None:
                kept.append(r)
            else:
                rejected.append({**r, "rejected_by": name, "reason": reason})
                if len(examples) < 5:
                    examples.append({"id": r["id"], "source": r["source"], "reason": reason})
        per_op[name] = {"in": len(records), "dropped": len(records) - len(kept),
                        "seconds": round(time.perf_counter() - t0, 4), "examples": examples}
        records = kept
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r in records:
        r["split"] = assign_split(input_key(r), cfg.split)
        splits[r["split"]].append(r)
    for s, rows in splits.items():
        rows.sort(key=lambda r: (r["timestamp"], r["id"]))
        pq.write_table(to_table(rows), ctx.work / f"{s}.parquet", compression="zstd")
    schema = to_table([]).schema.append(pa.field("rejected_by", pa.string())).append(pa.field("reason", pa.string()))
    rej_rows = [{**r, "feedback": list((r.get("feedback") or {}).items()), "tags": list((r.get("tags") or {}).items())}
                for r in rejected]
    pq.write_table(pa.Table.from_pylist(rej_rows, schema=schema), ctx.work / "rejected.parquet", compression="zstd")
    by_function = {s: dict(Counter(r["function"] for r in rows)) for s, rows in splits.items()}
    pii_redacted = sum(1 for r in records if (r.get("tags") or {}).get("pii_redacted"))
    report = {
        "records_in": n_in,
        "kept": len(records),
        "rejected": len(rejected),
        "operators": per_op,
        "splits": {s: len(rows) for s, rows in splits.items()},
        "splits_by_function": by_function,
        "pii_redacted_in_kept": pii_redacted,
    }
    assert n_in == len(records) + len(rejected), "records in must equal kept + rejected"
    write_json_atomic(ctx.work / "report.json", report)
    summary = [("records in", f"{n_in:,}")]
    summary += [(f"- {name}", f"{v['dropped']:,} dropped") for name, v in per_op.items() if v["dropped"]]
    summary += [("kept", f"{len(records):,}  (PII redacted in {pii_redacted:,})"),
                ("splits", "  ".join(f"{s} {len(rows):,}" for s, rows in splits.items())),
                ("report", str(ctx.run.stage_dir("curate") / "report.json"))]
    return StageResult(
        counts={"records_in": n_in, "kept": len(records), "rejected": len(rejected),
                "splits": report["splits"], "dropped_by": {k: v["dropped"] for k, v in per_op.items()}},
        summary=summary,
    )
