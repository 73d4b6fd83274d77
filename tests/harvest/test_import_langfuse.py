"""Langfuse observation exports (issue 13, new sources): the UI JSONL export and an API page as a JSON document;
GENERATION observations become records (input/output, model parameters, usage, latency, cost, scores), errors are
kept with their message, other observations and generations with no output are quarantined with the reason."""

import json
import shutil

from harvest_helpers import by_id, harvest, in_tmp, quarantine, write_recipe  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st
from test_import_otel import FIXTURES, check_rows_in_equal_harvested_plus_quarantined, fixture_rows
from test_import_properties import SETTINGS


def test_langfuse_jsonl_export(tmp_path):
    shutil.copy(FIXTURES / "langfuse_observations.jsonl", tmp_path / "obs.jsonl")
    recipe = write_recipe(tmp_path, {"sources": [{"format": "langfuse", "path": "obs.jsonl"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert m["counts"]["records"] == 3 and m["counts"]["quarantined"] == 2
    img = r["gen_7f3a"]
    assert [x["role"] for x in img["messages"]] == ["system", "user"] and img["tags"]["has_images"] == "1"
    assert img["output"]["content"] == "A cat on a sofa." and img["function"] == "describe-image"
    assert json.loads(img["teacher"]["params"]) == {"temperature": 0.2, "max_tokens": 256}
    assert img["teacher"]["model"] == "gpt-4o-mini" and img["teacher"]["provider"] == "openai"
    assert img["usage"] == {"input_tokens": 812, "output_tokens": 7}
    assert abs(img["latency_ms"] - 1360.0) < 1e-6 and abs(img["cost_usd"] - 0.000126) < 1e-12
    assert img["feedback"] == {"user-feedback": 1.0} and img["episode_id"] == "tr_91c2"
    tool = r["gen_8a01"]
    assert json.loads(tool["output"]["tool_calls"])[0]["function"]["name"] == "get_weather"
    assert json.loads(tool["tools"])[0]["function"]["name"] == "get_weather"
    assert tool["feedback"] == {"accuracy": 0.75}  # the score column's last value
    err = r["gen_9b02"]
    assert err["error"] == "Rate limit reached for gpt-4o" and err["output"] is None
    reasons = {q["line"]: q["reason"] for q in quarantine(recipe)}
    assert "not a GENERATION" in reasons[4] and "no output and no error" in reasons[5]


def test_langfuse_api_page_document(tmp_path):
    shutil.copy(FIXTURES / "langfuse_page.json", tmp_path / "page.json")
    recipe = write_recipe(tmp_path, {"sources": [{"format": "langfuse", "path": "page.json"}]})
    m = harvest(recipe)
    (rec,) = by_id(recipe).values()
    assert m["counts"]["records"] == 1 and m["counts"]["quarantined"] == 0
    assert rec["messages"][0]["content"] == "Capital of Norway?" and rec["output"]["content"] == "Oslo."
    assert rec["teacher"]["model"] == "claude-3-5-sonnet" and json.loads(rec["teacher"]["params"]) == {
        "max_tokens": 1024}
    assert rec["latency_ms"] == 1500.0 and rec["tags"]["session_id"] == "s_1"


@SETTINGS
@given(st.data())
def test_langfuse_rows_in_equal_harvested_plus_quarantined(tmp_path_factory, data):
    samples = fixture_rows("langfuse_observations.jsonl") + fixture_rows("langfuse_page.json")
    check_rows_in_equal_harvested_plus_quarantined("langfuse", samples, data, tmp_path_factory)
