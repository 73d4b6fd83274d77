"""Each importer on realistic samples, read by the harvest stage from real files (JSONL, gzip, Parquet, CSV), a real
SQLite database and fsspec URLs (file://, and http:// from a server on loopback)."""

import csv
import gzip
import json
import os
import sqlite3
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from harvest_helpers import (
    SEVERAL_CHOICES,
    STRUCTURED,
    TOOL_ROUND_TRIP,
    WEATHER_TOOL,
    by_id,
    harvest,
    in_tmp,  # noqa: F401
    jsonl,
    openai_row,
    quarantine,
    records,
    stream_chunks,
    write_recipe,
)

from curation.harvest.importers.openai import reassemble_stream


def uuid7(ms: int, n: int) -> str:
    h = f"{ms:012x}7{n:03x}8{n:015x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


T0 = 1795392000000  # 2026-11-23T00:00:00Z in ms


def test_openai_logs_tool_calls_schemas_choices_and_streams(tmp_path):
    sse = ["data: " + json.dumps(c) for c in stream_chunks()] + ["data: [DONE]"]
    rows = [
        TOOL_ROUND_TRIP, STRUCTURED, SEVERAL_CHOICES,
        {"id": "req_stream", "timestamp": "2026-11-23T14:00:00Z", "request": {
            "model": "gpt-4o-mini", "stream": True, "tools": [WEATHER_TOOL],
            "messages": [{"role": "user", "content": "Weather in Bergen?"}]}, "response": stream_chunks()},
        {"id": "req_sse", "timestamp": "2026-11-23T14:00:01Z", "request": {
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Weather in Bergen?"}]}, "response": sse},
    ]
    jsonl(tmp_path / "logs" / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist([{"id": "req_pq", "timestamp": "2026-11-23T15:00:00Z",
                                          "request": json.dumps(openai_row(1)["request"]),
                                          "response": json.dumps(openai_row(1)["response"])}]),
                   tmp_path / "logs" / "b.parquet")
    recipe = write_recipe(tmp_path, {"sources": [{"path": str(tmp_path / "logs")}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert m["counts"]["records"] == 8 and m["counts"]["quarantined"] == 0 and m["counts"]["extra_choices"] == 2

    tool = r["req_tool"]
    assert [x["role"] for x in tool["messages"]] == ["user", "assistant", "tool"]
    assert json.loads(tool["messages"][1]["tool_calls"])[0]["function"]["name"] == "get_weather"
    assert tool["messages"][2]["tool_call_id"] == "call_1" and "rain" in tool["messages"][2]["content"]
    assert json.loads(tool["tools"])[0]["function"]["name"] == "get_weather"
    assert tool["function"] == "weather_agent" and tool["usage"] == {"input_tokens": 70, "output_tokens": 12}

    schema = json.loads(r["req_json"]["response_format"])
    assert schema["json_schema"]["schema"]["required"] == ["intent"]  # kept for curation's schema checks
    assert json.loads(r["req_json"]["output"]["content"]) == {"intent": "billing"}

    names = [r[k]["output"]["content"] for k in ("req_n3", "req_n3#1", "req_n3#2")]
    assert names == ["Miso", "Tofu", "Pixel"] and r["req_n3#2"]["tags"]["choice"] == "2"
    assert r["req_n3"]["usage"] == {"input_tokens": 9, "output_tokens": None}  # tokens are for all choices

    for key in ("req_stream", "req_sse"):
        s = r[key]
        assert s["output"]["content"] == "Let me check." and s["finish_reason"] == "tool_calls"
        call = json.loads(s["output"]["tool_calls"])[0]
        assert call["id"] == "call_9" and json.loads(call["function"]["arguments"]) == {"city": "Bergen"}
        assert s["usage"] == {"input_tokens": 31, "output_tokens": 17} and s["teacher"]["model"] == "gpt-4o-mini"

    assert r["req_pq"]["output"]["content"] == "Answer 1." and r["req_pq"]["source"] == "b.parquet:1"


def test_stream_reassembly_keeps_choices_and_logprobs_apart():
    chunks = [{"id": "c", "model": "m", "created": 1, "choices": [
        {"index": i, "delta": {"content": t}, "logprobs": {"content": [{"token": t, "logprob": -0.1 * (i + 1),
                                                                        "top_logprobs": []}]}}]}
        for i, t in [(0, "a"), (1, "x"), (0, "b"), (1, "y")]]
    body = reassemble_stream(chunks)
    assert [c["message"]["content"] for c in body["choices"]] == ["ab", "xy"]
    assert [t["token"] for t in body["choices"][1]["logprobs"]["content"]] == ["x", "y"]


def test_openai_finetune_jsonl(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4", "weight": 1}]},
        {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                      {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                          "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}],
         "tools": [WEATHER_TOOL], "metadata": {"function": "agent"}},
        {"messages": [{"role": "user", "content": "no answer"}]},
    ]
    jsonl(tmp_path / "ft" / "train.jsonl", rows)
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openai_finetune", "path": "ft/*.jsonl",
                                                  "function": None}]})
    harvest(recipe)
    got = records(recipe)
    assert len(got) == 2
    terse = next(x for x in got if x["output"]["content"] == "4")
    assert [m["role"] for m in terse["messages"]] == ["system", "user"] and terse["function"] == "default"
    agent = next(x for x in got if x["function"] == "agent")
    assert json.loads(agent["output"]["tool_calls"])[0]["function"]["name"] == "get_weather" and agent["tools"]
    (q,) = quarantine(recipe)
    assert q["line"] == 3 and "last message must be the assistant" in q["reason"]
    assert len({x["id"] for x in got}) == 2 and all(x["timestamp"] for x in got)


def tensorzero_rows():
    ep = uuid7(T0, 1)
    chat = {
        "id": uuid7(T0 + 1000, 2), "function_name": "support_agent", "variant_name": "gpt4o_v2", "episode_id": ep,
        "input": json.dumps({"system": {"customer": "Ada"}, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Where is order 7?"}]},
            {"role": "assistant", "content": [{"type": "tool_call", "id": "t1", "name": "lookup_order",
                                               "arguments": "{\"order\": 7}"}]},
            {"role": "user", "content": [{"type": "tool_result", "id": "t1", "name": "lookup_order",
                                          "result": "shipped 2026-11-22"}]}]}),
        "output": json.dumps([{"type": "thought", "text": "it shipped"},
                              {"type": "text", "text": "It shipped yesterday."}]),
        "inference_params": json.dumps({"chat_completion": {"temperature": 0.3, "seed": None}}),
        "processing_time_ms": 812, "timestamp": "2026-11-23 00:00:01", "tags": {"user": "u1"},
        "dynamic_tools": [json.dumps({"name": "lookup_order", "description": "Find an order",
                                      "parameters": {"type": "object"}, "strict": False})],
    }
    second = {**chat, "id": uuid7(T0 + 2000, 3), "timestamp": "2026-11-23 00:00:02",
              "input": json.dumps({"messages": [{"role": "user", "content": "Thanks!"}]}),
              "output": json.dumps([{"type": "text", "text": "You're welcome."}]), "dynamic_tools": []}
    js = {
        "id": uuid7(T0 + 3000, 4), "function_name": "triage", "variant_name": "mini", "episode_id": uuid7(T0, 5),
        "input": json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "arguments": {
            "ticket": "refund please"}}]}]}),
        "output": json.dumps({"raw": "{\"intent\": \"refund\"}", "parsed": {"intent": "refund"}}),
        "output_schema": json.dumps({"type": "object", "properties": {"intent": {"type": "string"}}}),
        "inference_params": "{}", "processing_time_ms": 95, "tags": {},
    }  # no timestamp: it comes from the UUIDv7 id
    api = {"type": "chat", "inference_id": uuid7(T0 + 4000, 6), "function_name": "support_agent",
           "variant_name": "gpt4o_v2", "episode_id": uuid7(T0, 7), "timestamp": "2026-11-23T00:00:04Z",
           "input": {"messages": [{"role": "user", "content": "Hi"}]}, "output": [{"type": "text", "text": "Hello!"}],
           "tags": {}, "model_name": "gpt-4o-2024-08-06", "model_provider_name": "openai",
           "input_tokens": 5, "output_tokens": 2}
    return ep, chat, second, js, api


def test_tensorzero_inferences_and_feedback(tmp_path):
    ep, chat, second, js, api = tensorzero_rows()
    jsonl(tmp_path / "tz" / "ChatInference.jsonl", [chat, second, api])
    jsonl(tmp_path / "tz" / "JsonInference.jsonl", [js, {"id": "not-a-row"}])
    fb = [
        {"id": uuid7(T0 + 9000, 10), "target_id": chat["id"], "metric_name": "task_success", "value": False},
        {"id": uuid7(T0 + 9500, 11), "target_id": chat["id"], "metric_name": "task_success", "value": True},
        {"id": uuid7(T0 + 9100, 12), "target_id": ep, "metric_name": "csat", "value": 4.5},
        {"id": uuid7(T0 + 9200, 13), "target_id": second["id"], "metric_name": "csat", "value": 2.0},
        {"id": uuid7(T0 + 9300, 14), "target_id": chat["id"], "target_type": "inference", "value": "call me 555-0100"},
        {"id": uuid7(T0 + 9400, 15), "inference_id": js["id"],
         "value": json.dumps({"intent": "billing_error"})},
        {"id": uuid7(T0 + 9600, 16), "target_id": uuid7(T0, 99), "metric_name": "csat", "value": 1.0},
        {"id": uuid7(T0 + 9700, 17), "target_id": chat["id"], "metric_name": "csat", "value": "very good"},
    ]
    jsonl(tmp_path / "tz" / "feedback" / "all.jsonl", fb)
    recipe = write_recipe(tmp_path, {
        "sources": [{"format": "tensorzero", "path": "tz/*Inference.jsonl"}],
        "feedback": [{"format": "tensorzero", "path": "tz/feedback/*.jsonl"}],
    })
    m = harvest(recipe)
    r = by_id(recipe)
    assert len(r) == 4
    c = r[chat["id"]]
    assert c["function"] == "support_agent" and c["episode_id"] == ep and c["tags"]["variant"] == "gpt4o_v2"
    assert [x["role"] for x in c["messages"]] == ["system", "user", "assistant", "tool"]
    assert json.loads(c["messages"][0]["content"]) == {"customer": "Ada"}
    assert json.loads(c["messages"][2]["tool_calls"])[0]["function"]["name"] == "lookup_order"
    assert c["messages"][3]["tool_call_id"] == "t1" and c["messages"][3]["content"] == "shipped 2026-11-22"
    assert c["output"]["content"] == "It shipped yesterday."  # the thought block is not trained on
    assert json.loads(c["teacher"]["params"]) == {"temperature": 0.3}
    assert json.loads(c["tools"])[0]["function"]["name"] == "lookup_order"
    # Later boolean feedback wins; episode-level csat reaches every inference of the episode, an inference's own
    # csat beats it; the comment is dropped (it may hold personal data).
    assert c["feedback"] == {"task_success": 1.0, "csat": 4.5}
    assert r[second["id"]]["feedback"] == {"csat": 2.0}
    assert "comment" not in c["tags"] and m["counts"]["feedback"]["comments_dropped"] == 1
    j = r[js["id"]]
    assert j["timestamp"].isoformat().startswith("2026-11-23T00:00:03")
    assert json.loads(j["response_format"])["json_schema"]["schema"]["properties"]["intent"]
    assert json.loads(j["messages"][0]["content"]) == {"ticket": "refund please"}
    assert json.loads(j["output"]["content"]) == {"intent": "billing_error"}  # the demonstration
    assert j["tags"]["output_source"] == "demonstration"
    a = r[api["inference_id"]]
    assert a["teacher"]["model"] == "gpt-4o-2024-08-06" and a["usage"] == {"input_tokens": 5, "output_tokens": 2}
    q = quarantine(recipe)
    assert sorted((x["file"].rsplit("/", 1)[-1], x["line"], x["reason"]) for x in q) == [
        ("JsonInference.jsonl", 2, "'input' must be an object with 'messages' (and optionally 'system')"),
        ("all.jsonl", 8, "value is not a number or a boolean")]
    assert m["counts"]["feedback"]["records_matched"] == 3


def test_feedback_levels_wide_csv_and_metric_filter(tmp_path):
    rows = [openai_row(i) for i in range(4)]  # episodes ep0 (req_0, req_1) and ep1 (req_2, req_3)
    jsonl(tmp_path / "logs" / "day.jsonl", rows)
    with open(tmp_path / "ratings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request", "helpful", "stars", "note"])
        w.writerow(["req_0", "true", "5", "x"])
        w.writerow(["req_3", "0", "", "y"])
        w.writerow(["", "1", "1", "z"])
    jsonl(tmp_path / "episodes.jsonl", [{"episode": "ep1", "kind": "resolved", "score": 1},
                                        {"episode": "ep1", "kind": "latency", "score": 9}])
    recipe = write_recipe(tmp_path, {
        "sources": [{"path": "logs/*.jsonl"}],
        "feedback": [
            {"path": "ratings.csv", "target_field": "request", "metric_field": None,
             "metric_columns": ["helpful", "stars"], "level": "inference"},
            {"path": "episodes.jsonl", "target_field": "episode", "metric_field": "kind", "value_field": "score",
             "level": "episode", "metrics": ["resolved"]},
        ],
    })
    m = harvest(recipe)
    r = by_id(recipe)
    assert r["req_0"]["feedback"] == {"helpful": 1.0, "stars": 5.0}
    assert r["req_1"]["feedback"] == {}
    assert r["req_2"]["feedback"] == {"resolved": 1.0}
    assert r["req_3"]["feedback"] == {"helpful": 0.0, "resolved": 1.0}
    (q,) = quarantine(recipe)
    assert q["file"].endswith("ratings.csv") and q["line"] == 4 and "no target id" in q["reason"]
    assert m["counts"]["feedback"]["metrics"] == {"helpful": 2, "stars": 1, "resolved": 1}


def test_openpipe_exports_and_logged_calls(tmp_path):
    export = {"input": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Classify: great product"}],
                        "tools": [WEATHER_TOOL]},
              "output": {"id": "chatcmpl-op1", "model": "gpt-4o-2024-08-06", "created": 1795392000,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "positive"}}],
                         "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}},
              "tags": {"prompt_id": "classify", "$sdk": "python", "team": "growth"}}
    logged = {"id": "6a1f", "requestedAt": 1795392060000, "receivedAt": 1795392060500, "durationMs": 500,
              "statusCode": 429, "errorMessage": "Rate limit reached",
              "reqPayload": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Classify: meh"}]},
              "respPayload": None, "tags": [{"name": "prompt_id", "value": "classify"}]}
    jsonl(tmp_path / "op.jsonl", [export, logged, {"input": {"messages": "oops"}}])
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openpipe", "path": "op.jsonl"}]})
    harvest(recipe)
    r = by_id(recipe)
    a, b = r["chatcmpl-op1"], r["6a1f"]
    assert a["function"] == "classify" and a["output"]["content"] == "positive" and a["tags"]["team"] == "growth"
    assert a["teacher"]["provider"] == "openpipe" and a["usage"]["input_tokens"] == 12
    assert b["status_code"] == 429 and b["error"] == "Rate limit reached" and b["output"] is None
    assert b["latency_ms"] == 500 and b["timestamp"].isoformat().startswith("2026-11-23T00:01:00")
    (q,) = quarantine(recipe)
    assert q["line"] == 3 and "request.messages must be a non-empty list" in q["reason"]


def test_mapped_jsonl_parquet_and_csv_with_dotted_paths(tmp_path):
    jsonl(tmp_path / "m" / "calls.jsonl", [
        {"meta": {"rid": "n1", "ts": 1795392000}, "call": {"input": {"messages": [
            {"role": "user", "content": "hello"}]}, "result": {"text": "hi there"}}, "scores": {"helpful": 0.9},
         "llm": "llama-3-70b"},
        {"meta": {"rid": "n2", "ts": "yesterday"}, "call": {"input": {"messages": [{"role": "user", "content": "x"}]}}},
    ])
    fields = {"id": "meta.rid", "timestamp": "meta.ts", "messages": "call.input.messages",
              "output": "call.result.text", "feedback": "scores", "model": "llm"}
    pq.write_table(pa.Table.from_pylist([{"key": "p1", "at": "2026-11-23T08:00:00+01:00",
                                          "payload": json.dumps({"chat": [{"role": "user", "content": "2+2"}],
                                                                 "answer": {"role": "assistant", "content": "4"}}),
                                          "cost": 0.0012}]), tmp_path / "m" / "rows.parquet")
    with open(tmp_path / "m" / "sheet.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request_id", "created_at", "task", "question", "answer", "rating", "user"])
        w.writerow(["c1", "2026-11-23 09:00:00", "faq", "Do you ship\nto Norway?", "Yes.", "1", "u7"])
        w.writerow(["c2", "2026-11-23 09:01:00", "faq", "", "?", "0", "u8"])
    recipe = write_recipe(tmp_path, {"sources": [
        {"format": "mapped", "path": "m/calls.jsonl", "fields": fields},
        {"format": "mapped", "path": "m/rows.parquet", "function": "math",
         "fields": {"id": "key", "timestamp": "at", "messages": "payload.chat", "output": "payload.answer",
                    "cost_usd": "cost"}},
        {"format": "mapped", "path": "m/sheet.csv", "fields": {
            "id": "request_id", "timestamp": "created_at", "function": "task", "prompt": "question",
            "output": "answer", "feedback.thumbs_up": "rating", "tags.user": "user"}},
    ]})
    harvest(recipe)
    r = by_id(recipe)
    assert r["n1"]["output"]["content"] == "hi there" and r["n1"]["feedback"] == {"helpful": 0.9}
    assert r["n1"]["teacher"]["model"] == "llama-3-70b"
    assert r["p1"]["messages"][0]["content"] == "2+2" and r["p1"]["output"]["content"] == "4"
    assert r["p1"]["timestamp"].isoformat() == "2026-11-23T07:00:00+00:00" and r["p1"]["cost_usd"] == 0.0012
    assert r["p1"]["function"] == "math"
    c1 = r["c1"]
    assert c1["messages"][0]["content"] == "Do you ship\nto Norway?" and c1["feedback"] == {"thumbs_up": 1.0}
    assert c1["tags"] == {"user": "u7"} and c1["function"] == "faq"
    q = {(x["file"].rsplit("/", 1)[-1], x["line"]): x["reason"] for x in quarantine(recipe)}
    assert "timestamp is not ISO 8601" in q[("calls.jsonl", 2)]
    assert "the prompt) is missing" in q[("sheet.csv", 4)]  # the row starts on line 4 (line 2 holds a newline)


def test_sqlite_table_and_query(tmp_path):
    db = tmp_path / "calls.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE llm_calls (id INTEGER PRIMARY KEY, created_at TEXT, request TEXT, response TEXT, "
                "status_code INT)")
    for i in range(5):
        row = openai_row(i, ts=f"2026-11-23T10:0{i}:00Z")
        con.execute("INSERT INTO llm_calls VALUES (?, ?, ?, ?, ?)",
                    (i, row["timestamp"], json.dumps(row["request"]), json.dumps(row["response"]), 200))
    con.execute("INSERT INTO llm_calls VALUES (9, '2026-11-23T11:00:00Z', '{broken', NULL, 200)")
    con.commit()
    con.close()
    recipe = write_recipe(tmp_path, {"sources": [
        {"sql": {"url": f"sqlite:///{db}", "table": "llm_calls", "timestamp_column": "created_at"}, "name": "tbl"},
        {"format": "mapped", "sql": {"url": f"sqlite:///{db}", "query": "SELECT id, created_at, request "
                                     "FROM llm_calls WHERE id < 2"},
         "fields": {"id": "id", "timestamp": "created_at", "messages": "request.messages"}, "name": "qry"},
    ]})
    m = harvest(recipe)
    got = records(recipe)
    assert m["counts"]["sources"]["tbl"]["records"] == 5 and m["counts"]["sources"]["qry"]["records"] == 2
    assert {x["source"] for x in got if x["output"]} == {f"llm_calls:{i}" for i in range(1, 6)}
    (q,) = quarantine(recipe)
    assert q == {"source": "tbl", "file": "sql:llm_calls", "line": 6, "reason": "no 'request' object"}


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP file server on loopback over tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fsspec_urls_file_and_http(tmp_path, http_dir, capsys):
    root, base = http_dir
    jsonl(tmp_path / "logs" / "day1.jsonl", [openai_row(1)])
    with gzip.open(root / "day2.jsonl.gz", "wt") as f:
        f.write(json.dumps(openai_row(2, ts="2026-11-24T10:00:00Z")) + "\n")
    recipe = write_recipe(tmp_path, {"sources": [{"path": f"file://{tmp_path}/logs/*.jsonl"},
                                                 {"path": f"{base}/day2.jsonl.gz"}]})
    harvest(recipe)
    assert sorted(by_id(recipe)) == ["req_1", "req_2"]
    assert "req_2" in by_id(recipe) and by_id(recipe)["req_2"]["source"] == "day2.jsonl.gz:1"
    bad = write_recipe(tmp_path, {"sources": [{"path": "s3://bucket/logs/*.jsonl"}]})
    from pipeline.cli import main as cli

    assert cli(["harvest", str(bad)]) == 2
    assert "install the 'cloud' extra" in capsys.readouterr().err


PG_URL = os.environ.get("DISTILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/distill_test")


@pytest.fixture
def pg_table():
    """A fresh table in a real PostgreSQL server (.ci/run starts one); skipped when none is reachable here."""
    sa = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg", reason="the 'postgres' extra (psycopg) is not installed")
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as err:
        engine.dispose()
        if os.environ.get("DISTILL_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"no PostgreSQL server at {PG_URL} ({str(err).splitlines()[0][:120]}); .ci/run starts one, or "
                    "set DISTILL_TEST_POSTGRES_URL")
    name = f"llm_logs_{os.getpid()}_{threading.get_ident() % 10000}"
    with engine.begin() as con:
        con.execute(sa.text(f"CREATE TABLE {name} (id TEXT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL, "
                            "request JSONB, response JSONB, status_code INT, latency_ms NUMERIC)"))
    yield engine, name
    with engine.begin() as con:
        con.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    engine.dispose()


def test_postgresql_table_with_jsonb_and_a_nightly_watermark(tmp_path, pg_table, monkeypatch):
    import sqlalchemy as sa

    engine, name = pg_table

    def add(rows):
        with engine.begin() as con:
            for r in rows:
                con.execute(sa.text(f"INSERT INTO {name} VALUES (:id, :at, CAST(:req AS JSONB), "
                                    "CAST(:resp AS JSONB), 200, :lat)"),
                            {"id": r["id"], "at": r["timestamp"], "req": json.dumps(r["request"]) if r["request"]
                             else None, "resp": json.dumps(r["response"]), "lat": r.get("latency_ms")})

    add([openai_row(i, ts=f"2026-11-23T10:0{i}:00+00:00") for i in range(4)] + [TOOL_ROUND_TRIP]
        + [{**openai_row(8, ts="2026-11-23T10:30:00+00:00"), "request": None}])
    monkeypatch.setenv("DISTILL_PG", PG_URL)  # the URL (and any password) stays out of the recipe
    recipe = write_recipe(tmp_path, {"sources": [{"name": "pg", "sql": {
        "url_env": "DISTILL_PG", "table": name, "timestamp_column": "created_at"}}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert m["counts"]["records"] == 5 and r["req_2"]["latency_ms"] == 302.0
    assert json.loads(r["req_tool"]["tools"])[0]["function"]["name"] == "get_weather"
    assert r["req_3"]["timestamp"].isoformat() == "2026-11-23T10:03:00+00:00"
    (q,) = quarantine(recipe)
    assert q["file"] == f"sql:{name}" and q["reason"] == "no 'request' object"

    add([openai_row(i, ts=f"2026-11-24T09:0{i - 10}:00+00:00") for i in range(10, 13)])
    m = harvest(recipe)
    assert m["counts"]["this_run"]["lines"] == 4  # 3 new rows and the one at the watermark, not the whole table
    assert m["counts"]["records"] == 8 and len(by_id(recipe)) == 8
