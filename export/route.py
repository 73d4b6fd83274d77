"""The route stage: fit ``routing_policy.json`` on the held-out results of this run's own student.

Per function trained on: the longest input (in student tokens) seen in training, and the lowest student
confidence (minimum token logprob) at which its answers are still kept, chosen so that the routed
traffic's quality (student answers where kept, teacher answers elsewhere, scored against the teacher)
stays within ``route.tolerance`` of the teacher's while sending as much as possible to the student.

Writes ``routing_policy.json``, ``tokenizer.json`` (what the Router counts tokens with) and
``calibration.json`` (per function: the whole curve of quality against student share). The export stage
publishes the policy with the student, in the same store version.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections import defaultdict
from typing import Any

import pyarrow.parquet as pq

from export.router import POLICY_SCHEMA, Router, confidence, count_input_tokens
from pipeline.record import from_table
from pipeline.stages import StageContext, StageResult


def choose_threshold(points: list[tuple[float, float]], tolerance: float) -> dict[str, Any]:
    """Given (confidence, quality in [0, 1]) of held-out student answers, where the teacher scores 1, pick the
    lowest threshold whose routed quality is >= 1 - tolerance. Answers at or above it go to the student.

    Returns the threshold (None: accept all; +inf: accept none), the share and quality it gives, and the curve.
    """
    n = len(points)
    ranked = sorted(points, key=lambda p: -p[0])
    curve = [{"threshold": math.inf, "student_share": 0.0, "routed_quality": 1.0}]
    best = curve[0]
    kept_quality = 0.0
    for i, (c, q) in enumerate(ranked):
        kept_quality += q
        if i + 1 < n and ranked[i + 1][0] == c:
            continue  # a threshold cannot split equal confidences
        k = i + 1
        point = {"threshold": c, "student_share": k / n, "routed_quality": (kept_quality + (n - k)) / n,
                 "student_quality": kept_quality / k}
        curve.append(point)
        if point["routed_quality"] >= 1 - tolerance - 1e-12:
            best = point
    threshold = best["threshold"]
    if best["student_share"] == 1.0:
        threshold = None
    return {"threshold": threshold, "student_share": best["student_share"],
            "routed_quality": best["routed_quality"], "curve": curve}


def _quantile(xs: list[int], q: float) -> int:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.route
    train_dir = ctx.inputs["train"]
    tok_src = next(p for p in (train_dir / "model" / "tokenizer.json", train_dir / "adapter" / "tokenizer.json")
                   if p.is_file())
    shutil.copyfile(tok_src, ctx.work / "tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ctx.work / "tokenizer.json"))
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    train = from_table(pq.read_table(ctx.inputs["curate"] / "train.parquet", columns=["function", "messages"]))
    trained_lengths: dict[str, list[int]] = defaultdict(list)
    for r in train:
        trained_lengths[r["function"]].append(count_input_tokens(encode, r["messages"]))
    test = {r["id"]: r for r in from_table(pq.read_table(ctx.inputs["curate"] / "test.parquet",
                                                         columns=["id", "messages"]))}
    preds = pq.read_table(ctx.inputs["evaluate"] / "predictions.parquet",
                          columns=["id", "function", "logprobs", "exact_match"]).to_pylist()
    by_fn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in preds:
        by_fn[p["function"]].append(p)
    functions: dict[str, Any] = {}
    calibration: dict[str, Any] = {}
    for fn in sorted(set(trained_lengths) | set(by_fn)):
        rows = by_fn.get(fn, [])
        if fn not in trained_lengths:
            continue  # never trained: the Router sends unknown functions to the teacher
        max_len = _quantile(trained_lengths[fn], cfg.length_quantile)
        if len(rows) < cfg.min_records:
            functions[fn] = {"enabled": False, "why": f"only {len(rows)} held-out records (< {cfg.min_records})",
                             "max_input_tokens": max_len, "confidence": {"signal": "min_token_logprob",
                                                                         "threshold": None}}
            continue
        # Inputs over the length limit go to the teacher whatever the confidence.
        points = []
        for p in rows:
            in_band = count_input_tokens(encode, test[p["id"]]["messages"]) <= max_len
            points.append((confidence(p["logprobs"]) if in_band else -math.inf, float(p["exact_match"])))
        fit = choose_threshold(points, cfg.tolerance)
        functions[fn] = {
            "enabled": fit["student_share"] > 0,
            "why": "" if fit["student_share"] > 0 else "no threshold keeps quality within tolerance",
            "max_input_tokens": max_len,
            "confidence": {"signal": "min_token_logprob", "threshold": fit["threshold"]},
            "calibration": {"n": len(rows), "student_share": fit["student_share"],
                            "routed_quality": fit["routed_quality"],
                            "student_quality_all": sum(q for _, q in points) / len(points)},
        }
        calibration[fn] = {"n": len(rows), "curve": fit["curve"]}
    teachers = sorted({t["model"] for t in pq.read_table(ctx.inputs["curate"] / "train.parquet", columns=["teacher"])
                       .column("teacher").to_pylist() if t and t.get("model")})
    policy = {
        "schema": POLICY_SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "student": {"name": ctx.recipe.export.model_name, "train_fingerprint": ctx.run.manifest("train")["fingerprint"]},
        "teacher": {"models": teachers},
        "quality": {"metric": "exact_match against the teacher", "tolerance": cfg.tolerance},
        "tokenizer": {"file": "tokenizer.json",
                      "sha256": hashlib.sha256((ctx.work / "tokenizer.json").read_bytes()).hexdigest()},
        "unknown_function": "teacher",
        "functions": functions,
    }
    (ctx.work / "routing_policy.json").write_text(json.dumps(policy, indent=2, default=str) + "\n")
    (ctx.work / "calibration.json").write_text(json.dumps(calibration, indent=2, default=str) + "\n")
    Router.load(ctx.work / "routing_policy.json")  # the file we wrote must load
    scores = json.loads((ctx.inputs["evaluate"] / "scores.json").read_text())
    cost = scores["cost_per_1k_requests_usd"]
    n_all = sum(len(v) for v in by_fn.values())
    share = sum(f.get("calibration", {}).get("student_share", 0) * f.get("calibration", {}).get("n", 0)
                for f in functions.values()) / max(1, n_all)
    blended = share * cost["student"] + (1 - share) * cost["teacher"]
    summary = []
    for fn, f in functions.items():
        c = f.get("calibration")
        thr = f["confidence"]["threshold"]
        if not f["enabled"] or c is None:
            summary.append((fn, f"teacher only: {f['why']}"))
            continue
        summary.append((fn, f"{100 * c['student_share']:.0f}% to student, routed quality "
                            f"{100 * c['routed_quality']:.1f}%, inputs <= {f['max_input_tokens']} tokens, "
                            f"confidence >= {'any' if thr is None else f'{thr:.3f}'}"))
    summary += [("overall", f"{100 * share:.0f}% of held-out traffic to the student "
                            f"(tolerance {100 * cfg.tolerance:.1f} points)"),
                ("cost / 1k requests", f"routed ${blended:.4f} vs teacher-only ${cost['teacher']:.4f}"),
                ("policy", str(ctx.run.stage_dir("route") / "routing_policy.json"))]
    return StageResult(
        counts={"functions": len(functions), "student_share": share},
        summary=summary,
        extra={"operating_point": {"student_share": share, "cost_per_1k_routed": blended,
                                   "cost_per_1k_teacher": cost["teacher"]}},
    )
