"""The Router's decisions are pinned: a fixed, seeded set of requests and student answers (every signal, every
length mode, the language rule, unknown and disabled functions, content parts, answers without top-k, top-k
entries at -9999, all-certain tokens) decided by the Router of commit a4bdd87 — before it was optimised for
throughput — is stored in ``data/router_decisions.json.gz``; today's Router must give the same route, phase,
reasons and signals (floats bit for bit), or raise the same error.

One change since, made on purpose (``unchecked``): a rule with no threshold on an entropy signal keeps an answer
whose every token has top-k without computing the entropy (it would change nothing, and it costs more than the rest
of the decision): its last reason says so and ``signals`` has no ``confidence``. Only the "faq" rows (the rule with
no threshold) with an entropy signal are affected; an answer without top-k still raises, as before.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from export.route.router import Router  # noqa: E402
from export.route.signals import ENTROPY_SIGNALS, SIGNALS, signal_value, split_logprobs  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "router_decisions.json.gz"
FUNCTIONS = ("triage", "faq", "off")
WORDS = ["the", "order", "refund", "Blender", "late", "please", "help", "account", "café", "naïve", "x" * 12, "42"]


def encode(text: str) -> list[int]:
    """A deterministic stand-in tokenizer: one token per 3 characters of each word (at least one)."""
    return [0] * sum(max(1, len(w) // 3) for w in text.split())


def language(text: str) -> tuple[str, float]:
    """A deterministic stand-in detector: 'it' for text with 'café', uncertain for short text, else 'en'."""
    if "café" in text:
        return "it", 0.97
    return ("en", 0.31) if len(text) < 12 else ("en", 0.9)


def policy(count: str, signal: str) -> dict[str, Any]:
    est = {"coef": [0.5, 0.21, 0.4], "residual": [-2.0, 3.0]}
    before = {"max_input_tokens": 40, "token_estimate": est, "languages": ["en"], "max_distance": None}
    return {"schema": "distill-routing/v2", "tokenizer": None, "unknown_function": "teacher",
            "length": {"count": count}, "language": {"file": "lid", "sha256": "0" * 64, "min_confidence": 0.5},
            "confidence": {"top_logprobs": 5},
            "functions": {
                "triage": {"before": before, "after": {"signal": signal, "threshold": -0.35}},
                "faq": {"before": {**before, "languages": None, "token_estimate": None},
                        "after": {"signal": signal, "threshold": None}},
                "off": {"enabled": False, "why": "too few records", "before": before,
                        "after": {"signal": signal, "threshold": None}}}}


def answer(rng: random.Random) -> Any:
    """Student logprobs in one of the shapes an endpoint returns, edge cases included."""
    kind = rng.random()
    n = rng.choice([0, 1, 2, 5, 18, 30, 48]) if kind > 0.05 else 0
    if kind < 0.15:
        return [math.log(rng.uniform(0.3, 1.0)) for _ in range(n)]  # floats only: no top-k
    tokens = []
    for _ in range(n):
        p = rng.choice([1.0, rng.uniform(0.3, 0.7), 1 - rng.expovariate(100) % 0.2])
        k = rng.choice([5, 5, 5, 3, 1]) if kind > 0.25 else 0
        alts = sorted(((1 - p) * rng.uniform(0, 0.99) / (j + 1) for j in range(k - 1)), reverse=True)
        top = [math.log(p), *(math.log(a) if a > 0 else -9999.0 for a in alts)]
        if rng.random() < 0.05:
            top[-1] = -9999.0
        tokens.append({"token": "t", "logprob": top[0], "bytes": None,
                       "top_logprobs": [{"token": "a", "logprob": x} for x in top]})
    return tokens


def request(rng: random.Random) -> dict[str, Any]:
    words = rng.choices(WORDS, k=rng.choice([1, 3, 8, 20, 60]))
    user: Any = " ".join(words)
    if rng.random() < 0.1:
        user = [{"type": "text", "text": user}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    msgs = [{"role": "system", "content": "You triage tickets."}, {"role": "user", "content": user}]
    if rng.random() < 0.2:
        msgs.insert(1, {"role": "developer", "content": "Be brief."})
    fn = rng.choices([*FUNCTIONS, "unknown", None], weights=[10, 6, 1, 1, 1])[0]
    return {"messages": msgs, **({"metadata": {"function": fn}} if fn else {})}


def cases(n: int = 100, seed: int = 0) -> list[tuple[str, str, dict[str, Any], Any]]:
    rng = random.Random(seed)
    return [(count, signal, request(rng), answer(rng))
            for count in ("estimate", "bounded", "exact") for signal in SIGNALS for _ in range(n)]


def decide(router: Router, req: dict[str, Any], lp: Any) -> dict[str, Any]:
    """Both phases as serve-router runs them; an error is recorded by type and message."""
    try:
        d = router.before(req)
        out = {"before": d.as_dict()}
        if d.to_student:
            out["after"] = router.after(req, lp, before=d).as_dict()
    except (ValueError, KeyError, TypeError) as err:
        return {"error": [type(err).__name__, str(err)]}
    return out


def decisions() -> list[str]:
    routers = {(c, s): Router(policy(c, s), encode, language=language) for c in ("estimate", "bounded", "exact")
               for s in SIGNALS}
    return [json.dumps(decide(routers[c, s], req, lp), sort_keys=True) for c, s, req, lp in cases()]


def unchecked(golden: str, req: dict[str, Any], signal: str) -> str:
    """A pinned decision as the Router gives it since a rule with no threshold stopped computing an entropy signal:
    the same phase 1, then the answer kept with the new last reason and no confidence. Other rows are unchanged."""
    g = json.loads(golden)
    after = g.get("after")
    if (req.get("metadata") or {}).get("function") != "faq" or signal not in ENTROPY_SIGNALS or not after \
            or after["route"] != "student":
        return golden
    assert after["reasons"][-1].endswith(f"({signal}) no threshold"), after
    g["after"] = {**after, "reasons": [*after["reasons"][:-1], f"student answer kept: no threshold ({signal} not computed)"],
                  "signals": {k: v for k, v in after["signals"].items() if k != "confidence"}}
    return json.dumps(g, sort_keys=True)


def test_decisions_are_those_of_the_router_before_optimisation():
    pinned = json.loads(gzip.decompress(GOLDEN.read_bytes()))
    now = decisions()
    assert len(now) == len(pinned) == 1500
    golden = [unchecked(g, req, signal) for g, (_, signal, req, _) in zip(pinned, cases(), strict=True)]
    assert sum(g != p for g, p in zip(golden, pinned, strict=True)) > 50  # the change is exercised
    diff = [i for i, (a, b) in enumerate(zip(now, golden, strict=True)) if a != b]
    assert not diff, f"{len(diff)} decisions changed, first: {now[diff[0]]} != {golden[diff[0]]}"
    # The pinned set reaches every outcome it is meant to cover.
    text = "\n".join(pinned)
    for needle in ('"route": "student"', "< threshold", "no threshold", "not in training", "uncertain", "over the",
                   "is routed to the teacher", "not trained", "answer is empty", "top_logprobs", '"phase": "after"', "at most", "at least",
                   "about", "function 'default'"):
        assert needle in text, needle


def test_router_signal_matches_the_calibration_signal_bit_for_bit():
    """The Router's fast path and signal_value (what calibration uses) agree exactly on every pinned answer."""
    for _, signal, _, lp in cases(40, seed=1):
        if not lp or not isinstance(lp[0], dict) or not all(t["top_logprobs"] for t in lp):
            continue
        r = Router(policy("exact", signal), encode, language=language)
        req = {"messages": [{"role": "user", "content": "the order"}], "metadata": {"function": "triage"}}
        got = r.after(req, lp).signals["confidence"]
        want = signal_value(signal, *split_logprobs(lp))
        assert got == want or (math.isnan(got) and math.isnan(want)), (signal, got, want)


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_bytes(gzip.compress(json.dumps(decisions()).encode(), mtime=0))
    print(f"wrote {GOLDEN}")
