"""Evaluation: metrics, bootstrap intervals, tables, the LLM judge against a real loopback server, and the
evaluate stage's outputs on the shared end-to-end run."""

import json
import os

import pyarrow.parquet as pq
import pytest
from export_helpers import JudgeServer, copy_project, judge_rule

from pipeline.cli import main as cli
from pipeline.config.evaluate import JudgeConfig
from pipeline.recipe import RecipeError, parse_recipe
from training.evaluate import tables as eval_tables
from training.evaluate.judge import JudgeError, grade, parse_grade
from training.evaluate.metrics import (
    chrf,
    exact_match,
    field_accuracy,
    quality,
    response_schema,
    schema_valid,
    score,
)

from conftest import BASE_RECIPE, merge

SCHEMA = {"type": "object", "required": ["intent", "order"], "additionalProperties": False,
          "properties": {"intent": {"type": "string", "enum": ["refund", "other"]},
                         "order": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                    "items": {"type": "array"}}}}}
REF = '{"intent": "refund", "order": {"id": 7, "items": ["a", "b"]}}'


def test_field_accuracy_follows_the_schema_field_by_field():
    # Nested object fields count one by one; the array is one field; 7 == 7.0; key order does not matter.
    assert field_accuracy('{"order": {"items": ["a", "b"], "id": 7.0}, "intent": "refund"}', REF, SCHEMA) == 1.0
    assert field_accuracy('{"intent": "refund", "order": {"id": 8, "items": ["a", "b"]}}', REF, SCHEMA) == pytest.approx(2 / 3)
    assert field_accuracy('{"intent": "refund", "order": {"id": 7, "items": ["b", "a"]}}', REF, SCHEMA) == pytest.approx(2 / 3)
    assert field_accuracy('{"intent": "other"}', REF, SCHEMA) == 0.0
    assert field_accuracy("not json", REF, SCHEMA) == 0.0
    assert field_accuracy("anything", "plain text", SCHEMA) is None
    # A boolean is not the number 1.
    assert field_accuracy('{"x": true}', '{"x": 1}') == 0.0 and field_accuracy('{"x": 1.0}', '{"x": 1}') == 1.0
    assert exact_match('{"order": {"items": ["a", "b"], "id": 7}, "intent": "refund"}', REF)


def test_schema_validity_and_response_format():
    rf = json.dumps({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    schema = response_schema(rf)
    assert schema == SCHEMA and response_schema('{"type": "json_object"}') is None and response_schema(None) is None
    assert schema_valid(REF, schema) is True
    assert schema_valid('{"intent": "maybe", "order": {}}', schema) is False  # not in the enum
    assert schema_valid('{"intent": "refund", "order": {}, "extra": 1}', schema) is False  # additionalProperties
    assert schema_valid("{", schema) is False and schema_valid(REF, None) is None


def test_chrf_orders_answers_by_overlap_and_quality_picks_the_metric():
    ref = "You can return the Echo Speaker within 30 days of delivery."
    near, far = "You can return the Echo Speaker within 14 days of delivery.", "Yes, it is in stock."
    assert chrf(ref, ref) == pytest.approx(1.0)
    assert 0.5 < chrf(near, ref) < 1.0 and chrf(far, ref) < chrf(near, ref)
    row = score(near, ref)
    assert row["exact_match"] is False and row["field_accuracy"] is None and row["chrf"] == chrf(near, ref)
    assert quality(row, "auto") == 0.0 and quality(row, "chrf") == row["chrf"]
    json_row = score('{"intent": "refund", "order": {"id": 8, "items": ["a", "b"]}}', REF, SCHEMA)
    assert quality(json_row, "auto") == pytest.approx(2 / 3) and quality(json_row, "exact_match") == 0.0


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    small = [1.0] * 6 + [0.0] * 4
    big = small * 40
    lo, hi = eval_tables.bootstrap_ci(small, 2000, 0.95, seed=1)
    assert lo < 0.6 < hi and 0.2 < hi - lo < 0.8
    blo, bhi = eval_tables.bootstrap_ci(big, 2000, 0.95, seed=1)
    assert blo < 0.6 < bhi and (bhi - blo) < (hi - lo) / 3
    assert eval_tables.bootstrap_ci(small, 2000, 0.95, seed=1) == [lo, hi]  # seeded: reproducible
    assert eval_tables.bootstrap_ci([1.0], 100, 0.95) is None and eval_tables.bootstrap_ci(small, 0, 0.95) is None
    s = eval_tables.summarize([{"quality": v, "exact_match": v} for v in small], 500, 0.9)
    assert s["n"] == 10 and s["quality"] == 0.6 and s["ci"]["quality"][0] < 0.6 < s["ci"]["quality"][1]


def test_length_buckets_and_language_ids():
    edges = [64, 128, 256]
    assert [eval_tables.length_bucket(n, edges) for n in (1, 64, 65, 128, 200, 257)] == [
        "<=64", "<=64", "65-128", "65-128", "129-256", ">256"]
    assert eval_tables.bucket_order(edges) == ["<=64", "65-128", "129-256", ">256"]
    detect = eval_tables.language_detector(["en", "es", "de", "fr"])
    assert detect(["My order never arrived and I would like a refund please.",
                   "Quiero que me devuelvan el dinero del altavoz.",
                   "Mein Router funktioniert nicht mehr, bitte helfen Sie mir.",
                   "Mon colis n'est toujours pas arrivé, que faire ?", ""]) == ["en", "es", "de", "fr", "und"]


def test_recipe_rejects_bad_evaluate_and_export_settings():
    bad = {"evaluate": {"languages": ["en", "xx"], "length_buckets": [128, 64], "quality": "judge",
                        "gate": {"functions": {"faq": 150}}},
           "export": {"formats": ["gguf-q8_0", "gguf-q4"], "format_points_lost": {"bnb-9bit": 1}}}
    with pytest.raises(RecipeError) as err:
        parse_recipe(merge(BASE_RECIPE, bad))
    msg = str(err.value)
    for needle in ("evaluate.languages", "unknown ISO 639-1 code 'xx'", "evaluate.length_buckets",
                   "evaluate.gate.functions", "export.formats.1"):
        assert needle in msg, msg
    with pytest.raises(RecipeError, match="quality 'judge' needs a judge section"):
        parse_recipe(merge(BASE_RECIPE, {"evaluate": {"quality": "judge"}}))
    with pytest.raises(RecipeError, match="judge.base_url"):
        parse_recipe(merge(BASE_RECIPE, {"evaluate": {"judge": {"base_url": "ftp://x", "model": "m"}}}))


def test_judge_grades_through_a_real_server_with_retries_and_failures(monkeypatch):
    assert parse_grade('{"score": 10, "reason": "ok"}') == 1.0 and parse_grade("7/10") == pytest.approx(6 / 9)
    assert parse_grade("great answer") is None and parse_grade('{"score": 11}') is None
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    request = [{"role": "user", "content": "Where is my Echo Speaker?"}]
    answers = ['{"intent": "shipping_delay", "priority": "low", "product": "Echo Speaker"}',
               "The Echo Speaker ships within 2 business days.", "dunno", "FLAKY: the answer.", "GARBAGE"]
    with JudgeServer(api_key="sk-test-123") as server:
        cfg = JudgeConfig(base_url=server.url, model="judge-1", api_key_env="JUDGE_KEY", max_concurrency=2,
                          retries=1, timeout_s=10)
        ticks = []
        out = grade(cfg, [request] * len(answers), answers, advance=lambda: ticks.append(1))
        assert [g["score"] for g in out[:4]] == [1.0, pytest.approx(7 / 9), pytest.approx(1 / 9), pytest.approx(7 / 9)]
        assert out[4]["score"] is None and out[4]["error"] == "no 1-10 grade in the reply"
        assert len(ticks) == len(answers)
        # FLAKY was retried after its 503; GARBAGE was tried 1 + retries times; every request carried the key.
        assert len(server.requests) == len(answers) + 1 + 1
        assert all(r["headers"]["Authorization"] == "Bearer sk-test-123" for r in server.requests)
        assert server.requests[0]["body"]["model"] == "judge-1" and server.requests[0]["body"]["temperature"] == 0
        monkeypatch.setenv("JUDGE_KEY", "wrong")
        with pytest.raises(JudgeError, match="refused the request .HTTP 401"):
            grade(cfg, [request], ["x"])
        monkeypatch.delenv("JUDGE_KEY")
        with pytest.raises(JudgeError, match="JUDGE_KEY, which is not set"):
            grade(cfg, [request], ["x"])


def test_evaluate_writes_the_contract_tables_and_the_gate(e2e):
    ev = e2e / "runs" / "t" / "evaluate"
    scores = json.loads((ev / "scores.json").read_text())
    preds = pq.read_table(ev / "predictions.parquet")
    # The columns the route stage and export read.
    assert {"id", "function", "prediction", "reference", "logprobs", "exact_match", "field_accuracy", "json_valid",
            "input_tokens", "output_tokens", "quality", "chrf", "schema_valid", "language", "length_bucket",
            "teacher_cost_usd", "latency_ms"} <= set(preds.column_names)
    rows = preds.to_pylist()
    for r in rows:
        assert r["quality"] == quality(r, "auto")
        assert r["chrf"] == pytest.approx(chrf(r["prediction"], r["reference"]))
        if r["function"] == "ticket_triage":
            assert r["schema_valid"] is not None and r["field_accuracy"] is not None
    for fn, s in scores["functions"].items():
        mine = [r for r in rows if r["function"] == fn]
        assert s["n"] == len(mine) and s["quality"] == pytest.approx(sum(r["quality"] for r in mine) / len(mine))
        lo, hi = s["ci"]["quality"]
        assert lo <= s["quality"] <= hi and hi > lo
        assert s["teacher_quality"] == 1.0
    assert sum(b["n"] for b in scores["by_length"].values()) == len(rows)
    assert list(scores["by_length"]) == [b for b in eval_tables.bucket_order([64, 128, 256, 512, 1024, 2048])
                                         if b in scores["by_length"]]
    assert sum(b["n"] for b in scores["by_language"].values()) == len(rows) and "en" in scores["by_language"]
    assert scores["latency_ms"]["student_single_p50"] > 0 and scores["latency_ms"]["teacher_logged_p50"] > 0
    cost = scores["cost_per_1k_requests_usd"]
    assert cost["teacher"] == pytest.approx(1000 * sum(r["teacher_cost_usd"] for r in rows) / len(rows))
    gate = json.loads((ev / "gate.json").read_text())
    assert gate["passed"] and gate["failures"] == [] and scores["gate"]["passed"]


def test_evaluate_with_the_llm_judge_as_quality(e2e, tmp_path, monkeypatch):
    key = "sk-judge-secret-42"
    with JudgeServer(api_key=key) as server:
        monkeypatch.setenv("DISTILL_TEST_JUDGE_KEY", key)
        recipe = copy_project(e2e, tmp_path / "p", monkeypatch, evaluate={
            "quality": "judge", "max_records": 16, "bootstrap": 200, "latency_samples": 1,
            "judge": {"base_url": server.url, "model": "judge-1", "api_key_env": "DISTILL_TEST_JUDGE_KEY"},
            "gate": {"max_points_below_teacher": 100}})
        assert cli(["evaluate", str(recipe)]) == 0
        assert len(server.requests) == 2 * 16  # student and teacher answers
    for f in (tmp_path / "p/runs/t").rglob("*"):  # the key is never written anywhere
        assert not f.is_file() or key.encode() not in f.read_bytes(), f
    scores = json.loads((tmp_path / "p/runs/t/evaluate/scores.json").read_text())
    rows = pq.read_table(tmp_path / "p/runs/t/evaluate/predictions.parquet").to_pylist()
    for r in rows:  # the grades the server gave, scaled to 0-1, are the rows' quality
        assert r["judge_student"] == pytest.approx((judge_rule(r["prediction"]) - 1) / 9)
        assert r["judge_teacher"] == pytest.approx((judge_rule(r["reference"]) - 1) / 9)
        assert r["quality"] == r["judge_student"]
    assert scores["quality_metric"] == "judge" and scores["judge"]["graded"] == 32 and scores["judge"]["failed"] == 0
    tri = scores["functions"]["ticket_triage"]
    assert tri["teacher_quality"] == tri["judge_teacher"] == pytest.approx(1.0)
    gate = json.loads((tmp_path / "p/runs/t/evaluate/gate.json").read_text())
    check = next(c for c in gate["checks"] if c["function"] == "ticket_triage" and c["kind"] == "teacher")
    assert check["points_below"] == pytest.approx(100 * (tri["judge_teacher"] - tri["judge_student"]), abs=1e-3)
    assert os.environ["DISTILL_TEST_JUDGE_KEY"] == key


def test_metrics():
    ref = '{"intent": "refund", "priority": "high", "product": "Echo Speaker"}'
    assert exact_match('{"product": "Echo Speaker", "priority": "high", "intent": "refund"}', ref)
    assert not exact_match('{"intent": "refund"}', ref)
    assert field_accuracy('{"intent": "refund", "priority": "low", "product": "Echo Speaker"}', ref) == pytest.approx(2 / 3)
    assert field_accuracy("not json", ref) == 0.0
    assert field_accuracy("anything", "plain text") is None
