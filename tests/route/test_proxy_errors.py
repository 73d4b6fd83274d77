"""serve-router answers in JSON, always: malformed-but-plausible requests get an OpenAI-shaped 4xx naming the field,
aiohttp's own 404/405/413 too, each with a request id and a line in errors-<date>.jsonl; a student reply that is
not a usable completion falls back to the teacher."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import ClientSession, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from route_helpers import FAQ, IN_BAND_FAQ, Upstream, full_router, read_jsonl, request, with_rule

from export.route.proxy import MAX_BODY, ProxyConfig, RouterProxy, request_problem


class BadStudent(Upstream):
    """The loopback student, but replies with an error that is a string, or choices that are not a list."""

    async def handle(self, req: web.Request) -> web.Response:
        body = await req.json()
        user = " ".join(m.get("content") or "" for m in body["messages"] if m["role"] == "user")
        if "ERRSTRING" in user:
            return web.json_response({"error": "string"}, status=500)
        if "CHOICES5" in user:
            return web.json_response({"choices": 5})
        return await super().handle(req)


def _deep(n: int) -> str:
    return '{"messages": [{"role": "user", "content": "hi"}], "x": ' + "[" * n + "]" * n + "}"


BAD_REQUESTS = [
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "metadata": "fn"}, "'metadata' must be an object"),
    ({"messages": [{"role": "user", "content": "hi"}], "metadata": {"function": ["a"]}}, "metadata.function"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"messages": []}, "'messages'"),
    ([1, 2], "JSON object"),
    ("{not json", "not valid JSON"),
    (_deep(100_000), "not valid JSON"),
]


async def _session(router, log_dir):
    student, teacher = BadStudent("student"), Upstream("teacher")
    cfg = ProxyConfig(student_url=await student.start(), teacher_url=await teacher.start(), log_dir=log_dir,
                      student_model="tiny-student")
    runner = web.AppRunner(RouterProxy(router, cfg, "cd" * 32).app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    out = []
    try:
        async with ClientSession() as http:
            for body, _ in BAD_REQUESTS:
                kw = {"data": body} if isinstance(body, str) else {"json": body}
                async with http.post(f"{base}/v1/chat/completions", **kw) as r:
                    out.append((r.status, {k.lower(): v for k, v in r.headers.items()}, await r.text()))
            for method, path, data in [("GET", "/v1/nothing", None), ("GET", "/v1/chat/completions", None),
                                       ("POST", "/v1/chat/completions", b"x" * (MAX_BODY + 10))]:
                async with http.request(method, base + path, data=data) as r:
                    out.append((r.status, {k.lower(): v for k, v in r.headers.items()}, await r.text()))
            for marker in ("ERRSTRING", "CHOICES5"):
                async with http.post(f"{base}/v1/chat/completions", json=request(f"{IN_BAND_FAQ} {marker}")) as r:
                    out.append((r.status, {k.lower(): v for k, v in r.headers.items()}, await r.text()))
    finally:
        await runner.cleanup()
        await student.stop()
        await teacher.stop()
    return out


@pytest.fixture(scope="module")
def answers(e2e, tmp_path_factory):
    router = with_rule(full_router(str(e2e / "runs/t/route")), FAQ, signal="min_logprob", threshold=-1.0)
    log_dir = tmp_path_factory.mktemp("router-logs")
    return asyncio.run(_session(router, log_dir)), log_dir


def test_malformed_requests_get_json_errors_naming_the_field(answers):
    out, log_dir = answers
    for (status, headers, text), (_, field) in zip(out[: len(BAD_REQUESTS)], BAD_REQUESTS, strict=True):
        body = json.loads(text)
        assert status == 400 and field in body["error"]["message"], (field, body)
        assert body["error"]["request_id"] == headers["x-request-id"] != ""
    errors = [line for p in sorted(log_dir.glob("errors-*.jsonl")) for line in read_jsonl(p)]
    assert len(errors) >= len(BAD_REQUESTS) + 3
    assert {e["id"] for e in errors} >= {h["x-request-id"] for _, h, _ in out[: len(BAD_REQUESTS) + 3]}


def test_aiohttp_errors_are_json_too(answers):
    out, _ = answers
    statuses = [s for s, _, _ in out[len(BAD_REQUESTS): len(BAD_REQUESTS) + 3]]
    assert statuses == [404, 405, 413]
    for _, headers, text in out[len(BAD_REQUESTS): len(BAD_REQUESTS) + 3]:
        assert json.loads(text)["error"]["request_id"] == headers["x-request-id"]


def test_a_bad_student_reply_falls_back_to_the_teacher(answers):
    out, _ = answers
    for status, headers, text in out[-2:]:
        assert status == 200 and headers["x-distill-route"] == "teacher", text
        assert "student endpoint failed" in headers["x-distill-reasons"]
        assert json.loads(text)["choices"][0]["message"]["content"]


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | _json},
                                 optional={"content": _json | st.text(max_size=40), "name": _json})
_bodies = st.fixed_dictionaries({"messages": st.lists(_message | _json, max_size=3) | _json},
                                optional={"metadata": st.fixed_dictionaries({}, optional={"function": _json | st.just(
                                    FAQ)}) | _json, "model": _json, "stream": _json})


@pytest.fixture(scope="module")
def fuzz_router(e2e):
    return full_router(str(e2e / "runs/t/route"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies | _json)
def test_any_request_is_refused_with_a_reason_or_routed(fuzz_router, body):
    """The proxy's validation is the Router's contract: whatever it lets through, the Router decides on."""
    problem = request_problem(body)
    if problem is None:
        fn = (body.get("metadata") or {}).get("function")
        d = fuzz_router.before(body, fn)
        assert d.route in ("student", "teacher") and d.reasons
    else:
        assert isinstance(problem, str) and problem
