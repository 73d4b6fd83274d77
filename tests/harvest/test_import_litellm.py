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


def _spend_row(rid: str, route: str | None, text: str, group: str = "distill/router", model_id: str = "9f3c2a",
               hidden_as_text: bool = False) -> dict:
    """A LiteLLM_SpendLogs row as LiteLLM 1.110.2 writes it for a chat call through distill's config (its own
    get_logging_payload, keys trimmed): litellm_call_id present, messages '{}', the prompt and the upstream's
    headers in proxy_server_request, the deployment's model_info.id as model_id."""
    hidden = {"additional_headers": {"llm_provider-x-distill-route": route}} if route else {}
    request = {"model": group, "messages": [{"role": "user", "content": "Is the Echo Speaker in stock?"}],
               "metadata": {"headers": {"x-distill-function": "product_faq"} if group == "distill/router" else {},
                            "hidden_params": json.dumps(hidden) if hidden_as_text else hidden}}
    response = {"id": rid, "created": 1796618212, "model": group, "object": "chat.completion",
                "choices": [{"finish_reason": "stop", "index": 0, "message": {"content": text, "role": "assistant"}}],
                "usage": {"completion_tokens": 11, "prompt_tokens": 30, "total_tokens": 41}}
    return {"request_id": rid, "call_type": "acompletion", "litellm_call_id": f"call-{rid}",
            "startTime": "2026-12-07 04:36:52.525279+00:00", "endTime": "2026-12-07 04:36:52.565715+00:00",
            "model": "openai/gpt-4o-2024-08-06", "model_group": group, "model_id": model_id, "spend": 0.000185,
            "status": "success", "messages": "{}", "response": json.dumps(response), "custom_llm_provider": "openai",
            "prompt_tokens": 30, "completion_tokens": 11, "proxy_server_request": json.dumps(request)}


STUDENT_CALLS = "student calls logged by LiteLLM (x-distill-route: student, or a distill/<function>/student deployment)"


def test_litellm_1_110_spend_logs_and_the_students_calls(tmp_path):
    """LiteLLM 1.110's spend-log rows were all quarantined ('no messages in the row'); and a gateway in front of
    serve-router logs the student's answers, which were taken as the teacher's. A disabled function's group is
    the teacher alone: its answers are kept."""
    rows = [_spend_row("s1", "student", "from the student"), _spend_row("t1", "teacher", "from the teacher"),
            _spend_row("s2", None, "from the student", group="distill/product_faq",
                       model_id="distill/product_faq/student"),
            _spend_row("t2", None, "from the fallback", group="distill/product_faq/teacher"),
            _spend_row("t3", None, "from the teacher alone", group="distill/ticket_triage"),
            _spend_row("s3", "student", "from the student", hidden_as_text=True),
            _spend_row("u1", None, "from whom?")]  # distill/router, no route header logged
    (tmp_path / "spend.json").write_text(json.dumps(rows))
    recipe = write_recipe(tmp_path, {"sources": [{"format": "litellm", "path": "spend.json"}]})
    counts = harvest(recipe)["counts"]
    got = by_id(recipe)
    assert sorted(got) == ["t1", "t2", "t3"] and counts["quarantined"] == 0
    assert got["t1"]["messages"][0]["content"] == "Is the Echo Speaker in stock?"
    assert got["t1"]["output"]["content"] == "from the teacher"
    # the function: the x-distill-function header LiteLLM logged, else the group that answered
    assert [got[k]["function"] for k in ("t1", "t2", "t3")] == ["product_faq", "product_faq", "ticket_triage"]
    assert counts["not_calls"] == {STUDENT_CALLS: 3, (
        "distill/router calls with no x-distill-route header logged (this LiteLLM keeps no upstream headers): "
        "harvest serve-router's teacher-*.jsonl instead"): 1}
