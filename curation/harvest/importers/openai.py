"""Importer: OpenAI chat-completions request/response logs -> canonical records.

A row holds ``request`` (the body sent to /v1/chat/completions), ``response`` (the body received, an ``error``
object, or -- for a streamed call -- the list of ``chat.completion.chunk`` objects or ``data: ...`` SSE lines, or
the whole SSE body as one string, which are reassembled), and optionally ``id``, ``timestamp``, ``status_code``, ``latency_ms`` and ``feedback``.
Tool calls, tool results, ``tools`` and ``response_format`` (JSON schemas) are kept. A response with several
choices gives one record per choice (ids ``<id>``, ``<id>#1``, ...) unless the source says ``choices: first``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from curation.harvest.importers.common import (
    COERCED,
    SAMPLING_KEYS,
    BadRecord,
    NotACall,
    chat_message,
    chat_messages,
    content_id,
    dotted,
    integer,
    json_text,
    metrics,
    new_record,
    number,
    string_tags,
    timestamp,
)
from pipeline.record import dumps, epoch_ms

__all__ = ["BadRecord", "NotACall", "dotted", "fast_row", "from_call", "not_a_call", "parse_line", "parse_openai",
           "reassemble_stream", "sse_events"]

STREAM_CUT_OFF = "no chunk carried a finish_reason: the stream ended before its final chunk"

# What serve-router writes beside the calls it logs (export.route.calllog), for a source that names its whole log
# folder or a glob over it: the student's own answers (student-*.jsonl; training on them would teach the student its
# own mistakes, and evaluate would score it against itself) and records that hold no call.
STUDENT_ANSWER = "student answers logged by serve-router"
ROUTER_RECORD = "serve-router records that are not calls (errors-, passthrough-, live-)"
LIVE_KINDS = frozenset({"audit", "shadow", "dropped", "error"})
# The keys of those records (export.route.calllog, export.route.audit): a row from another logger is not taken
# for one and stays quarantined with its reason.
ERROR_KEYS = frozenset({"id", "timestamp", "status_code", "method", "path", "error"})
PASSTHROUGH_KEYS = frozenset({"id", "timestamp", "status_code", "method", "path", "latency_ms", "bytes_out", "error"})
LIVE_KEYS = frozenset({"timestamp", "kind", "request_id", "version", "function"})


def not_a_call(line: dict[str, Any]) -> str | None:
    """Why a serve-router log line is not a teacher call (``STUDENT_ANSWER`` or ``ROUTER_RECORD``); None for the
    rest, which the importer reads as a call."""
    routing = line.get("routing")
    if routing is not None:
        return STUDENT_ANSWER if type(routing) is dict and routing.get("route") == "student" else None
    if "request" in line or "response" in line or "chunks" in line:
        return None
    keys = line.keys()
    if ({"id", "method", "path", "status_code"} <= keys and (keys <= ERROR_KEYS or keys <= PASSTHROUGH_KEYS)
            or isinstance(line.get("kind"), str) and line["kind"] in LIVE_KINDS and keys >= LIVE_KEYS):
        return ROUTER_RECORD
    return None


def _chunks(raw: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(raw):
        if isinstance(c, (str, bytes)):  # an SSE line as the proxy saw it
            c = c.strip()
            c = c[5:].strip() if c[:5] in ("data:", b"data:") else c
            if not c or c in ("[DONE]", b"[DONE]"):
                continue
            try:
                c = orjson.loads(c)
            except orjson.JSONDecodeError:
                raise BadRecord(f"response chunk {i} is not JSON") from None
        if not isinstance(c, dict):
            raise BadRecord(f"response chunk {i} is not an object")
        out.append(c)
    return out


def sse_events(body: str | bytes) -> list[str | bytes]:
    """An SSE body logged as one string (``data: {...}\n\ndata: {...}\n\ndata: [DONE]``) -> the data of each
    event (several ``data:`` lines of one event joined by newlines, as the SSE spec says); ``event:``, ``id:`` and
    comment lines are left out."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    events, data = [], []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if data:
                events.append("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        events.append("\n".join(data))
    return events


def is_sse(v: Any) -> bool:
    """A response logged as the SSE body of a streamed call: text that starts with a ``data:`` line (or with an
    ``event:`` / ``id:`` / comment line, and holds ``data:`` lines)."""
    if not isinstance(v, str):
        return False
    head = v.lstrip()
    return head[:5] == "data:" or (head.startswith((":", "event:", "id:", "retry:")) and "\ndata:" in head)


def reassemble_stream(raw: list[Any]) -> dict[str, Any]:
    """Streamed ``chat.completion.chunk`` objects -> one ``chat.completion`` body (content, tool-call argument
    fragments and logprobs concatenated per choice; the last usage and finish reason win)."""
    chunks = _chunks(raw)
    if not chunks:
        raise BadRecord("streamed response has no chunks")
    body: dict[str, Any] = {"object": "chat.completion"}
    choices: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(chunks):
        if isinstance(c.get("error"), dict):
            body["error"] = c["error"]
        for key in ("id", "model", "created", "system_fingerprint"):
            if c.get(key) is not None and key not in body:
                body[key] = c[key]
        if isinstance(c.get("usage"), dict):
            body["usage"] = c["usage"]
        if not isinstance(c.get("choices") or [], list):
            raise BadRecord(f"response chunk {i}: choices is not a list")
        for ch in c.get("choices") or ():
            if not isinstance(ch, dict):
                raise BadRecord(f"response chunk {i}: a choice is not an object")
            idx = ch.get("index", 0)
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise BadRecord(f"response chunk {i}: choice index must be an integer")
            acc = choices.setdefault(idx, {"role": None, "content": [], "refusal": [], "calls": {}, "lp": [],
                                           "finish": None})
            delta = ch.get("delta") or {}
            if not isinstance(delta, dict):
                raise BadRecord(f"response chunk {i}: delta is not an object")
            if isinstance(delta.get("role"), str):
                acc["role"] = delta["role"]
            for key in ("content", "refusal"):
                piece = delta.get(key)
                if piece is not None:
                    if not isinstance(piece, str):
                        raise BadRecord(f"response chunk {i}: delta.{key} is not a string")
                    acc[key].append(piece)
            if not isinstance(delta.get("tool_calls") or [], list):
                raise BadRecord(f"response chunk {i}: delta.tool_calls is not a list")
            for tc in delta.get("tool_calls") or ():
                if not isinstance(tc, dict):
                    raise BadRecord(f"response chunk {i}: a tool call delta is not an object")
                at = tc.get("index", len(acc["calls"]))
                if not isinstance(at, int) or isinstance(at, bool):
                    raise BadRecord(f"response chunk {i}: a tool call delta's index must be an integer")
                call = acc["calls"].setdefault(at, {"id": None, "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
                if isinstance(tc.get("id"), str):
                    call["id"] = tc["id"]
                fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
                if isinstance(fn.get("name"), str):
                    call["function"]["name"] += fn["name"]
                if isinstance(fn.get("arguments"), str):
                    call["function"]["arguments"] += fn["arguments"]
            lp = ch.get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                acc["lp"].extend(lp["content"])
            if ch.get("finish_reason") is not None:
                acc["finish"] = ch["finish_reason"]
    body["choices"] = []
    for idx in sorted(choices):
        acc = choices[idx]
        msg: dict[str, Any] = {"role": acc["role"] or "assistant",
                               "content": "".join(acc["content"]) if acc["content"] else None}
        if acc["refusal"]:
            msg["refusal"] = "".join(acc["refusal"])
        if acc["calls"]:
            msg["tool_calls"] = [acc["calls"][k] for k in sorted(acc["calls"])]
        body["choices"].append({"index": idx, "message": msg, "finish_reason": acc["finish"],
                                "logprobs": {"content": acc["lp"]} if acc["lp"] else None})
    return body


def _token_bytes(t: dict[str, Any], where: str) -> bytes | None:
    """A logged token's ``bytes`` kept only where its text does not spell them (compact: null otherwise)."""
    raw = t.get("bytes")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(type(b) is int and 0 <= b < 256 for b in raw):
        raise BadRecord(f"{where}.bytes is not a list of byte values (0-255)")
    value = bytes(raw)
    return None if value == t["token"].encode() else value


def logprobs(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """OpenAI ``logprobs.content`` -> the record's teacher.logprobs (token, logprob, bytes, top: [token, logprob,
    bytes]); bytes only where the text does not spell them (see pipeline.record.TOKEN_LOGPROB)."""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list) or not content:
        return None
    out = []
    for i, t in enumerate(content):
        if not isinstance(t, dict) or not isinstance(t.get("token"), str) or number(t.get("logprob")) is None:
            raise BadRecord(f"logprobs.content[{i}] has no string token and numeric logprob")
        top = [{"token": a["token"], "logprob": float(a["logprob"]),
                "bytes": _token_bytes(a, f"logprobs.content[{i}].top_logprobs[{j}]")}
               for j, a in enumerate(t.get("top_logprobs") or ())
               if isinstance(a, dict) and isinstance(a.get("token"), str) and number(a.get("logprob")) is not None]
        out.append({"token": t["token"], "logprob": float(t["logprob"]),
                    "bytes": _token_bytes(t, f"logprobs.content[{i}]"), "top": top})
    return out


def _output(choice: Any, where: str) -> dict[str, Any]:
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise BadRecord(f"{where}.message must be an object")
    msg = choice["message"]
    if msg.get("content") is None and isinstance(msg.get("refusal"), str):
        msg = {**msg, "content": msg["refusal"]}
    if "role" not in msg:
        msg = {**msg, "role": "assistant"}
    return chat_message(msg, f"{where}.message")


def from_call(
    request: Any, response: Any, *, rid: Any, source: str, ts: Any, status: Any = None, latency: Any = None,
    feedback: dict[str, float] | None = None, tags: dict[str, str] | None = None, function: Any = None,
    choices: str = "all", provider: str = "openai",
) -> list[dict[str, Any]]:
    """A chat-completions request and its response (or chunks, or error) -> one record per choice."""
    if not isinstance(request, dict):
        raise BadRecord("no 'request' object")
    messages = chat_messages(request.get("messages"), "request.messages")
    streamed = True
    if isinstance(response, list):
        response = reassemble_stream(response)
    elif isinstance(response, dict) and isinstance(response.get("chunks"), list):
        response = reassemble_stream(response["chunks"])
    elif is_sse(response):  # the SSE body as one string
        response = reassemble_stream(sse_events(response))
    else:
        streamed = False
    resp = response if isinstance(response, dict) else {}
    error = None
    if isinstance(resp.get("error"), dict):
        error = str(resp["error"].get("message") or resp["error"].get("type") or "error")
    elif isinstance(resp.get("error"), str):
        error = resp["error"]
    status = integer(status, "status_code")
    if status is not None and not 0 <= status < 1000:
        raise BadRecord("status_code is not an HTTP status")
    if status is None:
        status = 200 if resp.get("choices") else (500 if error else None)
    outs: list[tuple[int, dict[str, Any] | None, Any, Any]] = []
    raw_choices = resp.get("choices")
    if isinstance(raw_choices, list) and raw_choices:
        for i, ch in enumerate(raw_choices[:1] if choices == "first" else raw_choices):
            out = _output(ch, f"response.choices[{i}]")
            idx = ch.get("index", i)
            outs.append((idx if isinstance(idx, int) else i, out, ch.get("finish_reason"), logprobs(ch)))
    elif error is None and (status or 0) < 400:
        raise BadRecord("response has neither choices nor an error")
    else:
        outs.append((0, None, None, None))
    metadata = request.get("metadata") if isinstance(request.get("metadata"), dict) else {}
    if request.get("metadata") is not None and not isinstance(request["metadata"], dict):
        COERCED["tags"] += 1  # metadata that is not an object: no tags from it
    usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
    if resp.get("usage") is not None and not isinstance(resp["usage"], dict):
        COERCED["usage"] += 1
    several = len(outs) > 1
    in_tokens = integer(usage.get("prompt_tokens"), "usage.input_tokens")
    out_tokens = None if several else integer(usage.get("completion_tokens"), "usage.output_tokens")
    latency_ms = number(latency, "latency_ms")
    base = str(rid) if rid not in (None, "") else (str(resp["id"]) if resp.get("id") else None)
    when = timestamp(ts if ts is not None else resp.get("created"))
    params = {k: request[k] for k in SAMPLING_KEYS if k in request}
    model = resp.get("model") or request.get("model")
    records = []
    for idx, out, finish, lps in outs:
        rid_i = base if base else content_id({"request": request, "response": resp})
        if idx:
            rid_i = f"{rid_i}#{idx}"
        fin = finish if isinstance(finish, str) else None
        rec_tags = dict(tags or string_tags(metadata, skip=("function",)))
        if streamed and fin is None and out is not None and error is None:
            # No chunk carried a finish reason: the stream lost its final chunk, so the answer may be cut off.
            # Marked as a cut-off answer, which curate's truncated_output drops with its reason.
            fin = "length"
            rec_tags["stream_cut_off"] = STREAM_CUT_OFF
        if several:
            rec_tags["choice"] = str(idx)
        records.append(new_record(
            rid_i, source, when, str(function) if function not in (None, "") else "default", messages,
            episode_id=str(metadata["episode_id"]) if metadata.get("episode_id") is not None else None,
            tools=json_text(request.get("tools") or request.get("functions")),
            response_format=json_text(request.get("response_format")),
            output=out, finish_reason=fin, status_code=status, error=error,
            teacher={"model": str(model) if model is not None else None, "provider": provider,
                     "params": dumps(params) if params else "{}", "logprobs": lps},
            usage={"input_tokens": in_tokens, "output_tokens": out_tokens},
            latency_ms=latency_ms, feedback=dict(feedback or {}), tags=rec_tags,
        ))
    return records


def parse_openai(line: Any, source: str, function_field: str | None = None, feedback_field: str = "feedback",
                 choices: str = "all", function: str | None = None) -> list[dict[str, Any]]:
    """One parsed log row -> its records (one per choice); raises BadRecord with the reason."""
    if not isinstance(line, dict):
        raise BadRecord(f"line is a JSON {type(line).__name__}, not an object")
    if (why := not_a_call(line)) is not None:
        raise NotACall(why)
    response = line.get("response")
    if response is None and isinstance(line.get("chunks"), list):
        response = line["chunks"]
    fn = function or dotted(line, function_field or "request.metadata.function")
    return from_call(
        line.get("request"), response, rid=line.get("id"), source=source,
        ts=line.get("timestamp") if line.get("timestamp") is not None else line.get("created_at"),
        status=line.get("status_code"), latency=line.get("latency_ms"),
        feedback=metrics(dotted(line, feedback_field), "feedback"), function=fn, choices=choices,
    )


def parse_line(line: Any, source: str, function_field: str = "request.metadata.function",
               feedback_field: str = "feedback") -> dict[str, Any]:
    """One parsed log line -> its (first) record; raises BadRecord with the reason."""
    return parse_openai(line, source, function_field, feedback_field, choices="first")[0]


def _fast_messages(msgs: list) -> list[tuple] | None:
    """fast_row's request messages: plain text messages as message rows; None for anything else."""
    messages = []
    for m in msgs:
        if type(m) is not dict or "tool_calls" in m or "function_call" in m:
            return None
        role, content, name, call_id = m.get("role"), m.get("content"), m.get("name"), m.get("tool_call_id")
        if (type(role) is not str or (content is not None and type(content) is not str)
                or (name is not None and type(name) is not str) or (call_id is not None and type(call_id) is not str)):
            return None
        messages.append((role, content, name, call_id, None, None))
    return messages


def _fast_epoch_ms(ts: Any) -> int | None:
    """fast_row's timestamp in epoch milliseconds: ISO 8601 text straight through datetime, the rest as
    ``timestamp`` reads it."""
    if type(ts) is str and len(ts) >= 19 and ts[4] == "-":  # ISO 8601, the usual case
        try:
            return epoch_ms(datetime.fromisoformat(ts))
        except ValueError:
            pass
    return epoch_ms(timestamp(ts))


def fast_row(line: Any, where: str, function_field: str | None = None,
             feedback_field: str = "feedback") -> tuple | None:
    """The common case -- one choice, text messages, no stream, no error -- straight to a flat record row (see
    ``pipeline.record.ROW_FIELDS``), several times faster than ``parse_openai``; None when the row is anything
    else, and ``parse_openai`` must decide (it gives the same record for every row this accepts)."""
    if type(line) is not dict:
        return None
    req = line.get("request")
    resp = line.get("response")
    if type(req) is not dict or type(resp) is not dict or "error" in resp or "chunks" in resp:
        return None
    routing = line.get("routing")
    if routing is not None and (type(routing) is not dict or routing.get("route") == "student"):
        return None  # parse_openai says why it is not a call
    msgs = req.get("messages")
    choices = resp.get("choices")
    if type(msgs) is not list or not msgs or type(choices) is not list or len(choices) != 1:
        return None
    messages = _fast_messages(msgs)
    if messages is None:
        return None
    ch = choices[0]
    if type(ch) is not dict or ch.get("logprobs") is not None or ch.get("index", 0) != 0:
        return None
    msg = ch.get("message")
    if type(msg) is not dict or "tool_calls" in msg or "function_call" in msg:
        return None
    role, content, name, call_id = msg.get("role", "assistant"), msg.get("content"), msg.get("name"), \
        msg.get("tool_call_id")
    if (type(role) is not str or (content is None and msg.get("refusal") is not None)
            or (content is not None and type(content) is not str) or (name is not None and type(name) is not str)
            or (call_id is not None and type(call_id) is not str)):
        return None
    status = line.get("status_code")
    if status is not None and (type(status) is not int or not 0 <= status < 1000):
        return None
    rid = line.get("id")
    if rid in (None, ""):
        rid = resp.get("id")
        if not rid:
            return None
    ts = line.get("timestamp")
    if ts is None:
        ts = line.get("created_at")
        if ts is None:
            ts = resp.get("created")
    meta = req.get("metadata")
    if meta is None:
        meta = {}
    elif type(meta) is not dict:
        return None
    fn = meta.get("function") if function_field in (None, "request.metadata.function") else dotted(line, function_field)
    fb = line.get(feedback_field) if feedback_field == "feedback" else dotted(line, feedback_field)
    usage = resp.get("usage")
    if type(usage) is not dict:
        if usage is not None:
            COERCED["usage"] += 1
        usage = {}
    finish = ch.get("finish_reason")
    model = resp.get("model") or req.get("model")
    params = {k: req[k] for k in SAMPLING_KEYS if k in req}
    latency = line.get("latency_ms")
    episode = meta.get("episode_id")
    tools = req.get("tools") or req.get("functions")
    schema = req.get("response_format")
    return (
        str(rid), where, _fast_epoch_ms(ts), str(fn) if fn not in (None, "") else "default",
        str(episode) if episode is not None else None, messages,
        json_text(tools) if tools else None, json_text(schema) if schema else None,
        (role, content, name, call_id, None, None), finish if type(finish) is str else None,
        200 if status is None else status, None,
        (str(model) if model is not None else None, "openai", dumps(params) if params else "{}", None),
        (integer(usage.get("prompt_tokens"), "usage.input_tokens"),
         integer(usage.get("completion_tokens"), "usage.output_tokens")),
        float(latency) if type(latency) in (int, float) else number(latency, "latency_ms"), None,
        metrics(fb, "feedback") if fb is not None else {},
        {k if type(k) is str else str(k): v if type(v) is str else dumps(v)
         for k, v in meta.items() if k != "function" and v is not None} if meta else {},
        None,
    )
