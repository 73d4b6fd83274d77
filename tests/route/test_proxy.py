"""serve-router end to end: real HTTP servers on loopback stand in for the student and the teacher, the proxy
routes, puts the decision in headers and logs every call; the real harvest stage then reads its logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import ClientSession, web
from route_helpers import (
    FAQ,
    FAR_FAQ,
    IN_BAND_FAQ,
    Upstream,
    free_port,
    full_router,
    read_jsonl,
    request,
    wait_healthy,
    with_rule,
)

from export.route.proxy import ProxyConfig, RouterProxy
from pipeline.cli import main as cli

SECRET = "sk-test-secret-never-logged-1234"


async def _exchange(router, log_dir, calls):
    """Start student, teacher and proxy on loopback, send the calls, return (responses, student, teacher)."""
    student, teacher = Upstream("student"), Upstream("teacher")
    cfg = ProxyConfig(student_url=await student.start(), teacher_url=await teacher.start(), log_dir=log_dir,
                      student_model="tiny-student", student_key_env="DISTILL_TEST_STUDENT_KEY",
                      teacher_key_env="DISTILL_TEST_TEACHER_KEY")
    runner = web.AppRunner(RouterProxy(router, cfg, "ab" * 32).app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    out = []
    try:
        async with ClientSession() as http:
            for body, headers in calls:
                kw = {"data": body} if isinstance(body, str) else {"json": body}
                async with http.post(f"{base}/v1/chat/completions", headers=headers or {}, **kw) as resp:
                    out.append((resp.status, dict(resp.headers), await resp.json()))
            async with http.get(f"{base}/health") as resp:
                out.append((resp.status, {}, await resp.json()))
    finally:
        await runner.cleanup()
        await student.stop()
        await teacher.stop()
    return out, student, teacher


@pytest.fixture(scope="module")
def served(e2e, tmp_path_factory):
    """One session of traffic through the proxy; the Router's FAQ rule is pinned so that answers are in band."""
    router = with_rule(full_router(str(e2e / "runs/t/route")), FAQ, signal="min_logprob", threshold=-1.0)
    log_dir = tmp_path_factory.mktemp("router-logs")
    calls = [
        (request(IN_BAND_FAQ), None),  # in band, confident -> student
        (request(IN_BAND_FAQ + " UNSURE"), None),  # in band, unsure -> escalated after generation
        (request(IN_BAND_FAQ, function="legal_advice"), None),  # unseen function -> teacher, student never called
        (request(FAR_FAQ), None),  # far from the training inputs -> teacher before generation
        (request(IN_BAND_FAQ + " FAIL"), None),  # student endpoint fails -> teacher
        (request(IN_BAND_FAQ, function=None), {"x-distill-function": FAQ}),  # function from a header
        ({**request(IN_BAND_FAQ), "stream": "yes"}, None),  # refused: stream must be a boolean (stream: true
        # streams: tests/route/test_proxy_stream.py)
        ("{not json", None),
    ]
    os.environ["DISTILL_TEST_STUDENT_KEY"] = SECRET
    os.environ["DISTILL_TEST_TEACHER_KEY"] = SECRET + "-teacher"
    try:
        out, student, teacher = asyncio.run(_exchange(router, log_dir, calls))
    finally:
        del os.environ["DISTILL_TEST_STUDENT_KEY"], os.environ["DISTILL_TEST_TEACHER_KEY"]
    return out, student, teacher, log_dir


def test_decisions_are_in_the_response_headers(served):
    out, student, teacher, _ = served
    routes = [(s, h.get("x-distill-route"), h.get("x-distill-phase")) for s, h, _ in out[:6]]
    assert routes == [(200, "student", "after"), (200, "teacher", "after"), (200, "teacher", "before"),
                      (200, "teacher", "before"), (200, "teacher", "after"), (200, "student", "after")]
    reasons = [json.loads(h["x-distill-reasons"]) for _, h, _ in out[:6]]
    assert "student confidence -4.500 (min_logprob) < threshold -1.000" in reasons[1][-1]
    assert reasons[2] == ["function 'legal_advice' was not trained or not calibrated"]
    assert "from the training inputs is over the limit" in reasons[3][-1]
    assert reasons[4][-1].startswith("student endpoint failed: HTTP 503")
    assert all(len(h["x-distill-policy"]) == 12 for _, h, _ in out[:6])
    # The client gets the answer of whoever answered, without logprobs it did not ask for.
    assert out[0][2]["choices"][0]["message"]["content"] == "The Echo Speaker is in stock."
    assert "logprobs" not in out[0][2]["choices"][0]
    assert json.loads(out[1][2]["choices"][0]["message"]["content"]) == {"answer": "from the teacher"}
    assert out[6][0] == 400 and "stream" in out[6][2]["error"]["message"]
    assert out[7][0] == 400 and "not valid JSON" in out[7][2]["error"]["message"]
    assert out[8][2]["routed"] == {"student": 2, "teacher": 4}


def test_upstreams_get_what_they_need(served):
    _, student, teacher, _ = served
    # The student saw the in-band calls only (4: two answered, one unsure, one failing), asked for logprobs.
    assert len(student.bodies) == 4 and len(teacher.bodies) == 4
    assert all(b["model"] == "tiny-student" and b["logprobs"] is True and b["top_logprobs"] == 5
               for b in student.bodies)
    assert all(b["model"] == "gpt-4o" for b in teacher.bodies)  # the client's model, unchanged
    assert not any("metadata" in b for b in student.bodies + teacher.bodies)  # OpenAI takes it only with store
    assert set(student.auth) == {f"Bearer {SECRET}"} and set(teacher.auth) == {f"Bearer {SECRET}-teacher"}


def test_every_call_is_logged_without_keys(served):
    _, _, _, log_dir = served
    files = sorted(p.name for p in log_dir.iterdir())
    assert len(files) == 3 and files[0].startswith("errors-") and files[1].startswith("student-") \
        and files[2].startswith("teacher-")
    refused = read_jsonl(log_dir / files[0])  # the two refused requests (stream, bad JSON), with their request ids
    assert [x["status_code"] for x in refused] == [400, 400] and all(x["id"].startswith("req-") for x in refused)
    files = files[1:]
    student_lines = read_jsonl(log_dir / files[0])
    teacher_lines = read_jsonl(log_dir / files[1])
    assert len(student_lines) == 2 and len(teacher_lines) == 4
    for line in student_lines + teacher_lines:
        assert {"id", "timestamp", "status_code", "latency_ms", "request", "response", "routing"} <= set(line)
        assert line["request"]["metadata"]["function"] in (FAQ, "legal_advice")  # header function added
    assert all(line["response"]["model"] == "gpt-4o-2024-08-06" for line in teacher_lines)
    escalated = next(line for line in teacher_lines if "UNSURE" in line["request"]["messages"][-1]["content"])
    assert escalated["routing"]["phase"] == "after" and escalated["routing"]["student_answer"]
    assert escalated["routing"]["signals"]["confidence"] == pytest.approx(-4.5)
    text = "".join(p.read_text() for p in log_dir.iterdir())  # the errors log too
    assert SECRET not in text and "Bearer" not in text and "Authorization" not in text


def test_harvest_reads_the_proxy_logs(served, project, monkeypatch):
    """Tomorrow's run learns from today's traffic: the teacher's answers harvested by the real harvest stage."""
    _, _, _, log_dir = served
    recipe = project(harvest={"sources": [{"format": "openai", "path": f"{log_dir}/teacher-*.jsonl"}]})
    assert cli(["harvest", str(recipe)]) == 0
    run = yaml.safe_load(recipe.read_text())["name"]
    records = pq.read_table(sorted((recipe.parent / "runs" / run / "harvest").glob("records-*.parquet"))).to_pylist()
    assert len(records) == 4
    assert sorted(r["function"] for r in records) == sorted([FAQ, FAQ, "legal_advice", FAQ])
    assert all(json.loads(r["output"]["content"]) == {"answer": "from the teacher"} for r in records)
    assert {r["teacher"]["model"] for r in records} == {"gpt-4o-2024-08-06"}


def test_serve_router_command(e2e, tmp_path):
    """`distill serve-router` as a user runs it: a real process, real sockets, then SIGINT."""

    async def run(port: int, log_dir) -> tuple[int, dict, dict]:
        teacher = Upstream("teacher")
        turl = await teacher.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve-router", str(e2e / "runs/t/route"), "--student-url",
             "http://127.0.0.1:9/v1", "--teacher-url", turl, "--log-dir", str(log_dir), "--port", str(port),
             "--no-embeddings"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            await wait_healthy(proc, f"http://127.0.0.1:{port}")
            async with httpx.AsyncClient(timeout=10) as http:
                resp = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                       json=request(IN_BAND_FAQ, function="legal_advice"))
                return resp.status_code, dict(resp.headers), resp.json()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            finally:
                await teacher.stop()

    status, headers, body = asyncio.run(run(free_port(), tmp_path / "logs"))
    assert status == 200 and headers["x-distill-route"] == "teacher"
    assert json.loads(body["choices"][0]["message"]["content"]) == {"answer": "from the teacher"}
    assert len(read_jsonl(next((tmp_path / "logs").glob("teacher-*.jsonl")))) == 1
