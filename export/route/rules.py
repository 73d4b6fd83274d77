"""Fitting the pre-generation rules of each function the student was trained on: the input's length in student
tokens, its language and its distance from the training inputs (see the route stage's docstring).

Each function's rule is the ``before`` part of its entry in the policy (``export.route.policy.BeforeRule``):
``max_input_tokens``, ``token_estimate``, ``languages`` and ``max_distance``. The language detector's and the
training embeddings' files are written into the route stage's folder, under ``EXTRAS``.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.route.policy import EXTRAS
from export.route.signals import (
    CACHED_ROLES,
    LANGUAGE_MODEL,
    LanguageDetector,
    TokenCounter,
    bundled_language_model,
    message_text,
    user_text,
)
from pipeline.rundir import sha256_file


@dataclass
class BeforeFit:
    """The pre-generation rules per function, and what the Router and the drift reference need to apply them."""

    rules: dict[str, dict[str, Any]]  # function -> max_input_tokens, token_estimate, languages, max_distance
    detector: LanguageDetector | None = None
    language_meta: dict[str, Any] | None = None
    train_languages: dict[str, Counter] = field(default_factory=dict)
    embedder: Any = None
    embedder_meta: dict[str, Any] | None = None
    distance_meta: dict[str, Any] | None = None
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # function -> training embeddings
    heldout_vecs: dict[str, np.ndarray] = field(default_factory=dict)  # held-out record id -> embedding
    heldout_dist: dict[str, list[float]] = field(default_factory=dict)  # function -> held-out distances
    notes: list[str] = field(default_factory=list)


def quantile(xs: list[int], q: float) -> int:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def fit_token_estimate(samples: list[tuple[int, int, int]]) -> dict[str, Any] | None:
    """Least squares ``tokens ~ a + b * bytes + c * spaces`` over (bytes, spaces, tokens) of the training
    inputs' non-system text, with the residual range (plus one token of slack) as the bound."""
    if len(samples) < 3:
        return None
    x = np.array([[1.0, b, s] for b, s, _ in samples])
    y = np.array([t for *_, t in samples], dtype=np.float64)
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    res = y - x @ coef
    return {"coef": [float(v) for v in coef], "residual": [float(res.min()) - 1, float(res.max()) + 1],
            "fitted_on": len(samples)}


def fit_length(trained: dict[str, list[dict[str, Any]]], counter: TokenCounter, encode: Callable[[str], list[int]],
               length_quantile: float) -> BeforeFit:
    """The length rule per function (the other rules left empty): the ``length_quantile`` of the training inputs'
    exact token counts, and the bytes-and-spaces estimate of the count."""
    rules: dict[str, dict[str, Any]] = {}
    for fn, rows in trained.items():
        lengths, samples = [], []
        for r in rows:
            lengths.append(counter.exact(r["messages"]))
            rest = [message_text(m) for m in r["messages"] if m["role"] not in CACHED_ROLES]
            if rest and all(t.isascii() for t in rest):
                samples.append((sum(len(t) for t in rest), sum(t.count(" ") for t in rest),
                                sum(len(encode(t)) for t in rest)))
        rules[fn] = {"max_input_tokens": quantile(lengths, length_quantile),
                     "token_estimate": fit_token_estimate(samples), "languages": None, "max_distance": None}
    return BeforeFit(rules)


def fit_language(fit: BeforeFit, trained: dict[str, list[dict[str, Any]]], cfg, work: Path, progress) -> None:
    """The language rule per function: the languages of at least ``cfg.min_records`` training inputs (``cfg``:
    the recipe's ``route.language``). Copies fastText lid.176 beside the policy."""
    shutil.copyfile(bundled_language_model(), work / EXTRAS / LANGUAGE_MODEL)
    fit.detector = LanguageDetector(work / EXTRAS / LANGUAGE_MODEL)
    fit.language_meta = {"detector": "fastText lid.176.ftz (176 languages; CC BY-SA 3.0, Joulin et al. 2016)",
                         "file": f"{EXTRAS}/{LANGUAGE_MODEL}", "sha256": sha256_file(work / EXTRAS / LANGUAGE_MODEL),
                         "min_confidence": cfg.min_confidence}
    task = progress.add_task("detect languages", total=sum(map(len, trained.values())))
    for fn, rows in trained.items():
        seen: Counter = Counter()
        for r in rows:
            lang, p = fit.detector(user_text(r["messages"]))
            seen[lang if p >= cfg.min_confidence else "uncertain"] += 1
        progress.advance(task, len(rows))
        fit.train_languages[fn] = seen
        fit.rules[fn]["languages"] = sorted(lang for lang, c in seen.items()
                                            if c >= cfg.min_records and lang != "uncertain")


def fit_distance(fit: BeforeFit, trained: dict[str, list[dict[str, Any]]],
                 heldout_inputs: dict[str, list[dict[str, Any]]], cfg, seed: int, work: Path, progress) -> None:
    """The distance rule per function (``cfg``: the recipe's ``route.distance``): the ``cfg.quantile`` of the
    held-out inputs' kNN cosine distances to at most ``cfg.max_reference`` training inputs, whose MiniLM
    embeddings are written beside the policy."""
    from safetensors.numpy import save_file

    from export.route.embedder import Embedder, knn_distance

    task = progress.add_task("embed inputs (MiniLM)",
                             total=sum(map(len, trained.values())) + sum(map(len, heldout_inputs.values())))
    fit.embedder = embedder = Embedder()
    fit.embedder_meta = embedder.identity
    rng = np.random.default_rng(seed)
    for fn, rows in sorted(trained.items()):
        if len(rows) > cfg.max_reference:
            rows = [rows[i] for i in sorted(rng.choice(len(rows), cfg.max_reference, replace=False))]
        fit.reference[fn] = embedder([user_text(r["messages"]) for r in rows])
        progress.advance(task, len(trained[fn]))
        held = heldout_inputs.get(fn, [])
        if held:
            vecs = embedder([user_text(r["messages"]) for r in held])
            fit.heldout_vecs.update({r["id"]: v for r, v in zip(held, vecs, strict=True)})
            dist = knn_distance(vecs, fit.reference[fn], cfg.k)
            progress.advance(task, len(held))
        else:  # no held-out input of this function: leave-one-out distances of the training inputs
            dist = knn_distance(fit.reference[fn], fit.reference[fn], cfg.k, exclude_self=True)
            fit.notes.append(f"{fn}: no held-out inputs, distance limit from leave-one-out training distances")
        fit.heldout_dist[fn] = dist.tolist()
        fit.rules[fn]["max_distance"] = float(np.quantile(dist, cfg.quantile, method="higher"))
    save_file(fit.reference, str(work / EXTRAS / "embeddings.safetensors"))
    fit.distance_meta = {"method": "knn-cosine", "k": cfg.k, "file": f"{EXTRAS}/embeddings.safetensors",
                         "sha256": sha256_file(work / EXTRAS / "embeddings.safetensors")}
