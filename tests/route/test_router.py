"""The Router on the e2e run's policy: inputs built to be in band and out of band (unseen function, foreign
language, very long, far from the training data), each decision and its reasons; both phases."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
from route_helpers import (
    FAQ,
    FAR_FAQ,
    IN_BAND_FAQ,
    ITALIAN_FAQ,
    TRIAGE,
    content_logprobs,
    full_router,
    request,
    with_rule,
)

from export.route.router import POLICY_SCHEMA, PolicyError, Router
from export.route.signals import TokenCounter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def router(e2e):
    return full_router(str(e2e / "runs/t/route"))


def test_policy_has_every_pre_generation_rule(router):
    policy = router.policy
    assert policy["schema"] == POLICY_SCHEMA
    for fn in (FAQ, TRIAGE):
        before = policy["functions"][fn]["before"]
        assert before["max_input_tokens"] > 0 and before["token_estimate"]["coef"]
        assert "en" in before["languages"] and 0 < before["max_distance"] < 1
    assert policy["embedder"]["name"].endswith("all-MiniLM-L6-v2") and len(policy["embedder"]["weights_sha256"]) == 64
    assert router.skipped == []


def test_in_band_request_may_go_to_the_student(router):
    d = with_rule(router, FAQ, threshold=None).before(request(IN_BAND_FAQ))
    assert d.route == "student", d.reasons
    assert d.reasons[0] == f"function '{FAQ}' is calibrated"
    assert any(r.startswith("input ") and r.endswith(f"<= {router.functions[FAQ]['before']['max_input_tokens']}")
               for r in d.reasons)
    assert "language 'en' was in training" in d.reasons
    assert any(r.startswith("distance ") and "<=" in r for r in d.reasons)
    assert d.signals["language"] == "en" and d.signals["distance"] <= router.functions[FAQ]["before"]["max_distance"]


@pytest.mark.parametrize(("req", "last_reason"), [
    (request(IN_BAND_FAQ, function="legal_advice"), "function 'legal_advice' was not trained or not calibrated"),
    (request(IN_BAND_FAQ, function=None), "function 'default' was not trained or not calibrated"),
    (request(ITALIAN_FAQ), "language 'it'"),
    (request(IN_BAND_FAQ + " " + "Also, tell me everything about the warranty and shipping. " * 40), "input is"),
    (request(FAR_FAQ), "from the training inputs is over the limit"),
], ids=["unseen-function", "no-function", "foreign-language", "very-long", "far-from-training"])
def test_out_of_band_requests_go_to_the_teacher(router, req, last_reason):
    r = with_rule(router, FAQ, threshold=None)  # enabled, so only the input decides
    d = r.before(req)
    assert d.route == "teacher" and d.phase == "before"
    assert last_reason in d.reasons[-1], d.reasons
    # Phase 2 cannot bring it back, however confident the student is.
    assert r.after(req, content_logprobs([-0.001])).route == "teacher"


def test_reasons_name_the_limit_that_was_crossed(router):
    r = with_rule(router, FAQ, threshold=None)
    limit = router.functions[FAQ]["before"]["max_input_tokens"]
    d = r.before(request(IN_BAND_FAQ + " and more words" * 60))
    assert f"over the {limit} seen in training" in d.reasons[-1] and d.signals["input_tokens"] > limit
    d = r.before(request(ITALIAN_FAQ))
    assert "was not in training (en" in d.reasons[-1] and d.signals["language"] == "it"


def test_after_generation_confident_stays_unsure_escalates(router):
    r = with_rule(router, FAQ, signal="min_logprob", threshold=-1.0)
    req = request(IN_BAND_FAQ)
    d = r.after(req, [-0.01, -0.2])
    assert d.route == "student" and d.phase == "after" and "student confidence -0.200 (min_logprob)" in d.reasons[-1]
    d = r.after(req, [-0.01, -6.0])
    assert d.route == "teacher" and "confidence -6.000 (min_logprob) < threshold -1.000" in d.reasons[-1]
    assert r.after(req, []).reasons[-1] == "the student's answer is empty"
    # Reusing the phase-1 decision gives the same answer as recomputing it.
    first = r.before(req)
    assert r.after(req, [-0.01, -6.0], before=first).reasons == d.reasons


def test_signals_that_do_not_punish_length(router):
    """A long confident answer with one unsure token: min_logprob escalates it, the 10th percentile does not."""
    answer = [-0.01] * 60 + [-2.5]
    req = request(IN_BAND_FAQ)
    assert with_rule(router, FAQ, signal="min_logprob", threshold=-1.0).after(req, answer).route == "teacher"
    assert with_rule(router, FAQ, signal="p10_logprob", threshold=-1.0).after(req, answer).route == "student"
    assert with_rule(router, FAQ, signal="mean_logprob", threshold=-1.0).after(req, answer * 3).route == "student"


def test_entropy_signal_needs_top_logprobs(router):
    r = with_rule(router, FAQ, signal="mean_entropy", threshold=-0.5)
    req = request(IN_BAND_FAQ)
    assert r.after(req, content_logprobs([-0.001, -0.002])).route == "student"  # peaked distributions
    flat = content_logprobs([math.log(0.34), math.log(0.34)])  # three nearly equal choices per token
    d = r.after(req, flat)
    assert d.route == "teacher" and "(mean_entropy) < threshold -0.500" in d.reasons[-1]
    with pytest.raises(ValueError, match="top_logprobs"):
        r.after(req, [-0.01, -0.02])


def test_disabled_function_and_rules_skipped_on_purpose(router, e2e):
    policy = copy.deepcopy(router.policy)
    policy["functions"][FAQ]["enabled"] = False
    policy["functions"][FAQ]["why"] = "only 2 held-out records"
    d = Router(policy, router.encode, language=router.language, embed=router.embed,
               reference=router.reference).before(request(IN_BAND_FAQ))
    assert d.route == "teacher" and d.reasons == [f"function '{FAQ}' is routed to the teacher: only 2 held-out records"]
    with pytest.raises(PolicyError, match="checks distance"):
        Router(router.policy, router.encode, language=router.language)
    light = Router.load(e2e / "runs/t/route", embeddings=False)  # no torch: the distance rule is skipped, and said so
    d = with_rule(light, FAQ, threshold=None).before(request(FAR_FAQ))
    assert d.route == "student" and d.reasons[-1] == "not checked: distance"



def test_router_without_embeddings_stays_light(e2e):
    """Loaded with embeddings=False, the Router decides both phases without torch, numpy or transformers."""
    import subprocess
    import sys

    code = (
        "import sys; from export.router import Router\n"
        f"r = Router.load({str(e2e / 'runs/t/route')!r}, embeddings=False)\n"
        "req = {'messages': [{'role': 'user', 'content': 'Is the Echo Speaker in stock?'}],"
        " 'metadata': {'function': 'product_faq'}}\n"
        "d = r.after(req, [{'logprob': -0.1, 'top_logprobs': [{'logprob': -0.1}]}])\n"
        "assert d.reasons, d\n"
        "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'sentence_transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(ROOT))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_router_with_embeddings_loads_quietly(e2e):
    """serve-router and route-check load the embedder at start and at each reload: no progress bar or library
    warning in their logs."""
    import subprocess
    import sys

    code = (f"from export.router import Router\nr = Router.load({str(e2e / 'runs/t/route')!r})\n"
            f"again = Router.load({str(e2e / 'runs/t/route')!r})\n"
            "assert r.embed is not None and again.embed is r.embed\n")  # one MiniLM per process, not per version
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "Loading weights" not in out.stderr and "kernels" not in out.stderr, out.stderr


def test_length_estimate_agrees_with_exact_count(router, e2e):
    import pyarrow.parquet as pq

    counter = TokenCounter(router.encode)
    test = pq.read_table(e2e / "runs/t/curate/test.parquet", columns=["function", "messages"]).to_pylist()
    checked = 0
    for r in test:
        est = router.functions[r["function"]]["before"]["token_estimate"]
        exact = counter.exact(r["messages"])
        for limit in (exact - 3, exact, exact + 3):
            ok, n, how = counter.check(r["messages"], limit, est, "bounded")
            assert ok == (exact <= limit), (how, n, exact, limit)  # bounded mode decides exactly like exact
            checked += 1
        ok, n, how = counter.check(r["messages"], 10_000, est, "estimate")
        assert ok and how in ("at most", "exact")  # exact: non-ASCII text is always tokenized
    assert checked >= 30
    long = request("word " * 3000)["messages"]
    ok, n, how = counter.check(long, 50, router.functions[FAQ]["before"]["token_estimate"], "estimate")
    assert not ok and how == "at least" and n > 50


def test_a_huge_non_ascii_message_is_judged_from_a_prefix(router):
    """A 3 MB Japanese message was tokenized in full (13.5 s on serve-router's event loop, every other client
    waiting) to learn it is over a 40-token limit; now a prefix decides, and the bound is a true lower bound."""
    seen: list[int] = []

    def encode(text: str) -> list[int]:
        seen.append(len(text))
        return router.encode(text)

    counter = TokenCounter(encode)
    huge = [{"role": "user", "content": "日本語のテキスト、在庫はありますか。" * 180_000}]
    est = router.functions[FAQ]["before"]["token_estimate"]
    for mode in ("estimate", "bounded", "exact"):
        seen.clear()
        ok, n, how = counter.check(huge, 40, est, mode)
        assert not ok and how == "at least" and n > 40 and max(seen) <= 64 * 41, (mode, seen)
    for text in ("日本語のテキスト " * 400, "é" * 9000, "ab" * 6000, "word " * 3000):
        exact = len(router.encode(text))
        for limit in (10, 40, 100):
            ok, n, how = counter.check([{"role": "user", "content": text}], limit, None, "exact")
            assert ok == (exact <= limit) and (n == exact if how == "exact" else n <= exact), (text[:9], limit)


def test_unknown_major_version_and_tampered_files_are_refused(e2e, tmp_path):
    import shutil

    route = tmp_path / "route"
    shutil.copytree(e2e / "runs/t/route", route)
    policy = json.loads((route / "routing_policy.json").read_text())
    (route / "routing_policy.json").write_text(json.dumps({**policy, "schema": "distill-routing/v3"}))
    with pytest.raises(PolicyError, match="newer than this Router understands"):
        Router.load(route, embeddings=False)
    (route / "routing_policy.json").write_text(json.dumps({**policy, "schema": "other/v2"}))
    with pytest.raises(PolicyError, match="not a distill routing policy"):
        Router.load(route, embeddings=False)
    (route / "routing_policy.json").write_text(json.dumps(policy))
    (route / "routing" / "lid.176.ftz").write_bytes(b"tampered")
    with pytest.raises(PolicyError, match="lid.176.ftz does not match the policy's sha256"):
        Router.load(route, embeddings=False)
    broken = {**policy, "functions": {FAQ: {"enabled": True, "before": {}, "after": {"signal": "x", "threshold": 1}}}}
    (route / "routing_policy.json").write_text(json.dumps(broken))
    with pytest.raises(PolicyError, match="functions/product_faq"):
        Router.load(route, language=False, embeddings=False)


def test_v1_policy_still_loads(e2e):
    router = full_router(str(e2e / "runs/t/route"))
    v1 = {"schema": "distill-routing/v1", "functions": {FAQ: {
        "enabled": True, "why": "", "max_input_tokens": 40,
        "confidence": {"signal": "min_token_logprob", "threshold": -1.0}}}}
    r = Router(v1, router.encode)
    assert r.policy["upgraded_from"] == "distill-routing/v1"
    assert r.after(request(IN_BAND_FAQ), [-0.1]).route == "student"
    assert r.after(request(IN_BAND_FAQ), [-3.0]).route == "teacher"
    assert r.before(request("x " * 200)).route == "teacher"


def test_a_later_minor_version_loads_and_a_nan_threshold_is_refused(router, e2e):
    """v2.x policies may add fields; a NaN threshold (which json reads) would keep every answer with the student."""
    policy = json.loads((e2e / "runs/t/route/routing_policy.json").read_text())
    newer = {**policy, "schema": "distill-routing/v2.1", "added_in_v2_1": {"x": 1}}
    assert Router(newer, router.encode, language=router.language, skip=("distance",)).policy["schema"].endswith("v2.1")
    rule = policy["functions"][FAQ]
    nan = {**policy, "functions": {**policy["functions"],
                                   FAQ: {**rule, "enabled": True, "after": {"signal": "min_logprob",
                                                                           "threshold": float("nan")}}}}
    with pytest.raises(PolicyError, match="functions/product_faq/after/threshold"):
        Router(nan, router.encode, language=router.language, skip=("distance",))
