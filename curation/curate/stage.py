"""The curate stage: harvested records -> train/val/test splits, with an audit of every drop.

Two halves. The per-record half (``curation.curate.filters.PER_RECORD``, run by ``curation.curate.chain``: PII and
secrets, HTTP errors, empty, cut-off and error outputs, refusals, feedback, JSON schemas, language, length) runs on
Arrow batches on the recipe's executor (in-process, `datasets` on all cores, or Ray). The global half (``GLOBAL``
below: exact, near and semantic dedup, decontamination, balance) runs here on the compact columns the first half
adds, together with earlier nights' records from the incremental index (``curation.curate.index``), so a nightly
run reads only new harvest files. ``curation.curate.carry`` then writes the outputs, carrying earlier nights' over.

Writes ``train.parquet``, ``val.parquet``, ``test.parquet``, ``rejected.parquet`` (each dropped record, redacted,
with the operator and reason), ``report.json`` (per-operator counts, timings and example ids and reasons; no
record text, and reasons are scrubbed of PII; ``curation.curate.audit``) and ``index/``. Records in = kept +
rejected.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.curate import carry, index
from curation.curate.audit import SPLITS, Audit, Writers
from curation.curate.balance import balance
from curation.curate.carry import Decisions, set_column
from curation.curate.chain import output_schema
from curation.curate.columns import codes, prompts_of, runs
from curation.curate.decontaminate import decontaminate, golden_references, load_external
from curation.curate.dedup import exact_dedup, near_dedup, rank
from curation.curate.executors import choose, count_rows, run_map
from curation.curate.filters import PER_RECORD, Op, Plan, length_mode, plan_for
from curation.curate.semantic import from_f16_bytes, load_embedder, semantic_dedup, to_f16_bytes
from pipeline import __version__
from pipeline.record import RECORD_SCHEMA
from pipeline.rundir import digest, sha256_file, write_json_atomic
from pipeline.stages import StageContext, StageResult
from pipeline.ui import stage_progress

# The stage's contract (pipeline/stages.py). Lengths are counted in the student's tokens, so the student is read.
READS = ("harvest",)
ALSO_READS = ("train.student",)
MAY_BE_ABSENT = ("train",)  # with no train section, lengths are counted by the documented approximation
REPORT_FILES = ("report.json",)


def external_inputs(recipe) -> dict[str, str]:
    """The golden set's files (evaluate.golden): decontamination removes training records that overlap them, so
    new or changed golden files rerun curate. Nothing without a golden set (the fingerprint stays as it was)."""
    from curation.harvest.golden import golden_inputs

    return golden_inputs(recipe.evaluate.golden) if recipe.evaluate else {}


def _references(ctx: StageContext) -> list[tuple[str, str]]:
    """What decontamination protects besides the test split: external eval sets and the golden set."""
    cfg = ctx.recipe.curate
    if cfg.decontaminate is None:
        return []
    golden = ctx.recipe.evaluate.golden if ctx.recipe.evaluate else []
    if golden:
        from curation.harvest.golden import golden_redaction, load_golden

        records = load_golden(golden, golden_redaction(ctx.recipe))  # redacted like the training text it is matched to
        return load_external(cfg.decontaminate.external) + golden_references(records)
    return load_external(cfg.decontaminate.external)


@dataclass
class Everything:
    """What the global operators see: every record's compact columns (earlier nights' included), which are still
    alive, their ranks (which copy of duplicates is kept), and what the operators leave for the outputs."""

    table: pa.Table
    alive: np.ndarray
    ranks: np.ndarray
    plan: Plan
    external: list
    copies: np.ndarray  # rows in train.parquet per record (balance's weights)
    embeddings: np.ndarray | None = None  # semantic dedup's, kept in the index


def _exact_dedup(e: Everything) -> dict[int, str]:
    return exact_dedup(e.table, e.alive, e.ranks)


def _near_dedup(e: Everything) -> dict[int, str]:
    return near_dedup(e.table, e.alive, e.ranks, e.plan.cfg.near_dedup)


def _semantic_dedup(e: Everything) -> dict[int, str]:
    e.embeddings = _embeddings(e.table, e.alive, e.plan.cfg.semantic_dedup)
    return semantic_dedup(e.table, e.alive, e.ranks, e.plan.cfg.semantic_dedup, e.embeddings)


def _decontaminate(e: Everything) -> dict[int, str]:
    return decontaminate(e.table, e.alive, e.plan.cfg.decontaminate, e.external)


def _balance(e: Everything) -> dict[int, str]:
    reasons, e.copies = balance(e.table, e.alive, e.plan.cfg.balance)
    return reasons


# The global half, in the order it runs: each operator returns {row: reason} for the rows it drops.
GLOBAL: tuple[Op, ...] = (
    Op("exact_dedup", _exact_dedup, when=lambda cfg: cfg.dedup),
    Op("near_dedup", _near_dedup, when=lambda cfg: cfg.near_dedup is not None),
    Op("semantic_dedup", _semantic_dedup, when=lambda cfg: cfg.semantic_dedup is not None),
    Op("decontaminate", _decontaminate, when=lambda cfg: cfg.decontaminate is not None),
    Op("balance", _balance, when=lambda cfg: cfg.balance.enabled),
)
GLOBAL_OPS = tuple(op.name for op in GLOBAL)
OPERATOR_ORDER = (*(op.name for op in PER_RECORD), *GLOBAL_OPS)


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


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.curate
    plan = plan_for(cfg, ctx.recipe.train.student if ctx.recipe.train else None)
    external = _references(ctx)
    files_sha = harvest_files(ctx.inputs["harvest"], ctx.run.manifest("harvest"))
    files = [ctx.inputs["harvest"] / name for name in files_sha]
    schema = input_schema(files)
    fingerprint = config_fingerprint(ctx)
    prev, mode_reason = (index.previous(ctx.run.stage_dir("curate"), fingerprint, files_sha) if cfg.incremental
                         else (None, "curate.incremental is off"))
    new_files = [f for f in files if prev is None or f.name not in prev.files]
    n_new = count_rows(new_files)
    kind = choose(cfg.executor, n_new)
    audit = Audit(cfg.pii, OPERATOR_ORDER, GLOBAL_OPS)
    partial_root = ctx.work.parent
    for stale in partial_root.glob("curate-tmp-*"):  # left by a killed run (the run directory lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="curate-tmp-", dir=partial_root))
    started = time.perf_counter()
    try:
        with stage_progress(ctx.console, "curate") as progress:
            job = Job(ctx, plan, external, files_sha, new_files, n_new, schema, fingerprint, prev, kind, audit, tmp,
                      progress)
            result = _run(job)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = _report(job, result, mode_reason, time.perf_counter() - started)
    write_json_atomic(ctx.work / "report.json", report)
    return StageResult(
        counts={"records_in": report["records_in"], "kept": report["kept"], "rejected": report["rejected"],
                "splits": report["splits"], "train_rows": report["train_rows"], "mode": report["mode"],
                "new_records": n_new,
                "dropped_by": {k: v["dropped"] for k, v in report["operators"].items() if v["dropped"]}},
        summary=_summary(report, ctx.run.stage_dir("curate") / "report.json"),
    )


def _report(job: Job, result: tuple, mode_reason: str, seconds: float) -> dict[str, Any]:
    """report.json; checks that every record in is kept or rejected, once."""
    counts, splits, by_function, train_rows = result
    audit, n_new = job.audit, job.n_new
    n_in = counts["records_in"]
    kept = sum(splits.values())
    rejected = counts["rejected"]
    if n_in != kept + rejected:  # the audit's promise: nothing is lost and nothing is counted twice
        raise RuntimeError(f"records in ({n_in}) must equal kept ({kept}) + rejected ({rejected})")
    return {
        "records_in": n_in,
        "kept": kept,
        "rejected": rejected,
        "mode": "incremental" if job.prev else "full",
        "mode_reason": mode_reason,
        "new_records": n_new,
        "earlier_records": n_in - n_new,
        "executor": job.kind,
        "seconds": round(seconds, 3),
        "phases_seconds": audit.phases,  # cpu: this process and the datasets workers (not Ray's)
        "operators": audit.report(),
        "other_cpu_seconds": {"setup (loading recognizers, detectors, tokenizers; per process)":
                              round(audit.ops.get("setup", {}).get("cpu_seconds", 0.0), 3),
                              "input keys and splits": round(audit.ops.get("keys", {}).get("cpu_seconds", 0.0), 3)},
        "retracted": counts["retracted"],
        "restored": counts["restored"],
        "labels": {k: v for k, v in sorted(audit.extra.items()) if not k.startswith("pii:")},
        "pii_and_secrets_found": {k[4:]: v for k, v in sorted(audit.extra.items()) if k.startswith("pii:")},
        "lengths": length_mode(job.plan) if job.plan.cfg.lengths.enabled else "no length limits",
        "splits": splits,
        "train_rows": train_rows,
        "splits_by_function": by_function,
        "pii_redacted_in_kept": audit.extra.get("pii_redacted_in_kept", 0),
    }


def _summary(report: dict[str, Any], path: Path) -> list[tuple[str, str]]:
    """The lines the CLI prints after the run."""
    splits, train_rows = report["splits"], report["train_rows"]
    summary = [("records in", f"{report['records_in']:,}  ({report['mode']}: {report['new_records']:,} new; "
                              f"{report['mode_reason']})"),
               ("executor", report["executor"])]
    summary += [(f"- {name}", f"{v['dropped']:,} dropped") for name, v in report["operators"].items() if v["dropped"]]
    if report["retracted"] or report["restored"]:
        summary.append(("earlier records",
                        f"{report['retracted']:,} now dropped, {report['restored']:,} restored"))
    summary += [("kept", f"{report['kept']:,}  (PII or secrets redacted in {report['pii_redacted_in_kept']:,})"),
                ("splits", "  ".join(f"{s} {n:,}" for s, n in splits.items())
                 + (f"  (train rows with weights: {train_rows:,})" if train_rows != splits["train"] else "")),
                ("report", str(path))]
    return summary


REDUCE_NAMES = {"_uid": "uid", "id": "id", "source": "source", "function": "function", "_split": "split",
                "_key": "key", "_text": "text", "_prompt": "prompt", "_score": "score", "timestamp": "timestamp",
                "_bands": "bands"}


@dataclass
class Job:
    """One run of the stage: its inputs, the earlier run it builds on, and where it works."""

    ctx: StageContext
    plan: Plan
    external: list  # decontamination's external benchmark texts
    files_sha: dict[str, str]  # every harvest file -> sha256
    new_files: list[Path]  # the harvest files not curated yet
    n_new: int  # their records
    schema: pa.Schema  # the harvest files' record schema
    fingerprint: str  # of the configuration, for the index
    prev: index.Previous | None  # the earlier run an incremental run builds on
    kind: str  # the executor of the per-record half
    audit: Audit
    tmp: Path  # scratch folder, removed afterwards
    progress: Any  # the stage's rich progress bar


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the datasets executor's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _run(job: Job) -> tuple[dict[str, int], dict[str, int], dict[str, dict[str, int]], int]:
    """Both halves, then the outputs and the index: (counts, splits, splits by function, train rows)."""
    phases: dict[str, float] = {}
    cpu: dict[str, float] = {}
    prev, audit = job.prev, job.audit
    t0, c0 = time.perf_counter(), cpu_seconds()
    new_rows = _per_record_half(job)
    phases["per-record half"], cpu["per-record half"] = time.perf_counter() - t0, cpu_seconds() - c0

    t0, c0 = time.perf_counter(), cpu_seconds()
    old_rows = index.read(prev)
    n_old = old_rows.num_rows
    table = pa.concat_tables([old_rows, new_rows])
    decisions, embeddings = _global_half(table, job)
    if embeddings is not None:
        table = set_column(table, "emb", to_f16_bytes(embeddings), pa.binary())
    phases["global half"], cpu["global half"] = time.perf_counter() - t0, cpu_seconds() - c0

    t0, c0 = time.perf_counter(), cpu_seconds()
    writers = Writers(job.ctx.work, job.schema)
    task = job.progress.add_task("write", total=None)
    try:
        counts = carry.write(prev, table.column("uid").to_numpy(), n_old, decisions, job.tmp, writers, audit)
    finally:
        writers.close()
    job.progress.remove_task(task)
    audit.extra["pii_redacted_in_kept"] = writers.pii_kept
    records_in = (prev.state.get("records_in", 0) if prev else 0) + job.n_new
    index.write(job.ctx.work, prev, table.slice(n_old),
                {"config": job.fingerprint, "harvest_files": job.files_sha, "records_in": records_in})
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


def _per_record_half(job: Job) -> pa.Table:
    """Run the per-record checks on the executor; survivors go to tmp/alive.arrow, dropped rows (final) to
    tmp/map-rejected.arrow. Returns the survivors' compact columns for the global half."""
    map_schema = output_schema(job.schema)
    compact: list[pa.Table] = []
    progress, tmp = job.progress, job.tmp
    task = progress.add_task(f"per-record checks ({job.kind})", total=job.n_new)
    with pa.OSFile(str(tmp / "alive.arrow"), "wb") as a_sink, pa.OSFile(str(tmp / "map-rejected.arrow"), "wb") as \
            r_sink, pa.ipc.new_stream(a_sink, map_schema) as alive_w, pa.ipc.new_stream(r_sink, map_schema) as rej_w:
        for out in run_map(job.kind, job.new_files, job.schema, job.plan, job.plan.cfg.executor, tmp,
                           lambda n: progress.advance(task, n)):
            if out.num_rows == 0:
                continue
            for blob in out.column("_stats").drop_null().to_pylist():
                job.audit.add_map_stats(blob)
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


def _global_half(table: pa.Table, job: Job) -> tuple[Decisions, np.ndarray | None]:
    """The runner of ``GLOBAL``: each operator the recipe turns on, in order, over every record (earlier nights'
    included) still alive; counts rows in, drops and time per operator in the audit."""
    cfg = job.plan.cfg
    n = table.num_rows
    e = Everything(table, np.ones(n, dtype=bool), rank(table), job.plan, job.external, np.ones(n, dtype=np.int64))
    by = np.full(n, None, dtype=object)
    why = np.full(n, None, dtype=object)
    task = job.progress.add_task("dedup, decontamination, balance", total=len(GLOBAL))
    for op in GLOBAL:
        t0, c0 = time.perf_counter(), time.process_time()
        n_in = int(e.alive.sum())
        if op.when(cfg):
            reasons = op.fn(e)
            o = job.audit.op(op.name, "global")
            o["in"] += n_in
            o["seconds"] += time.perf_counter() - t0
            o["cpu_seconds"] += time.process_time() - c0
            o["dropped_this_run"] += len(reasons)
            for i, r in reasons.items():
                e.alive[i] = False
                by[i], why[i] = op.name, r
        job.progress.advance(task)
    job.progress.remove_task(task)
    split_code = pc.fill_null(pc.index_in(table.column("split"), pa.array(list(SPLITS))), 0).to_numpy(
        zero_copy_only=False)
    dest = np.array([*SPLITS, "rejected"])[np.where(e.alive, split_code, len(SPLITS))]
    return Decisions(dest, by, why, e.copies), e.embeddings


def _embeddings(table: pa.Table, alive: np.ndarray, cfg) -> np.ndarray:
    """Unit embeddings (float16-rounded, so earlier nights' stored ones compare alike) of every row; rows that are
    not alive and have none stored get zeros."""
    values = table.column("emb").to_pylist()
    need = [int(i) for i in np.flatnonzero(alive) if values[i] is None]
    if need:
        texts = prompts_of(table).take(pa.array(need)).to_pylist()
        for i, b in zip(need, to_f16_bytes(load_embedder(cfg)(texts)), strict=True):
            values[i] = b
    dim = next((len(v) // 2 for v in values if v is not None), 1)
    return from_f16_bytes(values, dim).astype(np.float32)


