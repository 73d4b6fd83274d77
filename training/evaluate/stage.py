"""The evaluate stage: the student answers the held-out test split, batched and greedy; every answer is scored
against the teacher's (exact match, schema-aware JSON field accuracy, schema validity, chrF, and optionally an
LLM judge's grade of both answers), with bootstrap confidence intervals, tables per function, per input-length
bucket and per language, tokens, latency, cost per 1,000 requests, and the quality gate.

Writes ``predictions.parquet`` (one row per test record, with the student's per-token logprobs that the
route stage calibrates on), ``scores.json`` and ``gate.json``. With a golden set (``evaluate.golden``: files of
fixed requests with reviewed answers, in any harvest format) the student answers it too: ``golden_predictions.parquet``
and ``scores.json``'s ``golden`` (scored against the reviewed answers, reported apart from the test split and
gated by ``gate.golden_min_quality``). The engine (generation and scoring) is in
``training.evaluate.engine``, which the export stage reuses to re-evaluate every artefact on the same records.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.harvest.golden import golden_inputs, golden_redaction, load_golden
from pipeline.chat import prompt_messages
from pipeline.config.evaluate import EvaluateConfig
from pipeline.record import from_table
from pipeline.stages import StageContext, StageResult
from pipeline.ui import stage_progress
from training.evaluate import gate, metrics
from training.evaluate import tables as eval_tables
from training.evaluate.engine import evaluate_model, single_request_latency
from training.train.outputs import load_trained_student

# The stage's contract (pipeline/stages.py). It also looks at export.store and export.model_name for the gate's
# regression check against the published student; they stay out of its fingerprint because the store changes
# without the recipe changing, and export checks the gate again against the store as it is when it publishes.
READS = ("curate", "train")
ALSO_READS = ("curate.pii", "curate.max_record_bytes")  # golden records are redacted as harvest redacts (golden.py)


def external_inputs(recipe) -> dict[str, str]:
    """The golden set's files (evaluate.golden): new or changed ones rerun evaluate."""
    return golden_inputs(recipe.evaluate.golden) if recipe.evaluate else {}


def _golden(ctx: StageContext, model, tokenizer, progress, detect, boot) -> dict[str, Any] | None:
    """The student on the golden set, redacted as harvest redacts (so no raw PII is written), scored against its
    reviewed answers (the judge is not asked: with quality 'judge' the golden set is scored by 'auto'); writes
    golden_predictions.parquet."""
    cfg, work = ctx.recipe.evaluate, ctx.work
    if not cfg.golden:
        return None
    records = load_golden(cfg.golden, golden_redaction(ctx.recipe))
    metric = "auto" if cfg.quality == "judge" else cfg.quality
    rows, _ = evaluate_model(model, tokenizer, records, cfg, progress, "golden", detect, metric)
    pq.write_table(pa.Table.from_pylist(rows), work / "golden_predictions.parquet")
    by_fn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for x in rows:
        by_fn[x["function"]].append(x)
    files: dict[str, int] = defaultdict(int)
    for r in records:
        files[r["tags"]["golden_file"]] += 1
    return {"quality_metric": metric, "reference": "the golden set's reviewed answers", "records": len(rows),
            "files": dict(files), "overall": eval_tables.summarize(rows, *boot),
            "functions": {fn: eval_tables.summarize(xs, *boot) for fn, xs in sorted(by_fn.items())}}


def _timing(rows: list[dict[str, Any]], wall: float, single: list[float], cfg: EvaluateConfig, model) -> dict:
    """Latency (batched, single request, the teacher's logged) and throughput of the test split's generation."""
    return {
        "latency_ms": {
            "student_batched_mean": 1000 * wall / len(rows),
            "student_single_p50": _percentile(single, 50),
            "student_single_p95": _percentile(single, 95),
            "teacher_logged_mean": _mean([x["teacher_latency_ms"] for x in rows]),
            "teacher_logged_p50": _percentile([x["teacher_latency_ms"] for x in rows
                                               if x["teacher_latency_ms"] is not None], 50),
        },
        "throughput": {"requests_per_s": len(rows) / wall,
                       "output_tokens_per_s": sum(x["output_tokens"] for x in rows) / wall,
                       "batch_size": cfg.batch_size, "device": str(model.device)},
    }


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _percentile(xs: Sequence[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else None


def _judge(cfg: EvaluateConfig, records: list[dict[str, Any]], rows: list[dict[str, Any]], progress) -> dict[str, Any]:
    """Grade student (and teacher) answers with the LLM judge; adds judge_student / judge_teacher to rows."""
    from training.evaluate.judge import grade

    jc = cfg.judge
    chosen = [i for i, r in enumerate(records) if jc.functions is None or r["function"] in jc.functions]
    chosen = chosen[: jc.max_records] if jc.max_records else chosen
    for row in rows:
        row["judge_student"] = None
        row["judge_teacher"] = None
    requests = [prompt_messages(records[i]) for i in chosen]
    jobs = [("judge_student", [rows[i]["prediction"] for i in chosen])]
    if jc.judge_teacher:
        jobs.append(("judge_teacher", [rows[i]["reference"] for i in chosen]))
    stats: dict[str, Any] = {"model": jc.model, "graded": 0, "failed": 0, "errors": {}, "prompt_tokens": 0,
                             "completion_tokens": 0}
    for column, answers in jobs:
        task = progress.add_task(f"judge {column.split('_')[1]}", total=len(answers)) if progress else None
        grades = grade(jc, requests, answers, (lambda t=task: progress.advance(t)) if progress else None)
        for i, g in zip(chosen, grades, strict=True):
            rows[i][column] = g["score"]
            if g["score"] is None:
                stats["failed"] += 1
                stats["errors"][g["error"]] = stats["errors"].get(g["error"], 0) + 1
            else:
                stats["graded"] += 1
            for k in ("prompt_tokens", "completion_tokens"):
                stats[k] += int((g.get("usage") or {}).get(k) or 0)
    return stats


def run(ctx: StageContext) -> StageResult:
    from pipeline.hf import quiet_hf

    quiet_hf()
    cfg = ctx.recipe.evaluate
    records = from_table(pq.read_table(ctx.inputs["curate"] / "test.parquet"))
    if cfg.max_records:
        records = records[: cfg.max_records]
    if not records:
        raise ValueError("the test split is empty: raise curate.split.test_fraction or add logs")
    model, tokenizer = load_trained_student(ctx.inputs["train"])
    detect = eval_tables.language_detector(cfg.languages)
    judge_stats = None
    with stage_progress(ctx.console, "evaluate") as progress:
        rows, wall = evaluate_model(model, tokenizer, records, cfg, progress, "student", detect)
        if cfg.judge is not None:
            judge_stats = _judge(cfg, records, rows, progress)
            if cfg.quality == "judge":
                for row in rows:
                    row["quality"] = row["judge_student"]
        single = single_request_latency(model, tokenizer, [prompt_messages(r) for r in records[: cfg.latency_samples]],
                                        cfg.max_new_tokens)
        boot = (cfg.bootstrap, cfg.confidence, ctx.recipe.seed)
        golden = _golden(ctx, model, tokenizer, progress, detect, boot)
    pq.write_table(pa.Table.from_pylist(rows), ctx.work / "predictions.parquet")

    by_fn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for x in rows:
        by_fn[x["function"]].append(x)
    functions = {fn: eval_tables.summarize(xs, *boot) for fn, xs in sorted(by_fn.items())}
    for fn, s in functions.items():
        s["teacher_quality"] = gate.teacher_score(s, cfg.quality)
        s["teacher_cost_per_1k_usd"] = 1000 * _mean([x["teacher_cost_usd"] for x in by_fn[fn]])
    # Cost per 1,000 requests. Teacher: logged token counts at the recipe's prices. Student: the hourly price
    # over the measured request throughput of batched generation on this machine.
    req_per_s = len(rows) / wall
    student_cost = cfg.student_price.usd_per_hour / 3600 / req_per_s * 1000
    teacher_cost = 1000 * _mean([x["teacher_cost_usd"] for x in rows])
    gate_result = gate.against_store(functions, cfg.gate, cfg.quality, ctx.recipe.export.store,
                                     ctx.recipe.export.model_name, strict=False,
                                     golden=golden["functions"] if golden else None)
    scores = {
        "quality_metric": cfg.quality,
        "quality_description": metrics.describe_quality(cfg.quality),
        "bootstrap": {"resamples": cfg.bootstrap, "confidence": cfg.confidence},
        "overall": eval_tables.summarize(rows, *boot),
        "functions": functions,
        "by_length": eval_tables.table(rows, "length_bucket", *boot,
                                       order=eval_tables.bucket_order(cfg.length_buckets)),
        "by_language": eval_tables.table(rows, "language", *boot),
        "tokens": {
            "student_input_mean": _mean([x["input_tokens"] for x in rows]),
            "student_output_mean": _mean([x["output_tokens"] for x in rows]),
            "teacher_input_mean": _mean([x["teacher_input_tokens"] for x in rows]),
            "teacher_output_mean": _mean([x["teacher_output_tokens"] for x in rows]),
        },
        **_timing(rows, wall, single, cfg, model),
        "cost_per_1k_requests_usd": {"teacher": teacher_cost, "student": student_cost,
                                     "saving": 1 - student_cost / teacher_cost if teacher_cost else None},
        "gate": {"passed": gate_result["passed"], "failures": gate_result["failures"]},
    }
    if judge_stats is not None:
        scores["judge"] = judge_stats
    if golden is not None:
        scores["golden"] = golden
    (ctx.work / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    (ctx.work / "gate.json").write_text(json.dumps(gate_result, indent=2) + "\n")
    return StageResult(
        counts={"records": len(rows), "quality": scores["overall"]["quality"],
                "exact_match": scores["overall"]["exact_match"], "gate": "passed" if gate_result["passed"] else "failed"},
        summary=_summary(scores, gate_result, judge_stats, model.device),
        extra={"scores": {k: scores[k] for k in ("quality_metric", "overall", "functions", "cost_per_1k_requests_usd",
                                                 "golden") if k in scores},
               "gate": {"passed": gate_result["passed"], "failures": gate_result["failures"]}},
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _with_ci(s: dict[str, Any], metric: str) -> str:
    ci = (s.get("ci") or {}).get(metric)
    return _pct(s.get(metric)) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _summary(scores: dict[str, Any], gate_result: dict[str, Any], judge_stats, device) -> list[tuple[str, str]]:
    out = []
    for fn, s in scores["functions"].items():
        parts = [f"quality {_with_ci(s, 'quality')}", f"exact {_pct(s['exact_match'])}"]
        if s.get("field_accuracy") is not None:
            parts.append(f"fields {_pct(s['field_accuracy'])}, valid JSON {_pct(s['json_valid'])}")
        elif s.get("chrf") is not None:
            parts.append(f"chrF {100 * s['chrf']:.1f}")
        if s.get("judge_student") is not None:
            parts.append(f"judge {_pct(s['judge_student'])} vs teacher {_pct(s.get('judge_teacher'))}")
        out.append((f"{fn} (n={s['n']})", ", ".join(parts)))
    out.append(("overall", f"quality {_with_ci(scores['overall'], 'quality')} ({scores['quality_description']})"))
    out.append(("by input length", ", ".join(f"{k}: {_pct(v['quality'])} (n={v['n']})"
                                             for k, v in scores["by_length"].items())))
    out.append(("by language", ", ".join(f"{k}: {_pct(v['quality'])} (n={v['n']})"
                                         for k, v in scores["by_language"].items())))
    if scores.get("golden"):
        g = scores["golden"]
        out.append((f"golden set (n={g['records']})", ", ".join(
            f"{fn} {_with_ci(s, 'quality')} (n={s['n']})" for fn, s in g["functions"].items())
            + f"; against its reviewed answers, {len(g['files'])} file(s)"))
    if judge_stats:
        out.append(("judge", f"{judge_stats['model']}: {judge_stats['graded']} graded, {judge_stats['failed']} failed"))
    lat, thr, cost = scores["latency_ms"], scores["throughput"], scores["cost_per_1k_requests_usd"]
    out.append(("throughput", f"{thr['requests_per_s']:.1f} requests/s, {thr['output_tokens_per_s']:.0f} tokens/s "
                              f"on {device}; one request alone {lat['student_single_p50']:.0f} ms (p50)"))
    out.append(("cost / 1k requests", f"teacher ${cost['teacher']:.4f}, student ${cost['student']:.4f}"))
    if gate_result["passed"]:
        out.append(("gate", "[green]passed[/]" + (f" (against the teacher and {gate_result['published_version']})"
                                                  if gate_result["published_version"] else "")))
    else:
        out.append(("gate", "[bold red]FAILED[/]: " + "; ".join(gate_result["failures"])
                    + " (export will refuse to publish)"))
    return out
