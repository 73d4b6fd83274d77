"""Calibration of a routing threshold on held-out records: the curve of routed quality against student share,
its area, bootstrap confidence intervals, and the operating point that keeps quality within tolerance.

Quality is the student's score against the teacher's answer in [0, 1]; the teacher scores 1 against itself, so
*routed* quality (student answers where kept, the teacher's elsewhere) at a student share s is
``(sum of kept quality + number escalated) / n``. Records that fail a pre-generation rule (``passed`` false) or
whose confidence is not finite never go to the student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.stats import bootstrap_counts


@dataclass
class Curve:
    """Every threshold that splits the held-out records differently (cuts), best-confidence first."""

    n: int
    order: np.ndarray  # record indices: passing records by confidence, highest first, then the rest
    cuts: np.ndarray  # numbers of records kept: 0 and every k where the k-th and (k+1)-th confidences differ
    share: np.ndarray  # per cut
    quality: np.ndarray  # routed quality per cut
    student_quality: np.ndarray  # mean quality of the kept answers per cut (1.0 at cut 0)
    thresholds: list[float | None]  # lowest kept confidence per cut (+inf at 0; None: every passing record kept)
    n_passing: int

    def point(self, i: int) -> dict[str, Any]:
        t = self.thresholds[i]
        return {"threshold": t, "student_share": float(self.share[i]), "routed_quality": float(self.quality[i]),
                "student_quality": float(self.student_quality[i])}


def build_curve(scores: np.ndarray, quality: np.ndarray, passed: np.ndarray | None = None) -> Curve:
    scores = np.asarray(scores, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    n = len(scores)
    ok = np.isfinite(scores) & (np.ones(n, bool) if passed is None else np.asarray(passed, bool))
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    order = np.concatenate([idx, np.flatnonzero(~ok)]).astype(np.int64)
    m = len(idx)
    s = scores[idx]
    ks = [k for k in range(1, m + 1) if k == m or s[k - 1] != s[k]]
    cuts = np.array([0, *ks], dtype=np.int64)
    kept_q = np.concatenate([[0.0], np.cumsum(quality[idx])])[cuts]
    share = cuts / n if n else np.zeros(1)
    routed = (kept_q + (n - cuts)) / n if n else np.ones(1)
    student_q = np.where(cuts > 0, kept_q / np.maximum(cuts, 1), 1.0)
    thresholds: list[float | None] = [math.inf] + [float(s[k - 1]) for k in ks]
    if m:  # every record that passed the pre-generation rules kept: no confidence threshold
        thresholds[-1] = None
    return Curve(n, order, cuts, share, routed, student_q, thresholds, m)


def area(curve: Curve) -> float:
    """Mean routed quality along the curve from share 0 to the largest reachable share (1.0 if nothing can be
    sent to the student)."""
    if len(curve.cuts) < 2 or curve.share[-1] <= 0:
        return 1.0
    return float(np.trapezoid(curve.quality, curve.share) / curve.share[-1])


def ranking_skill(curve: Curve, quality: np.ndarray) -> float | None:
    """Where the curve's area falls between a random order of the passing records (0) and the oracle order,
    most correct first (1): the routing counterpart of RouteLLM's APGR. None when no order can do better."""
    if curve.n_passing == 0:
        return None
    passing = np.asarray(quality, dtype=np.float64)[curve.order[: curve.n_passing]]
    oracle = build_curve(passing, passing)  # scored by their own quality: best first
    # Put the oracle and random curves on the same axis (share of all n records).
    s_max = curve.n_passing / curve.n
    rand = 1 - s_max * (1 - passing.mean()) / 2
    best_rel = float(np.trapezoid((oracle.quality * curve.n_passing + (curve.n - curve.n_passing)) / curve.n,
                                  oracle.share)) / max(oracle.share[-1], 1e-12)
    if best_rel - rand < 1e-9:
        return None
    return float((area(curve) - rand) / (best_rel - rand))


def bootstrap(curve: Curve, quality: np.ndarray, resamples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Share and routed quality at every cut for ``resamples`` bootstrap resamples of the records: two arrays
    of shape (resamples, len(cuts)). The thresholds stay fixed; only the records are redrawn."""
    n = curve.n
    q = np.asarray(quality, dtype=np.float64)[curve.order]
    shares = np.empty((resamples, len(curve.cuts)))
    routed = np.empty((resamples, len(curve.cuts)))
    start = 0
    for w in bootstrap_counts(n, resamples, seed):  # (b, n) draw counts, in order
        b = len(w)
        cw = np.concatenate([np.zeros((b, 1)), np.cumsum(w, axis=1)], axis=1)[:, curve.cuts]
        cq = np.concatenate([np.zeros((b, 1)), np.cumsum(w * q, axis=1)], axis=1)[:, curve.cuts]
        shares[start : start + b] = cw / n
        routed[start : start + b] = (cq + n - cw) / n
        start += b
    return shares, routed


def choose(curve: Curve, tolerance: float, lower: np.ndarray | None = None) -> int:
    """Index of the cut sending the most records to the student while routed quality (or, given, its lower
    confidence bound per cut) stays >= 1 - tolerance. Cut 0 (nothing to the student) always qualifies."""
    q = curve.quality if lower is None else lower
    feasible = np.flatnonzero(q >= 1 - tolerance - 1e-12)
    return int(feasible.max()) if len(feasible) else 0


def interval(values: np.ndarray, level: float) -> list[float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return [float(lo), float(hi)]


def thin(curve: Curve, keep: set[int], max_points: int = 200) -> list[int]:
    """Indices of at most about ``max_points`` cuts, evenly spread, always with the ends and ``keep``."""
    k = len(curve.cuts)
    step = max(1, math.ceil(k / max_points))
    return sorted({*range(0, k, step), k - 1, *keep})


def choose_threshold(points: list[tuple[float, float]], tolerance: float) -> dict[str, Any]:
    """Given (confidence, quality in [0, 1]) of held-out student answers, where the teacher scores 1, pick the
    lowest threshold whose routed quality is >= 1 - tolerance. Answers at or above it go to the student.

    Returns the threshold (None: accept all; +inf: accept none), the share and quality it gives, and the curve.
    """
    curve = build_curve(np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    i = choose(curve, tolerance)
    best = curve.point(i)
    return {"threshold": best["threshold"], "student_share": best["student_share"],
            "routed_quality": best["routed_quality"], "curve": [curve.point(j) for j in range(len(curve.cuts))]}
