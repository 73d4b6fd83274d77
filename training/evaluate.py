"""The evaluate stage: the student answers the held-out test split; its answers are scored against the
teacher's, per function, with tokens, latency and cost per 1,000 requests.

Writes ``predictions.parquet`` (one row per test record, with the student's per-token logprobs that the
route stage calibrates on) and ``scores.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.artifacts import load_trained_student
from pipeline.record import from_table
from pipeline.stages import StageContext, StageResult
from training.chat import prompt_messages
from training.metrics import score


def generate(model, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int,
             progress=None) -> list[dict[str, Any]]:
    """Greedy answers with per-token logprobs, batched with left padding."""
    import torch

    tokenizer.padding_side = "left"
    model.eval()
    out: list[dict[str, Any]] = []
    task = progress.add_task("generate", total=len(prompts)) if progress else None
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - t0
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        logprobs = model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
        for j in range(len(chunk)):
            ids, lps = [], []
            for tok, lp in zip(new[j].tolist(), logprobs[j].tolist(), strict=True):
                if tok == tokenizer.pad_token_id:
                    break
                ids.append(tok)
                lps.append(lp)
                if tok == tokenizer.eos_token_id:
                    break
            out.append({
                "prediction": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                "input_tokens": int(enc["attention_mask"][j].sum()),
                "output_tokens": len(ids),
                "logprobs": [float(x) if math.isfinite(x) else -100.0 for x in lps],
                "batch_seconds": seconds,
                "batch_size": len(chunk),
            })
        if progress:
            progress.advance(task, len(chunk))
    return out


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores of a set of prediction rows."""
    fa = [r["field_accuracy"] for r in rows if r["field_accuracy"] is not None]
    return {
        "n": len(rows),
        "exact_match": _mean([float(r["exact_match"]) for r in rows]),
        "field_accuracy": _mean(fa) if fa else None,
        "json_valid": _mean([float(r["json_valid"]) for r in rows if r["json_valid"] is not None]) if fa else None,
    }


def run(ctx: StageContext) -> StageResult:
    from training.train import quiet_hf

    quiet_hf()
    cfg = ctx.recipe.evaluate
    records = from_table(pq.read_table(ctx.inputs["curate"] / "test.parquet"))
    if cfg.max_records:
        records = records[: cfg.max_records]
    if not records:
        raise ValueError("the test split is empty: raise curate.split.test_fraction or add logs")
    model, tokenizer = load_trained_student(ctx.inputs["train"])
    with Progress(TextColumn("evaluate {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=ctx.console, transient=True) as progress:
        t0 = time.perf_counter()
        gens = generate(model, tokenizer, [prompt_messages(r) for r in records], cfg.max_new_tokens,
                        cfg.batch_size, progress)
        wall = time.perf_counter() - t0
    rows = []
    for r, g in zip(records, gens, strict=True):
        ref = r["output"]["content"] or ""
        rows.append({
            "id": r["id"], "function": r["function"], "reference": ref, **g, **score(g["prediction"], ref),
            "latency_ms": 1000 * g["batch_seconds"],
            "teacher_input_tokens": (r.get("usage") or {}).get("input_tokens"),
            "teacher_output_tokens": (r.get("usage") or {}).get("output_tokens"),
            "teacher_latency_ms": r.get("latency_ms"),
        })
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in x.items() if k not in ("batch_seconds", "batch_size")}
                                         for x in rows]), ctx.work / "predictions.parquet")
    by_fn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for x in rows:
        by_fn[x["function"]].append(x)
    # Cost per 1,000 requests. Teacher: logged token counts at the recipe's prices. Student: the hourly price
    # over the measured request throughput of batched generation on this machine.
    tp = cfg.teacher_price
    teacher_costs = [((x["teacher_input_tokens"] or 0) * tp.input_per_mtok
                      + (x["teacher_output_tokens"] or 0) * tp.output_per_mtok) / 1e6 for x in rows]
    req_per_s = len(rows) / wall
    student_cost = cfg.student_price.usd_per_hour / 3600 / req_per_s * 1000
    teacher_cost = 1000 * sum(teacher_costs) / len(rows)
    scores = {
        "overall": summarize(rows),
        "functions": {fn: summarize(xs) for fn, xs in sorted(by_fn.items())},
        "tokens": {
            "student_input_mean": _mean([x["input_tokens"] for x in rows]),
            "student_output_mean": _mean([x["output_tokens"] for x in rows]),
            "teacher_input_mean": _mean([x["teacher_input_tokens"] for x in rows]),
            "teacher_output_mean": _mean([x["teacher_output_tokens"] for x in rows]),
        },
        "latency_ms": {"student_batched_mean": 1000 * wall / len(rows),
                       "teacher_logged_mean": _mean([x["teacher_latency_ms"] for x in rows])},
        "throughput": {"requests_per_s": req_per_s, "output_tokens_per_s": sum(x["output_tokens"] for x in rows) / wall,
                       "batch_size": cfg.batch_size, "device": str(model.device)},
        "cost_per_1k_requests_usd": {"teacher": teacher_cost, "student": student_cost,
                                     "saving": 1 - student_cost / teacher_cost if teacher_cost else None},
    }
    (ctx.work / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    summary = [(f"{fn} (n={s['n']})", f"exact match {pct(s['exact_match'])}"
                + (f", field accuracy {pct(s['field_accuracy'])}, valid JSON {pct(s['json_valid'])}"
                   if s["field_accuracy"] is not None else ""))
               for fn, s in scores["functions"].items()]
    summary += [
        ("overall", f"exact match {pct(scores['overall']['exact_match'])} against the teacher"),
        ("throughput", f"{req_per_s:.1f} requests/s, {scores['throughput']['output_tokens_per_s']:.0f} tokens/s "
                       f"on {model.device}"),
        ("cost / 1k requests", f"teacher ${teacher_cost:.4f}, student ${student_cost:.4f}"),
    ]
    return StageResult(
        counts={"records": len(rows), "exact_match": scores["overall"]["exact_match"]},
        summary=summary,
        extra={"scores": {"overall": scores["overall"], "functions": scores["functions"],
                          "cost_per_1k_requests_usd": scores["cost_per_1k_requests_usd"]}},
    )
