"""serve-router under generated hostile-but-plausible traffic, through a real loopback proxy: several hundred
request bodies mutated from a valid one (wrong types at every field, truncated or non-UTF-8 JSON, deep nesting,
huge strings, odd content types) and an over-long header. Every answer is OpenAI-shaped JSON (or a well-formed
event stream for a valid streaming request) with a request id, below 500 unless the teacher itself failed, within
10 s, and every refusal has its line in errors-<date>.jsonl."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, web
from route_helpers import Upstream, completion, content_logprobs, read_jsonl

from export.route.proxy import ProxyConfig, RouterProxy
from export.route.router import Router

N_BODIES = 400
SEED = 14
TEACHER_DOWN = "TEACHERDOWN"
STUDENT_DOWN = "STUDENTDOWN"
CANARY_HEADER = "Bearer sk-proj-CANARYheader0123456789abcdefghij"
POLICY = {"schema": "distill-routing/v2", "tokenizer": None, "unknown_function": "teacher",
          "functions": {"faq": {"before": {"max_input_tokens": None},
                                "after": {"signal": "min_logprob", "threshold": -3.0}}}}
BASE = {"model": "gpt-4o", "messages": [{"role": "system", "content": "Answer briefly."},
                                        {"role": "user", "content": "Is the speaker in stock?"}],
        "metadata": {"function": "faq"}}


class RobustUpstream(Upstream):
    """Answers whatever body the proxy forwards (it may hold any JSON the client sent); fails with HTTP 503 when
    the body mentions its DOWN marker."""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        self.bodies.append({})
        marker = TEACHER_DOWN if self.kind == "teacher" else STUDENT_DOWN
        if marker in raw:
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)
        return web.json_response(completion("The speaker is in stock.", "m", content_logprobs([-0.01, -0.02])))


def _value(rng: random.Random) -> Any:
    """A JSON value of a random kind, some of them hostile in size or depth."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.randint(-2**63, 2**63)
    if kind == 1:
        return rng.choice([0.5, -1e308, 1e-300, 3.0])
    if kind == 2:
        return rng.choice(["", "x", "ünïcödé ✓ 🚀", "\u0000\u001f\ud7ff", "a" * rng.choice([10, 10_000, 300_000])])
    if kind == 3:
        return None
    if kind == 4:
        return rng.choice([True, False])
    if kind == 5:
        return [_value(rng) for _ in range(rng.randrange(4))] if rng.random() < 0.7 else []
    if kind == 6:
        return {rng.choice(["role", "content", "type", "text", "x", ""]): _value(rng) for _ in range(rng.randrange(4))}
    if kind == 7:
        depth = rng.choice([50, 500])
        return json.loads("[" * depth + "]" * depth)
    if kind == 8:
        return [{"type": rng.choice(["text", "image_url", "input_audio", "refusal", 5]),
                 "text": rng.choice(["hi", 5, None, ["a"]]), "image_url": rng.choice([{"url": "data:x"}, "u", 3])}]
    if kind == 9:
        return {"role": rng.choice(["user", "assistant", "tool", "system", "developer", 7, None]),
                "content": rng.choice(["hi", None, 5, [], [{"type": "text", "text": "hi"}]]),
                **({"tool_calls": _value(rng)} if rng.random() < 0.3 else {}),
                **({"name": _value(rng)} if rng.random() < 0.2 else {})}
    if kind == 10:
        return rng.choice(["faq", "unknown_fn", "", "faq\n", "ünï"])
    return rng.choice([TEACHER_DOWN, STUDENT_DOWN, "plain text"])


FIELDS = ["model", "messages", "metadata", "stream", "stream_options", "n", "temperature", "max_tokens", "tools",
          "tool_choice", "logprobs", "top_logprobs", "response_format", "user", "stop", "seed"]


def _mutate(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        where = rng.randrange(6)
        if where == 0:
            body[rng.choice(FIELDS)] = _value(rng)
        elif where == 1 and body:
            body.pop(rng.choice(list(body)))
        elif where == 2 and isinstance(body.get("messages"), list) and body["messages"]:
            msgs = body["messages"]
            i = rng.randrange(len(msgs))
            if isinstance(msgs[i], dict) and rng.random() < 0.7:
                msgs[i][rng.choice(["role", "content", "name", "tool_calls", "tool_call_id"])] = _value(rng)
            else:
                msgs[i] = _value(rng)
        elif where == 3:
            body["metadata"] = rng.choice([_value(rng), {"function": _value(rng)}, {"function": "faq",
                                                                                   "x": _value(rng)}])
        elif where == 4:
            body["stream"] = rng.choice([True, False, "yes", 1, None])
            if rng.random() < 0.5:
                body["stream_options"] = rng.choice([{"include_usage": True}, "usage", [1], None])
        else:
            body.setdefault("messages", [])
            if isinstance(body["messages"], list):
                body["messages"].append({"role": "user", "content": rng.choice([TEACHER_DOWN, STUDENT_DOWN,
                                                                                "more", 5])})
    return body


def cases(n: int, seed: int = SEED) -> list[tuple[bytes, str | None]]:
    """(raw body, content type) pairs: mostly mutated JSON objects, some broken serializations."""
    rng = random.Random(seed)
    out: list[tuple[bytes, str | None]] = []
    for _ in range(n):
        body = _mutate(rng, BASE)
        raw = json.dumps(body).encode()
        style = rng.randrange(10)
        if style == 0:
            raw = raw[: rng.randrange(len(raw))]  # truncated
        elif style == 1:
            raw = raw + b" trailing"
        elif style == 2:
            raw = raw.replace(b"Answer", b"\xff\xfeAns", 1)  # not UTF-8
        elif style == 3:
            raw = rng.choice([b"", b"null", b"[]", b"NaN", b'{"messages": NaN}', b"\xef\xbb\xbf" + raw,
                              b'{"messages": [' * 5000])
        ctype = rng.choice(["application/json"] * 6 + ["text/plain", None, "application/x-www-form-urlencoded"])
        out.append((raw, ctype))
    return out


def _json_shaped(status: int, headers: dict[str, str], text: str) -> str | None:
    """Why an answer is not OpenAI-shaped (None when it is). A teacher's own error is passed on as it came (with
    the request id in the header only)."""
    rid = headers.get("x-request-id")
    if not rid:
        return "no x-request-id"
    if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
        events = [x[6:] for x in text.split("\n") if x.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "an event stream without [DONE]"
        return None if all(isinstance(json.loads(e), dict) for e in events[:-1]) else "an event that is not JSON"
    try:
        body = json.loads(text)
    except ValueError:
        return f"not JSON: {text[:80]!r}"
    if status >= 400:
        err = body.get("error") if isinstance(body, dict) else None
        passed_on = status >= 500 and "x-distill-route" in headers
        if not isinstance(err, dict) or not err.get("message") or (err.get("request_id") != rid and not passed_on):
            return f"not an OpenAI error with the request id: {text[:120]}"
        return None
    return None if isinstance(body.get("choices"), list) and body["choices"] else f"no choices: {text[:120]}"


async def _serve(log_dir) -> tuple[str, list]:
    student, teacher = RobustUpstream("student"), RobustUpstream("teacher")
    cfg = ProxyConfig(student_url=await student.start(), teacher_url=await teacher.start(), log_dir=log_dir,
                      student_model="tiny-student", timeout_s=20)
    runner = web.AppRunner(RouterProxy(Router(POLICY), cfg, "cd" * 32).app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", [runner, student, teacher]


async def _fuzz(log_dir, bodies: list[tuple[bytes, str | None]]) -> list[tuple]:
    base, parts = await _serve(log_dir)
    sem = asyncio.Semaphore(8)
    out: list[tuple] = [None] * len(bodies)

    async def one(i: int, http: ClientSession) -> None:
        raw, ctype = bodies[i]
        async with sem:
            t0 = time.perf_counter()
            async with http.post(f"{base}/v1/chat/completions", data=raw,
                                 headers={"Content-Type": ctype} if ctype else {}) as r:
                text = await r.text(errors="replace")
                out[i] = (r.status, {k.lower(): v for k, v in r.headers.items()}, text, time.perf_counter() - t0)

    try:
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:
            await asyncio.gather(*(one(i, http) for i in range(len(bodies))))
            async with http.post(f"{base}/v1/chat/completions", json=BASE,
                                 headers={"Authorization": CANARY_HEADER + "x" * 20_000}) as r:
                out.append((r.status, {k.lower(): v for k, v in r.headers.items()}, await r.text(), 0.0))
    finally:
        for p in parts:
            await (p.cleanup() if isinstance(p, web.AppRunner) else p.stop())
    return out


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("fuzz-logs")
    bodies = cases(N_BODIES)
    t0 = time.perf_counter()
    out = asyncio.run(_fuzz(log_dir, bodies))
    return bodies, out, log_dir, time.perf_counter() - t0


def test_every_generated_request_gets_an_openai_shaped_answer_below_500(fuzzed):
    bodies, out, _, seconds = fuzzed
    statuses: dict[int, int] = {}
    for (raw, ctype), (status, headers, text, took) in zip(bodies, out, strict=False):
        statuses[status] = statuses.get(status, 0) + 1
        assert took < 10, (raw[:200], took)
        why = _json_shaped(status, headers, text)
        assert why is None, (raw[:300], ctype, status, why)
        if status >= 500:  # only when the teacher itself failed: its marker is in the request
            assert TEACHER_DOWN.encode() in raw, (raw[:300], status, text[:300])
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 50, statuses  # the fuzz reaches both sides
    assert seconds < 60


def test_every_refusal_is_logged_with_its_request_id(fuzzed):
    _, out, log_dir, _ = fuzzed
    logged = {e["id"] for p in sorted(log_dir.glob("errors-*.jsonl")) for e in read_jsonl(p)}
    refused = {h["x-request-id"] for s, h, _, _ in out if s >= 400 and "x-distill-route" not in h}
    assert refused and refused <= logged
    # a teacher failure passed on is logged as the call it was (teacher-<date>.jsonl), with its status
    failed = sum(1 for s, h, _, _ in out if s >= 500 and "x-distill-route" in h)
    calls = [e for p in sorted(log_dir.glob("teacher-*.jsonl")) for e in read_jsonl(p)]
    assert failed and sum(1 for e in calls if e["status_code"] >= 500) == failed


def test_an_over_long_header_gets_a_json_431_that_does_not_echo_it(fuzzed):
    _, out, log_dir, _ = fuzzed
    status, headers, text, _ = out[-1]
    assert status == 431 and headers["content-type"].startswith("application/json"), (status, text[:200])
    err = json.loads(text)["error"]
    assert err["request_id"] == headers["x-request-id"] and "header" in err["message"]
    assert "CANARY" not in text
    lines = [e for p in sorted(log_dir.glob("errors-*.jsonl")) for e in read_jsonl(p)
             if e["id"] == headers["x-request-id"]]
    assert [e["status_code"] for e in lines] == [431] and "CANARY" not in json.dumps(lines)
