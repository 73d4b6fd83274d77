"""serve-router's pass-through: the OpenAI endpoints it does not route (``/v1/embeddings``, ``/v1/responses``,
``/v1/moderations``, ...) sent to the teacher unchanged, for the paths ``--pass-through`` names.

An app whose ``OPENAI_BASE_URL`` points at serve-router calls more than chat completions; without a pass-through
those calls get a 404 that names the flag. Only the named paths (and what lies under them: ``/v1/files`` covers
``/v1/files/file-abc/content``) go through, because the proxy holds the teacher's key: a client that may chat must
not also be able to delete the organisation's files. The teacher is called with its own key (the client's
``Authorization`` is never passed on), the method, path below the base URL, query, body and a few content
headers; its answer (streamed server-sent events included) is relayed as it arrives. Each call is counted and
logged in ``passthrough-<date>.jsonl`` (``CallLog.passthrough``) without its body (what it holds is not
training data and may be anything).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiohttp import ClientError, web

from export.route.upstream import failure_status, shown, upstream_failure
from export.route.wire import error_response

# headers a client's call carries that the teacher needs to read it the same way, and those of the teacher's
# answer a client reads (rate limits, timing); everything else stays on its side (the x-request-id is the proxy's)
REQUEST_HEADERS = ("Content-Type", "Accept", "OpenAI-Beta", "Idempotency-Key")
ANSWER_HEADERS = ("content-type", "openai-processing-ms", "openai-version")
BACKOFF_HEADERS, BACKOFF_PREFIXES = ("retry-after", "retry-after-ms"), ("x-ratelimit-",)
ERROR_HEAD = 1 << 20  # bytes of a passed-through error searched for a key the teacher repeats (the rest is relayed)
ENCODED = ("%2e", "%2f", "%5c", "%25", ";")  # dots, slashes, a second encoding, path parameters ("..;/")


def normalise(paths: Iterable[str]) -> tuple[str, ...]:
    """The ``--pass-through`` paths, checked: each starts with ``/``, has no query, no ``.``/``..`` segment and is
    not ``/v1`` itself; ``/v1`` is implied (``/embeddings`` means ``/v1/embeddings``). ``POST
    /v1/chat/completions`` is always routed; ``/v1/chat/completions`` here passes the other methods (stored
    completions: list, get, delete)."""
    out = []
    for raw in paths:
        p = raw.strip().rstrip("/")
        if not p.startswith("/") or any(c in p.lower() for c in ("?", "#", *ENCODED, "\\")) or \
                any(s in (".", "..") for s in p.split("/")):
            raise ValueError(f"--pass-through {raw!r}: give a path such as /v1/embeddings (no query, no '..')")
        if p == "/v1":
            raise ValueError(f"--pass-through {raw!r}: name the endpoints to send to the teacher, e.g. "
                             "/v1/embeddings (everything under /v1 would hand the teacher's key to every client)")
        if not p.startswith("/v1/"):
            p = "/v1" + p
        out.append(p)
    return tuple(dict.fromkeys(out))


def allowed(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a request path (as the client sent it, still %-encoded) is at or under a pass-through path. An
    encoded dot, slash or backslash is refused: it could make a path look allowed here and mean another one
    upstream."""
    if any(e in path.lower() for e in ENCODED) or "\\" in path:
        return False
    path = path if path.startswith("/v1/") else "/v1" + path
    if any(s in (".", "..") for s in path.split("/")):
        return False
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def backoff_headers(headers) -> dict[str, str]:
    """An upstream answer's back-off headers (Retry-After, x-ratelimit-*): a client's SDK waits as they say."""
    return {k: v for k, v in headers.items()
            if k.lower() in BACKOFF_HEADERS or k.lower().startswith(BACKOFF_PREFIXES)}


async def pass_through(proxy, request: web.Request) -> web.StreamResponse:
    """Send a call on one of the ``--pass-through`` paths to the teacher and relay its answer as it arrives; any
    other path gets a 404 that names the flag."""
    rid = request.get("request_id", "")
    raw = request.raw_path.split("?", 1)[0]
    if request.method == "POST" and raw.rstrip("/") in ("/v1/chat/completions", "/chat/completions"):
        return await proxy.chat(request)  # a trailing slash: still the routed endpoint
    chat = raw.rstrip("/") in ("/v1/chat/completions", "/chat/completions")
    if chat and not allowed(raw, proxy.cfg.pass_through):
        return error_response(405, f"{request.method} {raw[:200]}: serve-router routes POST here only",
                              request_id=rid)
    if any(e in raw.lower() for e in ENCODED) or "\\" in raw:
        return error_response(404, f"{request.method} {raw[:200]}: a path with an encoded dot, slash, backslash or "
                              "percent sign, or a ';', is never passed to the teacher", request_id=rid)
    if not allowed(raw, proxy.cfg.pass_through):
        return error_response(404, f"serve-router routes POST /v1/chat/completions; {request.method} {raw[:200]} is "
                              f"not passed to the teacher (start serve-router with --pass-through "
                              f"{_suggest(raw)} to send it there unchanged)", request_id=rid)
    t0 = time.perf_counter()
    tail = raw[3:] if raw.startswith("/v1/") else raw
    query = request.rel_url.raw_query_string  # as the client encoded it
    url = proxy.cfg.teacher_url.rstrip("/") + tail + (f"?{query}" if query else "")
    _, headers = proxy._target(proxy.cfg.teacher_url, proxy.cfg.teacher_key_env)
    headers.pop("Content-Type", None)
    headers.update({h: request.headers[h] for h in REQUEST_HEADERS if h in request.headers})
    out, sent, why, status = None, 0, "", 502
    try:
        async with proxy.upstream.session.request(request.method, url, data=await request.read() or None, headers=headers,
                                                  timeout=proxy.upstream.stream_timeout()) as up:
            keep = {k: v for k, v in up.headers.items() if k.lower() in ANSWER_HEADERS}
            keep.update(backoff_headers(up.headers))
            out = web.StreamResponse(status=up.status, headers={**keep, "x-distill-route": "passthrough",
                                                                "x-request-id": rid})
            await out.prepare(request)
            if up.status >= 400:  # an error's first MiB read whole, so a key the teacher repeats in it is masked
                head = b""
                while len(head) < ERROR_HEAD and (part := await up.content.read(ERROR_HEAD - len(head))):
                    head += part
                data = proxy.masked_bytes(head, url)
                sent += len(data)
                await asyncio.wait_for(out.write(data), proxy.cfg.timeout_s)
            async for data in up.content.iter_any():
                sent += len(data)  # a client that stops reading holds a teacher connection: not for ever
                await asyncio.wait_for(out.write(data), proxy.cfg.timeout_s)
            await out.write_eof()
    except (ClientError, asyncio.TimeoutError, ConnectionError) as err:
        if out is None:
            why = upstream_failure(url, err, proxy.cfg.timeout_s) or f"cannot reach {shown(url)}: {type(err).__name__}"
            status = failure_status(err)
        else:
            why = f"{shown(url)}: answer broken after {sent} bytes: {type(err).__name__}"
            if request.transport is not None:  # cut: closed without the last chunk, so the client cannot take
                request.transport.close()       # it for a whole answer
    proxy.counts["passthrough"] = proxy.counts.get("passthrough", 0) + 1
    proxy.log.passthrough(request, rid, out.status if out is not None else status,
                          1000 * (time.perf_counter() - t0), sent, why)
    if out is None:
        resp = error_response(status, why, "upstream_error", rid)
        resp.headers["x-distill-route"] = "passthrough"
        return resp
    return out


def _suggest(path: str) -> str:
    """The pass-through path to suggest for a refused one: its first segment below /v1 (/v1/files for
    /v1/files/file-abc), or /v1/chat/completions for the stored-completions calls; nothing built from a request
    line that is not a path (an absolute URL)."""
    if not path.startswith("/") or "://" in path:
        return "/v1/<endpoint>"
    parts = [s for s in (path if path.startswith("/v1/") else "/v1" + path).split("/") if s]
    return "/" + "/".join(parts[:3] if parts[1:2] == ["chat"] else parts[:2])
