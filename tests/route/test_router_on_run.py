"""The Router on the policy the demo-sized e2e run fitted: its decisions, and a replay of the held-out
predictions that must give the share and quality the policy reports."""

import json
import math

import pyarrow.parquet as pq
import pytest

from export.route.router import Router


def test_router_decisions_in_and_out_of_band(e2e):
    route = e2e / "runs/t/route"
    policy = json.loads((route / "routing_policy.json").read_text())
    assert policy["schema"] == "distill-routing/v2"
    assert set(policy["functions"]) == {"ticket_triage", "product_faq"}
    router = Router.load(route / "routing_policy.json", embeddings=False)  # no torch: distance not checked
    fn = "product_faq"
    rule = policy["functions"][fn]
    ok = {"messages": [{"role": "user", "content": "Is the Echo Speaker in stock?"}], "metadata": {"function": fn}}
    d = router.before(ok)  # the tiny student may not have earned this function: then it is disabled, with why
    assert (d.route == "student" and "calibrated" in d.reasons[0]) if rule["enabled"] else \
        (d.route == "teacher" and rule["why"] in d.reasons[0])
    unknown = {**ok, "metadata": {"function": "legal_advice"}}
    d = router.before(unknown)
    assert d.route == "teacher" and "'legal_advice' was not trained" in d.reasons[0]
    # The same rules with the function enabled and a known confidence threshold.
    forced = {**policy, "functions": {fn: {**rule, "enabled": True,
                                           "after": {"signal": "min_logprob", "threshold": -1.0}}}}
    r = Router(forced, router.encode, language=router.language, skip=("distance",))
    long = {**ok, "messages": [{"role": "user", "content": "Is the Echo Speaker in stock? " * 200}]}
    d = r.before(long)
    assert d.route == "teacher" and f"over the {rule['before']['max_input_tokens']} seen in training" in d.reasons[-1]
    # After generation: a confident answer stays with the student, an unsure one escalates.
    assert r.after(ok, [-0.01, -0.2]).route == "student"
    d = r.after(ok, [-0.01, -6.0])
    assert d.route == "teacher" and "confidence -6.000 (min_logprob) < threshold -1.000" in d.reasons[-1]
    assert r.after(ok, []).route == "teacher"
    assert r.after(long, [-0.01]).route == "teacher"
    calibration = json.loads((route / "calibration.json").read_text())
    for fn_cal in calibration["functions"].values():
        curve = fn_cal["curve"]  # ends at the share of records that passed the pre-generation rules
        assert curve[0]["student_share"] == 0.0 and curve[-1]["student_share"] == fn_cal["n_passing_before"] / fn_cal["n"]


def test_router_policy_matches_the_calibration_it_reports(e2e):
    """Replaying the held-out predictions through the Router gives the share the policy reports."""
    from route_helpers import full_router

    from export.route.signals import user_text

    route = e2e / "runs/t/route"
    router = full_router(str(route))
    policy = router.policy
    held = {h["id"]: h for h in pq.read_table(route / "heldout.parquet").to_pylist()}  # with the top-k logprobs
    preds = pq.read_table(e2e / "runs/t/evaluate/predictions.parquet").to_pylist()
    test = {r["id"]: r for r in pq.read_table(e2e / "runs/t/curate/test.parquet").to_pylist()}
    vecs = router.embed([user_text(test[p["id"]]["messages"]) for p in preds])  # MiniLM once, batched
    emb = {p["id"]: v for p, v in zip(preds, vecs, strict=True)}
    for fn, rule in policy["functions"].items():
        if not rule.get("calibration"):
            continue
        rows = [p for p in preds if p["function"] == fn]
        to_student = []
        for p in rows:
            h = held[p["id"]]
            lp = [{"logprob": c, "top_logprobs": [{"logprob": x} for x in t]}
                  for c, t in zip(h["logprobs"], h["top_logprobs"], strict=True)]
            req = {"messages": test[p["id"]]["messages"], "metadata": {"function": fn}}
            if router.after(req, lp, before=router.before(req, embedding=emb[p["id"]])).to_student:
                to_student.append(p)
        assert len(to_student) / len(rows) == pytest.approx(rule["calibration"]["student_share"])
        quality = (sum(p["exact_match"] for p in to_student) + len(rows) - len(to_student)) / len(rows)
        assert quality == pytest.approx(rule["calibration"]["routed_quality"])
        assert quality >= 1 - policy["quality"]["tolerance"] - 1e-9
    assert not math.isnan(json.loads((route / "manifest.json").read_text())["operating_point"]["student_share"])
