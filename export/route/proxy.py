"""``distill serve-router``: an OpenAI-compatible proxy that applies a routing policy in front of a student and a
teacher endpoint, and logs every call in the format ``distill harvest`` reads.

    POST /v1/chat/completions   routed: student (checked after it answers) or teacher
    GET  /v1/models, /health

Per request: phase 1 (function, length, language, distance) decides whether the student may try; the student is
asked for ``logprobs`` (and ``top_logprobs``), phase 2 keeps its answer only when it is confident enough, else the
teacher answers. A student endpoint that fails also falls back to the teacher. The response carries the decision
in headers: ``x-distill-route`` (student | teacher), ``x-distill-phase``, ``x-distill-reasons`` (JSON list) and
``x-distill-policy`` (the policy's sha256 prefix).

Logs: one JSON object per line, ``{id, timestamp, status_code, latency_ms, request, response, routing}``, in
``<log_dir>/teacher-YYYY-MM-DD.jsonl`` for calls the teacher answered (tomorrow's training data: point
``harvest.sources`` at ``<log_dir>/teacher-*.jsonl``) and ``<log_dir>/student-YYYY-MM-DD.jsonl`` for calls the
student answered (for `distill route-check`; training on them would teach the student its own answers). The
request is logged as the client sent it, plus ``metadata.function`` when the function came from the
``x-distill-function`` header (what a gateway forwards: LiteLLM drops ``metadata`` but forwards ``x-`` headers
with ``forward_client_headers_to_llm_api``). The teacher is asked for the model the client named, or
``--teacher-model``; a client that names the student (a gateway's deployment) gets the policy's teacher model; headers are never logged, so API keys never reach the logs. API keys are read from
the environment variables named on the command line. ``metadata`` is not forwarded upstream unless the request
sets ``store`` (OpenAI accepts it only then).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from export.route.router import Decision, Router
from pipeline.rundir import sha256_file


@dataclass
class ProxyConfig:
    student_url: str  # base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1
    teacher_url: str
    log_dir: Path
    student_model: str | None = None  # model name sent to the student (default: the policy's student name)
    teacher_model: str | None = None  # model name sent to the teacher (default: the client's)
    student_key_env: str | None = None  # names of env vars holding API keys (never the keys themselves)
    teacher_key_env: str | None = None
    timeout_s: float = 120.0
    check_after: bool = True  # phase 2 on the student's logprobs


MAX_BODY = 32 * 1024 * 1024  # bytes of one request body


def _error(status: int, message: str, kind: str = "invalid_request_error", request_id: str = "") -> web.Response:
    """An OpenAI-shaped error, with the request id in the body and the x-request-id header."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": None, "request_id": request_id}}
    return web.json_response(body, status=status, headers={"x-request-id": request_id} if request_id else None)


def request_problem(body: Any) -> str | None:
    """Why a request body is not a chat-completions request this proxy can route (None when it is), naming the
    field: the Router and the upstream calls then only ever see the shapes they expect."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list of messages"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{i}] must be an object with a string 'role'"
        c = m.get("content")
        if c is not None and not isinstance(c, str) and not (
                isinstance(c, list) and all(isinstance(p, dict) for p in c)):
            return f"messages[{i}].content must be a string, a list of content parts or null"
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return "'metadata' must be an object"
    fn = (meta or {}).get("function")
    if fn is not None and not isinstance(fn, str):
        return "'metadata.function' must be a string"
    return None


def _answer_problem(status: int, resp: dict[str, Any]) -> str | None:
    """Why an upstream reply is not a usable chat completion (None when it is)."""
    if status != 200:
        err = resp.get("error")
        msg = err.get("message", "") if isinstance(err, dict) else str(err or "")
        return f"HTTP {status} {msg[:200]}".strip()
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
            or not isinstance(choices[0].get("message") or {}, dict):
        return "HTTP 200 without a usable choice"
    return None


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every answer carries a request id, and every error is OpenAI-shaped JSON (aiohttp's own 404, 405 and 413
    included), logged by the proxy."""
    rid = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
    request["request_id"] = rid
    proxy: RouterProxy = request.app["proxy"]
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        resp = _error(exc.status, exc.reason if exc.status != 413 else
                      f"the request body is over the {MAX_BODY:,}-byte limit", kind, rid)
    except Exception as exc:  # noqa: BLE001 - a bug must still answer in JSON, be logged, and not kill the proxy
        resp = _error(500, f"internal error in distill serve-router: {type(exc).__name__}", "server_error", rid)
    if resp.status >= 400 and "x-distill-route" not in resp.headers:
        proxy.log_error(request, rid, resp)
    resp.headers.setdefault("x-request-id", rid)
    return resp


def _reasons_header(reasons: list[str], limit: int = 4000) -> str:
    """The reasons as an ASCII JSON list (header-safe), shortened from the start if too long."""
    reasons = list(reasons)
    while True:
        text = json.dumps(reasons, ensure_ascii=True)
        if len(text) <= limit or not reasons:
            return text
        reasons = ["...", *reasons[2:]]  # drop the oldest reason (the first stays "...")


class RouterProxy:
    def __init__(self, router: Router, cfg: ProxyConfig, policy_sha256: str = ""):
        self.router, self.cfg = router, cfg
        self.policy_sha = policy_sha256[:12]
        self.top_k = int((router.policy.get("confidence") or {}).get("top_logprobs", 0))
        self.student_model = cfg.student_model or (router.policy.get("student") or {}).get("name") or "student"
        teachers = (router.policy.get("teacher") or {}).get("models") or []
        self.policy_teacher = teachers[0] if len(teachers) == 1 else None
        self.session: ClientSession | None = None
        self.blocking = router.embed is not None  # MiniLM runs in a thread, off the event loop
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        self.counts = {"student": 0, "teacher": 0}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
        app["proxy"] = self
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=self.cfg.timeout_s))

    async def _stop(self, _app) -> None:
        if self.session:
            await self.session.close()

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.student_model, "object": "model",
                                                              "owned_by": "distill"}]})

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "policy": self.policy_sha, "routed": self.counts})

    async def _forward(self, base: str, body: dict[str, Any], key_env: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(key_env) if key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = base.rstrip("/") + "/chat/completions"
        try:
            async with self.session.post(url, json=body, headers=headers) as resp:
                try:
                    data = await resp.json(content_type=None)
                except (json.JSONDecodeError, ValueError):
                    data = {"error": {"message": f"non-JSON answer from {url} (HTTP {resp.status})",
                                      "type": "upstream_error"}}
                return resp.status, data if isinstance(data, dict) else {"error": {"message": "bad upstream body"}}
        except (ClientError, asyncio.TimeoutError) as err:
            return 502, {"error": {"message": f"cannot reach {url}: {type(err).__name__}", "type": "upstream_error"}}

    async def _decide_before(self, body: dict[str, Any], fn: str | None) -> Decision:
        if self.blocking:
            return await asyncio.get_running_loop().run_in_executor(None, self.router.before, body, fn)
        return self.router.before(body, fn)

    async def chat(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        rid = request.get("request_id", "")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return _error(400, "the request body is not valid JSON (or nests deeper than JSON parsers allow)",
                          request_id=rid)
        problem = request_problem(body)
        if problem:
            return _error(400, problem, request_id=rid)
        if body.get("stream"):
            return _error(400, "stream=true is not supported by distill serve-router (the answer is checked before "
                               "it is returned); send stream=false", request_id=rid)
        fn = (body.get("metadata") or {}).get("function") or request.headers.get("x-distill-function")
        logged = body
        if fn and not (body.get("metadata") or {}).get("function"):
            logged = {**body, "metadata": {**(body.get("metadata") or {}), "function": fn}}
        decision = await self._decide_before(body, fn)
        upstream = body if body.get("store") else {k: v for k, v in body.items() if k != "metadata"}
        routing: dict[str, Any] = {}
        status, resp = 0, {}
        if decision.to_student:
            sbody = {**upstream, "model": self.student_model, "logprobs": True}
            if self.top_k:
                sbody["top_logprobs"] = self.top_k
            status, resp = await self._forward(self.cfg.student_url, sbody, self.cfg.student_key_env)
            choices = resp.get("choices")
            problem = _answer_problem(status, resp)
            if problem:  # the teacher answers instead
                decision = Decision("teacher", [*decision.reasons, f"student endpoint failed: {problem}"], "after",
                                    decision.signals)
            elif self.cfg.check_after:
                lp = choices[0].get("logprobs")
                content = (lp.get("content") if isinstance(lp, dict) else None) or []
                try:
                    decision = self.router.after(body, content, fn, before=decision)
                except ValueError as err:  # the endpoint did not return what the signal needs
                    decision = Decision("teacher", [*decision.reasons, str(err)], "after", decision.signals)
                if not decision.to_student:
                    routing["student_answer"] = (choices[0].get("message") or {}).get("content")
            if decision.to_student and not body.get("logprobs"):
                for c in resp.get("choices") or []:
                    if isinstance(c, dict):
                        c.pop("logprobs", None)
        if not decision.to_student:
            tbody = dict(upstream)
            if self.cfg.teacher_model:
                tbody["model"] = self.cfg.teacher_model
            elif self.policy_teacher and tbody.get("model") in (self.student_model, None):
                tbody["model"] = self.policy_teacher  # a gateway asked for the student: the teacher has its own name
            status, resp = await self._forward(self.cfg.teacher_url, tbody, self.cfg.teacher_key_env)
        latency = 1000 * (time.perf_counter() - t0)
        self.counts[decision.route] += 1
        routing.update(decision.as_dict())
        routing["policy_sha256"] = self.policy_sha
        self._log(logged, status, resp, latency, routing)
        headers = {"x-distill-route": decision.route, "x-distill-phase": decision.phase,
                   "x-distill-reasons": _reasons_header(decision.reasons),
                   "x-distill-policy": self.policy_sha, "x-request-id": rid}
        return web.json_response(resp, status=status, headers=headers)

    def log_error(self, request: web.Request, rid: str, resp: web.Response) -> None:
        """A refused or failed request, in errors-<date>.jsonl (never its body: it may hold anything)."""
        now = datetime.now(timezone.utc)
        try:
            message = json.loads(resp.body)["error"]["message"]
        except (TypeError, ValueError, KeyError):
            message = ""
        line = {"id": rid, "timestamp": now.isoformat(), "status_code": resp.status, "method": request.method,
                "path": request.path[:200], "error": message[:500]}
        with open(self.cfg.log_dir / f"errors-{now:%Y-%m-%d}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _log(self, request: dict[str, Any], status: int, response: dict[str, Any], latency_ms: float,
             routing: dict[str, Any]) -> None:
        now = datetime.now(timezone.utc)
        line = {"id": response.get("id") or f"distill-{uuid.uuid4().hex}", "timestamp": now.isoformat(),
                "status_code": status, "latency_ms": round(latency_ms, 1), "request": request, "response": response,
                "routing": routing}
        path = self.cfg.log_dir / f"{routing['route']}-{now:%Y-%m-%d}.jsonl"
        with open(path, "a", encoding="utf-8") as f:  # one write per line: a crash leaves at most one torn line
            f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


def policy_path(source: str | Path) -> Path:
    """A routing_policy.json from a recipe (its run's route stage), a policy file or a folder holding one."""
    p = Path(source)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        from pipeline.recipe import load_recipe

        p = load_recipe(p).run_path / "route" / "routing_policy.json"
        if not p.is_file():
            raise FileNotFoundError(f"no routing policy at {p}: run `distill route {source}` first")
    elif p.is_dir():
        p = p / "routing_policy.json"
    if not p.is_file():
        raise FileNotFoundError(f"no routing policy at {p} (pass a recipe, a routing_policy.json or its folder)")
    return p


def serve(source: str | Path, cfg: ProxyConfig, host: str = "127.0.0.1", port: int = 8080, *,
          language: bool = True, embeddings: bool = True, print_fn=print) -> None:
    """Load the policy and serve until interrupted."""
    path = policy_path(source)
    # bitsandbytes (pulled in by transformers with the MiniLM embedder) warns at import that its optional CPU
    # "kernels" package is missing; serve-router never runs 4-bit layers.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    router = Router.load(path, language=language, embeddings=embeddings)
    proxy = RouterProxy(router, cfg, sha256_file(path))
    skipped = f" (not checked: {', '.join(router.skipped)})" if router.skipped else ""
    print_fn(f"distill serve-router: policy {path}{skipped}; student {cfg.student_url}, teacher {cfg.teacher_url}; "
             f"logs in {cfg.log_dir}; listening on http://{host}:{port}/v1")
    web.run_app(proxy.app(), host=host, port=port, print=None)
