"""The curate stage: harvested records -> train/val/test splits, with an audit of every drop.

Two halves. The per-record half (``curation.chain``: PII and secrets, HTTP errors, empty, cut-off and error
outputs, refusals, feedback, JSON schemas, language, length) runs on Arrow batches on the recipe's executor
(in-process, `datasets` on all cores, or Ray). The global half (exact, near and semantic dedup, decontamination,
balance) runs here on the compact columns the first half adds, together with earlier nights' records from the
incremental index (``curation.index``), so a nightly run reads only new harvest files.

Writes ``train.parquet``, ``val.parquet``, ``test.parquet``, ``rejected.parquet`` (each dropped record, redacted,
with the operator and reason), ``report.json`` (per-operator counts, timings and example ids and reasons; no
record text, and reasons are scrubbed of PII) and ``index/``. Records in = kept + rejected.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.curate import index
from curation.curate.balance import balance
from curation.curate.chain import EXTRA_NAMES, assign_split, output_schema, uids  # noqa: F401  (assign_split: API)
from curation.curate.columns import codes, conform, map_value, runs
from curation.curate.decontaminate import decontaminate, load_external
from curation.curate.dedup import exact_dedup, near_dedup, rank
from curation.curate.executors import choose, count_rows, run_map
from curation.curate.filters import length_mode, plan_for
from curation.curate.pii import scrub
from curation.curate.semantic import from_f16_bytes, load_embedder, semantic_dedup, to_f16_bytes
from pipeline import __version__
from pipeline.record import RECORD_SCHEMA
from pipeline.rundir import digest, sha256_file, write_json_atomic
from pipeline.stages import StageContext, StageResult
from pipeline.ui import stage_progress

# The stage's contract (pipeline/stages.py). Lengths are counted in the student's tokens, so the student is read.
READS = ("harvest",)
ALSO_READS = ("train.student",)
REPORT_FILES = ("report.json",)

SPLITS = ("train", "val", "test")
GLOBAL_OPS = ("exact_dedup", "near_dedup", "semantic_dedup", "decontaminate", "balance")
OPERATOR_ORDER = ("pii", "http_error", "empty_output", "truncated_output", "error_text", "refusal", "feedback",
                  "json_schema", "language", "length", *GLOBAL_OPS)
EXAMPLES = 5


def harvest_files(folder: Path, manifest: dict | None) -> dict[str, str]:
    """Harvest's record files (name -> sha256), in order; checksums from its manifest when it lists them."""
    outputs = (manifest or {}).get("outputs", {})
    return {f.name: outputs.get(f.name) or sha256_file(f) for f in sorted(folder.glob("records-*.parquet"))}


def input_schema(files: list[Path]) -> pa.Schema:
    """The record schema of the harvest files (the canonical one, plus any fields harvest added)."""
    schemas = [pq.read_schema(f) for f in files]
    if not schemas:
        return RECORD_SCHEMA
    return pa.unify_schemas(schemas, promote_options="permissive")


def config_fingerprint(ctx: StageContext) -> str:
    """What the index depends on: the curate section (less the executor, which never changes results), the
    student whose tokens lengths are counted in, the seed, distill's version and rensa's (candidates are verified
    with its MinHash)."""
    section = ctx.recipe.section("curate", ALSO_READS)
    section["curate"] = {k: v for k, v in section["curate"].items() if k not in ("executor", "incremental")}
    from importlib.metadata import version

    return digest({"section": section, "version": __version__, "index": index.INDEX_VERSION,
                   "rensa": version("rensa")})


class Audit:
    """Per-operator counts, timings and a few examples (id, source, scrubbed reason) for report.json."""

    def __init__(self, pii_cfg):
        self.pii_cfg = pii_cfg
        self.ops: dict[str, dict[str, Any]] = {}
        self.dropped: Counter[str] = Counter()
        self.extra: Counter[str] = Counter()
        self.phases: dict[str, float] = {}

    def op(self, name: str, phase: str) -> dict[str, Any]:
        return self.ops.setdefault(name, {"phase": phase, "in": 0, "dropped_this_run": 0, "seconds": 0.0,
                                          "cpu_seconds": 0.0, "examples": []})

    def add_map_stats(self, blob: str) -> None:
        stats = json.loads(blob)
        for name, (n_in, dropped, seconds, cpu) in stats["ops"].items():
            if name == "band_keys":  # near dedup's per-record part: the LSH keys, on the executor's cores
                o = self.op("near_dedup", "global")
                o["band_keys_seconds"] = o.get("band_keys_seconds", 0.0) + float(seconds)
                o["band_keys_cpu_seconds"] = o.get("band_keys_cpu_seconds", 0.0) + float(cpu)
                continue
            o = self.op(name, "per-record")
            o["in"] += int(n_in)
            o["dropped_this_run"] += int(dropped)
            o["seconds"] += float(seconds)
            o["cpu_seconds"] += float(cpu)
        self.extra.update(stats.get("extra", {}))

    def rejected(self, table: pa.Table) -> None:
        """Count rejected rows by operator and keep the first examples."""
        by = table.column("rejected_by").to_pylist()
        self.dropped.update(by)
        need = [i for i, b in enumerate(by) if len(self.op(b, "global" if b in GLOBAL_OPS else "per-record")
                                                   ["examples"]) < EXAMPLES]
        if not need:
            return
        rows = table.select(["id", "source", "rejected_by", "reason"]).take(pa.array(need)).to_pylist()
        for r in rows:
            ex = self.ops[r["rejected_by"]]["examples"]
            if len(ex) < EXAMPLES:
                ex.append({"id": r["id"], "source": r["source"], "reason": scrub(r["reason"] or "", self.pii_cfg)})

    def report(self) -> dict[str, Any]:
        out = {}
        for name, o in self.ops.items():
            if name in ("keys", "setup"):
                continue
            cpu = o["cpu_seconds"] + o.get("band_keys_cpu_seconds", 0.0)
            rate = o["in"] / o["seconds"] if o["seconds"] > 0 else None
            cpu_rate = o["in"] / cpu if cpu > 0 else None
            out[name] = {"phase": o["phase"], "in": o["in"], "dropped": self.dropped.get(name, 0),
                         "dropped_this_run": o["dropped_this_run"], "seconds": round(o["seconds"], 4),
                         "cpu_seconds": round(cpu, 4), "records_per_s": round(rate) if rate else None,
                         "records_per_cpu_s": round(cpu_rate) if cpu_rate else None, "examples": o["examples"]}
            if "band_keys_cpu_seconds" in o:
                out[name]["of_which_band_keys_cpu_seconds"] = round(o["band_keys_cpu_seconds"], 4)
        for name, n in self.dropped.items():  # operators of earlier nights not run tonight
            out.setdefault(name, {"phase": "global" if name in GLOBAL_OPS else "per-record", "in": 0,
                                  "dropped": n, "dropped_this_run": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                  "records_per_s": None, "records_per_cpu_s": None, "examples": []})
        order = {name: i for i, name in enumerate(OPERATOR_ORDER)}  # the order they run in
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


class Writers:
    """Streaming Parquet writers for the four outputs. Rows are written in row groups of a fixed size, so the
    files are byte-identical however the executor cut the data into batches."""

    ROW_GROUP = 16_384

    def __init__(self, work: Path, schema: pa.Schema):
        self.schema = schema
        self.rej_schema = schema.append(pa.field("rejected_by", pa.string())).append(pa.field("reason", pa.string()))
        self.w = {s: pq.ParquetWriter(work / f"{s}.parquet", schema, compression="zstd") for s in SPLITS}
        self.w["rejected"] = pq.ParquetWriter(work / "rejected.parquet", self.rej_schema, compression="zstd")
        self.buf: dict[str, list[pa.Table]] = {k: [] for k in self.w}
        self.rows: Counter[str] = Counter()
        self.pii_kept = 0  # kept records (not rows: weights repeat some) whose text had PII or secrets redacted

    def _add(self, name: str, table: pa.Table, schema: pa.Schema) -> None:
        if not table.num_rows:
            return
        self.buf[name].append(conform(table, schema))
        self.rows[name] += table.num_rows
        if sum(t.num_rows for t in self.buf[name]) >= self.ROW_GROUP:
            self._flush(name, final=False)

    def _flush(self, name: str, final: bool) -> None:
        if not self.buf[name]:
            return
        t = pa.concat_tables(self.buf[name])
        full = t.num_rows - (0 if final else t.num_rows % self.ROW_GROUP)
        for start in range(0, full, self.ROW_GROUP):
            self.w[name].write_table(t.slice(start, min(self.ROW_GROUP, full - start)))
        self.buf[name] = [t.slice(full)] if full < t.num_rows else []

    def split(self, name: str, table: pa.Table, copies: np.ndarray | None = None) -> None:
        """Kept records to a split; `copies` repeats each row (weights)."""
        if table.num_rows and "tags" in table.column_names:
            self.pii_kept += int(map_value(table, "tags", "pii_redacted").is_valid().to_numpy(
                zero_copy_only=False).sum())
        if copies is not None and not (copies == 1).all():
            table = table.take(pa.array(np.repeat(np.arange(table.num_rows), copies)))
        self._add(name, table, self.schema)

    def rejected(self, table: pa.Table) -> None:
        self._add("rejected", table, self.rej_schema)

    def close(self) -> None:
        for name, w in self.w.items():
            self._flush(name, final=True)
            w.close()


def _set(table: pa.Table, name: str, values: list | pa.Array, type_: pa.DataType) -> pa.Table:
    arr = values if isinstance(values, pa.Array) else pa.array(values, type_)
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), pa.field(name, type_), arr)
    return table.append_column(pa.field(name, type_), arr)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.curate
    plan = plan_for(cfg, ctx.recipe.train.student)
    external = load_external(cfg.decontaminate.external) if cfg.decontaminate else []
    files_sha = harvest_files(ctx.inputs["harvest"], ctx.run.manifest("harvest"))
    files = [ctx.inputs["harvest"] / name for name in files_sha]
    schema = input_schema(files)
    fingerprint = config_fingerprint(ctx)
    prev, mode_reason = (index.previous(ctx.run.stage_dir("curate"), fingerprint, files_sha) if cfg.incremental
                         else (None, "curate.incremental is off"))
    new_files = [f for f in files if prev is None or f.name not in prev.files]
    n_new = count_rows(new_files)
    kind = choose(cfg.executor, n_new)
    audit = Audit(cfg.pii)
    partial_root = ctx.work.parent
    for stale in partial_root.glob("curate-tmp-*"):  # left by a killed run (the run directory lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="curate-tmp-", dir=partial_root))
    started = time.perf_counter()
    try:
        with stage_progress(ctx.console, "curate") as progress:
            result = _run(ctx, plan, external, files_sha, new_files, schema, fingerprint, prev, kind, audit, tmp,
                          progress, n_new)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts, splits, by_function, train_rows = result
    n_in = counts["records_in"]
    kept = sum(splits.values())
    rejected = counts["rejected"]
    if n_in != kept + rejected:  # the audit's promise: nothing is lost and nothing is counted twice
        raise RuntimeError(f"records in ({n_in}) must equal kept ({kept}) + rejected ({rejected})")
    pii_kept = audit.extra.get("pii_redacted_in_kept", 0)
    report = {
        "records_in": n_in,
        "kept": kept,
        "rejected": rejected,
        "mode": "incremental" if prev else "full",
        "mode_reason": mode_reason,
        "new_records": n_new,
        "earlier_records": n_in - n_new,
        "executor": kind,
        "seconds": round(time.perf_counter() - started, 3),
        "phases_seconds": audit.phases,  # cpu: this process and the datasets workers (not Ray's)
        "operators": audit.report(),
        "other_cpu_seconds": {"setup (loading recognizers, detectors, tokenizers; per process)":
                              round(audit.ops.get("setup", {}).get("cpu_seconds", 0.0), 3),
                              "input keys and splits": round(audit.ops.get("keys", {}).get("cpu_seconds", 0.0), 3)},
        "retracted": counts["retracted"],
        "restored": counts["restored"],
        "labels": {k: v for k, v in sorted(audit.extra.items()) if not k.startswith("pii:")},
        "pii_and_secrets_found": {k[4:]: v for k, v in sorted(audit.extra.items()) if k.startswith("pii:")},
        "lengths": length_mode(plan) if cfg.lengths.enabled else "no length limits",
        "splits": splits,
        "train_rows": train_rows,
        "splits_by_function": by_function,
        "pii_redacted_in_kept": pii_kept,
    }
    write_json_atomic(ctx.work / "report.json", report)
    summary = [("records in", f"{n_in:,}  ({report['mode']}: {n_new:,} new; {mode_reason})"),
               ("executor", kind)]
    summary += [(f"- {name}", f"{v['dropped']:,} dropped") for name, v in report["operators"].items() if v["dropped"]]
    if counts["retracted"] or counts["restored"]:
        summary.append(("earlier records", f"{counts['retracted']:,} now dropped, {counts['restored']:,} restored"))
    summary += [("kept", f"{kept:,}  (PII or secrets redacted in {pii_kept:,})"),
                ("splits", "  ".join(f"{s} {n:,}" for s, n in splits.items())
                 + (f"  (train rows with weights: {train_rows:,})" if train_rows != splits["train"] else "")),
                ("report", str(ctx.run.stage_dir("curate") / "report.json"))]
    return StageResult(
        counts={"records_in": n_in, "kept": kept, "rejected": rejected, "splits": splits, "train_rows": train_rows,
                "mode": report["mode"], "new_records": n_new,
                "dropped_by": {k: v["dropped"] for k, v in report["operators"].items() if v["dropped"]}},
        summary=summary,
    )


REDUCE_NAMES = {"_uid": "uid", "id": "id", "source": "source", "function": "function", "_split": "split",
                "_key": "key", "_text": "text", "_score": "score", "timestamp": "timestamp", "_bands": "bands"}


@dataclass
class Decisions:
    """The verdict on every record of the global half's table: where it goes, why, and how often in train."""

    dest: np.ndarray  # train | val | test | rejected
    by: np.ndarray  # operator that dropped it, or None
    why: np.ndarray  # its reason, or None
    copies: np.ndarray  # rows in train.parquet (weights)

    def slice(self, start: int, stop: int) -> Decisions:
        return Decisions(self.dest[start:stop], self.by[start:stop], self.why[start:stop], self.copies[start:stop])


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the datasets executor's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _run(ctx, plan, external, files_sha, new_files, schema, fingerprint, prev, kind, audit, tmp, progress, n_new):
    phases: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    new_rows = _per_record_half(kind, new_files, schema, plan, tmp, audit, progress, n_new)
    phases["per-record half"], cpu["per-record half"] = time.perf_counter() - t0, cpu_seconds() - c0

    t0, c0 = time.perf_counter(), cpu_seconds()
    old_rows = index.read(prev)
    n_old = old_rows.num_rows
    table = pa.concat_tables([old_rows, new_rows])
    decisions, embeddings = _global_half(table, plan, external, audit, progress)
    if embeddings is not None:
        table = _set(table, "emb", to_f16_bytes(embeddings), pa.binary())
    phases["global half"], cpu["global half"] = time.perf_counter() - t0, cpu_seconds() - c0

    t0, c0 = time.perf_counter(), cpu_seconds()
    writers = Writers(ctx.work, schema)
    task = progress.add_task("write", total=None)
    try:
        counts = _write(prev, table.column("uid").to_numpy(), n_old, decisions, tmp, writers, audit)
    finally:
        writers.close()
    progress.remove_task(task)
    audit.extra["pii_redacted_in_kept"] = writers.pii_kept
    records_in = (prev.state.get("records_in", 0) if prev else 0) + n_new
    index.write(ctx.work, prev, table.slice(n_old),
                {"config": fingerprint, "harvest_files": files_sha, "records_in": records_in})
    phases["writing outputs and index"] = time.perf_counter() - t0
    cpu["writing outputs and index"] = cpu_seconds() - c0
    audit.phases = {k: {"wall": round(v, 3), "cpu": round(cpu[k], 3)} for k, v in phases.items()}

    dest = decisions.dest
    splits = {"train": int((dest == "train").sum()), "val": writers.rows.get("val", 0),
              "test": writers.rows.get("test", 0)}
    fn, fn_names = codes(table, "function")
    by_function = {}
    for s in SPLITS:
        values, n_values = np.unique(fn[dest == s], return_counts=True)
        by_function[s] = dict(sorted((str(fn_names[v]) if v >= 0 else "null", int(c))
                                     for v, c in zip(values, n_values, strict=True)))
    return ({"records_in": records_in, "rejected": writers.rows.get("rejected", 0),
             "retracted": counts["retracted"], "restored": counts["restored"]},
            splits, by_function, writers.rows.get("train", 0))


def _per_record_half(kind, new_files, schema, plan, tmp, audit, progress, n_new) -> pa.Table:
    """Run the per-record checks on the executor; survivors go to tmp/alive.arrow, dropped rows (final) to
    tmp/map-rejected.arrow. Returns the survivors' compact columns for the global half."""
    map_schema = output_schema(schema)
    compact: list[pa.Table] = []
    task = progress.add_task(f"per-record checks ({kind})", total=n_new)
    with pa.OSFile(str(tmp / "alive.arrow"), "wb") as a_sink, pa.OSFile(str(tmp / "map-rejected.arrow"), "wb") as \
            r_sink, pa.ipc.new_stream(a_sink, map_schema) as alive_w, pa.ipc.new_stream(r_sink, map_schema) as rej_w:
        for out in run_map(kind, new_files, schema, plan, plan.cfg.executor, tmp, lambda n: progress.advance(task, n)):
            if out.num_rows == 0:
                continue
            for blob in out.column("_stats").drop_null().to_pylist():
                audit.add_map_stats(blob)
            is_rej = out.column("_rejected_by").is_valid().to_numpy(zero_copy_only=False)
            for a, b, rejected in runs(is_rej):  # map_batch puts survivors first: slices, not copies
                part = out.slice(a, b - a)
                if rejected:
                    rej_w.write_table(part)
                else:
                    alive_w.write_table(part)
                    # a copy: a slice would keep the whole batch it was read with alive
                    compact.append(part.select(list(REDUCE_NAMES)).take(pa.array(np.arange(part.num_rows))))
    progress.remove_task(task)
    rows = pa.concat_tables(compact) if compact else map_schema.empty_table().select(list(REDUCE_NAMES))
    rows = rows.rename_columns(list(REDUCE_NAMES.values()))
    return rows.append_column("emb", pa.nulls(rows.num_rows, pa.binary())).cast(index.REDUCE_SCHEMA)


def _global_half(table: pa.Table, plan, external, audit: Audit, progress) -> tuple[Decisions, np.ndarray | None]:
    """Dedup, decontamination and balance over every record (earlier nights' included), in order."""
    cfg = plan.cfg
    n = table.num_rows
    alive = np.ones(n, dtype=bool)
    by = np.full(n, None, dtype=object)
    why = np.full(n, None, dtype=object)
    copies = np.ones(n, dtype=np.int64)
    ranks = rank(table)
    embeddings = None
    task = progress.add_task("dedup, decontamination, balance", total=len(GLOBAL_OPS))
    for name in GLOBAL_OPS:
        t0, c0 = time.perf_counter(), time.process_time()
        n_in = int(alive.sum())
        reasons: dict[int, str] | None = None
        if name == "exact_dedup" and cfg.dedup:
            reasons = exact_dedup(table, alive, ranks)
        elif name == "near_dedup" and cfg.near_dedup is not None:
            reasons = near_dedup(table, alive, ranks, cfg.near_dedup)
        elif name == "semantic_dedup" and cfg.semantic_dedup is not None:
            embeddings = _embeddings(table, alive, cfg.semantic_dedup)
            reasons = semantic_dedup(table, alive, ranks, cfg.semantic_dedup, embeddings)
        elif name == "decontaminate" and cfg.decontaminate is not None:
            reasons = decontaminate(table, alive, cfg.decontaminate, external)
        elif name == "balance" and cfg.balance.enabled:
            reasons, copies = balance(table, alive, cfg.balance)
        if reasons is not None:
            o = audit.op(name, "global")
            o["in"] += n_in
            o["seconds"] += time.perf_counter() - t0
            o["cpu_seconds"] += time.process_time() - c0
            o["dropped_this_run"] += len(reasons)
            for i, r in reasons.items():
                alive[i] = False
                by[i], why[i] = name, r
        progress.advance(task)
    progress.remove_task(task)
    split_code = pc.fill_null(pc.index_in(table.column("split"), pa.array(list(SPLITS))), 0).to_numpy(
        zero_copy_only=False)
    dest = np.array([*SPLITS, "rejected"])[np.where(alive, split_code, len(SPLITS))]
    return Decisions(dest, by, why, copies), embeddings


def _write(prev, uids_all: np.ndarray, n_old: int, decisions: Decisions, tmp: Path, writers: Writers,
           audit: Audit) -> Counter:
    """Earlier nights' rows (carried, with tonight's decisions), tonight's survivors, tonight's dropped rows."""
    counts: Counter[str] = Counter()
    if prev is not None:
        counts.update(_carry(prev, uids_all[:n_old], decisions.slice(0, n_old), writers, audit))
    offset = n_old
    with pa.OSFile(str(tmp / "alive.arrow")) as src:  # plain reads: resident memory stays flat
        for batch in pa.ipc.open_stream(src):
            t = pa.Table.from_batches([batch])
            _route(t, decisions.slice(offset, offset + t.num_rows), writers, audit)
            offset += t.num_rows
    with pa.OSFile(str(tmp / "map-rejected.arrow")) as src:
        for batch in pa.ipc.open_stream(src):
            t = pa.Table.from_batches([batch])
            t = _set(t, "split", t.column("_split"), pa.string())
            t = t.rename_columns([{"_rejected_by": "rejected_by", "_reason": "reason"}.get(c, c)
                                  for c in t.column_names])
            writers.rejected(t)
            audit.rejected(t)
    return counts


def _embeddings(table: pa.Table, alive: np.ndarray, cfg) -> np.ndarray:
    """Unit embeddings (float16-rounded, so earlier nights' stored ones compare alike) of every row; rows that are
    not alive and have none stored get zeros."""
    values = table.column("emb").to_pylist()
    need = [int(i) for i in np.flatnonzero(alive) if values[i] is None]
    if need:
        texts = table.column("text").take(pa.array(need)).to_pylist()
        for i, b in zip(need, to_f16_bytes(load_embedder(cfg)(texts)), strict=True):
            values[i] = b
    dim = next((len(v) // 2 for v in values if v is not None), 1)
    return from_f16_bytes(values, dim).astype(np.float32)


def _route(t: pa.Table, d: Decisions, writers: Writers, audit: Audit) -> None:
    """Send tonight's surviving rows to their split (repeated per weight) or to rejected with the global reason."""
    t = _set(t, "split", t.column("_split"), pa.string())
    for s in SPLITS:
        rows = np.flatnonzero(d.dest == s)
        if len(rows):
            writers.split(s, t.take(pa.array(rows)), d.copies[rows] if s == "train" else None)
    rows = np.flatnonzero(d.dest == "rejected")
    if len(rows):
        r = t.take(pa.array(rows))
        r = _set(r, "rejected_by", list(d.by[rows]), pa.string())
        r = _set(r, "reason", list(d.why[rows]), pa.string())
        writers.rejected(r)
        audit.rejected(r)


def _carry(prev: index.Previous, old_uids: np.ndarray, d: Decisions, writers: Writers, audit: Audit) -> Counter:
    """Stream the previous run's outputs into this run's, applying tonight's decisions to earlier records."""
    counts: Counter[str] = Counter()
    order = np.argsort(old_uids, kind="stable")
    sorted_uids = old_uids[order]
    seen: set[int] = set()

    def lookup(u: np.ndarray) -> np.ndarray:
        if len(sorted_uids) == 0:
            return np.full(len(u), -1)
        pos = np.minimum(np.searchsorted(sorted_uids, u), len(sorted_uids) - 1)
        return np.where(sorted_uids[pos] == u, order[pos], -1)

    for name in (*SPLITS, "rejected"):
        for batch in pq.ParquetFile(prev.folder / f"{name}.parquet").iter_batches(batch_size=4096):
            t = pa.Table.from_batches([batch])
            if name == "rejected":
                fixed = np.array([b not in GLOBAL_OPS for b in t.column("rejected_by").to_pylist()], dtype=bool)
                if fixed.any():  # per-record decisions do not change
                    kept_rej = t.filter(pa.array(fixed))
                    writers.rejected(kept_rej)
                    audit.rejected(kept_rej)
                t = t.filter(pa.array(~fixed)).drop_columns(["rejected_by", "reason"])
                if t.num_rows == 0:
                    continue
            u = uids(t)
            first = np.array([x not in seen for x in u.tolist()], dtype=bool)  # weights repeat train rows
            seen.update(u.tolist())
            t, u = t.filter(pa.array(first)), u[first]
            j = lookup(u)
            if (j < 0).any():
                raise RuntimeError("the earlier curated data and its index disagree; rerun with --force after "
                                   "deleting the curate folder for a full rebuild")
            dest = d.dest[j]
            for s in SPLITS:
                rows = np.flatnonzero(dest == s)
                if len(rows):
                    writers.split(s, t.take(pa.array(rows)), d.copies[j[rows]] if s == "train" else None)
                    if name == "rejected":
                        counts["restored"] += len(rows)
            rows = np.flatnonzero(dest == "rejected")
            if len(rows):
                r = t.take(pa.array(rows))
                r = _set(r, "rejected_by", list(d.by[j[rows]]), pa.string())
                r = _set(r, "reason", list(d.why[j[rows]]), pa.string())
                writers.rejected(r)
                audit.rejected(r)
                if name != "rejected":
                    counts["retracted"] += len(rows)
    return counts
