"""The route stage: calibration maths on built data, then what the stage wrote for the e2e run's own student."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import tomllib
import yaml
from route_helpers import FAQ, TRIAGE, full_router

from export.route import calibrate
from export.route.calibrate import choose_threshold
from export.route.router import POLICY_JSON_SCHEMA, POLICY_SCHEMA
from export.route.signals import SIGNALS, all_signals, signal_value, split_logprobs, topk_entropy, user_text
from pipeline.recipe import RecipeError, parse_recipe
from pipeline.rundir import sha256_file


def _data(n=400, seed=0):
    """Confidence that predicts correctness: P(correct) rises with the score."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n)
    quality = (rng.random(n) < 1 / (1 + np.exp(-3 * scores - 2))).astype(float)
    return scores, quality


def test_curve_choice_and_area_on_built_data():
    scores, quality = _data()
    curve = calibrate.build_curve(scores, quality)
    assert curve.share[0] == 0 and curve.quality[0] == 1 and curve.share[-1] == 1
    assert np.all(np.diff(curve.share) > 0)
    assert curve.quality[-1] == pytest.approx(quality.mean())
    i = calibrate.choose(curve, tolerance=0.05)
    assert curve.quality[i] >= 0.95 - 1e-12
    assert all(curve.quality[j] < 0.95 for j in range(i + 1, len(curve.cuts)))  # the largest share that qualifies
    kept = curve.order[: curve.cuts[i]]
    assert scores[kept].min() == pytest.approx(curve.thresholds[i])  # kept = confidence >= threshold
    # An informative signal ranks well; the same signal reversed ranks worse than random.
    skill = calibrate.ranking_skill(curve, quality)
    reversed_skill = calibrate.ranking_skill(calibrate.build_curve(-scores, quality), quality)
    assert 0.3 < skill <= 1 and reversed_skill < 0
    assert calibrate.area(curve) > calibrate.area(calibrate.build_curve(-scores, quality))


def test_pre_generation_failures_never_reach_the_student():
    scores, quality = _data(200)
    passed = np.arange(200) % 4 != 0
    curve = calibrate.build_curve(scores, quality, passed)
    assert curve.share[-1] == pytest.approx(passed.mean())
    assert set(curve.order[: curve.cuts[-1]]) == set(np.flatnonzero(passed))
    assert curve.thresholds[-1] is None  # every passing record kept: no confidence threshold


def test_bootstrap_intervals_and_lower_bound_guarantee():
    scores, quality = _data(300)
    curve = calibrate.build_curve(scores, quality)
    shares, routed = calibrate.bootstrap(curve, quality, 500, seed=1)
    assert shares.shape == routed.shape == (500, len(curve.cuts))
    i = calibrate.choose(curve, 0.05)
    lo, hi = calibrate.interval(routed[:, i], 0.95)
    assert lo <= curve.quality[i] <= hi and hi - lo > 0
    slo, shi = calibrate.interval(shares[:, i], 0.95)
    assert slo <= curve.share[i] <= shi
    lower = np.quantile(routed, 0.05, axis=0)
    j = calibrate.choose(curve, 0.05, lower)
    assert curve.share[j] < curve.share[i] and lower[j] >= 0.95  # the guarantee costs share


def test_choose_threshold_first_api():
    points = [(-0.01 * i, 1.0) for i in range(8)] + [(-3.0, 0.0), (-4.0, 0.0)]
    assert calibrate.choose_threshold(points, 0.1)["threshold"] == -3.0
    assert calibrate.choose_threshold(points, 0.0)["student_share"] == 0.8


def test_confidence_signals():
    assert topk_entropy([0.0]) == 0.0
    assert topk_entropy([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(2))
    assert topk_entropy([math.log(0.5)]) == pytest.approx(math.log(2))  # the missing half counts as one outcome
    lp = [-0.1, -0.2, -3.0, -0.1]
    assert signal_value("min_logprob", lp) == -3.0 and signal_value("mean_logprob", lp) == pytest.approx(-0.85)
    assert signal_value("p10_logprob", lp * 10) == -3.0 and signal_value("p10_logprob", [-0.1] * 30 + [-3.0]) == -0.1
    assert signal_value("min_logprob", []) == -math.inf
    # An empty answer, or one without top-k, can never be kept on any signal (and calibration needs every key).
    assert set(all_signals([], [])) == set(SIGNALS) and max(all_signals([], []).values()) == -math.inf
    assert all_signals([-0.1], None)["mean_entropy"] == -math.inf
    chosen, tops = split_logprobs([{"logprob": -0.5, "top_logprobs": [{"logprob": -0.5}, {"logprob": -1.0}]}])
    assert chosen == [-0.5] and tops == [[-0.5, -1.0]]
    assert split_logprobs([{"logprob": -0.5, "top_logprobs": []}])[1] is None
    with pytest.raises(ValueError, match="top-k"):
        signal_value("max_entropy", lp)


def test_recipe_fields_are_validated():
    from conftest import BASE_RECIPE, merge

    with pytest.raises(RecipeError, match="route: .*needs route.top_logprobs > 0"):
        parse_recipe(merge(BASE_RECIPE, {"route": {"signal": "mean_entropy", "top_logprobs": 0}}))
    with pytest.raises(RecipeError, match="route.quality_metric"):
        parse_recipe(merge(BASE_RECIPE, {"route": {"quality_metric": "bleu"}}))
    with pytest.raises(RecipeError, match="route.distance.quantile"):
        parse_recipe(merge(BASE_RECIPE, {"route": {"distance": {"quantile": 1.5}}}))
    ok = parse_recipe(merge(BASE_RECIPE, {"route": {"guarantee": "lower_bound", "length_count": "exact"}}))
    assert ok.route.language.min_records == 10 and ok.route.gateway.student_key_env == "STUDENT_API_KEY"


def test_stage_writes_a_complete_policy(e2e):
    import jsonschema

    route = e2e / "runs/t/route"
    policy = json.loads((route / "routing_policy.json").read_text())
    jsonschema.validate(policy, POLICY_JSON_SCHEMA)
    assert policy["schema"] == POLICY_SCHEMA and set(policy["functions"]) == {FAQ, TRIAGE}
    for rel, digest in policy["files"].items():  # every file the policy needs, with its checksum
        assert sha256_file(route / rel) == digest, rel
    assert {"tokenizer.json", "routing/lid.176.ftz", "routing/embeddings.safetensors", "routing/litellm.yaml",
            "routing/vllm-sr.yaml", "routing/tensorzero.toml"} == set(policy["files"])
    op = policy["operating_point"]
    assert 0 <= op["student_share"] <= 1 and op["student_share_ci"][0] <= op["student_share"] <= op["student_share_ci"][1]
    assert op["routed_quality"] >= 1 - policy["quality"]["tolerance"] - 1e-9
    assert op["cost_per_1k_routed_usd"] <= op["cost_per_1k_teacher_usd"] + op["cost_per_1k_student_usd"]
    calibration = json.loads((route / "calibration.json").read_text())
    assert calibration["rescoring"]["aligned_records"] == calibration["rescoring"]["records"]
    for fn, cal in calibration["functions"].items():
        rule = policy["functions"][fn]
        curve = cal["curve"]
        assert curve[0]["student_share"] == 0 and curve[0]["routed_quality"] == 1
        assert curve[-1]["student_share"] == pytest.approx(cal["n_passing_before"] / cal["n"])
        assert sum(p["chosen"] for p in curve) == 1 and set(cal["areas"]) >= {"min_logprob", "mean_entropy"}
        chosen = next(p for p in curve if p["chosen"])
        assert chosen["student_share"] == pytest.approx(rule["calibration"]["student_share"])
        assert rule["after"]["signal"] == max(cal["areas"], key=lambda s: cal["areas"][s]) or \
            cal["areas"][rule["after"]["signal"]] == max(cal["areas"].values())
        lo, hi = rule["calibration"]["routed_quality_ci"]
        assert lo <= rule["calibration"]["routed_quality"] <= hi


def test_router_replays_the_calibration_from_the_published_files(e2e):
    """Loaded from its folder, the Router gives each held-out record the route the calibration counted."""
    route = e2e / "runs/t/route"
    router = full_router(str(route))
    test = {r["id"]: r for r in pq.read_table(e2e / "runs/t/curate/test.parquet", columns=["id", "messages"])
            .to_pylist()}
    rows = pq.read_table(route / "heldout.parquet").to_pylist()
    vecs = router.embed([user_text(test[r["id"]]["messages"]) for r in rows])  # one batch, not one per request
    emb = {r["id"]: v for r, v in zip(rows, vecs, strict=True)}
    policy = router.policy
    for fn, rule in policy["functions"].items():
        mine = [r for r in rows if r["function"] == fn]
        kept = []
        for r in mine:
            req = {"messages": test[r["id"]]["messages"], "metadata": {"function": fn}}
            lp = [{"logprob": c, "top_logprobs": [{"logprob": x} for x in t]}
                  for c, t in zip(r["logprobs"], r["top_logprobs"], strict=True)]
            d = router.after(req, lp, before=router.before(req, embedding=emb[r["id"]]))
            assert d.route == r["route"], (r["id"], d.reasons, r["reasons"])
            kept.append(d.to_student)
        if rule.get("calibration"):
            assert sum(kept) / len(mine) == pytest.approx(rule["calibration"]["student_share"])
            q = sum(r["quality"] if k else 1.0 for r, k in zip(mine, kept, strict=True)) / len(mine)
            assert q == pytest.approx(rule["calibration"]["routed_quality"])
            assert q >= 1 - policy["quality"]["tolerance"] - 1e-9


def test_gateway_configs_express_what_they_can(e2e):
    route = e2e / "runs/t/route"
    policy = json.loads((route / "routing_policy.json").read_text())
    lite = yaml.safe_load((route / "routing/litellm.yaml").read_text())
    groups = {m["model_name"]: m for m in lite["model_list"]}
    for fn, rule in policy["functions"].items():
        entry = groups[f"distill/{fn}"]
        if rule["enabled"]:
            assert entry["litellm_params"]["model"] == "openai/tiny-student"
            # The limit in LiteLLM's own count (cl100k_base plus message overhead), calibrated on the held-out
            # inputs; the config's comment gives the conversion.
            limit, lite_limit = rule["before"]["max_input_tokens"], entry["model_info"]["max_input_tokens"]
            assert f"{fn}: {limit} student tokens -> {lite_limit} in LiteLLM's count" in \
                (route / "routing/litellm.yaml").read_text()
            assert {f"distill/{fn}": [f"distill/{fn}/teacher"]} in lite["router_settings"]["fallbacks"]
        else:
            assert entry["litellm_params"]["model"] == "openai/gpt-4o-2024-08-06"
    assert all("os.environ/" in m["litellm_params"]["api_key"] for m in lite["model_list"])  # key names, no keys
    assert lite["router_settings"]["enable_pre_call_checks"] is True
    text = (route / "routing/litellm.yaml").read_text()
    assert "post-generation confidence threshold" in text and "distill/router" in groups
    tz = tomllib.loads((route / "routing/tensorzero.toml").read_text())
    assert tz["models"]["student"]["providers"]["student"]["api_key_location"] == "env::STUDENT_API_KEY"
    for fn, rule in policy["functions"].items():
        f = tz["functions"][fn]
        assert set(f["variants"]) == {"student", "teacher", "router"}
        assert f["experimentation"]["type"] == "static"
        assert f["experimentation"]["candidate_variants"] == ({"student": 1.0} if rule["enabled"] else {"teacher": 1.0})
    assert policy["gateways"]["routing/tensorzero.toml"]["not_expressed"]


def test_choose_threshold_keeps_quality_within_tolerance():
    # 10 answers: confident ones right, unsure ones wrong.
    points = [(-0.01 * i, 1.0) for i in range(8)] + [(-3.0, 0.0), (-4.0, 0.0)]
    fit = choose_threshold(points, tolerance=0.0)
    assert fit["threshold"] == pytest.approx(-0.07) and fit["student_share"] == 0.8 and fit["routed_quality"] == 1.0
    fit = choose_threshold(points, tolerance=0.1)  # one wrong answer is allowed
    assert fit["threshold"] == -3.0 and fit["student_share"] == 0.9
    assert choose_threshold(points, tolerance=0.2)["threshold"] is None  # everything to the student
    assert choose_threshold([(-1.0, 0.0)] * 3, tolerance=0.0)["student_share"] == 0.0
