"""Summaries of scored answers: means with bootstrap confidence intervals, and the tables per function, per
input-length bucket and per language that ``scores.json`` holds."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.stats import bootstrap_counts

# Metrics summarised per group (None values, e.g. field accuracy of free-text answers, are left out).
SUMMARY_METRICS = ("quality", "exact_match", "field_accuracy", "json_valid", "schema_valid", "chrf",
                   "judge_student", "judge_teacher")


def bootstrap_ci(values: Sequence[float], resamples: int, confidence: float, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean; None with fewer than two values or no resamples."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if resamples <= 0 or len(x) < 2:
        return None
    means = np.concatenate([counts @ x / len(x) for counts in bootstrap_counts(len(x), resamples, seed)])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def summarize(rows: Sequence[dict[str, Any]], resamples: int = 0, confidence: float = 0.95,
              seed: int = 0) -> dict[str, Any]:
    """n, the mean of every metric present, and a bootstrap interval for each under ``ci``."""
    out: dict[str, Any] = {"n": len(rows)}
    ci: dict[str, list[float]] = {}
    for m in SUMMARY_METRICS:
        vals = [float(r[m]) for r in rows if r.get(m) is not None]
        if not vals:
            if m in ("quality", "exact_match", "field_accuracy", "json_valid"):
                out[m] = None
            continue
        out[m] = sum(vals) / len(vals)
        interval = bootstrap_ci(vals, resamples, confidence, seed)
        if interval is not None:
            ci[m] = interval
    if ci:
        out["ci"] = ci
    return out


def length_bucket(tokens: int, edges: Sequence[int]) -> str:
    """The bucket label of an input length: '<=64', '65-128', ..., '>2048'."""
    lower = 0
    for edge in edges:
        if tokens <= edge:
            return f"<={edge}" if lower == 0 else f"{lower + 1}-{edge}"
        lower = edge
    return f">{edges[-1]}"


def bucket_order(edges: Sequence[int]) -> list[str]:
    return [length_bucket(e, edges) for e in edges] + [f">{edges[-1]}"]


def language_detector(codes: Sequence[str]) -> Callable[[list[str]], list[str]]:
    """A function from texts to ISO 639-1 codes ('und' when too short or unsure), choosing among ``codes``."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    detector = (LanguageDetectorBuilder.from_iso_codes_639_1(*[getattr(IsoCode639_1, c.upper()) for c in codes])
                .with_minimum_relative_distance(0.05).build())

    def detect(texts: list[str]) -> list[str]:
        found = detector.detect_languages_in_parallel_of(texts)
        return [lang.iso_code_639_1.name.lower() if lang is not None else "und" for lang in found]

    return detect


def table(rows: Sequence[dict[str, Any]], key: str, resamples: int, confidence: float, seed: int = 0,
          order: Sequence[str] | None = None) -> dict[str, Any]:
    """Rows grouped by ``key``, each group summarised (in ``order`` when given, else by size)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[str(r[key])].append(r)
    keys = [k for k in order if k in groups] if order else sorted(groups, key=lambda k: (-len(groups[k]), k))
    keys += sorted(k for k in groups if k not in keys)
    return {k: summarize(groups[k], resamples, confidence, seed) for k in keys}
