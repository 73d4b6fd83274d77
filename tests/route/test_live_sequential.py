"""The live loop's decisions without a network: the sequential tests (false alarms, detection delay, no flapping
on one bad hour), the deployment file's transitions and atomic writes, and the nightly decision on logged
records (issue 16, item 4)."""

from __future__ import annotations

import json
import math
import os
import random
import threading

import numpy as np
import pytest

from export.route import canary, deployment, sequential
from pipeline.config.route import LiveConfig

FLOOR = 0.85


def _bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_the_detector_rarely_alarms_on_a_version_that_holds_its_floor():
    alarms = sum(sequential.detector(_bernoulli(0.87, 1000, s), FLOOR, "below", 0.001, 0.05).decided
                 for s in range(100))
    assert alarms <= 2  # 100 streams of 1,000 audits each at 2 points above the floor


def test_the_detector_catches_a_real_drop_within_a_bounded_number_of_audits():
    good, bad = _bernoulli(0.95, 3000, 1), _bernoulli(0.65, 1000, 2)
    out = sequential.detector(np.r_[good, bad], FLOOR, "below", 0.001, 0.05)
    assert out.decided and out.at >= 3000
    bound = sequential.expected_delay(FLOOR, 0.65, "below", 0.001, 0.05)
    assert 50 < bound < 200 and out.at - 3000 < 3 * bound  # a long good history does not slow it down


def test_one_bad_hour_does_not_flap():
    """12 wrong answers in a row inside a long good stream stay under the threshold; 52 do not."""
    xs = np.r_[_bernoulli(0.95, 500, 3), np.zeros(12), _bernoulli(0.95, 500, 4)]
    out = sequential.detector(xs, FLOOR, "below", 0.001, 0.05)
    assert not out.decided and out.statistic < out.threshold
    assert sequential.detector(np.r_[xs, np.zeros(40)], FLOOR, "below", 0.001, 0.05).decided  # a real drop does


def test_evidence_needs_data_above_the_floor_and_is_valid_per_observation_bound():
    assert sequential.evidence(np.ones(100), FLOOR, "above", 0.05, 0.1).decided
    assert not sequential.evidence(_bernoulli(FLOOR, 2000, 5), FLOOR, "above", 0.05, 0.1).decided
    at_floor = sum(sequential.evidence(_bernoulli(FLOOR, 500, s), FLOOR, "above", 0.05, 0.1).decided
                   for s in range(200))
    assert at_floor <= 0.05 * 200 * 1.5  # Ville: at most alpha of the streams, however long they run
    per_obs = sequential.evidence([1.0, 1.0] * 40, [0.85, 0.99] * 40, "above", 0.05, 0.1)
    assert per_obs.n == 80 and per_obs.decided


def test_scores_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sequential.detector([0.5, 1.5], FLOOR)
    with pytest.raises(ValueError, match="side"):
        sequential.evidence([0.5], FLOOR, side="sideways")


def test_deployment_transitions_and_history():
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1")
    deployment.change(dep, "shadow", "v2", share=0.2)
    assert dep["candidate"]["stage"] == "shadow" and dep["candidate"]["share"] == 0.2
    with pytest.raises(deployment.DeploymentError, match="already the candidate"):
        deployment.change(dep, "shadow", "v3")
    deployment.change(dep, "canary", share=0.1)
    deployment.change(dep, "promote", evidence={"n": 40})
    assert dep["serving"] == "v2" and dep["previous"] == ["v1"] and dep["candidate"] is None
    assert deployment.since(dep, "v2", "serving") == dep["history"][-1]["at"]
    entry = deployment.change(dep, "rollback", reason="drop")
    assert dep["serving"] == "v1" and dep["rejected"] == ["v2"] and entry["to"] == "v1"
    assert deployment.since(dep, "v1", "serving") == entry["at"]
    with pytest.raises(deployment.DeploymentError, match="nothing to roll back to"):
        deployment.change(dep, "rollback")
    assert [h["action"] for h in dep["history"]] == ["serve", "shadow", "canary", "promote", "rollback"]
    with pytest.raises(deployment.DeploymentError, match="no candidate"):
        deployment.change(dep, "canary")


def test_a_bad_deployment_file_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "deployment.json"
    path.write_text(json.dumps({**deployment.new("tiny"), "serving": "v1",
                                "candidate": {"version": "v2", "stage": "canary", "share": 1.5}}))
    with pytest.raises(deployment.DeploymentError, match="candidate.share"):
        deployment.load(path)
    path.write_text("{not json")
    with pytest.raises(deployment.DeploymentError, match="not valid JSON"):
        deployment.load(path)
    for field, value, message in (("rejected", [3], r"rejected\[0\]"), ("history", [5], r"history\[0\]"),
                                  ("history", [{"action": "serve"}], r"history\[0\]"),
                                  ("serving", "v3\n", "serving")):
        path.write_text(json.dumps({**deployment.new("tiny"), "serving": "v1", field: value}))
        with pytest.raises(deployment.DeploymentError, match=message):
            deployment.load(path)


def test_concurrent_updates_lose_nothing_and_readers_never_see_half_a_file(tmp_path):
    path = tmp_path / "tiny" / deployment.FILE
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1")
    seen, errors, stop = [], [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                seen.append(len(deployment.load(path)["history"]))
            except Exception as err:  # noqa: BLE001 - a half-written file: collected, asserted below
                errors.append(err)

    def write(k):
        for i in range(20):
            with deployment.updating(path, "tiny") as dep:
                dep["urls"][f"v{100 * k + i + 2}"] = "http://x/v1"
                dep["history"].append({"at": deployment.now(), "action": "note", "version": None})

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    final = deployment.load(path)
    assert len(final["urls"]) == 60 and len(final["history"]) == 61
    assert not errors, errors[:3]  # a reader never saw half a file
    assert seen and min(seen) >= 1
    assert not [p for p in os.listdir(path.parent) if ".tmp-" in p]


def _policy(kept=0.95, esc_after=0.1):
    calib = {"student_quality_kept": kept, "escalated_before": 0.0, "escalated_after": esc_after}
    return {"functions": {"faq": {"calibration": calib}, "triage": {"calibration": calib}}}


def _audit(version, q, i, fn="faq", kind="audit", **kw):
    return {"kind": kind, "version": version, "function": fn, "quality": q,
            "timestamp": f"2026-12-06T03:{i // 60:02d}:{i % 60:02d}.000000+00:00", **kw}


CFG = LiveConfig(min_audits=20, max_quality_drop=0.1, alpha=0.05, canary_share=0.25, shadow_share=0.5)


def test_decide_moves_a_candidate_on_with_evidence_and_not_without():
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1", at="2026-12-06T00:00:00+00:00")
    pols = {"v1": _policy(), "v2": _policy()}
    assert canary.decide(dep, pols, "v2", [], [], CFG)[0]["action"] == "shadow"
    dep["history"][-1]["at"] = dep["candidate"]["since"] = "2026-12-06T01:00:00+00:00"
    few = [_audit("v2", 1.0, i, kind="shadow", tried=True, escalated=False) for i in range(10)]
    assert canary.decide(dep, pols, "v2", [], few, CFG) == []  # too few scored answers
    many = [_audit("v2", 1.0, i, kind="shadow", tried=True, escalated=False) for i in range(60)]
    notes: dict = {}
    assert canary.decide(dep, pols, "v2", [], many, CFG, notes=notes) == []  # triage, a stratum, has no score yet
    assert notes["candidate"]["promotion"]["waiting_for"] == ["triage"]
    many += [_audit("v2", 1.0, 60 + i, fn="triage", kind="shadow", tried=True, escalated=False) for i in range(60)]
    done = canary.decide(dep, pols, "v2", [], many, CFG)
    assert [d["action"] for d in done] == ["canary"] and dep["candidate"]["share"] == 0.25
    assert done[0]["evidence"]["promotion"]["ready"] and done[0]["evidence"]["promotion"]["n"] == 120


def test_rare_functions_are_one_stratum_or_exempt_and_a_stale_stage_waits():
    """A second simulation review: per-function promotion let a function with no audit yet go untested (a 1 %
    function at 0.50 was promoted 36 % of the time), made rare functions hold promotion back for thousands of
    audits, and re-ran a fresh test every night once a stage outlived the window (not level alpha any more)."""
    lims = canary.limits({"functions": {fn: {"calibration": {"student_quality_kept": 0.95}}
                                        for fn in ("big", "mid", "r1", "r2", "tiny")}}, CFG)
    mix = {"big": 0.6, "mid": 0.3, "r1": 0.04, "r2": 0.04, "tiny": 0.02}
    groups, exempt = canary.strata(lims, mix)
    assert groups == {"big": ["big"], "mid": ["mid"], "rare functions": ["r1", "r2", "tiny"]} and exempt == []
    assert canary.strata(lims, {**mix, "r1": 0.01, "r2": 0.01, "tiny": 0.01, "big": 0.67}) == (
        {"big": ["big"], "mid": ["mid"]}, ["r1", "r2", "tiny"])
    ev = canary.Evidence(scores=[("big", 1.0), ("mid", 1.0)] * 60)
    p = canary.promotion(ev, lims, CFG, mix)
    assert not p["ready"] and p["waiting_for"] == ["rare functions"]  # no rare score yet: waits, not untested
    ev.scores += [("r1", 1.0), ("tiny", 1.0)] * 30
    assert canary.promotion(ev, lims, CFG, mix)["ready"]
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1", at="2026-12-01T00:00:00+00:00")
    deployment.change(dep, "shadow", "v2", at="2026-12-01T01:00:00+00:00")
    good = [_audit("v2", 1.0, i, fn=fn, kind="shadow", tried=True, escalated=False)
            for i, fn in enumerate(["faq", "triage"] * 60)]
    notes: dict = {}
    pols = {"v1": _policy(), "v2": _policy()}
    assert canary.decide(dep, pols, None, [], good, CFG, floor="2026-12-06T00:00:00+00:00", notes=notes) == []
    assert "longer than route.live.window_days" in notes["candidate"]["promotion"]["stale"]


def test_decide_rolls_back_a_serving_version_that_drops_and_never_reshadows_it():
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1", at="2026-12-06T00:00:00+00:00")
    deployment.change(dep, "promote", "v2", at="2026-12-06T01:00:00+00:00")
    pols = {"v1": _policy(), "v2": _policy()}
    before = [_audit("v2", 0.0, i) for i in range(0, 30)]  # bad, but before v2 served: not its evidence
    for r in before:
        r["timestamp"] = r["timestamp"].replace("T03", "T00")
    good = [_audit("v2", 1.0, i) for i in range(200)]
    assert canary.decide(dep, pols, "v2", [], before + good, CFG) == []
    bad = [_audit("v2", 0.0, 200 + i, fn="triage") for i in range(40)]
    done = canary.decide(dep, pols, "v2", [], before + good + bad, CFG)
    assert [d["action"] for d in done] == ["rollback"] and dep["serving"] == "v1" and dep["rejected"] == ["v2"]
    broken = [t for t in done[0]["evidence"]["tests"] if (t.get("outcome") or {}).get("decided")]
    assert [(t["function"], t["what"]) for t in broken] == [("triage", "quality")]
    assert broken[0]["outcome"]["at"] < 20  # caught within a bounded number of audits
    assert canary.decide(dep, pols, "v2", [], [], CFG) == []  # v2 is rejected: not shadowed again


def _tried(i: int, route: str) -> dict:
    return {"timestamp": f"2026-12-06T02:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}000+00:00",
            "request": {"metadata": {"function": "faq"}},
            "routing": {"version": "v1", "route": route, "phase": "after",
                        "cost": {"student_basis": "per request (evaluate)"}}}


def test_escalations_that_come_in_batches_do_not_roll_back_a_version_at_its_rate():
    """Requests escalate together (a client's batch, retries): at its calibrated rate (0.1; ceiling 0.25) in
    batches of 1-10, a version was rolled back when each request was a test observation; blocks of 20 are not."""
    rng = random.Random(7)
    routes: list[str] = []
    while len(routes) < 20_000:
        routes += ["teacher" if rng.random() < 0.1 else "student"] * rng.randint(1, 10)
    calls = [_tried(i, r) for i, r in enumerate(routes)]
    one_by_one = LiveConfig(**{**CFG.model_dump(), "escalation_block": 1})
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1", at="2026-12-06T00:00:00+00:00")
    assert [d["action"] for d in canary.decide(dep, {"v1": _policy()}, "v1", calls, [], one_by_one)] == ["broken"]
    assert canary.decide(dep, {"v1": _policy()}, "v1", calls, [], CFG) == []


def test_decide_rolls_back_on_escalations_and_reports_nothing_to_roll_back_to():
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1", at="2026-12-06T00:00:00+00:00")
    calls = [_tried(i, "teacher") for i in range(400)]  # 20 blocks of 20, every request escalated
    assert canary.decide(dep, {"v1": _policy()}, "v1", calls[:60], [], CFG) == []  # 3 blocks: not yet
    done = canary.decide(dep, {"v1": _policy()}, "v1", calls, [], CFG)
    assert [d["action"] for d in done] == ["broken"] and dep["serving"] == "v1"
    assert done[0]["evidence"]["tests"][0]["what"] == "escalation"
    assert math.isclose(done[0]["evidence"]["tests"][0]["bound"], 0.25)


def test_a_failing_serving_version_is_rolled_back_and_the_candidate_beside_it_is_kept():
    """v2 serves, v3 is in shadow, v2's audits fail: v2 goes (back to v1), v3 stays in shadow, not rejected."""
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1", at="2026-12-06T00:00:00+00:00")
    deployment.change(dep, "promote", "v2", at="2026-12-06T01:00:00+00:00")
    deployment.change(dep, "shadow", "v3", share=0.5, at="2026-12-06T02:00:00+00:00")
    pols = {"v1": _policy(), "v2": _policy(), "v3": _policy()}
    bad = [_audit("v2", 0.0, i) for i in range(40)]
    done = canary.decide(dep, pols, "v3", [], bad, CFG)
    assert [(d["action"], d["version"], d.get("to")) for d in done] == [("rollback", "v2", "v1")]
    assert dep["serving"] == "v1" and dep["rejected"] == ["v2"]
    assert dep["candidate"]["version"] == "v3" and dep["candidate"]["stage"] == "shadow"
    with pytest.raises(deployment.DeploymentError, match="neither serving"):
        deployment.change(dep, "rollback", "v2")
    deployment.change(dep, "rollback", "v3")  # by name: the candidate is withdrawn
    assert dep["candidate"] is None and dep["rejected"] == ["v2", "v3"] and dep["serving"] == "v1"


def test_promotion_needs_evidence_in_every_function():
    """faq (70 % of the audits) at 1.0, triage (30 %) at 0.75, below its floor of 0.85: the pooled mean (0.925)
    is above the floors, and one pooled test promoted it; each function must now show its own evidence."""
    lims = canary.limits(_policy(), CFG)
    scores = [("faq", 1.0)] * 7 + [("triage", 1.0)] * 2 + [("triage", 0.25)]
    ev = canary.Evidence(scores=scores * 60)
    pooled = sequential.evidence([x for _, x in ev.scores], [lims[f]["floor"] for f, _ in ev.scores], "above",
                                 CFG.alpha, CFG.max_quality_drop)
    assert pooled.decided  # what the old test looked at
    p = canary.promotion(ev, lims, CFG)
    assert not p["ready"] and p["waiting_for"] == ["triage"] and p["functions"]["faq"]["decided"]
    good = canary.Evidence(scores=[("faq", 1.0), ("triage", 1.0)] * 60)
    assert canary.promotion(good, lims, CFG)["ready"]


def test_a_new_canary_share_keeps_the_evidence_so_far():
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1", at="2026-12-06T00:00:00+00:00")
    deployment.change(dep, "shadow", "v2", at="2026-12-06T01:00:00+00:00")
    deployment.change(dep, "canary", share=0.1, at="2026-12-06T02:00:00+00:00")
    deployment.change(dep, "canary", share=0.2, at="2026-12-06T03:00:00+00:00")  # by hand: more traffic
    assert deployment.since(dep, "v2", "canary") == "2026-12-06T02:00:00+00:00"  # was 03:00: evidence restarted
    assert dep["candidate"]["share"] == 0.2 and dep["history"][-1]["share_from"] == 0.1


def test_the_live_interval_covers_what_it_says_near_perfect_quality():
    """The bootstrap percentile interval covered 24-78 % at quality 0.97 with 10-50 audits ([1, 1] when every
    audit agreed); the Wilson interval is within a few points of 95 %."""
    from export.route.live import mean_ci

    assert mean_ci([1.0] * 30)["ci"][0] < 0.9  # all 30 audits agreed: not a certainty
    rng = np.random.default_rng(3)
    for p, n in ((0.97, 30), (0.9, 20), (0.5, 40)):
        covered = 0
        for _ in range(2000):
            lo, hi = mean_ci(list((rng.random(n) < p).astype(float)))["ci"]
            covered += lo <= p <= hi
        assert covered / 2000 > 0.9, (p, n, covered)


def test_strata_shares_are_among_the_functions_with_a_floor():
    """A third review: a disabled function (no floor) with 97 % of the traffic made the only tested function
    'rare', hence exempt, and the candidate could never be promoted."""
    lims = {"weak": {"floor": None, "ceiling": None}, "extract": {"floor": 0.85, "ceiling": 0.3}}
    assert canary.strata(lims, {"weak": 0.97, "extract": 0.03}) == ({"extract": ["extract"]}, [])
    assert canary.strata(lims, {"other": 1.0}) == ({"extract": ["extract"]}, [])  # no usable mix
    both = {"a": {"floor": 0.8}, "b": {"floor": 0.8}}
    for odd in ({"a": "n/a", "b": 0.5}, {"a": -0.2, "b": 0.9}, {"a": float("nan"), "b": 0.5}):
        assert canary.strata(both, odd) == ({"a": ["a"], "b": ["b"]}, [])  # was a crash, or 'a' exempt
    ev = canary.Evidence(scores=[("extract", 1.0)] * 100)
    assert canary.promotion(ev, lims, CFG, {"weak": 0.97, "extract": 0.03})["ready"]
