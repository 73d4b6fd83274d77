"""Choosing each function's post-generation rule on the held-out records (a confidence signal and its threshold,
with the calibration that supports it), and the operating point that gives over all held-out traffic.

The maths on one curve (build, area, bootstrap, choice) is in ``export.route.calibrate``; this module applies it
per function with the recipe's ``route`` section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.route import calibrate
from export.route.policy import FunctionRule
from export.route.signals import ENTROPY_SIGNALS, SIGNALS
from pipeline.stats import bootstrap_counts


@dataclass
class Fitted:
    """Per function its rule (policy) and its calibration record, and which held-out records the student keeps."""

    functions: dict[str, FunctionRule]
    calibration: dict[str, Any]
    kept: np.ndarray  # bool per held-out record


def answer_quality(row: dict[str, Any], metric: str) -> float:
    """A held-out answer's quality against the teacher's in [0, 1] (``route.quality_metric``)."""
    if metric == "field_accuracy" and row.get("field_accuracy") is not None:
        return float(row["field_accuracy"])
    if metric == "chrf":
        from sacrebleu.metrics import CHRF

        return CHRF().sentence_score(row["prediction"] or "", [row["reference"] or ""]).score / 100
    return float(bool(row["exact_match"]))


def _why_disabled(cfg, n_pass: int) -> str:
    if n_pass == 0:
        return "every held-out input failed the pre-generation rules"
    return (f"no confidence threshold keeps routed {cfg.quality_metric} within {cfg.tolerance:g} of the teacher"
            + (" (lower confidence bound)" if cfg.guarantee == "lower_bound" else ""))


def _curve_points(curve: calibrate.Curve, routed_b: np.ndarray, best: int, level: float) -> list[dict[str, Any]]:
    """The thinned curve for calibration.json, with each point's interval of routed quality."""
    lo_b, hi_b = np.quantile(routed_b, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    points = []
    for j in calibrate.thin(curve, {best}):
        pt = curve.point(j)
        pt["threshold"] = None if pt["threshold"] is None or math.isinf(pt["threshold"]) else pt["threshold"]
        pt["routed_quality_ci"] = [float(lo_b[j]), float(hi_b[j])]
        pt["chosen"] = j == best
        points.append(pt)
    return points


def calibrate_function(idx: np.ndarray, before: dict[str, Any], quality: np.ndarray, passed: np.ndarray,
                       sig: list[dict[str, float]], cfg, seed: int) -> tuple[FunctionRule, dict[str, Any], np.ndarray]:
    """One function with enough held-out records (``idx``, their ``passed`` pre-generation rules): its rule, its
    calibration record and the held-out records it keeps. ``cfg``: the recipe's ``route`` section."""
    level = cfg.confidence_level
    q = quality[idx]
    candidates = [s for s in SIGNALS if s not in ENTROPY_SIGNALS or cfg.top_logprobs > 0]
    if cfg.signal != "auto":
        candidates = [cfg.signal]
    curves = {s: calibrate.build_curve(np.array([sig[i][s] for i in idx]), q, passed) for s in candidates}
    areas = {s: calibrate.area(c) for s, c in curves.items()}
    signal = max(candidates, key=lambda s: (areas[s], -candidates.index(s)))
    curve = curves[signal]
    shares_b, routed_b = calibrate.bootstrap(curve, q, cfg.bootstrap, seed=seed)
    lower = np.quantile(routed_b, 1 - level, axis=0)
    best = calibrate.choose(curve, cfg.tolerance, lower if cfg.guarantee == "lower_bound" else None)
    point = curve.point(best)
    k = int(curve.cuts[best])
    n_pass = int(passed.sum())
    rule = FunctionRule(
        enabled=k > 0, why="" if k > 0 else _why_disabled(cfg, n_pass), before=before,
        after={"signal": signal, "threshold": point["threshold"] if k > 0 else None},
        calibration={
            "n": len(idx), "signal": signal,
            "student_share": point["student_share"], "student_share_ci": calibrate.interval(shares_b[:, best], level),
            "routed_quality": point["routed_quality"],
            "routed_quality_ci": calibrate.interval(routed_b[:, best], level),
            "routed_quality_lower_bound": float(lower[best]),
            "student_quality_kept": point["student_quality"] if k else None,
            "student_quality_all": float(q.mean()),
            "escalated_before": 1 - n_pass / len(idx), "escalated_after": (n_pass - k) / len(idx),
            "area": areas[signal], "ranking_skill": calibrate.ranking_skill(curve, q),
        },
    )
    record = {"n": len(idx), "n_passing_before": n_pass, "signal": signal, "areas": areas,
              "curve": _curve_points(curve, routed_b, best, level)}
    return rule, record, idx[curve.order[:k]]


def calibrate_functions(before_rules: dict[str, dict[str, Any]], by_fn: dict[str, list[int]], quality: np.ndarray,
                        passed: np.ndarray, sig: list[dict[str, float]], cfg, seed: int) -> Fitted:
    """Every trained function's rule, in name order; those with fewer than ``cfg.min_records`` held-out records
    are disabled (teacher only)."""
    fitted = Fitted({}, {}, np.zeros(len(quality), dtype=bool))
    for fn in sorted(before_rules):
        idx = np.array(by_fn.get(fn, []), dtype=np.int64)
        if len(idx) < cfg.min_records:
            fitted.functions[fn] = FunctionRule(
                enabled=False, why=f"only {len(idx)} held-out records (< route.min_records {cfg.min_records})",
                before=before_rules[fn], after={"signal": "min_logprob", "threshold": None})
            continue
        rule, record, kept = calibrate_function(idx, before_rules[fn], quality, passed[idx], sig, cfg, seed)
        fitted.functions[fn], fitted.calibration[fn] = rule, record
        fitted.kept[kept] = True
    return fitted


def operating_point(fitted: Fitted, preds: list[dict[str, Any]], to_student_before: list[bool],
                    quality: np.ndarray, teacher_price, student_cost: float, cfg, seed: int) -> dict[str, Any]:
    """Share, routed quality and cost per 1,000 requests over all held-out traffic, with bootstrap intervals.
    Requests the student answered and then escalated pay both calls."""
    kept = fitted.kept
    teacher_cost = np.array([((p.get("teacher_input_tokens") or 0) * teacher_price.input_per_mtok
                              + (p.get("teacher_output_tokens") or 0) * teacher_price.output_per_mtok) / 1e6
                             for p in preds])
    tried = np.array([to_student_before[i] and (fn := fitted.functions.get(p["function"])) is not None and fn.enabled
                      for i, p in enumerate(preds)])
    per_request = np.where(tried, student_cost, 0.0) + np.where(kept, 0.0, teacher_cost)
    routed_q = np.where(kept, quality, 1.0)
    n_all = len(preds)
    op = {
        "n": n_all,
        "student_share": float(kept.mean()) if n_all else 0.0,
        "routed_quality": float(routed_q.mean()) if n_all else 1.0,
        "teacher_quality": 1.0,
        "student_quality_all": float(quality.mean()) if n_all else None,
        "cost_per_1k_routed_usd": 1000 * float(per_request.mean()) if n_all else 0.0,
        "cost_per_1k_teacher_usd": 1000 * float(teacher_cost.mean()) if n_all else 0.0,
        "cost_per_1k_student_usd": 1000 * student_cost,
        "teacher_price_per_mtok": {"input": teacher_price.input_per_mtok, "output": teacher_price.output_per_mtok},
        "quality_metric": cfg.quality_metric,
    }
    if n_all:
        w = np.concatenate(list(bootstrap_counts(n_all, cfg.bootstrap, seed)))
        level = cfg.confidence_level
        op["student_share_ci"] = calibrate.interval(w @ kept / n_all, level)
        op["routed_quality_ci"] = calibrate.interval(w @ routed_q / n_all, level)
        op["cost_per_1k_routed_usd_ci"] = [1000 * x for x in calibrate.interval(w @ per_request / n_all, level)]
    return op
