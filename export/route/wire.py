"""OpenAI chat completions on the wire, as serve-router speaks them (JSON through ``jsonio``): what a request
must look like, what makes an upstream answer usable, errors in OpenAI's shape (a middleware turns aiohttp's own into them), and a completion as server-sent
chat.completion.chunk events. Requests aiohttp refuses before any middleware (an over-long header) get the same
JSON errors through ``json_parse_errors``."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from export.route.jsonio import dumps, loads

log = logging.getLogger("distill.serve_router")
MAX_BODY = 32 * 1024 * 1024  # bytes of one request body


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """``web.json_response`` with ``dumps``."""
    return web.Response(body=dumps(body), status=status, headers=headers, content_type="application/json",
                        charset="utf-8")


def error_response(status: int, message: str, kind: str = "invalid_request_error", request_id: str = "") -> web.Response:
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
        for j, part in enumerate(c if isinstance(c, list) else ()):
            if "text" in part and not isinstance(part["text"], str):
                return f"messages[{i}].content[{j}].text must be a string"
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return "'metadata' must be an object"
    problem = function_problem((meta or {}).get("function"), "'metadata.function'")
    if problem:
        return problem
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        return "'stream' must be a boolean"
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        return "'top_logprobs' must be an integer from 0 to 20"
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        return "'stream_options' must be an object"
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128):
        return "'n' must be an integer from 1 to 128"  # OpenAI's range; 0 got a 200 with no choice
    return None


STUDENT_FAILED = "student endpoint failed"  # a logged call's last reason when the teacher answered for that
UNAVAILABLE = (429, 502, 503)  # answered by the endpoint (or the load balancer before it): down or full


def unavailable(status: int, resp: dict[str, Any]) -> bool:
    """Whether an upstream's failure says nothing about the version's answers: no connection could be made, or the
    endpoint itself (or its load balancer) answered one of ``UNAVAILABLE``. A status serve-router made up for an
    answer it could not use (an ``upstream_`` error code) is the version's: a 200 that is not JSON, a stream whose
    first event is an error, an answer that broke off."""
    err = resp.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    if code == "upstream_unreachable":
        return True
    return status in UNAVAILABLE and not (isinstance(code, str) and code.startswith("upstream_"))


def refused(status: int, resp: dict[str, Any]) -> bool:
    """Whether the endpoint refused the request itself: an HTTP 4xx other than 408 (a timeout, counted against the
    version) and 429 (full: ``unavailable``). What it refused is often the client's doing (a parameter the
    endpoint does not serve, such as ``n`` > 1 for ``distill serve-student``; a wrong key or model name), so it is
    no escalation of the version's answers; the live loop counts it apart (``canary.endpoint_down``,
    ``canary.held_back``)."""
    err = resp.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    return 400 <= status < 500 and status not in (408, 429) and not (isinstance(code, str)
                                                                      and code.startswith("upstream_"))


def answer_problem(status: int, resp: dict[str, Any]) -> str | None:
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


def function_problem(fn: Any, where: str) -> str | None:
    """Why a function name (from ``metadata.function`` or the ``x-distill-function`` header) cannot be used: it
    is logged and becomes a key of the ledger, so it must be printable text (a header's stray bytes are not)."""
    if fn is None:
        return None
    if not isinstance(fn, str) or not fn.isprintable() or len(fn) > 200:
        return f"{where} must be printable text of at most 200 characters"
    return None


def non_text_part(body: dict[str, Any]) -> str | None:
    """The type of the first content part that is not text (an image, audio, a file), if any: the student was
    distilled from text and reads only text, so such a request is the teacher's."""
    for m in body["messages"]:
        c = m.get("content")
        for part in c if isinstance(c, list) else ():
            kind = part.get("type", "text")
            if kind not in ("text", "input_text", "refusal"):
                return str(kind)[:50]
    return None


CLIENT_GONE = 499  # logged for a request whose client hung up before sending all of it (nginx's code)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every answer carries a request id, and every error is OpenAI-shaped JSON (aiohttp's own 404, 405 and 413
    included), logged by the proxy."""
    rid = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
    request["request_id"] = rid
    proxy = request.app["proxy"]  # the RouterProxy: it logs refused and failed requests
    proxy.in_flight += 1
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        resp = error_response(exc.status, exc.reason if exc.status != 413 else
                      f"the request body is over the {MAX_BODY:,}-byte limit", kind, rid)
    except RequestPayloadError as exc:  # a body its Content-Encoding does not decode (bad gzip, zstd unknown)
        resp = error_response(400, f"the request body could not be read as its Content-Encoding "
                                   f"({request.headers.get('Content-Encoding', 'none')[:50]}) says: {' '.join(str(exc).split())}"[:300],
                              request_id=rid)
    except ConnectionResetError:  # the client went away while its request was still arriving: not our failure
        resp = error_response(CLIENT_GONE, "the client closed the connection before its request was read",
                              request_id=rid)
    except Exception as exc:  # noqa: BLE001 - a bug must still answer in JSON, be logged, and not kill the proxy
        log.exception("request %s failed inside serve-router", rid)  # the traceback only: never the body
        resp = error_response(500, f"internal error in distill serve-router: {type(exc).__name__}", "server_error", rid)
    finally:
        proxy.in_flight -= 1
    if proxy.stopping:  # draining: this connection closes after its answer, so its client sends no more on it
        resp.force_close()
    if resp.status >= 400 and "x-distill-route" not in resp.headers:
        proxy.log_error(request, rid, resp)
    resp.headers.setdefault("x-request-id", rid)
    return resp


def client_key(env: str | None):
    """A middleware that lets through only clients sending ``Authorization: Bearer <the key in $env>`` (compared in
    constant time); /health stays open for probes. No env: every client is let through."""
    key = os.environ.get(env, "") if env else ""
    if env and not key:
        raise ValueError(f"--client-key-env {env}: that environment variable is not set (or empty)")

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if key and request.path != "/health":
            sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")  # any bytes
            if not hmac.compare_digest(sent, f"Bearer {key}".encode()):
                return error_response(401, "missing or wrong API key: send Authorization: Bearer <the key "
                                      "serve-router was started with>", request_id=request.get("request_id", ""))
        return await handler(request)

    return check


def _parse_error_message(status: int, exc: BaseException | None) -> tuple[int, str, str]:
    """(status, message, kind) for a request aiohttp could not parse or handle; never echoes the request (aiohttp's
    own text quotes up to 100 bytes of the offending line, which may be an Authorization header)."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        over = f"the {limit:,}-byte limit" if limit else "the limit"
        return 431, f"the request line or a request header is over {over}", "invalid_request_error"
    if status >= 500:
        return status, f"internal error in distill serve-router: {type(exc).__name__ if exc else 'unknown'}", \
            "server_error"
    return status, f"malformed HTTP request ({type(exc).__name__ if exc else 'unparsable'})", "invalid_request_error"


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, with the errors it answers itself (a request it cannot parse, such as an
    over-long header, before any middleware runs) in OpenAI's JSON shape, with a request id, logged by the proxy."""

    app: web.Application

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # part of an answer is out: aiohttp can only drop the connection
            return super().handle_error(request, status, exc, message)
        if not isinstance(exc, HttpProcessingError):  # a bug: aiohttp logs the traceback
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        status, text, kind = _parse_error_message(status, exc)
        rid = f"req-{uuid.uuid4().hex}"
        resp = error_response(status, text, kind, rid)
        resp.force_close()
        try:
            self.app["proxy"].log_error(request, rid, resp)
        except Exception:  # noqa: BLE001 - the answer must still go out
            self.log_exception("could not log a refused request", exc_info=True)
        return resp


class _JsonErrorServer(web.Server):
    app: web.Application

    def __call__(self) -> RequestHandler:
        handler = _JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        handler.app = self.app
        return handler


def json_parse_errors(app: web.Application) -> web.Application:
    """The app, served (by web.run_app or an AppRunner) with ``_JsonErrorHandler``: requests aiohttp refuses
    before routing also get an OpenAI-shaped JSON answer, a request id and a line in the error log."""
    make = app._make_handler

    def make_handler(**kwargs: Any) -> web.Server:
        server = make(**kwargs)
        server.__class__ = _JsonErrorServer  # same state, our handler class (aiohttp has no public hook for it)
        server.app = app
        return server

    app._make_handler = make_handler  # type: ignore[method-assign]
    return app


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_PIECE = re.compile(r"\s*\S+|\s+$")


def event_data(event: list[bytes]) -> bytes:
    """The data of one SSE event (its ``data:`` lines joined); b"" for a comment or keep-alive."""
    return b"\n".join(x[5:].strip() for x in event if x.startswith(b"data:"))


def event_chunk(event: list[bytes]) -> dict[str, Any] | None:
    """One SSE event's JSON chunk; None for [DONE], a comment or data that is not a JSON object."""
    data = event_data(event)
    if not data or data == b"[DONE]":
        return None
    try:
        chunk = loads(data)
    except (ValueError, RecursionError):
        return None
    return chunk if isinstance(chunk, dict) else None


class BadEvent(Exception):
    """An upstream SSE event whose data is neither a JSON object nor ``[DONE]``: not passed on."""


class ClientStalled(Exception):
    """One write to the client waited ``timeout_s`` (its buffers full: it took less than about 48 KB in that time):
    a client that stopped reading must not hold an upstream for ever."""


@functools.lru_cache(maxsize=64)
def _id_field(upstream_id: str) -> re.Pattern[bytes]:
    """The ``"id": "<upstream_id>"`` member of a chunk, as JSON writers spell it (with or without spaces)."""
    return re.compile(rb'"id"\s*:\s*' + re.escape(json.dumps(upstream_id).encode()))


async def relay(out: web.StreamResponse, event: list[bytes], chunks: list[dict[str, Any]], want_usage: bool,
                timeout_s: float | None = None, call_id: str | None = None,
                mask: Callable[[Any], Any] | None = None) -> None:
    """Pass one upstream SSE event on as it came (the usage-only chunk only when the client asked for usage; the
    chunk's ``id`` as ``call_id`` when given; an error event through ``mask``, which hides the keys an upstream
    may repeat) and keep its chunk for the log. A malformed event raises ``BadEvent`` (the client's SDK would
    raise a bare JSON error, not an API error); a client that reads nothing for ``timeout_s`` raises
    ``ClientStalled``."""
    chunk = event_chunk(event)
    data = b"".join(event) + b"\n"
    if chunk is None:
        raw = event_data(event)
        if raw and raw != b"[DONE]":
            text = raw.decode("utf-8", "replace")
            raise BadEvent(f"sent an event that is not a JSON chunk: {(mask(text) if mask else text)[:60]!r}")
    else:
        rewrite = bool(mask) and "error" in chunk
        if rewrite:  # its string values masked (never its syntax), and written anew
            chunk = mask(chunk)
        chunks.append(chunk)
        if not want_usage and chunk.get("usage") and not chunk.get("choices"):
            return
        if call_id and chunk.get("id") != call_id and not rewrite:
            n = 0
            if isinstance(chunk.get("id"), str):
                data, n = _id_field(chunk["id"]).subn(b'"id":' + json.dumps(call_id).encode(), data, count=1)
            rewrite = not n  # no id, or one written with escapes ("a\/b") we do not spell alike
        if rewrite:
            data = b"data: " + dumps({**chunk, "id": call_id} if call_id else chunk) + b"\n\n"
    try:
        await asyncio.wait_for(out.write(data), timeout_s)
    except asyncio.TimeoutError:
        raise ClientStalled(f"the client read nothing for {timeout_s:g} s") from None


async def iter_events(content: Any) -> AsyncIterator[list[bytes]]:
    """An upstream's SSE body (aiohttp ``StreamReader``) event by event, as it arrives; no line-length limit (a
    chunk with logprobs is long)."""
    event: list[bytes] = []
    buf = b""
    async for data in content.iter_any():
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                event.append(line.rstrip(b"\r") + b"\n")
            elif event:
                yield event
                event = []
    if buf.strip():
        event.append(buf.rstrip(b"\r") + b"\n")
    if event:
        yield event


async def first_event(events: AsyncIterator[list[bytes]]) -> tuple[list[list[bytes]], str | None]:
    """The events up to and including the first one with data, and what is wrong with that one (None when it is a
    chunk): an error event (how vLLM reports a failure after the stream opened), [DONE] first, or no data at all.
    Nothing has been sent to the client yet, so the caller can still answer otherwise."""
    head: list[list[bytes]] = []
    async for event in events:
        head.append(event)
        if not event_data(event):
            continue  # a comment or keep-alive: wait for data
        chunk = event_chunk(event)
        if chunk is None:
            return head, "the stream ended before its first chunk"
        if chunk.get("error"):
            err = chunk["error"]
            return head, f"error event: {str(err.get('message') if isinstance(err, dict) else err)[:2000]}"
        return head, None
    return head, "the stream ended before any data"


async def end_with_error(out: web.StreamResponse, message: str) -> None:
    """End a relayed stream that broke with an OpenAI-style error event, so the client's SDK raises instead of
    taking a cut answer for a whole one."""
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": None}}
    try:
        await asyncio.wait_for(out.write(b"data: " + json.dumps(body).encode() + b"\n\n"), END_TIMEOUT_S)
        await asyncio.wait_for(out.write_eof(), END_TIMEOUT_S)
    except (ConnectionError, RuntimeError, asyncio.TimeoutError):  # the client is gone (or stalled) too
        pass


END_TIMEOUT_S = 10.0  # for the last words to a client that may have stopped reading


def completion_chunks(resp: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A chat.completion as OpenAI's chat.completion.chunk stream: per choice a role chunk, content chunks (a word
    each; logprobs, when the client asked for them, ride on the last), tool calls, a chunk with the finish reason;
    then, with include_usage, a last chunk with no choices and the usage."""
    base = {"id": resp.get("id") or f"chatcmpl-distill-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": resp.get("created") or int(time.time()), "model": resp.get("model")}
    if resp.get("system_fingerprint"):
        base["system_fingerprint"] = resp["system_fingerprint"]
    out = []

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> None:
        out.append({**base, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

    for c in resp.get("choices") or []:
        i, msg = c.get("index", 0), c.get("message") or {}
        chunk(i, {"role": msg.get("role") or "assistant", "content": None if msg.get("content") is None else ""})
        pieces = _PIECE.findall(msg.get("content") or "")
        for k, piece in enumerate(pieces):
            chunk(i, {"content": piece}, lp=c.get("logprobs") if k == len(pieces) - 1 else None)
        if msg.get("refusal"):
            chunk(i, {"refusal": msg["refusal"]})
        if msg.get("tool_calls"):
            chunk(i, {"tool_calls": [{**tc, "index": j} for j, tc in enumerate(msg["tool_calls"])]})
        chunk(i, {}, c.get("finish_reason") or "stop")
    if include_usage:
        out.append({**base, "choices": [], "usage": resp.get("usage")})
    return out


async def send_events(request: web.Request, chunks: list[dict[str, Any]], headers: dict[str, str]
                       ) -> web.StreamResponse:
    out = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
    await out.prepare(request)
    events = [b"data: " + dumps(c) + b"\n\n" for c in chunks]
    try:  # the answer is whole already: one write (one system call), not one per event
        await out.write(b"".join(events) + b"data: [DONE]\n\n")
        await out.write_eof()
    except ConnectionError:  # the client left: the answer is logged already
        pass
    return out
