"""Streaming through serve-router (issue 16, "Streaming") and the savings ledger ("Savings ledger"): loopback
student and teacher, the proxy on its own event loop, the official `openai` client streaming and not; the logs then
go through the real `distill harvest` and `distill ledger`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict

import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import web
from openai import OpenAI
from route_helpers import (
    FAQ,
    IN_BAND_FAQ,
    STREAM_DELAY_S,
    TEACHER_PIECES,
    TEACHER_USAGE,
    Upstream,
    full_router,
    read_jsonl,
    request,
    with_rule,
)

from curation.harvest.importers.openai import reassemble_stream
from export.route.proxy import ProxyConfig, RouterProxy, completion_chunks
from pipeline.cli import main as cli

STUDENT_TEXT = "The Echo Speaker is in stock."
TEACHER_TEXT = json.dumps({"answer": "from the teacher"})


def _start(router, log_dir):
    """Student, teacher and serve-router on one event loop in a thread; returns (proxy URL, student, teacher,
    proxy, stop)."""
    loop = asyncio.new_event_loop()
    student, teacher = Upstream("student"), Upstream("teacher")
    ready: dict = {}

    async def start():
        cfg = ProxyConfig(student_url=await student.start(), teacher_url=await teacher.start(), log_dir=log_dir,
                          student_model="tiny-student")
        ready["proxy"] = RouterProxy(router, cfg, "ef" * 32)
        runner = web.AppRunner(ready["proxy"].app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        ready["runner"] = runner

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(30)

    def stop():
        for coro in (ready["runner"].cleanup(), student.stop(), teacher.stop()):
            asyncio.run_coroutine_threadsafe(coro, loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return ready["url"], student, teacher, ready["proxy"], stop


def _ask(client, text, function=FAQ, stream=False, usage=False):
    """(headers, chunks with their arrival times | completion)."""
    body = request(text, function=function)
    kw = {"stream": True, **({"stream_options": {"include_usage": True}} if usage else {})} if stream else {}
    raw = client.chat.completions.with_raw_response.create(model=body["model"], messages=body["messages"],
                                                           extra_body={"metadata": body["metadata"]}, **kw)
    if not stream:
        return dict(raw.headers), raw.parse()
    return dict(raw.headers), [(time.perf_counter(), c) for c in raw.parse()]


def _text(chunks):
    return "".join(c.choices[0].delta.content or "" for _, c in chunks if c.choices)


@pytest.fixture(scope="module")
def traffic(e2e, tmp_path_factory):
    router = with_rule(full_router(str(e2e / "runs/t/route")), FAQ, signal="min_logprob", threshold=-1.0)
    log_dir = tmp_path_factory.mktemp("stream-logs")
    url, student, teacher, proxy, stop = _start(router, log_dir)
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        out = {
            "plain": _ask(client, IN_BAND_FAQ),
            "student": _ask(client, IN_BAND_FAQ, stream=True),
            "student_usage": _ask(client, IN_BAND_FAQ, stream=True, usage=True),
            "escalated": _ask(client, IN_BAND_FAQ + " UNSURE", stream=True),
            "escalated_usage": _ask(client, IN_BAND_FAQ + " UNSURE", stream=True, usage=True),
            "before": _ask(client, IN_BAND_FAQ, function="legal_advice", stream=True),
            "teacher_plain": _ask(client, IN_BAND_FAQ + " UNSURE"),
        }
    finally:
        stop()
    return out, student, teacher, proxy, log_dir


def test_a_student_answer_streams_with_the_same_text(traffic):
    out = traffic[0]
    headers, plain = out["plain"]
    assert headers["x-distill-route"] == "student" and plain.choices[0].message.content == STUDENT_TEXT
    for key in ("student", "student_usage"):
        headers, chunks = out[key]
        assert headers["x-distill-route"] == "student" and headers["content-type"].startswith("text/event-stream")
        assert json.loads(headers["x-distill-reasons"]) and len(headers["x-distill-policy"]) == 12
        assert _text(chunks) == STUDENT_TEXT
        objs = [c for _, c in chunks]
        assert all(c.object == "chat.completion.chunk" for c in objs)
        assert objs[0].choices[0].delta.role == "assistant"
        assert len([c for c in objs if c.choices and c.choices[0].delta.content]) == len(STUDENT_TEXT.split())
        assert all(c.choices[0].logprobs is None for c in objs if c.choices)  # the client did not ask for them
    objs = [c for _, c in out["student"][1]]
    assert objs[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in objs)
    objs = [c for _, c in out["student_usage"][1]]
    assert objs[-2].choices[0].finish_reason == "stop"
    assert objs[-1].choices == [] and objs[-1].usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}


def test_an_escalated_answer_streams_from_the_teacher_as_it_arrives(traffic):
    out, student, teacher = traffic[:3]
    for key, phase in (("escalated", "after"), ("escalated_usage", "after"), ("before", "before")):
        headers, chunks = out[key]
        assert (headers["x-distill-route"], headers["x-distill-phase"]) == ("teacher", phase)
        assert _text(chunks) == TEACHER_TEXT
        content = [(t, c) for t, c in chunks if c.choices and c.choices[0].delta.content]
        assert [c.choices[0].delta.content for _, c in content] == TEACHER_PIECES  # the teacher's own chunks
        # Relayed as they came, not gathered first: the pieces reach the client STREAM_DELAY_S apart.
        gaps = [b[0] - a[0] for a, b in zip(content, content[1:], strict=False)]
        assert min(gaps) > STREAM_DELAY_S / 2, gaps
        assert [c.choices[0].finish_reason for _, c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for _, c in out["escalated"][1])  # not asked for: the usage chunk is held back
    last = out["escalated_usage"][1][-1][1]
    assert last.choices == [] and last.usage.model_dump(exclude_none=True) == TEACHER_USAGE
    # The student is never asked to stream; the teacher is, with usage always asked (the ledger needs it).
    assert not any("stream" in b or "stream_options" in b for b in student.bodies)
    streamed = [b for b in teacher.bodies if b.get("stream")]
    assert len(streamed) == 3 and all(b["stream_options"] == {"include_usage": True} for b in streamed)
    assert traffic[0]["teacher_plain"][1].choices[0].message.content == TEACHER_TEXT
    assert not teacher.bodies[-1].get("stream")


def test_streamed_calls_are_logged_assembled_and_harvested(traffic, project):
    log_dir = traffic[4]
    student_lines = read_jsonl(next(log_dir.glob("student-*.jsonl")))
    teacher_lines = read_jsonl(next(log_dir.glob("teacher-*.jsonl")))
    assert len(student_lines) == 3 and len(teacher_lines) == 4
    assert [x["routing"].get("stream", False) for x in student_lines] == [False, True, True]
    for x in teacher_lines:
        assert x["status_code"] == 200 and x["response"]["choices"][0]["message"]["content"] == TEACHER_TEXT
    assert [x["response"].get("usage") for x in teacher_lines if x["routing"].get("stream")] == [TEACHER_USAGE] * 3
    # Every answer carries serve-router's own id, relayed chunks included: the client's id is its log line's
    out = traffic[0]
    seen = [{c.id for _, c in out[k][1]} for k in ("escalated", "escalated_usage", "before")]
    assert all(len(s) == 1 for s in seen)
    assert [x["id"] for x in teacher_lines] == [s.pop() for s in seen] + [out["teacher_plain"][1].id]
    assert [x["id"] for x in student_lines] == [out["plain"][1].id] + [
        {c.id for _, c in out[k][1]}.pop() for k in ("student", "student_usage")]
    assert all(x["routing"]["upstream_id"].startswith("chatcmpl-") and x["routing"]["upstream_id"] != x["id"]
               for x in teacher_lines + student_lines)
    recipe = project(harvest={"sources": [{"format": "openai", "path": f"{log_dir}/teacher-*.jsonl"},
                                          {"format": "openai", "path": f"{log_dir}/student-*.jsonl"}]})
    assert cli(["harvest", str(recipe)]) == 0
    run = yaml.safe_load(recipe.read_text())["name"]
    records = pq.read_table(sorted((recipe.parent / "runs" / run / "harvest").glob("records-*.parquet"))).to_pylist()
    assert sorted(r["output"]["content"] for r in records) == [TEACHER_TEXT] * 4  # streamed ones assembled
    # The student's answers (streamed ones logged assembled too) are never training data: counted, not read
    assert [x["response"]["choices"][0]["message"]["content"] for x in student_lines] == [STUDENT_TEXT] * 3
    manifest = json.loads((recipe.parent / "runs" / run / "harvest" / "manifest.json").read_text())
    assert manifest["counts"]["not_calls"] == {"student answers logged by serve-router": 3}


def _expected(lines, proxy):
    """The ledger's totals computed straight from the log lines: usage × prices, per (day, function, version)."""
    tin, tout = proxy.teacher_price
    per_request = proxy.student_per_request
    rows = defaultdict(lambda: defaultdict(float))
    for x in lines:
        key = (x["timestamp"][:10], x["request"]["metadata"]["function"], x["routing"]["policy_sha256"])
        row = rows[key]
        tried = x["routing"]["phase"] == "after"  # the student answered (kept or escalated)
        usage = x["response"]["usage"]
        teacher = (usage["prompt_tokens"] * tin + usage["completion_tokens"] * tout) / 1e6
        row["requests"] += 1
        row["student"] += x["routing"]["route"] == "student"
        row["escalated"] += tried and x["routing"]["route"] == "teacher"
        spent = (per_request if tried else 0.0) + (teacher if x["routing"]["route"] == "teacher" else 0.0)
        row["spent_usd"] += spent
        row["teacher_only_usd"] += teacher  # the student's usage priced at the teacher's prices when it answered
        row["saved_usd"] += teacher - spent
    return rows


def test_the_ledger_matches_the_logs(traffic, tmp_path):
    _, _, _, proxy, log_dir = traffic
    assert proxy.teacher_price == (2.5, 10.0) and proxy.student_per_request > 0  # the recipe's, via the policy
    lines = [x for f in sorted(log_dir.glob("[st]*-*.jsonl")) for x in read_jsonl(f)]
    out = tmp_path / "ledger.json"
    assert cli(["ledger", "--logs", str(log_dir), "--json", str(out)]) == 0
    ledger = json.loads(out.read_text())
    expected = _expected(lines, proxy)
    got = {(r["day"], r["function"], r["version"]): r for r in ledger["rows"]}
    assert set(got) == set(expected)
    for key, exp in expected.items():
        row = got[key]
        for field in ("requests", "student", "escalated"):
            assert row[field] == exp[field], (key, field)
        for field in ("spent_usd", "teacher_only_usd", "saved_usd"):
            assert row[field] == pytest.approx(exp[field], rel=1e-9, abs=1e-12), (key, field)
        assert row["student_share"] == pytest.approx(exp["student"] / exp["requests"])
    total = ledger["total"]
    assert total["requests"] == len(lines) == 7 and total["student"] == 3 and total["escalated"] == 3
    assert total["spent_usd"] == pytest.approx(sum(e["spent_usd"] for e in expected.values()))
    assert total["saved_usd"] == pytest.approx(sum(e["saved_usd"] for e in expected.values()))
    assert total["escalation_rate"] == pytest.approx(3 / 6)  # escalated / requests the student answered
    assert total["unpriced"] == 0


def test_completion_chunks_reassemble_to_the_completion():
    """The student's answer as chunks, read back by harvest's reassembler: text, tool calls, logprobs, usage."""
    lp = {"content": [{"token": "a", "logprob": -0.1, "top_logprobs": []}]}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
    resp = {"id": "c1", "created": 5, "model": "s", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "  two  words \n"},
                         "logprobs": lp, "finish_reason": "stop"},
                        {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                         "finish_reason": "tool_calls"}]}
    chunks = completion_chunks(resp, include_usage=True)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == resp["usage"]
    back = reassemble_stream(chunks)
    assert back["choices"][0]["message"]["content"] == "  two  words \n" and back["choices"][0]["logprobs"] == lp
    assert back["choices"][1]["message"]["tool_calls"] == [call] and back["choices"][1]["finish_reason"] == "tool_calls"
    assert back["usage"] == resp["usage"] and back["id"] == "c1"
    assert "usage" not in completion_chunks(resp, include_usage=False)[-1]
