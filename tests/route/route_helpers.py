"""Shared pieces of the routing tests: the e2e run's Router (loaded once: MiniLM takes seconds), requests built
in and out of band, and OpenAI-compatible stand-ins for a student and a teacher served on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import socket
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from export.route.router import Router

FAQ = "product_faq"
TRIAGE = "ticket_triage"
IN_BAND_FAQ = "Is the Echo Speaker in stock?"
FAR_FAQ = "Write a haiku about the moon."
ITALIAN_FAQ = "Il Echo Speaker è disponibile adesso?"
FAQ_SYSTEM = "You answer customer questions about our products in one short sentence."


def request(text: str, function: str | None = FAQ, system: str | None = FAQ_SYSTEM) -> dict[str, Any]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {"model": "gpt-4o", "messages": msgs, **({"metadata": {"function": function}} if function else {})}


@lru_cache(maxsize=4)
def full_router(route_dir: str) -> Router:
    """The policy with every rule loaded (tokenizer, fastText, MiniLM)."""
    return Router.load(route_dir)


def with_rule(router: Router, function: str, **after: Any) -> Router:
    """The same Router with one function enabled and its post-generation rule replaced (shares the helpers)."""
    policy = copy.deepcopy(router.policy)
    rule = policy["functions"][function]
    rule["enabled"] = True
    rule["after"] = {**rule["after"], **after}
    return Router(policy, router.encode, language=router.language, embed=router.embed, reference=router.reference,
                  skip=tuple(router.skipped))


def content_logprobs(values: list[float], top: int = 3) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content``: each token with its logprob and a top-k where it is the best choice."""
    out = []
    for i, lp in enumerate(values):
        rest = max(1e-9, 1 - math.exp(lp))
        alts = [{"token": f"alt{j}", "logprob": math.log(rest / top)} for j in range(top - 1)]
        out.append({"token": f"t{i}", "logprob": lp, "top_logprobs": [{"token": f"t{i}", "logprob": lp}, *alts]})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion(content: str, model: str, logprobs: list[dict[str, Any]] | None = None, rid: str = "x") -> dict:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": rid, "object": "chat.completion", "created": 1764000000, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}


TEACHER_PIECES = ['{"answer', '": "from', ' the', ' teacher"}']  # json.dumps({"answer": "from the teacher"})
TEACHER_USAGE = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}
STUDENT_USAGE = {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26}
STREAM_DELAY_S = 0.15
STUDENT_PIECES = ["The", " Echo", " Speaker", " is", " in", " stock."]  # the student's answer, when it streams


class Upstream:
    """A stand-in OpenAI-compatible server. The student answers with confident logprobs, or unsure ones when the
    user turn contains UNSURE, and fails with HTTP 503 on FAIL; the teacher always answers. Every request body
    and Authorization header it receives is kept. With ``hold`` = n, each request waits (up to ``hold_s``) until
    n requests are in flight at once; ``max_in_flight`` is the most seen."""

    def __init__(self, kind: str, hold: int = 0, hold_s: float = 10.0):
        self.kind = kind
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.hold, self.hold_s = hold, hold_s
        self.in_flight = self.max_in_flight = 0
        self._all_in: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                self._all_in = self._all_in or asyncio.Event()
                if self.in_flight >= self.hold:
                    self._all_in.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_in.wait(), self.hold_s)
            return await self.answer(request)
        finally:
            self.in_flight -= 1

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        user = " ".join(m.get("content") or "" for m in body["messages"] if m["role"] == "user")
        n = len(self.bodies)
        if self.kind == "teacher" and body.get("stream"):
            return await self.stream(request, body, f"chatcmpl-teacher-{n}")
        if self.kind == "student" and "FAIL" in user:
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)
        if self.kind == "student" and body.get("stream"):
            return await self.stream(request, body, f"chatcmpl-student-{n}", STUDENT_PIECES, STUDENT_USAGE, user)
        if self.kind == "teacher":
            return web.json_response(completion(json.dumps({"answer": "from the teacher"}), "gpt-4o-2024-08-06",
                                                rid=f"chatcmpl-teacher-{n}"))
        values = [-0.01, -0.02, -4.5, -0.01] if "UNSURE" in user else [-0.01, -0.03, -0.02, -0.01]
        return web.json_response(completion("The Echo Speaker is in stock.", body.get("model", "?"),
                                            content_logprobs(values, body.get("top_logprobs") or 3),
                                            rid=f"chatcmpl-student-{n}"))

    async def stream(self, request: web.Request, body: dict[str, Any], rid: str, pieces: list[str] = TEACHER_PIECES,
                     usage_of: dict[str, int] | None = None, user: str = "") -> web.StreamResponse:
        """An answer as OpenAI streams it: role chunk, one chunk per piece (STREAM_DELAY_S apart), a finish chunk,
        the usage chunk when stream_options.include_usage, then [DONE]. A user turn holding ERREVENT gets an error
        event first (as vLLM reports a failure after the stream opened), NOEVENT a stream closed before any event,
        BREAK a stream cut after two pieces."""
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        if "ERREVENT" in user:
            await out.write(b'data: {"error": {"message": "model crashed", "type": "server_error"}}\n\ndata: [DONE]\n\n')
            return out
        if "NOEVENT" in user:
            await asyncio.sleep(0.05)
            request.transport.close()
            return out
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        model = "gpt-4o-2024-08-06" if self.kind == "teacher" else body.get("model", "?")
        base = {"id": rid, "object": "chat.completion.chunk", "created": 1764000000, "model": model}
        deltas = [({"role": "assistant", "content": ""}, None), *[({"content": p}, None) for p in pieces],
                  ({}, "stop")]
        for k, (delta, finish) in enumerate(deltas):
            if "BREAK" in user and k == 3:
                request.transport.close()
                return out
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if usage:
                chunk["usage"] = None
            await out.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(STREAM_DELAY_S)
        if usage:
            tail = {**base, "choices": [], "usage": usage_of or TEACHER_USAGE}
            await out.write(f"data: {json.dumps(tail)}\n\n".encode())
        await out.write(b"data: [DONE]\n\n")
        return out

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@contextlib.asynccontextmanager
async def proxy_site(proxy: Any):
    """A RouterProxy's app served on a free loopback port; yields its base URL (no /v1)."""
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


async def wait_healthy(proc: subprocess.Popen, base: str) -> None:
    """Wait (60 s at most) until a serve-router process answers /health; its output if it died first."""
    async with httpx.AsyncClient(timeout=10) as http:
        deadline = time.time() + 60
        while True:
            try:
                if (await http.get(f"{base}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(proc.stdout.read()) from None
                await asyncio.sleep(0.2)
