"""Stand-ins for the live-loop tests: store versions published with the store's own API (a routing policy with no
tokenizer, language or distance rule, so a Router loads in milliseconds), and OpenAI-compatible student and
teacher servers on loopback that answer from a table, deterministically."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from loopback import LoopbackServer

from pipeline import store

FUNCTIONS = ("faq", "triage")
UNSURE = "UNSURE"  # a user turn holding it gets low logprobs from a student: the proxy escalates it


def policy(student: str, kept_quality: float = 0.95, escalated_after: float = 0.1,
           teacher_price: tuple[float, float] = (2.5, 10.0), per_1k_usd: float = 0.05) -> dict[str, Any]:
    """A distill-routing/v2 policy for FUNCTIONS: min-logprob threshold -1, calibrated at ``kept_quality``."""
    calib = {"n": 100, "signal": "min_logprob", "student_share": 0.9, "routed_quality": 0.99,
             "student_quality_kept": kept_quality, "escalated_before": 0.0, "escalated_after": escalated_after}
    rule = {"enabled": True, "why": "", "before": {"max_input_tokens": None},
            "after": {"signal": "min_logprob", "threshold": -1.0}, "calibration": calib}
    return {"schema": "distill-routing/v2", "student": {"name": student}, "teacher": {"models": ["gpt-4o"]},
            "quality": {"metric": "exact_match", "tolerance": 0.05}, "tokenizer": None,
            "confidence": {"top_logprobs": 0}, "unknown_function": "teacher",
            "functions": {fn: rule for fn in FUNCTIONS},
            "operating_point": {"teacher_price_per_mtok": {"input": teacher_price[0], "output": teacher_price[1]},
                                "cost_per_1k_student_usd": per_1k_usd}}


def publish_version(store_dir: Path, name: str, tag: str, work: Path, student: str | None = None,
                    **kw: Any) -> str:
    """Publish a version holding its policy (its student named ``student``, default ``name``) and a stand-in
    weights file (``tag`` makes the files differ)."""
    folder = work / f"build-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "routing_policy.json").write_text(json.dumps(policy(student or name, **kw), indent=2))
    (folder / "weights.txt").write_text(f"stand-in weights {tag}\n")
    return store.publish(store_dir, name, folder, {"lineage": {"recipe": tag}})


def completion(content: str, model: str, logprobs: list[float] | None, rid: str) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": f"t{i}", "logprob": v, "top_logprobs": []}
                                          for i, v in enumerate(logprobs)]}
    return {"id": rid, "object": "chat.completion", "created": 1764000000, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}


def user_text(body: dict[str, Any]) -> str:
    return " ".join(m.get("content") or "" for m in body["messages"] if m["role"] == "user")


class TableServer(LoopbackServer):
    """Answers each user turn from ``table`` (a miss: "I do not know"); a student adds logprobs, confident unless
    the text holds UNSURE. ``delay_s`` slows every answer (a slow teacher); ``max_n`` refuses a larger ``n`` with
    HTTP 400. Keeps every body it gets."""

    def __init__(self, table: dict[str, str], student: bool, delay_s: float = 0.0, max_n: int | None = None,
                 fixed_id: str | None = None, status: int | None = None):
        self.table, self.student, self.delay_s, self.max_n = table, student, delay_s, max_n
        self.status = status  # every answer an error with this status (a wrong key: 401)
        self.fixed_id = fixed_id  # every answer's id (Ollama's are chatcmpl-<0..998>: they repeat)
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.bodies.append(body)
            n = len(self.bodies)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status:
            return web.json_response({"error": {"message": f"refused with HTTP {self.status}",
                                                "type": "invalid_request_error"}}, status=self.status)
        if self.max_n is not None and (body.get("n") or 1) > self.max_n:  # as distill serve-student refuses n > 1
            return web.json_response({"error": {"message": f"n > {self.max_n} is not supported",
                                                "type": "invalid_request_error"}}, status=400)
        text = user_text(body)
        answer = self.table.get(text.replace(UNSURE, "").strip(), "I do not know")
        lps = ([-0.01, -3.0, -0.02] if UNSURE in text else [-0.01, -0.02, -0.01]) if self.student else None
        kind = "student" if self.student else "teacher"
        return web.json_response(completion(answer, body.get("model") or kind, lps,
                                            self.fixed_id or f"chatcmpl-{kind}-{n}"))


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def lines(folder: Path, pattern: str) -> list[dict[str, Any]]:
    return [json.loads(x) for f in sorted(folder.glob(pattern)) for x in f.read_text().splitlines() if x.strip()]


def mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else float("nan")


class ProxyServer:
    """A RouterProxy served on loopback from its own event loop in a thread; ``stop`` runs the app's cleanup
    (queued audits finish first)."""

    def __init__(self, proxy):
        self.proxy = proxy

    def start(self) -> ProxyServer:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def up():
            self.runner = web.AppRunner(self.proxy.app())
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]

        self.port = asyncio.run_coroutine_threadsafe(up(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
