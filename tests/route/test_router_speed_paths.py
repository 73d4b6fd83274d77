"""The Router's shortcut for throughput keeps its decisions those the route stage calibrated.

Calibration keeps, for a rule with no threshold, every answer that passed phase 1 and whose signal is finite; an
entropy signal is finite exactly when every token has top-k. So the Router, for a rule with no threshold on an
entropy signal, checks only that (and does not compute the entropy); it escalates an answer whose signal is not
finite (NaN, inf) whether or not there is a threshold. Checked on a policy fitted by
``export.route.thresholds.calibrate_functions`` itself, the proxy's way of handling a ValueError included.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest

from export.route.router import Router
from export.route.signals import all_signals, split_logprobs
from export.route.thresholds import calibrate_functions
from pipeline.config.route import RouteConfig

BEFORE = {"max_input_tokens": None, "token_estimate": None, "languages": None, "max_distance": None}


def answer(rng: random.Random, correct: bool, top_k: bool = True) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content`` of a seeded answer: sure tokens, a few unsure ones when wrong; top-5 per token
    (one entry below -50, the bound ``topk_entropy`` skips, now and then), or none with ``top_k=False``."""
    out = []
    unsure = set() if correct else {rng.randrange(8) for _ in range(2)}
    for i in range(8):
        p = rng.uniform(0.3, 0.6) if i in unsure else 1 - rng.uniform(0, 0.02)
        alts = [math.log((1 - p) * rng.uniform(0.05, 0.5) / (j + 1)) for j in range(4)]
        if rng.random() < 0.1:
            alts[-1] = -60.0
        top = [{"token": "t", "logprob": math.log(p)}] + [{"token": "a", "logprob": a} for a in alts]
        out.append({"token": "t", "logprob": math.log(p), **({"top_logprobs": top} if top_k else {})})
    return out


def fitted_case(signal: str, seed: int = 0) -> tuple[Router, list[tuple[str, Any]], np.ndarray]:
    """A policy fitted on 2 x 60 held-out answers: 'sure' always right (so no threshold; a few of its answers lack
    top-k, one has a NaN logprob), 'unsure' wrong on a third (so a threshold). Returns the Router, (function,
    answer) pairs and the records calibration keeps."""
    rng = random.Random(seed)
    records, quality = [], []
    for fn in ("sure", "unsure"):
        for i in range(60):
            correct = fn == "sure" or rng.random() < 0.67
            records.append((fn, answer(rng, correct, top_k=fn == "unsure" or i % 10 != 3)))
            quality.append(float(correct))
    records[5][1][0]["logprob"] = math.nan  # min_logprob NaN (the first token's), entropies unaffected
    sig = [all_signals(*split_logprobs(lp)) for _, lp in records]
    idx = {fn: [i for i, (f, _) in enumerate(records) if f == fn] for fn in ("sure", "unsure")}
    cfg = RouteConfig(signal=signal, top_logprobs=5, bootstrap=100, tolerance=0.05)
    fitted = calibrate_functions({fn: BEFORE for fn in idx}, idx, np.array(quality), np.ones(len(records), bool),
                                 sig, cfg, seed)
    policy = {"schema": "distill-routing/v2", "tokenizer": None, "unknown_function": "teacher",
              "length": {"count": "exact"}, "confidence": {"top_logprobs": 5},
              "functions": {fn: r.model_dump() for fn, r in fitted.functions.items()}}
    return Router(policy), records, fitted.kept


def served(router: Router, fn: str, lp: Any) -> bool:
    """Whether serve-router keeps the student's answer (it escalates when phase 2 raises ValueError)."""
    try:
        return router.after({"messages": [{"role": "user", "content": "x"}], "metadata": {"function": fn}},
                            lp).to_student
    except ValueError:
        return False


def test_router_keeps_what_calibration_kept_with_and_without_threshold():
    for signal in ("mean_entropy", "max_entropy", "min_logprob"):
        router, records, kept = fitted_case(signal)
        assert router.policy["functions"]["sure"]["after"]["threshold"] is None, signal
        assert router.policy["functions"]["unsure"]["after"]["threshold"] is not None, signal
        routes = [served(router, fn, lp) for fn, lp in records]
        assert routes == kept.tolist(), signal
        assert 0 < sum(routes[60:]) < 60  # the threshold keeps some of 'unsure' and escalates some
        assert sum(routes[:60]) == (59 if signal == "min_logprob" else 54)  # NaN (min only) or no top-k (entropy)


def test_no_threshold_on_entropy_checks_top_k_only():
    router, records, _ = fitted_case("max_entropy")
    req = {"messages": [{"role": "user", "content": "x"}], "metadata": {"function": "sure"}}
    d = router.after(req, records[0][1])
    assert d.route == "student" and "confidence" not in d.signals
    assert d.reasons[-1] == "student answer kept: no threshold (max_entropy not computed)"
    no_top_k = next(lp for fn, lp in records if fn == "sure" and "top_logprobs" not in lp[0])
    for lp in (no_top_k, [-0.5, -9.0]):  # calibration gave these -inf: not kept, and the proxy escalates them
        with pytest.raises(ValueError, match="top_logprobs"):
            router.after(req, lp)
    assert router.after(req, []).reasons[-1] == "the student's answer is empty"


def test_no_threshold_escalates_a_signal_that_is_not_finite():
    router, records, _ = fitted_case("min_logprob")
    req = {"messages": [{"role": "user", "content": "x"}], "metadata": {"function": "sure"}}
    d = router.after(req, records[5][1])
    assert d.route == "teacher" and d.reasons[-1] == "student confidence nan (min_logprob) is not finite"
    d = router.after(req, records[0][1])  # a logprob signal is cheap: computed and logged as before
    assert d.route == "student" and d.reasons[-1].endswith("(min_logprob) no threshold") and d.signals["confidence"] < 0
