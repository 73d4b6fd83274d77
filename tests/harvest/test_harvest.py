import gzip
import json

import pytest
from harvest_helpers import records as read_records

from curation.harvest.demo_traffic import DAYS, generate, write_demo
from curation.harvest.importers.openai import BadRecord, parse_line
from pipeline.cli import main as cli

from conftest import ROOT

GOOD = {
    "id": "req_1",
    "timestamp": "2026-11-23T10:00:00Z",
    "status_code": 200,
    "latency_ms": 420,
    "request": {
        "model": "gpt-4o",
        "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "metadata": {"function": "assistant", "episode_id": "ep9", "team": "x"},
    },
    "response": {
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 12},
    },
    "feedback": {"thumbs_up": True, "comment": "nice"},
}


def test_parse_line_maps_every_field():
    r = parse_line(GOOD, "f.jsonl:1")
    assert r["id"] == "req_1" and r["source"] == "f.jsonl:1" and r["function"] == "assistant"
    assert r["episode_id"] == "ep9" and r["tags"] == {"episode_id": "ep9", "team": "x"}
    assert r["messages"][1]["content"] == "Weather in Oslo?"
    assert json.loads(r["output"]["tool_calls"])[0]["function"]["name"] == "weather"
    assert json.loads(r["tools"])[0]["function"]["name"] == "weather"
    assert r["finish_reason"] == "tool_calls" and r["status_code"] == 200
    assert r["teacher"]["model"] == "gpt-4o-2024-08-06" and json.loads(r["teacher"]["params"]) == {"temperature": 0}
    assert r["usage"] == {"input_tokens": 30, "output_tokens": 12}
    assert r["feedback"] == {"thumbs_up": 1.0}  # non-numeric feedback is not a metric
    assert r["timestamp"].year == 2026


def test_error_responses_become_records_with_the_error():
    line = {**GOOD, "status_code": 429, "response": {"error": {"message": "rate limited"}}}
    r = parse_line(line, "f:1")
    assert r["status_code"] == 429 and r["error"] == "rate limited" and r["output"] is None


@pytest.mark.parametrize("line, reason", [
    ([1, 2], "not an object"),
    ({"timestamp": "2026-01-01"}, "no 'request' object"),
    ({"request": {"messages": []}}, "non-empty list"),
    ({"request": {"messages": [{"content": "hi"}]}, "response": {}}, "string 'role'"),
    ({**GOOD, "timestamp": "yesterday"}, "not ISO 8601"),
    ({**GOOD, "response": {"choices": [{"message": "oops"}]}}, "must be an object"),
])
def test_bad_lines_say_why(line, reason):
    with pytest.raises(BadRecord, match=reason):
        parse_line(line, "f:1")


def test_harvest_quarantines_with_file_line_and_reason(project):
    recipe = project(harvest={"sources": [{"format": "openai", "path": "logs/*.jsonl.gz"},
                                          {"format": "openai", "path": "logs/*.jsonl"}]})
    logs = recipe.parent / "logs"
    extra = logs / "extra.jsonl"
    extra.write_text(json.dumps(GOOD) + "\n" + '{"request": {"messages": [' + "\n\n" + json.dumps([1]) + "\n")
    assert cli(["harvest", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t" / "harvest"
    manifest = json.loads((run / "manifest.json").read_text())
    q = [json.loads(x) for x in (run / "quarantine.jsonl").read_text().splitlines()]
    bad = [x for x in q if x["file"].endswith("extra.jsonl")]
    assert [(x["line"], x["reason"].split(":")[0]) for x in bad] == [(2, "invalid JSON"), (4, "line is a JSON list, not an object")]
    records = read_records(run)
    c = manifest["counts"]
    assert c["lines"] == c["records"] + c["quarantined"] == len(records) + len(q)
    assert c["quarantined"] > 5  # the demo traffic has truncated lines and health checks
    assert any(r["id"] == "req_1" for r in records)
    assert "Oslo" not in (run / "quarantine.jsonl").read_text()  # raw text (and PII) is not copied


def test_missing_logs_fail_the_stage_clearly(project, capsys):
    recipe = project(harvest={"sources": [{"format": "openai", "path": "nowhere/*.jsonl"}]})
    assert cli(["harvest", str(recipe)]) == 2
    assert "no files match 'nowhere/*.jsonl'" in capsys.readouterr().err


def test_demo_traffic_is_deterministic_and_bundled(tmp_path):
    assert generate(50, "2026-11-23") == generate(50, "2026-11-23")
    assert generate(50, "2026-11-23") != generate(50, "2026-11-24")
    for p in write_demo(tmp_path):
        assert p.read_bytes() == (ROOT / "recipes/data/demo-traffic" / p.name).read_bytes()
    lines = gzip.decompress((tmp_path / "2026-11-23.jsonl.gz").read_bytes()).decode().splitlines()
    assert len(lines) == DAYS["2026-11-23"]
    text = "\n".join(lines)
    for mess in ('"status_code": 429', '"content": ""', "I'm sorry", '"finish_reason": "length"', "@", "+1 555-",
                 "Quiero", '"thumbs_up": 0', "health check"):
        assert mess in text, mess


def test_the_readme_examples_are_valid_recipes():
    import re

    import yaml

    from pipeline.recipe import parse_recipe

    from conftest import BASE_RECIPE, merge

    text = (ROOT / "docs" / "harvest.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert len(blocks) >= 3
    for b in blocks:
        harvest = {"sources": BASE_RECIPE["harvest"]["sources"], **b["harvest"]}
        parse_recipe(merge(BASE_RECIPE, {"harvest": harvest}), "docs/harvest.md")
