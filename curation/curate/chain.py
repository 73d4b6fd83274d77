"""The per-record (map) half of the curate chain: one Arrow batch in, one Arrow batch out.

``map_batch`` runs the recipe's per-record operators (``curation.curate.filters.PER_RECORD``, by
``run_operators``) in order; a row dropped by one is not seen by the next. The batch it returns holds the rows that
survived, in input order, with the columns the global (reduce) half needs, then the dropped rows, in input order,
with the operator and reason. It depends on nothing but the batch, so
in-process, ``datasets`` and Ray executors give the same rows however they cut the data.

Columns added (all start with '_'): ``_rejected_by``, ``_reason`` (null for survivors); for survivors ``_uid``
(64-bit hash of id and source), ``_key`` (exact dedup's key, function + the normalised whole prompt, as 64 bits),
``_split`` (stable hash split of function + user turns), ``_text`` (the redacted user turns), ``_prompt`` (the
redacted turns after the system prompt, null where those are the user turns), ``_score`` (feedback,
neutral when missing), ``_bands`` (the near-duplicate LSH band keys, computed here so that they use every core);
and ``_stats`` on the first row: per operator [rows in, dropped, wall s, CPU s] as JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.curate import columns, dedup
from curation.curate.filters import Plan, operators
from pipeline.config.curate import SplitConfig

EXTRA_FIELDS = [
    pa.field("_rejected_by", pa.string()),
    pa.field("_reason", pa.string()),
    pa.field("_uid", pa.uint64()),
    pa.field("_key", pa.uint64()),
    pa.field("_split", pa.string()),
    pa.field("_text", pa.string()),
    pa.field("_prompt", pa.string()),
    pa.field("_score", pa.float64()),
    pa.field("_bands", pa.list_(pa.uint64())),
    pa.field("_stats", pa.string()),
]
EXTRA_NAMES = [f.name for f in EXTRA_FIELDS]


def output_schema(schema: pa.Schema) -> pa.Schema:
    """The schema of map_batch's output for an input schema."""
    for f in EXTRA_FIELDS:
        schema = schema.append(f)
    return schema


def input_key(function: str | None, user_text: str) -> str:
    """Stable key of a record's input: function plus normalised user turns (pipeline.chat.user_text gives the user turns of one record)."""
    normalised = " ".join(user_text.split()).lower()
    return hashlib.sha256(f"{function}\x00{normalised}".encode()).hexdigest()


@functools.lru_cache(maxsize=1024)
def _normalised(text: str) -> bytes:
    """A system prompt as keys read it (one per function, usually: cached)."""
    return " ".join(text.split()).lower().encode()


def prompt_key(function: str | None, system: str, prompt: str) -> int:
    """Exact dedup's 64-bit key of a record whose prompt is more than its user turns: function, normalised system
    prompt and normalised turns after it (a record of user turns alone keys as ``input_key``)."""
    h = hashlib.blake2b(f"{function}".encode(), digest_size=8)
    h.update(b"\x00" + _normalised(system) + b"\x00" + " ".join(prompt.split()).lower().encode())
    return int.from_bytes(h.digest(), "big")


def assign_split(key: str, cfg: SplitConfig) -> str:
    """Stable split of an input key: the same input lands in the same split on every run."""
    bucket = int(hashlib.sha256(f"{cfg.salt}\x00{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if bucket < cfg.test_fraction:
        return "test"
    if bucket < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def uid(record_id: str | None, source: str | None) -> int:
    """64-bit identity of a record (id and where it came from)."""
    h = hashlib.blake2b(f"{record_id}\x00{source}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def uids(table: pa.Table) -> np.ndarray:
    ids = table.column("id").to_pylist()
    sources = table.column("source").to_pylist()
    return np.fromiter((uid(i, s) for i, s in zip(ids, sources, strict=True)), dtype=np.uint64, count=len(ids))


def scores(table: pa.Table, plan: Plan) -> np.ndarray:
    """Feedback as a number where higher is better; a record without it counts as the threshold (neutral)."""
    fb = plan.cfg.feedback
    if fb is None or table.num_rows == 0:
        return np.zeros(table.num_rows)
    v = pc.fill_null(columns.map_value(table, "feedback", fb.metric).cast(pa.float64()), fb.min_value)
    arr = v.to_numpy(zero_copy_only=False).astype(np.float64)
    return arr if fb.higher_is_better else -arr


def reduce_columns(table: pa.Table, plan: Plan) -> dict[str, pa.Array]:
    """The columns the global half of the chain reads, for surviving rows: the split from the function and user
    turns (a conversation's steps share it; decontamination reads them too: an eval prompt copied word for word
    stays found however long the tool results beside it), exact dedup's key from the whole prompt (system
    prompt, user turns, earlier answers, tool calls and results: each step of a tool loop is its own input), the
    text near and semantic dedup read from the turns after the system prompt (null where that is the user turns)."""
    users, systems, prompts = (a.to_pylist() for a in columns.prompt_parts(table))
    functions = table.column("function").to_pylist()
    splits = [input_key(f, t) for f, t in zip(functions, users, strict=True)]
    keys = [int(k[:16], 16) if not s and p == t else prompt_key(f, s, p)
            for f, t, s, p, k in zip(functions, users, systems, prompts, splits, strict=True)]
    return {
        "_uid": pa.array(uids(table), pa.uint64()),
        "_key": pa.array(keys, pa.uint64()),
        "_split": pa.array([assign_split(k, plan.cfg.split) for k in splits], pa.string()),
        "_text": pa.array(users, pa.string()),
        "_prompt": pa.array([None if p == t else p for t, p in zip(users, prompts, strict=True)], pa.string()),
        "_score": pa.array(scores(table, plan), pa.float64()),
    }


def band_column(text: pa.Array, plan: Plan) -> pa.Array:
    """Near-duplicate LSH band keys of the surviving rows (null when near dedup is off)."""
    near = plan.cfg.near_dedup
    if near is None or len(text) == 0:
        return pa.nulls(len(text), pa.list_(pa.uint64()))
    return dedup.bands_array(dedup.band_keys(text, near))


Dropped = tuple[np.ndarray, pa.Table, list[str], list[str]]  # input positions, rows, operator, reasons


def run_operators(table: pa.Table, plan: Plan, stats: dict[str, list[float]]
                  ) -> tuple[pa.Table, list[Dropped], Counter[str]]:
    """The runner of the per-record chain (``filters.PER_RECORD``): each operator the recipe turns on, in order,
    over the rows the ones before it kept. Records per operator [rows in, dropped, wall s, CPU s] in `stats`;
    returns the survivors, the dropped rows of each operator and the labels counted."""
    pos = np.arange(table.num_rows)
    rejected: list[Dropped] = []
    extra: Counter[str] = Counter()
    for op in operators(plan.cfg):
        if table.num_rows == 0:
            stats[op.name] = [0, 0, 0.0, 0.0]
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        table, reasons = op.fn(table, plan)
        drop = np.array([r is not None for r in reasons], dtype=bool)
        stats[op.name] = [table.num_rows, int(drop.sum()), time.perf_counter() - t0, time.process_time() - c0]
        if op.name == "refusal" and not plan.cfg.drop_refusals:
            extra["refusals_labelled"] += _count_tag(table, "refusal")
        if drop.any():
            idx = np.flatnonzero(drop)
            rejected.append((pos[idx], table.take(pa.array(idx)), [op.name] * len(idx), [reasons[i] for i in idx]))
            keep = np.flatnonzero(~drop)
            table = table.take(pa.array(keep))
            pos = pos[keep]
    return table, rejected, extra


def map_batch(batch: pa.Table | pa.RecordBatch, plan: Plan, schema: pa.Schema | None = None) -> pa.Table:
    """Run the per-record operators on one batch (see the module docstring for what comes back)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    schema = schema or table.schema
    table = columns.conform(table, schema)
    n = table.num_rows
    stats: dict[str, list[float]] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if warm_up(plan):
        stats["setup"] = [0, 0, time.perf_counter() - t0, time.process_time() - c0]
    table, rejected, extra = run_operators(table, plan, stats)
    if plan.cfg.pii.action != "keep" or plan.cfg.pii.secrets:
        extra.update(_pii_counts(table, rejected))
    t0, c0 = time.perf_counter(), time.process_time()
    kept = table
    for f, arr in zip(EXTRA_FIELDS[:2], [pa.nulls(kept.num_rows, pa.string())] * 2, strict=True):
        kept = kept.append_column(f, arr)
    for name, arr in reduce_columns(table, plan).items():
        kept = kept.append_column(pa.field(name, arr.type), arr)
    stats["keys"] = [table.num_rows, 0, time.perf_counter() - t0, time.process_time() - c0]
    t0, c0 = time.perf_counter(), time.process_time()
    kept = kept.append_column(pa.field("_bands", pa.list_(pa.uint64())),
                              band_column(columns.prompts_of(kept, "_text", "_prompt"), plan))
    stats["band_keys"] = [table.num_rows, 0, time.perf_counter() - t0, time.process_time() - c0]
    kept = kept.append_column(EXTRA_FIELDS[-1], pa.nulls(kept.num_rows, pa.string()))
    out = pa.concat_tables([kept, _dropped_rows(rejected)]) if rejected else kept
    if out.num_rows:
        blob = json.dumps({"ops": stats, "extra": dict(extra), "rows": n})
        stats_col = pa.array([blob] + [None] * (out.num_rows - 1), pa.string())
        out = out.set_column(out.schema.get_field_index("_stats"), EXTRA_FIELDS[-1], stats_col)
    return out


def _dropped_rows(rejected: list[Dropped]) -> pa.Table:
    """Every operator's dropped rows, back in input order, with the operator and reason."""
    order = np.argsort(np.concatenate([r[0] for r in rejected]), kind="stable")
    rej = pa.concat_tables([r[1] for r in rejected]).take(pa.array(order))
    by = np.concatenate([np.array(r[2], dtype=object) for r in rejected])[order]
    why = np.concatenate([np.array(r[3], dtype=object) for r in rejected])[order]
    rej = rej.append_column(EXTRA_FIELDS[0], pa.array(list(by), pa.string()))
    rej = rej.append_column(EXTRA_FIELDS[1], pa.array(list(why), pa.string()))
    for f in EXTRA_FIELDS[2:]:
        rej = rej.append_column(f, pa.nulls(rej.num_rows, f.type))
    return rej


_WARM: set[int] = set()


def warm_up(plan: Plan) -> bool:
    """Build the heavy per-process parts (presidio's recognizers, the language detector, the student's tokenizer)
    once, outside the operators' timings. True when it did work."""
    if id(plan) in _WARM:
        return False
    from curation.curate import filters, pii

    cfg = plan.cfg
    if cfg.pii.action != "keep" or cfg.pii.secrets:
        pii.detector(cfg.pii).find("warm up: jane@example.com +1 555 123 4567 4111 1111 1111 1111 10.0.0.1")
    if cfg.language is not None:
        filters.language_detector(filters.language_codes(cfg.language))
    if cfg.lengths.enabled and plan.student is not None and plan.student.checkpoint:
        filters.student_tokenizer(plan.student)
    _WARM.add(id(plan))
    return True


def _count_tag(table: pa.Table, key: str) -> int:
    if "tags" not in table.column_names or table.num_rows == 0:
        return 0
    return int(pc.sum(pc.is_valid(columns.map_value(table, "tags", key))).as_py() or 0)


def _pii_counts(kept: pa.Table, rejected: list[Dropped]) -> Counter[str]:
    """Records per PII/secret kind found (kept and dropped rows), from the pii_redacted tag."""
    counts: Counter[str] = Counter()
    for t in [kept, *(r[1] for r in rejected)]:
        if "tags" not in t.column_names or t.num_rows == 0:
            continue
        for v in columns.map_value(t, "tags", "pii_redacted").to_pylist():
            if v:
                counts["records_with_pii_or_secrets"] += 1
                for k in v.split(","):
                    counts[f"pii:{k}"] += 1
    return counts
