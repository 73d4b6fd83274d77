"""LiteLLM proxy logs (issue 13, new sources): StandardLoggingPayload JSONL as the file/S3/callback loggers write
it (success with logprobs and cost, failure kept with its error, redacted messages and embeddings quarantined with
the reason) and LiteLLM_SpendLogs rows (content stored, and not stored: quarantined), as a JSON export and through
the SQL source."""

import json
import shutil
import sqlite3

from harvest_helpers import by_id, harvest, in_tmp, quarantine, write_recipe  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st
from test_import_otel import FIXTURES, check_rows_in_equal_harvested_plus_quarantined, fixture_rows
from test_import_properties import SETTINGS


def test_litellm_standard_logging_payloads(tmp_path):
    shutil.copy(FIXTURES / "litellm_payloads.jsonl", tmp_path / "litellm.jsonl")
    recipe = write_recipe(tmp_path, {"sources": [{"format": "litellm", "path": "litellm.jsonl"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert m["counts"]["records"] == 2 and m["counts"]["quarantined"] == 2
    ok = r["chatcmpl-9xYz"]
    assert [x["content"] for x in ok["messages"]] == ["Answer in one word.", "Capital of France?"]
    assert ok["output"]["content"] == "Paris" and ok["finish_reason"] == "stop" and ok["status_code"] == 200
    assert ok["teacher"]["provider"] == "openai" and ok["teacher"]["model"] == "gpt-4o-mini-2024-07-18"
    assert json.loads(ok["teacher"]["params"])["max_tokens"] == 16
    assert ok["teacher"]["logprobs"][0]["token"] == "Paris" and len(ok["teacher"]["logprobs"][0]["top"]) == 2
    assert ok["usage"] == {"input_tokens": 21, "output_tokens": 1} and abs(ok["latency_ms"] - 491) < 0.01
    assert ok["cost_usd"] == 3.75e-06 and ok["function"] == "capitals"
    assert ok["tags"]["session"] == "s-9" and ok["tags"]["model_group"] == "fast-chat"
    assert "user_api_key_hash" not in ok["tags"]
    failed = r["b0000000-0000-4000-8000-000000000002"]
    assert failed["status_code"] == 429 and "Rate limit" in failed["error"] and failed["output"] is None
    reasons = {q["line"]: q["reason"] for q in quarantine(recipe)}
    assert "redacted by LiteLLM" in reasons[3] and "not a chat completion" in reasons[4]


def test_litellm_spend_logs_json_and_sql(tmp_path):
    shutil.copy(FIXTURES / "litellm_spend_logs.json", tmp_path / "spend.json")
    rows = fixture_rows("litellm_spend_logs.json")
    db = tmp_path / "litellm.db"
    con = sqlite3.connect(db)
    cols = list(rows[0])
    con.execute(f"CREATE TABLE spend ({', '.join(repr(c) for c in cols)})")
    con.executemany(f"INSERT INTO spend VALUES ({', '.join('?' for _ in cols)})",
                    [[r[c] for c in cols] for r in rows])
    con.commit()
    con.close()
    for src in ({"format": "litellm", "path": "spend.json"},
                {"format": "litellm", "sql": {"url": f"sqlite:///{db}", "table": "spend"}}):
        recipe = write_recipe(tmp_path, {"sources": [src]}, name="t")
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
        m = harvest(recipe)
        (rec,) = by_id(recipe).values()
        assert m["counts"]["quarantined"] == 1
        assert rec["id"] == "chatcmpl-sp1" and rec["output"]["content"] == "Paris" and rec["latency_ms"] == 491
        assert rec["cost_usd"] == 3.75e-06 and json.loads(rec["teacher"]["params"])["max_tokens"] == 16
        (q,) = quarantine(recipe)
        assert "store_prompts_in_spend_logs" in q["reason"]


@SETTINGS
@given(st.data())
def test_litellm_rows_in_equal_harvested_plus_quarantined(tmp_path_factory, data):
    samples = fixture_rows("litellm_payloads.jsonl")[:2] + fixture_rows("litellm_spend_logs.json")
    check_rows_in_equal_harvested_plus_quarantined("litellm", samples, data, tmp_path_factory)
