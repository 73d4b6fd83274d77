"""The six stages end to end on a small project (one shared run), then what platform teams do with it."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from export.route.router import Router
from pipeline.cli import main as cli
from pipeline.stages import STAGES
from pipeline.store import ChecksumError, publish, pull, versions
from training.evaluate.metrics import exact_match


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
    assert "done: nothing to do" in out and "--force STAGE reruns one" in out, out
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
