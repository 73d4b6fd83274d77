"""serve-router's pass-through (export.route.passthrough): an app whose OPENAI_BASE_URL points at the proxy also
calls embeddings and the Responses API; `--pass-through` sends the named paths to the teacher unchanged, with the
teacher's key, its answer relayed as it comes (streamed events included); other paths get a 404 naming the flag.
Run as users run it: `distill serve-router` as a process, the official `openai` client, a loopback teacher."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import openai
import pytest
from aiohttp import web
from live_stubs import policy
from route_helpers import free_port, read_jsonl, wait_healthy

from export.route.passthrough import allowed, normalise
from pipeline.cli import main as cli

SECRET_INPUT = "the customer's address is 12 Acacia Avenue"  # must not reach the pass-through log


class Teacher:
    """A loopback OpenAI-like teacher: /v1/embeddings (JSON, or a 429 with rate-limit headers for input RATE),
    /v1/responses (server-sent events when streamed), /v1/files/{id}; keeps each call's method, path, query and
    Authorization."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, str | None]] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.method, request.path, request.rel_url.raw_query_string,
                           request.headers.get("Authorization")))
        if request.path == "/v1/embeddings":
            body = await request.json()
            if body["input"] == "RATE":
                return web.json_response({"error": {"message": "slow down", "type": "rate_limit_error"}}, status=429,
                                         headers={"Retry-After": "7", "x-ratelimit-remaining-requests": "0"})
            return web.json_response({"object": "list", "model": body["model"], "usage": {"prompt_tokens": 3,
                                      "total_tokens": 3}, "data": [{"object": "embedding", "index": 0,
                                                                    "embedding": [0.25, -0.5, 1.0]}]})
        if request.path == "/v1/responses":
            return await self.responses(request)
        return web.json_response({"id": request.match_info.get("tail", ""), "deleted": True})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        resp = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-4o", "status": "in_progress",
                "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        events = [("response.created", {"response": resp}),
                  *[("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                    "delta": d, "logprobs": []}) for d in ("In ", "stock.")],
                  ("response.completed", {"response": {**resp, "status": "completed"}})]
        for i, (kind, data) in enumerate(events):
            await out.write(f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': i, **data})}\n\n"
                            .encode())
            await asyncio.sleep(0.01)
        await out.write_eof()
        return out

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"


async def _client_calls(base: str) -> dict:
    """What an app does through the proxy, with the official client (its own key, never passed on)."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-client-key", max_retries=0)
    out: dict = {}
    raw = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=SECRET_INPUT)
    out["embedding"] = raw.parse().data[0].embedding, dict(raw.headers)
    stream = await client.responses.create(model="gpt-4o", input=SECRET_INPUT, stream=True)
    out["events"] = [(e.type, getattr(e, "delta", None)) async for e in stream]
    try:
        await client.embeddings.create(model="text-embedding-3-small", input="RATE")
    except openai.RateLimitError as err:
        out["rate"] = err.status_code, err.response.headers.get("retry-after"), \
            err.response.headers.get("x-ratelimit-remaining-requests")
    try:
        await client.files.delete("file-abc")
    except openai.NotFoundError as err:
        out["delete"] = err.status_code, err.message
    wrong = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0)
    try:
        await wrong.embeddings.create(model="text-embedding-3-small", input="x")
    except openai.AuthenticationError as err:
        out["wrong_key"] = err.status_code
    await wrong.close()
    async with httpx.AsyncClient(headers={"Authorization": "Bearer sk-client-key"}) as http:
        r = await http.post(f"{base}/v1/embeddings/%2e%2e/files", json={"input": "x"})
        out["encoded"] = r.status_code
        r = await http.get(f"{base}/v1/responses/resp_1?include=a%26b%3Dc&q=%2541")
        out["get"] = r.status_code
        out["health"] = (await http.get(f"{base}/health")).json()
    await client.close()
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("passthrough-logs")
    policy_file = log_dir.parent / "routing_policy.json"  # no tokenizer or language rule: loads in milliseconds
    policy_file.write_text(json.dumps(policy("tiny-student")))

    async def run() -> tuple[dict, Teacher]:
        teacher = Teacher()
        turl = await teacher.start()
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve-router", str(policy_file), "--student-url",
             "http://127.0.0.1:9/v1", "--teacher-url", turl, "--teacher-key-env", "TEACHER_KEY", "--log-dir",
             str(log_dir), "--port", str(port), "--no-embeddings", "--pass-through", "/v1/embeddings",
             "--pass-through", "/responses", "--client-key-env", "CLIENT_KEY"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TEACHER_KEY": "sk-teacher-key", "CLIENT_KEY": "sk-client-key"})
        try:
            await wait_healthy(proc, f"http://127.0.0.1:{port}")
            return await _client_calls(f"http://127.0.0.1:{port}"), teacher
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            finally:
                await teacher.runner.cleanup()

    out, teacher = asyncio.run(run())
    return out, teacher, log_dir


def test_embeddings_and_responses_reach_the_teacher_with_its_key(served):
    out, teacher, _ = served
    vector, headers = out["embedding"]
    assert vector == [0.25, -0.5, 1.0] and headers["x-distill-route"] == "passthrough"
    assert out["events"] == [("response.created", None), ("response.output_text.delta", "In "),
                             ("response.output_text.delta", "stock."), ("response.completed", None)]
    seen = [(m, p) for m, p, _, _ in teacher.calls]
    assert seen == [("POST", "/v1/embeddings"), ("POST", "/v1/responses"), ("POST", "/v1/embeddings"),
                    ("GET", "/v1/responses/resp_1")]
    assert out["get"] == 200 and teacher.calls[-1][2] == "include=a%26b%3Dc&q=%2541"  # the query as encoded
    assert {auth for *_, auth in teacher.calls} == {"Bearer sk-teacher-key"}  # never the client's key


def test_only_clients_with_the_key_are_served(served):
    out, teacher, _ = served
    assert out["wrong_key"] == 401 and len(teacher.calls) == 4  # /health needed no key (the start-up probe)


def test_the_teachers_rate_limit_reaches_the_client(served):
    out, _, _ = served
    assert out["rate"] == (429, "7", "0")  # status and headers kept: the client's SDK backs off as it would


def test_other_paths_get_a_404_naming_the_flag_and_never_reach_the_teacher(served):
    out, teacher, log_dir = served
    status, message = out["delete"]
    assert status == 404 and "--pass-through /v1/files" in message
    assert out["encoded"] == 404  # an encoded '..' cannot climb out of an allowed path
    assert not any("files" in p for _, p, _, _ in teacher.calls)
    assert any(x["status_code"] == 404 for p in log_dir.glob("errors-*.jsonl") for x in read_jsonl(p))


def test_pass_through_calls_are_counted_and_logged_without_bodies(served):
    out, _, log_dir = served
    assert out["health"]["routed"]["passthrough"] == 4
    lines = [x for p in log_dir.glob("passthrough-*.jsonl") for x in read_jsonl(p)]
    assert [(x["method"], x["path"], x["status_code"]) for x in lines] == [
        ("POST", "/v1/embeddings", 200), ("POST", "/v1/responses", 200), ("POST", "/v1/embeddings", 429),
        ("GET", "/v1/responses/resp_1", 200)]
    assert all(x["bytes_out"] > 0 for x in lines)
    text = "".join(p.read_text() for p in log_dir.glob("*.jsonl"))
    assert SECRET_INPUT not in text and "sk-teacher-key" not in text and "sk-client-key" not in text
    assert not list(log_dir.glob("teacher-*.jsonl"))  # not training data, not in the ledger


def test_pass_through_paths_are_checked():
    assert normalise(["/embeddings", "/v1/responses/", "/v1/embeddings"]) == ("/v1/embeddings", "/v1/responses")
    for bad in ("/v1", "/", "v1/embeddings", "/v1/../files", "/v1/embeddings?x=1"):
        with pytest.raises(ValueError, match="--pass-through"):
            normalise([bad])
    allow = ("/v1/files",)
    assert allowed("/v1/files/file-abc/content", allow) and allowed("/files", allow)
    assert not allowed("/v1/filesystem", allow) and not allowed("/v1/files/%2E%2E/batches", allow)
    assert not allowed("/v1/files/../batches", allow)


def test_a_bad_pass_through_flag_is_a_usage_error(capsys):
    code = cli(["serve-router", "x", "--student-url", "http://127.0.0.1:9/v1", "--teacher-url",
                "http://127.0.0.1:9/v1", "--pass-through", "/v1"])
    assert code == 2 and "--pass-through '/v1'" in capsys.readouterr().err
