"""``distill serve-router``: an OpenAI-compatible proxy that applies a routing policy in front of a student and a
teacher endpoint, and logs every call in the format ``distill harvest`` reads.

    POST /v1/chat/completions   routed: student (checked after it answers) or teacher
    GET  /v1/models, /health
    *    --pass-through paths   sent to the teacher unchanged (export.route.passthrough); other paths: 404

Per request: phase 1 (function, length, language, distance) decides whether the student may try; the student is
asked for ``logprobs`` (and ``top_logprobs``) when its function's rule has a threshold, and phase 2 keeps its
answer only when it is confident enough, else the teacher answers. A student endpoint that fails also falls back to the teacher. The response carries the decision
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

``stream: true``: the teacher is asked to stream (with usage always asked; the usage-only chunk reaches the client
only when its ``stream_options.include_usage`` asked for it) and its events are relayed as they arrive. The student
is asked without streaming when its answer is checked (phase 2), and a kept answer is sent as
``chat.completion.chunk`` events; for a function whose rule has no threshold (nothing to check) the student streams
and its events are relayed as they arrive, like the teacher's (a student that fails before its first byte still
falls back to the teacher). A streamed call is logged with its assembled response. Every log line's ``routing.cost`` holds what the
call cost and what the teacher alone would have cost (``RouterProxy.costs``); ``distill ledger`` sums them.

Live loop (docs/live.md): with ``--deployment`` the versions come from the store's deployment file (``lanes``): the
serving version answers, a candidate in canary answers its share, a candidate in shadow answers its share in the
background; each logged call names its ``routing.version`` and ``routing.lane``. A share of student answers is
audited by the teacher in the background (``audit``); the scores go to ``live-<date>.jsonl``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import ClientError, web

from curation.harvest.importers.openai import BadRecord, reassemble_stream
from export.route.answers import (
    check_answer,
    drop_logprobs,
    json_wanted,
    requires_tool,
    trim_top_logprobs,
    unfinished,
)
from export.route.audit import Job, LiveWork, answer_text
from export.route.calllog import CallLog, lately
from export.route.cost import request_cost
from export.route.jsonio import NotText, loads, read_request
from export.route.lanes import Lane, Versions, make_lane
from export.route.passthrough import backoff_headers, normalise, pass_through
from export.route.router import Decision, Router
from export.route.upstream import (
    Upstreams,
    failure_code,
    failure_status,
    has_user,
    shown,
    upstream_failure,
    url_secrets,
)
from export.route.wire import (  # noqa: F401  (MAX_BODY, request_problem, completion_chunks: the proxy's API)
    MAX_BODY,
    SSE_HEADERS,
    STUDENT_FAILED,
    BadEvent,
    ClientStalled,
    answer_problem,
    client_key,
    completion_chunks,
    end_with_error,
    error_response,
    event_data,
    first_event,
    function_problem,
    iter_events,
    json_errors,
    json_parse_errors,
    json_response,
    non_text_part,
    refused,
    relay,
    request_problem,
    send_events,
    unavailable,
)


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
    teacher_price: tuple[float, float] | None = None  # USD per million input, output tokens (default: the policy's)
    student_price: tuple[float, float] | None = None  # USD per million tokens (default: per request, the policy's)
    audit_share: float = 0.0  # share of student answers the teacher audits in the background
    canary_audit_share: float = 0.2  # the same for the answers of a canary
    queue_size: int = 1000  # background audits / shadow calls waiting at most (more are dropped and counted)
    workers: int = 4  # background audits / shadow calls at once
    reload_s: float = 1.0  # how often the deployment file is checked
    # upstream connections in use at once, over the student(s), the teacher and the background audits (0: no
    # limit; None: an eighth of the open-file limit, see upstream_limit)
    upstream_connections: int | None = None
    seed: int | None = None  # of the audit, shadow and canary sampling
    pass_through: tuple[str, ...] = ()  # other endpoints sent to the teacher unchanged (export.route.passthrough)
    client_key_env: str | None = None  # env var holding the key clients must send (Authorization: Bearer KEY)

    def __post_init__(self) -> None:
        self.pass_through = normalise(self.pass_through)
        if self.upstream_connections is not None and self.upstream_connections < 0:
            raise ValueError(f"upstream_connections must be 0 (no limit) or more, got {self.upstream_connections}")
        for who, url, env in (("student", self.student_url, self.student_key_env),
                              ("teacher", self.teacher_url, self.teacher_key_env)):
            if env and url and has_user(url):
                raise ValueError(f"--{who}-url {shown(url)} holds a user and password (sent as Basic auth) and "
                                 f"--{who}-key-env {env} a key (sent as Bearer): give one of them")


UPSTREAM_REQUEST_ID = "x-distill-upstream-request-id"  # a key of the kept headers, never sent to the client


def _own_id(resp: dict[str, Any], routing: dict[str, Any], call_id: str) -> None:
    """Give an answer serve-router's id, the one the client gets (an upstream's own, kept as ``upstream_id``, may
    repeat, or be missing)."""
    if isinstance(resp.get("id"), str) and resp["id"] != call_id:
        routing["upstream_id"] = resp["id"]
    resp["id"] = call_id


def _keep_request_id(keep: dict[str, str], headers: Any) -> None:
    rid = headers.get("x-request-id")
    if rid:
        keep[UPSTREAM_REQUEST_ID] = str(rid)[:200]


def _teacher_request_id(keep: dict[str, str]) -> dict[str, str]:
    """The teacher's own request id (OpenAI's ``req_…``), for the log line: what its support asks for."""
    rid = keep.pop(UPSTREAM_REQUEST_ID, None)
    return {"teacher_request_id": rid} if rid else {}


def _reasons_header(reasons: list[str], limit: int = 4000) -> str:
    """The reasons as an ASCII JSON list (header-safe), shortened from the start if too long."""
    reasons = list(reasons)
    while True:
        text = json.dumps(reasons, ensure_ascii=True)
        if len(text) <= limit or not reasons:
            return text
        reasons = ["...", *reasons[2:]]  # drop the oldest reason (the first stays "...")


PASSED_ON = "no answer check (no threshold, or --before-only): the student's stream is passed on as it comes"


def _headers(decision: Decision, lane: Lane, rid: str) -> dict[str, str]:
    """The routing decision in response headers."""
    headers = {"x-distill-route": decision.route, "x-distill-phase": decision.phase,
               "x-distill-reasons": _reasons_header(decision.reasons),
               "x-distill-policy": lane.policy_sha, "x-request-id": rid}
    if lane.version is not None:
        headers["x-distill-version"] = lane.version
    return headers


class RouterProxy:
    def __init__(self, router: Router | None, cfg: ProxyConfig, policy_sha256: str = "", *,
                 versions: Versions | None = None):
        """``router`` serves alone; or ``versions`` (router None) picks the version per request. The student's
        name, the policy's teacher and prices, ``/v1/models`` and ``/health`` follow the version that serves now
        (a reload changes them), and each request uses those of the version that handled it."""
        self.versions = versions
        self.lane: Lane = versions.serving if versions else make_lane(router, cfg.student_url, policy_sha256,
                                                                      None, cfg.student_model)
        self.cfg = cfg
        self.live = LiveWork(self, cfg.audit_share, cfg.canary_audit_share, cfg.queue_size, cfg.workers, cfg.seed)
        self._watch: asyncio.Task | None = None
        self.upstream = Upstreams(cfg.upstream_connections, cfg.timeout_s)
        self.log = CallLog(cfg.log_dir)
        self.counts = {"student": 0, "teacher": 0}
        self.in_flight = 0  # requests being handled now (a stop waits for them: serve._serve_until_stopped)
        self.stopping = False  # set when a stop began: answers then close their connection
        self.started = int(time.time())
        self.student_failures: dict[str, Any] = {"n": 0, "last": None, "at": None,  # /health's, per process
                                                 "unavailable_at": None}

    def serving(self) -> Lane:
        """The lane serving now (the deployment's serving version, re-read on reload)."""
        return (self.versions.serving if self.versions is not None else None) or self.lane

    @property
    def router(self) -> Router:
        return self.serving().router

    @property
    def policy_sha(self) -> str:
        return self.serving().policy_sha

    @property
    def student_model(self) -> str:
        return self.serving().model

    @property
    def policy_teacher(self) -> str | None:
        return self.serving().teacher

    @property
    def student_per_request(self) -> float | None:
        return self.serving().per_request_usd

    @property
    def teacher_price(self) -> tuple[float, float] | None:
        return self.price_of_teacher(None)

    def price_of_teacher(self, lane: Lane | None) -> tuple[float, float] | None:
        """USD per million teacher tokens: --teacher-price, else the lane's (the serving one's) policy."""
        return self.cfg.teacher_price or (lane or self.serving()).teacher_price

    def costs(self, tried: bool, student_usage: Any, teacher_usage: Any, route: str,
              lane: Lane | None = None) -> dict[str, Any]:
        """What a request cost and what the teacher alone would have cost (export.route.cost.request_cost)."""
        return request_cost(tried, student_usage, teacher_usage, route, student_price=self.cfg.student_price,
                            per_request_usd=(lane or self.serving()).per_request_usd,
                            teacher_price=self.price_of_teacher(lane))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors, client_key(self.cfg.client_key_env)])
        app["proxy"] = self
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        if "/v1/models" not in self.cfg.pass_through:  # else the teacher's list, as --pass-through /v1/models says
            app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.pass_through)  # the rest: --pass-through paths, else a 404
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return json_parse_errors(app)  # aiohttp's own refusals (an over-long header) in JSON too

    async def _start(self, _app) -> None:
        await self.upstream.start()
        await self.live.start()
        if self.versions is not None:
            self._watch = asyncio.create_task(self.versions.watch(self.cfg.reload_s))

    async def _stop(self, _app) -> None:
        if self._watch:
            self._watch.cancel()
        await self.live.stop()  # queued audits finish first (for a while): their teacher answers are paid for
        await self.upstream.close()

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.student_model, "object": "model",
                                                              "created": self.started, "owned_by": "distill"}]})

    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        return await pass_through(self, request)

    def status(self) -> str:
        """ok, or degraded and why: a log line lost, or a student endpoint unavailable, within the last minute."""
        if self.log.failing():
            return "degraded: cannot write its log"
        if lately(self.student_failures["unavailable_at"], 60.0):
            return "degraded: a student endpoint is unavailable (the teacher answers for it)"
        return "ok"

    async def health(self, _request: web.Request) -> web.Response:
        body = {"status": self.status(), "pid": os.getpid(),
                "policy": self.policy_sha, "routed": self.counts,
                "live": {**self.live.counts, "waiting": self.live.queue.qsize() if self.live.queue else 0},
                "waited_for_descriptor": self.upstream.descriptor_waits, "student_failed": self.student_failures,
                "log_failed": self.log.failures}
        if self.versions is not None:
            body["deployment"] = self.versions.status()
        return web.json_response(body)

    def _target(self, base: str, key_env: str | None) -> tuple[str, dict[str, str]]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(key_env) if key_env else None
        if key and not has_user(base):  # a user and password in the URL are its Basic auth (aiohttp sends them)
            headers["Authorization"] = f"Bearer {key}"
        return base.rstrip("/") + "/chat/completions", headers

    def _keys(self, url: str) -> list[str]:
        """The secrets a call to ``url`` carried: the keys serve-router sends, the URL's password (Basic auth)."""
        keys = [k for k in (os.environ.get(e) if e else None for e in (self.cfg.student_key_env,
                                                                       self.cfg.teacher_key_env)) if k]
        return sorted({*keys, *url_secrets(url)}, key=len, reverse=True)  # the longest first: none hides another

    def masked_bytes(self, data: bytes, url: str) -> bytes:
        """``data`` with the secrets of a call to ``url`` replaced by ``***`` (see ``_masked``)."""
        for k in self._keys(url):
            data = data.replace(k.encode(), b"***")
        return data

    def _masked(self, value: Any, keys: list[str]) -> Any:
        """``value`` (an upstream's error body) with ``keys`` (``_keys``) replaced by ``***``: an upstream that
        repeats what it was sent ("Incorrect API key provided: Bearer sk-…", a Basic auth header) must not hand
        it to clients, /health or the logs."""
        if not keys:
            return value
        if isinstance(value, str):
            for k in keys:
                value = value.replace(k, "***")
            return value
        if isinstance(value, dict):
            return {k: self._masked(v, keys) for k, v in value.items()}
        return [self._masked(v, keys) for v in value] if isinstance(value, list) else value

    async def _read_json(self, resp, url: str, keep: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """(status, body) of an upstream's JSON answer. A body that is not a JSON object becomes an OpenAI-shaped
        error that says so, with the upstream's status when that is an error, else 502 (an HTTP 200 passed on
        would reach the client as an empty answer). ``keep`` gets an error's back-off headers (Retry-After,
        x-ratelimit-*), which the client's SDK reads to wait before it retries."""
        if keep is not None:
            _keep_request_id(keep, resp.headers)
            if resp.status >= 400:
                keep.update(backoff_headers(resp.headers))
        try:
            data = loads(await resp.read(), resp.charset)
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict):
            return resp.status, self._masked(data, self._keys(url)) if resp.status >= 400 else data
        what = "non-JSON answer" if data is None else "an answer that is not a JSON object"
        err = {"message": f"{what} from {shown(url)} (HTTP {resp.status})", "type": "upstream_error"}
        if resp.status >= 400:  # an error keeps its status (429 stays a rate limit)
            return resp.status, {"error": err}
        return 502, {"error": {**err, "code": "upstream_unusable"}}

    async def _forward(self, base: str, body: dict[str, Any], key_env: str | None,
                       keep: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        url, headers = self._target(base, key_env)
        try:
            async with self.upstream.call(url, body, headers) as resp:
                return await self._read_json(resp, url, keep)
        except (ClientError, asyncio.TimeoutError) as err:
            why = upstream_failure(url, err, self.cfg.timeout_s) or f"cannot reach {shown(url)}: {type(err).__name__}"
            return failure_status(err), {"error": {"message": why, "type": "upstream_error",
                                                   "code": failure_code(err)}}

    async def forward_teacher(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return await self._forward(self.cfg.teacher_url, body, self.cfg.teacher_key_env)

    async def decide_before(self, lane: Lane, body: dict[str, Any], fn: str | None) -> Decision:
        if lane.blocking:
            return await asyncio.get_running_loop().run_in_executor(None, lane.router.before, body, fn)
        return lane.router.before(body, fn)

    def checks_answer(self, lane: Lane, decision: Decision) -> bool:
        """Whether phase 2 can still send this request to the teacher: off with ``check_after=False``, and for a
        function whose rule has no threshold (the route stage found the student good enough on all of it)."""
        if not self.cfg.check_after:
            return False
        rule = lane.router.functions.get(decision.signals.get("function")) or {}
        return (rule.get("after") or {}).get("threshold") is not None

    def checks_format(self, body: dict[str, Any]) -> bool:
        """Whether the answer must be checked whole even without a threshold: the request obliges a tool call or a
        JSON answer (a streamed answer passed on as it comes could not go to the teacher when it does not)."""
        return self.cfg.check_after and (requires_tool(body) or json_wanted(body.get("response_format")) is not None)

    def student_body(self, lane: Lane, upstream: dict[str, Any], stream: bool = False) -> dict[str, Any]:
        """What the lane's student is asked. Checked first: whole, with the logprobs phase 2 reads. Passed on as a
        stream: streaming, with usage always asked (the ledger), logprobs only when the client asked."""
        sbody = {k: v for k, v in upstream.items() if k not in ("stream", "stream_options")}
        sbody["model"] = lane.model
        if stream:  # _stream asks for usage, and passes it on only when the client asked
            sbody.update(stream=True, stream_options=dict(upstream.get("stream_options") or {}))
            return sbody
        sbody["logprobs"] = True
        asked = upstream.get("top_logprobs") if upstream.get("logprobs") else None
        k = max(lane.top_k or 0, asked if isinstance(asked, int) and not isinstance(asked, bool) else 0)
        if k:  # the policy's top-k, or more when the client asked for more (trimmed back for it after the check)
            sbody["top_logprobs"] = k
        else:
            sbody.pop("top_logprobs", None)
        return sbody

    def student_failed(self, lane: Lane, decision: Decision, status: int, resp: dict[str, Any],
                       routing: dict[str, Any]) -> Decision:
        """The teacher answers instead; counted for /health. When the endpoint was unavailable (``wire.unavailable``)
        the log line says so (``routing.student_unavailable``): the live loop leaves it out of the version's
        escalation guardrail, since an endpoint that is down says nothing about the version's answers."""
        problem = answer_problem(status, resp) or f"HTTP {status}"
        self.student_failures.update(n=self.student_failures["n"] + 1, at=datetime.now(timezone.utc).isoformat(),
                                     last=f"{lane.version or 'student'}: {problem}"[:300])
        routing["student_unavailable"] = unavailable(status, resp)  # said either way: the live loop reads it
        routing["student_refused"] = refused(status, resp)
        if routing["student_refused"]:
            routing["student_status"] = status  # 401/403/404: misconfigured; 400/413/422: what the request asked
        if routing["student_unavailable"]:
            self.student_failures["unavailable_at"] = self.student_failures["at"]
        return Decision("teacher", [*decision.reasons, f"{STUDENT_FAILED}: {problem}"], "after", decision.signals)

    async def ask_student(self, lane: Lane, body: dict[str, Any], upstream: dict[str, Any], decision: Decision,
                          fn: str | None, routing: dict[str, Any]) -> tuple[Decision, int, dict[str, Any]]:
        """The lane's student answers whole (its answer is checked before anything is sent); phase 2 keeps it
        or escalates."""
        status, resp = await self._forward(lane.url, self.student_body(lane, upstream), self.cfg.student_key_env)
        problem = answer_problem(status, resp)
        if problem:  # the teacher answers instead
            decision = self.student_failed(lane, decision, status, resp, routing)
        elif self.cfg.check_after:
            decision = check_answer(lane.router, self.checks_answer(lane, decision), body, resp["choices"],
                                    decision, fn)
            if not decision.to_student:
                msg = resp["choices"][0].get("message") or {}
                routing["student_answer"] = msg.get("content")
                if msg.get("tool_calls"):
                    routing["student_tool_calls"] = msg["tool_calls"]
        if decision.to_student and not body.get("logprobs"):
            drop_logprobs(resp)
        elif decision.to_student:
            trim_top_logprobs(resp, body.get("top_logprobs") or 0)
        return decision, status, resp

    def teacher_body(self, upstream: dict[str, Any], lane: Lane | None = None) -> dict[str, Any]:
        """What the teacher is asked: the client's model, or the lane's policy teacher when the client named the
        lane's student (a gateway's deployment name), or --teacher-model."""
        lane = lane or self.serving()
        tbody = dict(upstream)
        if self.cfg.teacher_model:
            tbody["model"] = self.cfg.teacher_model
        elif lane.teacher and tbody.get("model") in (lane.model, None):
            tbody["model"] = lane.teacher  # a gateway asked for the student: the teacher has its own name
        return tbody

    @staticmethod
    async def read_chat(request: web.Request) -> tuple[dict[str, Any], str | None] | web.Response:
        """(the request body, its function), or the 400 that says what is wrong with it."""
        rid = request.get("request_id", "")
        try:
            body = read_request(await request.read(), request.charset)
        except NotText as err:
            return error_response(400, str(err), request_id=rid)
        except (ValueError, RecursionError):
            return error_response(400, "the request body is not valid JSON (or nests deeper than JSON parsers allow)",
                                  request_id=rid)
        problem = request_problem(body)
        fn = None if problem else (body.get("metadata") or {}).get("function") or request.headers.get(
            "x-distill-function")
        problem = problem or function_problem(fn, "the x-distill-function header")
        return error_response(400, problem, request_id=rid) if problem else (body, fn)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = request.get("request_id", "")
        read = await self.read_chat(request)
        if isinstance(read, web.Response):
            return read
        body, fn = read
        stream = bool(body.get("stream"))
        logged = body
        if fn and not (body.get("metadata") or {}).get("function"):
            logged = {**body, "metadata": {**(body.get("metadata") or {}), "function": fn}}
        lane, stage = self.versions.pick() if self.versions is not None else (self.lane, "serving")
        decision = await self.decide_before(lane, body, fn)
        part = non_text_part(body) if decision.to_student else None
        if part:
            decision = Decision("teacher", [*decision.reasons, f"the request holds a '{part}' content part (the "
                                            "student reads text only)"], "before", decision.signals)
        upstream = body if body.get("store") else {k: v for k, v in body.items() if k != "metadata"}
        routing: dict[str, Any] = {"request_id": rid, "stream": True} if stream else {"request_id": rid}
        call_id = f"chatcmpl-{uuid.uuid4().hex}"  # the answer's id for the client and the log: upstreams reuse theirs
        if lane.version is not None:
            routing.update(version=lane.version, lane=stage)
        status, resp, student_usage = 0, {}, None
        tried = decision.to_student
        passed = tried and stream and not self.checks_answer(lane, decision) and not self.checks_format(body)
        if passed:  # nothing to check: the student's stream goes to the client as it comes
            decision = Decision("student", [*decision.reasons, PASSED_ON], "before", decision.signals)
        elif tried:
            decision, status, resp = await self.ask_student(lane, body, upstream, decision, fn, routing)
            student_usage = resp.get("usage") if status == 200 else None

        def finish(status: int, resp: dict[str, Any]) -> None:
            if status == 200:
                _own_id(resp, routing, call_id)
            self.counts[decision.route] += 1
            routing.update(decision.as_dict())
            routing["policy_sha256"] = lane.policy_sha
            routing["cost"] = self.costs(tried, student_usage, resp.get("usage") if decision.route == "teacher"
                                         else None, decision.route, lane)
            log_id = self.log_call(logged, status, resp, 1000 * (time.perf_counter() - t0), routing)
            if status == 200 and not resp.get("error"):
                answer = answer_text(resp)
                self.live.offer(Job(log_id, body, upstream, logged, fn, lane,
                                    answer if decision.to_student else None,
                                    None if decision.to_student else answer,
                                    self.versions.shadow() if self.versions is not None else None), stage)

        if passed:
            out, status, resp = await self._stream(request, lane.url, self.cfg.student_key_env,
                                                   self.student_body(lane, upstream, stream=True),
                                                   _headers(decision, lane, rid), call_id=call_id)
            student_usage = resp.get("usage") if status == 200 else None
            if out is not None:
                finish(200, resp)
                return out
            problem = answer_problem(status, resp)  # failed before its first chunk: the teacher answers instead
            if problem:
                decision = self.student_failed(lane, decision, status, resp, routing)
            elif not body.get("logprobs"):  # it answered plain JSON: sent as chunks below, without unasked logprobs
                drop_logprobs(resp)
        headers = _headers(decision, lane, rid)
        if not decision.to_student:
            tbody, backoff = self.teacher_body(upstream, lane), {}
            if stream:
                out, status, resp = await self._stream(request, self.cfg.teacher_url, self.cfg.teacher_key_env,
                                                       tbody, headers, backoff, call_id)
                routing.update(_teacher_request_id(backoff))
                if out is not None:
                    finish(200, resp)
                    return out
                # else an error before the stream began, or a teacher that does not stream
            else:
                status, resp = await self._forward(self.cfg.teacher_url, tbody, self.cfg.teacher_key_env, backoff)
                routing.update(_teacher_request_id(backoff))
            headers.update(backoff)  # a teacher's 429: its Retry-After reaches the client's SDK
        finish(status, resp)
        if stream and status == 200:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await send_events(request, completion_chunks(resp, include_usage), headers)
        return json_response(resp, status=status, headers=headers)

    async def _stream(self, request: web.Request, base: str, key_env: str | None, ubody: dict[str, Any],
                      headers: dict[str, str], keep: dict[str, str] | None = None, call_id: str | None = None
                      ) -> tuple[web.StreamResponse | None, int, dict[str, Any]]:
        """Relay an upstream's server-sent events to the client as they arrive (the teacher's, or the student's
        when nothing is checked). The upstream is always asked for usage (the ledger needs it); the usage-only
        chunk is passed on only when the client asked for it. Returns (the response, 200, the assembled
        completion), or (None, status, body) when the upstream answered with an error or a plain JSON completion
        before anything was sent."""
        asked = ubody.get("stream_options") or {}
        want_usage = bool(asked.get("include_usage"))
        ubody = {**ubody, "stream": True, "stream_options": {**asked, "include_usage": True}}
        url, up_headers = self._target(base, key_env)
        chunks: list[dict[str, Any]] = []
        out: web.StreamResponse | None = None
        broken = None
        try:
            async with self.upstream.call(url, ubody, up_headers, stream=True) as up:
                if keep is not None:
                    _keep_request_id(keep, up.headers)
                if up.status != 200 or "text/event-stream" not in up.headers.get("Content-Type", ""):
                    return None, *await self._read_json(up, url, keep)
                events = iter_events(up.content)
                head, problem = await first_event(events)
                if problem:  # nothing sent yet: the caller may still fall back
                    problem = self._masked(problem, self._keys(url))[:200]  # masked, then cut: no key half shown
                    return None, 502, {"error": {"message": f"{shown(url)}: {problem}", "type": "upstream_error",
                                                 "code": "upstream_unusable"}}
                out = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
                await out.prepare(request)
                broken = await self._relay_all(out, head, events, chunks, want_usage, url, call_id)
        except BadEvent as err:  # not passed on: the stream ends with an error event naming the upstream
            broken = f"{shown(url)}: {err} after {len(chunks)} chunks"
            await end_with_error(out, broken)
        except ClientStalled as err:  # the upstream call ends here; the client's connection is closed
            broken = f"{err} after {len(chunks)} chunks"
            if request.transport is not None:
                request.transport.close()
        except (ClientError, asyncio.TimeoutError, ConnectionError) as err:
            if out is None:
                why = upstream_failure(url, err, self.cfg.timeout_s) or (
                    f"cannot reach {shown(url)} or its stream broke before its first chunk: {type(err).__name__}")
                return None, failure_status(err), {"error": {"message": why, "type": "upstream_error",
                                                             "code": failure_code(err)}}
            gone = request.transport is None or request.transport.is_closing()
            broken = (f"{'client disconnected' if gone else 'stream broken'} after {len(chunks)} chunks: "
                      f"{type(err).__name__}")
            if not gone:
                await end_with_error(out, broken)
        try:
            resp = reassemble_stream(chunks)
        except BadRecord as err:
            resp = {"error": {"message": f"stream from {shown(url)} unusable: {err}", "type": "upstream_error"}}
        if broken:
            resp["error"] = resp.get("error") or {"message": broken, "type": "upstream_error"}
        return out, 200, resp

    async def _relay_all(self, out: web.StreamResponse, head: list[list[bytes]], events: Any,
                         chunks: list[dict[str, Any]], want_usage: bool, url: str, call_id: str | None = None
                         ) -> str | None:
        """Relay the stream's events to the client; why it is broken (None when whole)."""
        last = head[-1]
        keys = self._keys(url)
        mask = (lambda value: self._masked(value, keys)) if keys else None
        for event in head:
            await relay(out, event, chunks, want_usage, self.cfg.timeout_s, call_id, mask)
        async for event in events:
            await relay(out, event, chunks, want_usage, self.cfg.timeout_s, call_id, mask)
            last = event
        broken = unfinished(chunks)
        if broken and event_data(last) != b"[DONE]":  # cut: the client's SDK would take it for a whole one
            await end_with_error(out, f"{shown(url)}: {broken}")
        else:
            await out.write_eof()
        return broken

    def log_error(self, request: web.Request, rid: str, resp: web.Response) -> None:
        self.log.error(request, rid, resp)

    def log_call(self, request: dict[str, Any], status: int, response: dict[str, Any], latency_ms: float,
                 routing: dict[str, Any]) -> str:
        return self.log.call(request, status, response, latency_ms, routing)

    def log_live(self, record: dict[str, Any]) -> None:
        self.log.live(record)
