"""The six stages end to end on a small project (one shared run), then what platform teams do with it."""

import json
import math
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from export.route import choose_threshold
from export.router import Router
from export.store import ChecksumError, publish, pull, versions
from pipeline.cli import main as cli
from pipeline.rundir import STAGES
from training.metrics import exact_match, field_accuracy


def test_every_stage_completes_with_a_manifest(e2e):
    run = e2e / "runs" / "t"
    for stage in STAGES:
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["status"] == "complete" and m["fingerprint"] and m["duration_s"] >= 0
        assert m["outputs"], stage
    assert not (run / ".partial" / "train").exists()


def test_rerun_skips_every_stage(e2e, monkeypatch, capsys):
    monkeypatch.chdir(e2e)
    capsys.readouterr()
    assert cli(["run", "recipe.yaml"]) == 0
    out = capsys.readouterr().out
    assert all(f"{s}: unchanged" in out for s in STAGES), out
    assert cli(["status", "recipe.yaml"]) == 0
    assert capsys.readouterr().out.count("complete") >= len(STAGES)


def test_evaluate_scores_per_function_with_cost(e2e):
    ev = e2e / "runs" / "t" / "evaluate"
    scores = json.loads((ev / "scores.json").read_text())
    preds = pq.read_table(ev / "predictions.parquet").to_pylist()
    assert len(preds) == scores["overall"]["n"] == 64
    assert set(scores["functions"]) == {"ticket_triage", "product_faq"}
    triage = scores["functions"]["ticket_triage"]
    assert triage["field_accuracy"] is not None and scores["functions"]["product_faq"]["field_accuracy"] is None
    for p in preds:  # stored scores agree with the metric functions
        assert p["exact_match"] == exact_match(p["prediction"], p["reference"])
        assert len(p["logprobs"]) == p["output_tokens"]
    cost = scores["cost_per_1k_requests_usd"]
    assert cost["teacher"] > 0 and cost["student"] > 0 and cost["student"] < cost["teacher"]
    assert scores["tokens"]["teacher_input_mean"] > 0 and scores["throughput"]["requests_per_s"] > 0


def test_metrics():
    ref = '{"intent": "refund", "priority": "high", "product": "Echo Speaker"}'
    assert exact_match('{"product": "Echo Speaker", "priority": "high", "intent": "refund"}', ref)
    assert not exact_match('{"intent": "refund"}', ref)
    assert field_accuracy('{"intent": "refund", "priority": "low", "product": "Echo Speaker"}', ref) == pytest.approx(2 / 3)
    assert field_accuracy("not json", ref) == 0.0
    assert field_accuracy("anything", "plain text") is None


def test_pull_loads_in_transformers_and_generates(e2e, tmp_path):
    store = e2e / "store"
    dest = pull(store, "tiny-student", tmp_path / "student")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["version"] == "v1" and manifest["name"] == "tiny-student"
    lineage = manifest["lineage"]
    assert lineage["base_model"] == "built from config" and lineage["teacher_models"] == ["gpt-4o-2024-08-06"]
    assert len(lineage["recipe_sha256"]) == 64 and len(lineage["data_sha256"]) == 64
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["scores"]["functions"]["ticket_triage"]["n"] > 0
    # The routing policy fitted for this student is published with it and loads from the pulled folder.
    assert manifest["routing_policy_sha256"] == manifest["files"]["routing_policy.json"]
    policy = Router.load(dest / "routing_policy.json").policy
    assert policy["student"]["name"] == "tiny-student"
    tok = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest, use_safetensors=True)
    trained = AutoModelForCausalLM.from_pretrained(e2e / "runs/t/train/model", use_safetensors=True)
    enc = tok.apply_chat_template([{"role": "user", "content": "Is the Echo Speaker in stock?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, trained(**enc).logits, atol=1e-5)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_pull_refuses_a_tampered_store(e2e, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(e2e / "store", store)
    cfg = store / "tiny-student" / "v1" / "config.json"
    cfg.write_text(cfg.read_text().replace("{", "{\n ", 1))
    with pytest.raises(ChecksumError, match="config.json: sha256 differs"):
        pull(store, "tiny-student@v1", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert cli(["pull", str(store), "tiny-student", str(tmp_path / "b")]) == 4
    assert cli(["pull", str(store), "tiny-student@v9", str(tmp_path / "c")]) == 2
    assert "versions: v1" in capsys.readouterr().err


def test_store_versions_are_immutable_and_latest_moves(e2e, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    shutil.copytree(e2e / "store", store)
    art = e2e / "runs/t/export/tiny-student"
    v1 = (store / "tiny-student/v1/model.safetensors").read_bytes()
    assert publish(store, "tiny-student", art, {"note": "same files"}) == "v1"  # unchanged files: no new version
    changed = tmp_path / "changed"
    shutil.copytree(art, changed)
    (changed / "generation_config.json").write_text("{}")
    assert publish(store, "tiny-student", changed, {"note": "new"}) == "v2"
    assert versions(store, "tiny-student") == ["v1", "v2"]
    assert (store / "tiny-student/latest").read_text().strip() == "v2"
    assert (store / "tiny-student/v1/model.safetensors").read_bytes() == v1
    assert cli(["list", str(store)]) == 0
    assert "tiny-student: v1, v2  (latest: v2)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="invalid student name"):
        publish(store, "../evil", art, {})


def test_choose_threshold_keeps_quality_within_tolerance():
    # 10 answers: confident ones right, unsure ones wrong.
    points = [(-0.01 * i, 1.0) for i in range(8)] + [(-3.0, 0.0), (-4.0, 0.0)]
    fit = choose_threshold(points, tolerance=0.0)
    assert fit["threshold"] == pytest.approx(-0.07) and fit["student_share"] == 0.8 and fit["routed_quality"] == 1.0
    fit = choose_threshold(points, tolerance=0.1)  # one wrong answer is allowed
    assert fit["threshold"] == -3.0 and fit["student_share"] == 0.9
    assert choose_threshold(points, tolerance=0.2)["threshold"] is None  # everything to the student
    assert choose_threshold([(-1.0, 0.0)] * 3, tolerance=0.0)["student_share"] == 0.0


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

    from export.signals import user_text

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
