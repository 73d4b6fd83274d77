"""OpenAI stored chat completions (issue 13, new sources): a list item joined with its /messages (content_parts,
metadata, logprobs, request-side fields), a list page as one JSON document, and a completion without its input
quarantined with a clear reason."""

import json
import shutil

from harvest_helpers import by_id, harvest, in_tmp, quarantine, write_recipe  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st
from test_import_otel import FIXTURES, check_rows_in_equal_harvested_plus_quarantined, fixture_rows
from test_import_properties import SETTINGS


def test_openai_stored_completions_with_messages(tmp_path):
    shutil.copy(FIXTURES / "openai_stored.jsonl", tmp_path / "stored.jsonl")
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openai_stored", "path": "stored.jsonl"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert m["counts"]["records"] == 2 and m["counts"]["quarantined"] == 1
    rec = r["chatcmpl-B1x"]
    assert [x["role"] for x in rec["messages"]] == ["system", "user"]
    assert rec["messages"][1]["content"] == "Which city is this?" and rec["tags"]["has_images"] == "1"
    assert rec["output"]["content"] == "Paris." and rec["finish_reason"] == "stop"
    assert rec["function"] == "landmarks" and rec["tags"]["app"] == "support"
    assert rec["tags"]["request_id"] == "req_ded8ab98"
    assert json.loads(rec["teacher"]["params"]) == {"temperature": 1.0, "top_p": 1.0, "seed": 42}
    assert [t["token"] for t in rec["teacher"]["logprobs"]] == ["Paris", "."]
    assert rec["usage"] == {"input_tokens": 13, "output_tokens": 2}
    assert rec["timestamp"].isoformat().startswith("2025-02-07T20:36:50")
    assert r["chatcmpl-B2y"]["finish_reason"] == "length"  # curate's truncated_output drops it
    (q,) = quarantine(recipe)
    assert q["line"] == 3 and "no input messages" in q["reason"] and "/messages" in q["reason"]


def test_openai_stored_list_page_document(tmp_path):
    shutil.copy(FIXTURES / "openai_stored_page.json", tmp_path / "page.json")
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openai_stored", "path": "page.json"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    # one document = one row: the joined completion is a record; the one without input is kept as a failed
    # record (error says why) rather than taking its neighbour into quarantine with it
    assert m["counts"]["records"] == 2 and m["counts"]["quarantined"] == 0
    assert r["chatcmpl-B1x"]["output"]["content"] == "Paris."
    assert "no input messages" in r["chatcmpl-C3z"]["error"] and r["chatcmpl-C3z"]["output"] is None


@SETTINGS
@given(st.data())
def test_openai_stored_rows_in_equal_harvested_plus_quarantined(tmp_path_factory, data):
    samples = fixture_rows("openai_stored.jsonl")[:2] + fixture_rows("openai_stored_page.json")
    check_rows_in_equal_harvested_plus_quarantined("openai_stored", samples, data, tmp_path_factory)
