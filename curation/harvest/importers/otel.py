"""Importer: OpenTelemetry GenAI spans (the ``gen_ai.*`` semantic conventions) in OTLP/JSON -> canonical records.

A row is one OTLP/JSON document -- an ExportTraceServiceRequest ``{"resourceSpans": [...]}`` (a collector's file
exporter writes one per line; a ``.json`` file holds one), optionally with ``resourceLogs`` -- or one span object
on its own. One record per output message (choice) of every *inference* span: ``gen_ai.operation.name`` ``chat``,
``text_completion`` or ``generate_content`` (or, with no operation name, a span with GenAI messages). Other spans
(tools, agents, embeddings, HTTP) are not teacher calls and give no record.

Messages come from, in this order:
- the attribute form: ``gen_ai.system_instructions``, ``gen_ai.input.messages``, ``gen_ai.output.messages``
  (JSON text or structured AnyValue trees), on the span or on a ``gen_ai.client.inference.operation.details`` event;
- the older event form: ``gen_ai.{system,user,assistant,tool}.message`` and ``gen_ai.choice`` events, as span
  events (body in the ``gen_ai.event.content`` attribute) or as log records of the same document tied to the span
  by ``spanId`` (body as a kvlist or JSON text); log records with no span in the document make a call of their own;
- the v1.27 events ``gen_ai.content.prompt`` / ``gen_ai.content.completion`` (``gen_ai.prompt`` /
  ``gen_ai.completion`` attributes), and the flattened ``gen_ai.prompt.<i>.role/content`` attributes.

Row counting: a document is one row. Its inference spans become records (the first counts for the row, the rest
as extra records, like extra choices). A document with no inference span at all, or whose every inference span is
unusable, is quarantined with the reason. An unusable span in a document that also holds good ones (no content
captured, malformed messages) becomes a record with no output whose ``error`` says why (tag ``import_error``):
curate's http_error step drops it with that reason, so it is never lost silently.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone
from typing import Any

from curation.harvest.importers.common import (
    IMAGE_PARTS,
    BadRecord,
    chat_message,
    content_id,
    decode_json_text,
    failed_item,
    image_ref,
    integer,
    json_text,
    new_record,
    number,
    opt_str,
)
from pipeline.config.harvest import Source
from pipeline.record import dumps, message

INFERENCE = frozenset({"chat", "text_completion", "generate_content"})
PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_tokens": "max_tokens",
          "seed": "seed", "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
          "stop_sequences": "stop", "choice.count": "n"}
OLD_EVENTS = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
              "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}
DETAILS_EVENT = "gen_ai.client.inference.operation.details"


# --- OTLP/JSON values ------------------------------------------------------------------------------------------------

def any_value(v: Any) -> Any:
    """An OTLP AnyValue (``{"stringValue": ...}``, ``{"intValue": "42"}``, arrays, kvlists) -> a plain value."""
    if not isinstance(v, dict):
        return v
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return integer(v["intValue"])
    if "doubleValue" in v:
        x = number(v["doubleValue"])
        return x if x is not None and x == x and abs(x) != float("inf") else None
    if "boolValue" in v:
        return v["boolValue"] if isinstance(v["boolValue"], bool) else None
    if "bytesValue" in v:
        return v["bytesValue"] if isinstance(v["bytesValue"], str) else None
    if "arrayValue" in v:
        arr = v["arrayValue"]
        vals = arr.get("values") if isinstance(arr, dict) else arr
        return [any_value(x) for x in vals] if isinstance(vals, list) else []
    if "kvlistValue" in v:
        kv = v["kvlistValue"]
        return attributes(kv.get("values") if isinstance(kv, dict) else kv)
    return None


def attributes(kvs: Any) -> dict[str, Any]:
    """An OTLP attribute list ``[{"key": k, "value": AnyValue}]`` -> a dict (an object is taken as it is)."""
    if isinstance(kvs, dict):
        return kvs
    out: dict[str, Any] = {}
    for kv in kvs if isinstance(kvs, list) else ():
        if isinstance(kv, dict) and isinstance(kv.get("key"), str):
            out[kv["key"]] = any_value(kv.get("value"))
    return out


def _hex_id(v: Any) -> str | None:
    """A trace or span id as lower-case hex (OTLP/JSON says hex; some exporters write base64)."""
    if not isinstance(v, str) or not v:
        return None
    if len(v) in (16, 32) and all(c in "0123456789abcdefABCDEF" for c in v):
        return v.lower()
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        return v
    return raw.hex() if len(raw) in (8, 16) else v


def _nanos(v: Any) -> int | None:
    """Unix nanoseconds (a decimal string in OTLP/JSON, or a number), exactly: a float would lose the last digits."""
    if isinstance(v, str) and v.isdigit() and len(v) < 20:
        n = int(v)
    elif type(v) is int:
        n = v
    else:
        n = integer(v)
    return n if n is not None and 0 < n < 2**63 else None


def _time(ns: int) -> datetime:
    try:
        return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise BadRecord("startTimeUnixNano is out of range") from None


# --- messages: the parts form ----------------------------------------------------------------------------------------

def _args(v: Any) -> str:
    return v if isinstance(v, str) else dumps(v if v is not None else {})


def _parts_message(m: Any, where: str) -> list[dict[str, Any]]:
    """One ``{role, parts: [...]}`` message -> canonical messages (each tool_call_response its own tool message)."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRecord(f"{where} must be an object with a string 'role'")
    parts = m.get("parts")
    if parts is None and "content" in m:  # an OpenAI-style message where a parts message was expected
        return [chat_message(m, where)]
    if not isinstance(parts, list):
        raise BadRecord(f"{where}.parts must be a list")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    images: list[str] = []
    for j, p in enumerate(parts):
        if isinstance(p, str):
            texts.append(p)
            continue
        if not isinstance(p, dict):
            raise BadRecord(f"{where}.parts[{j}] is not an object")
        kind = p.get("type")
        if kind == "text":
            if not isinstance(p.get("content"), str):
                raise BadRecord(f"{where}.parts[{j}] is a text part whose content is not a string")
            texts.append(p["content"])
        elif kind == "tool_call":
            calls.append({"id": opt_str(p.get("id")), "type": "function",
                          "function": {"name": opt_str(p.get("name")) or "", "arguments": _args(p.get("arguments"))}})
        elif kind == "tool_call_response":
            r = p.get("response")
            results.append(message("tool", r if isinstance(r, str) else dumps(r), None, opt_str(p.get("id"))))
        elif kind in ("blob", "uri", "file") and p.get("modality") == "image":
            IMAGE_PARTS[0] += 1
            images.append(image_ref(p))
        # reasoning, server tool calls, audio/video and unknown parts carry nothing the student trains on
    out = list(results)
    if texts or calls or images or not results:
        out.append(message(m["role"], "".join(texts) if texts else None, opt_str(m.get("name")),
                           tool_calls=calls or None, images=images))
    return out


def _message_list(v: Any, where: str) -> list[Any]:
    v = decode_json_text(v)
    if not isinstance(v, list):
        raise BadRecord(f"{where} must be a list of messages (JSON text or structured)")
    return v


def _system(v: Any) -> dict[str, Any]:
    v = decode_json_text(v)
    if isinstance(v, str):
        return message("system", v)
    if not isinstance(v, list):
        raise BadRecord("gen_ai.system_instructions must be a list of parts")
    texts = []
    for p in v:
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("content"), str):
            texts.append(p["content"])
    return message("system", "\n".join(texts))


# --- messages: the event form ----------------------------------------------------------------------------------------

def _event_name(ev: dict[str, Any], attrs: dict[str, Any]) -> str | None:
    name = ev.get("name") if isinstance(ev.get("name"), str) else ev.get("eventName")
    if not isinstance(name, str) or not name:
        name = attrs.get("event.name")
    return name if isinstance(name, str) else None


def _event_body(ev: dict[str, Any], attrs: dict[str, Any]) -> dict[str, Any]:
    body = any_value(ev["body"]) if "body" in ev else None
    if body is None:
        body = attrs.get("gen_ai.event.content")
    body = decode_json_text(body)
    if isinstance(body, str):
        return {"content": body}
    if isinstance(body, dict):
        return body
    return {k: v for k, v in attrs.items() if not k.startswith(("gen_ai.system", "gen_ai.provider", "event."))}


def _old_message(role: str, body: dict[str, Any], where: str) -> dict[str, Any]:
    m = {"role": body.get("role") if isinstance(body.get("role"), str) else role, "content": body.get("content")}
    if role == "tool":
        m["tool_call_id"] = opt_str(body.get("id")) or opt_str(body.get("tool_call_id"))
    if body.get("tool_calls") is not None:
        m["tool_calls"] = body["tool_calls"]
    if m["role"] == "instruction":
        m["role"] = "system"
    return chat_message(m, where)


class Call:
    """One inference span: its attributes, events (span events and log records), times, status and ids."""

    def __init__(self, span: dict[str, Any], resource: dict[str, Any], scope: str | None) -> None:
        self.span = span
        self.attrs = attributes(span.get("attributes"))
        self.events: list[tuple[int, str, dict[str, Any], dict[str, Any]]] = []
        self.resource = resource
        self.scope = scope
        for ev in span.get("events") if isinstance(span.get("events"), list) else ():
            if isinstance(ev, dict):
                self.add_event(ev)

    def add_event(self, ev: dict[str, Any]) -> None:
        attrs = attributes(ev.get("attributes"))
        name = _event_name(ev, attrs)
        if name is None:
            return
        t = _nanos(ev.get("timeUnixNano")) or _nanos(ev.get("observedTimeUnixNano")) or 0
        if name == DETAILS_EVENT:  # the attribute form carried on an event: fill what the span lacks
            for k, v in attrs.items():
                self.attrs.setdefault(k, v)
            body = decode_json_text(any_value(ev.get("body")))
            if isinstance(body, dict):
                for k, v in body.items():
                    self.attrs.setdefault(k, v)
            return
        self.events.append((t, name, attrs, ev))

    def is_inference(self) -> bool:
        op = self.attrs.get("gen_ai.operation.name")
        if isinstance(op, str):
            return op in INFERENCE
        return any(k.startswith(("gen_ai.input.", "gen_ai.prompt", "gen_ai.request.model")) for k in self.attrs) \
            or any(n in OLD_EVENTS or n == "gen_ai.choice" for _, n, _, _ in self.events)

    # -- messages --

    def messages(self) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str | None]]]:
        """(input messages, [(output message, finish reason)])."""
        a = self.attrs
        if "gen_ai.input.messages" in a or "gen_ai.output.messages" in a:
            msgs: list[dict[str, Any]] = []
            if a.get("gen_ai.system_instructions") is not None:
                msgs.append(_system(a["gen_ai.system_instructions"]))
            if a.get("gen_ai.input.messages") is not None:
                for i, m in enumerate(_message_list(a["gen_ai.input.messages"], "gen_ai.input.messages")):
                    msgs.extend(_parts_message(m, f"gen_ai.input.messages[{i}]"))
            outs = []
            if a.get("gen_ai.output.messages") is not None:
                for i, m in enumerate(_message_list(a["gen_ai.output.messages"], "gen_ai.output.messages")):
                    got = _parts_message(m, f"gen_ai.output.messages[{i}]")
                    fin = m.get("finish_reason") if isinstance(m, dict) else None
                    outs.append((got[-1], fin if isinstance(fin, str) else None))
            return msgs, outs
        if any(n in OLD_EVENTS or n == "gen_ai.choice" for _, n, _, _ in self.events):
            return self._event_messages()
        if any(n in ("gen_ai.content.prompt", "gen_ai.content.completion") for _, n, _, _ in self.events):
            return self._v127_messages()
        return self._flat_messages()

    def _event_messages(self) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str | None]]]:
        msgs: list[dict[str, Any]] = []
        choices: dict[int, tuple[dict[str, Any], str | None]] = {}
        for i, (_, name, attrs, ev) in enumerate(sorted(self.events, key=lambda e: e[0])):
            where = f"event {i} ({name})"
            if name in OLD_EVENTS:
                msgs.append(_old_message(OLD_EVENTS[name], _event_body(ev, attrs), where))
            elif name == "gen_ai.choice":
                body = _event_body(ev, attrs)
                msg = body.get("message") if isinstance(body.get("message"), dict) else {}
                idx = integer(body.get("index"))
                fin = body.get("finish_reason")
                choices[idx if idx is not None and idx >= 0 else len(choices)] = (
                    _old_message("assistant", {"role": "assistant", **msg}, f"{where}.message"),
                    fin if isinstance(fin, str) else None)
        return msgs, [choices[k] for k in sorted(choices)]

    def _v127_messages(self) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str | None]]]:
        msgs: list[dict[str, Any]] = []
        outs: list[tuple[dict[str, Any], str | None]] = []
        for _, name, attrs, _ev in self.events:
            if name == "gen_ai.content.prompt":
                raw = decode_json_text(attrs.get("gen_ai.prompt"))
                if isinstance(raw, str):
                    msgs.append(message("user", raw))
                elif isinstance(raw, list):
                    msgs.extend(chat_message(m, f"gen_ai.prompt[{i}]") for i, m in enumerate(raw))
                else:
                    raise BadRecord("gen_ai.content.prompt: gen_ai.prompt is not a list of messages")
            elif name == "gen_ai.content.completion":
                raw = decode_json_text(attrs.get("gen_ai.completion"))
                if isinstance(raw, dict):
                    raw = [raw]
                if isinstance(raw, str):
                    outs.append((message("assistant", raw), None))
                elif isinstance(raw, list):
                    for i, m in enumerate(raw):
                        if isinstance(m, dict) and "role" not in m:
                            m = {"role": "assistant", **m}
                        fin = m.get("finish_reason") if isinstance(m, dict) else None
                        outs.append((chat_message(m, f"gen_ai.completion[{i}]"), fin if isinstance(fin, str)
                                     else None))
                else:
                    raise BadRecord("gen_ai.content.completion: gen_ai.completion is not a list of messages")
        return msgs, outs

    def _flat_messages(self) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str | None]]]:
        """OpenLLMetry-style flattened attributes: gen_ai.prompt.<i>.role / .content, gen_ai.completion.<i>.*."""
        def gather(prefix: str) -> dict[int, dict[str, Any]]:
            out: dict[int, dict[str, Any]] = {}
            for k, v in self.attrs.items():
                if k.startswith(prefix):
                    idx, _, field = k[len(prefix):].partition(".")
                    if idx.isdigit() and field in ("role", "content", "finish_reason", "tool_call_id"):
                        out.setdefault(int(idx), {})[field] = v
            return out

        msgs = [chat_message({"role": "user", **m} if "role" not in m else m, f"gen_ai.prompt.{i}")
                for i, m in sorted(gather("gen_ai.prompt.").items())]
        outs = []
        for i, m in sorted(gather("gen_ai.completion.").items()):
            fin = m.pop("finish_reason", None)
            outs.append((chat_message({"role": "assistant", **m} if "role" not in m else m, f"gen_ai.completion.{i}"),
                         fin if isinstance(fin, str) else None))
        return msgs, outs


def _finish(fin: str | None) -> str | None:
    return "tool_calls" if fin == "tool_call" else fin


def _feedback(call: Call) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, name, attrs, _ev in call.events:
        if name == "gen_ai.evaluation.result" and isinstance(attrs.get("gen_ai.evaluation.name"), str):
            v = attrs.get("gen_ai.evaluation.score.value")
            x = number(v) if not isinstance(v, bool) else float(v)
            if x is not None and x == x and abs(x) != float("inf"):
                out[attrs["gen_ai.evaluation.name"]] = x
    return out


def span_records(call: Call, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """One inference span -> one record per output message (choice)."""
    a = call.attrs
    span = call.span
    msgs, outs = call.messages()
    status = span.get("status") if isinstance(span.get("status"), dict) else {}
    err_type = a.get("error.type")
    failed = integer(status.get("code")) == 2 or status.get("code") == "STATUS_CODE_ERROR" or err_type is not None
    error = None
    if failed:
        error = opt_str(status.get("message")) or opt_str(err_type) or "span status ERROR"
    if not msgs and not outs:
        raise BadRecord("no messages captured on the span (gen_ai.input.messages / gen_ai.output.messages or "
                        "gen_ai.*.message events): content capture was off")
    if not outs and error is None:
        raise BadRecord("no output captured (gen_ai.output.messages or a gen_ai.choice event) and no error")
    http = integer(err_type)
    status_code = http if http is not None and 400 <= http < 600 else (500 if error else 200)
    start, end = _nanos(span.get("startTimeUnixNano")), _nanos(span.get("endTimeUnixNano"))
    if start is None:
        start = min((t for t, *_ in call.events if t), default=None)
    ts = _time(start) if start is not None else default_ts
    latency = (end - start) / 1e6 if start is not None and end is not None and end >= start else None
    span_id, trace_id = _hex_id(span.get("spanId")), _hex_id(span.get("traceId"))
    base = span_id or opt_str(a.get("gen_ai.response.id")) or content_id(span)
    params = {}
    for k, name in PARAMS.items():
        v = a.get(f"gen_ai.request.{k}")
        if v is not None:
            params[name] = v
    finishes = a.get("gen_ai.response.finish_reasons")
    finishes = finishes if isinstance(finishes, list) else []
    model = opt_str(a.get("gen_ai.response.model")) or opt_str(a.get("gen_ai.request.model"))
    provider = opt_str(a.get("gen_ai.provider.name")) or opt_str(a.get("gen_ai.system")) or "otel"
    tags = {k: v for k, v in (
        ("trace_id", trace_id), ("response_id", opt_str(a.get("gen_ai.response.id"))),
        ("service", opt_str(call.resource.get("service.name"))), ("instrumentation", call.scope),
        ("operation", opt_str(a.get("gen_ai.operation.name"))), ("agent", opt_str(a.get("gen_ai.agent.name"))),
    ) if v}
    fn = cfg.function or a.get(cfg.function_field or "gen_ai.agent.name") or call.resource.get("service.name")
    usage_in = integer(a.get("gen_ai.usage.input_tokens"), "usage.input_tokens")
    usage_out = integer(a.get("gen_ai.usage.output_tokens"), "usage.output_tokens")
    if not outs:
        outs = [(None, None)]
    several = len(outs) > 1
    records = []
    for i, (out, fin) in enumerate(outs):
        fin = _finish(fin) or (opt_str(finishes[i]) if i < len(finishes) else None)
        rec_tags = dict(tags)
        if several:
            rec_tags["choice"] = str(i)
        records.append(new_record(
            f"{base}#{i}" if i else base, where, ts, str(fn) if fn not in (None, "") else "default", msgs,
            episode_id=opt_str(a.get("gen_ai.conversation.id")) or trace_id,
            tools=json_text(decode_json_text(a.get("gen_ai.tool.definitions"))),
            output=out, finish_reason=fin, status_code=status_code, error=error,
            teacher={"model": model, "provider": provider, "params": dumps(params) if params else "{}",
                     "logprobs": None},
            usage={"input_tokens": usage_in, "output_tokens": None if several else usage_out},
            latency_ms=latency, feedback=_feedback(call), tags=rec_tags,
        ))
    return records


def _calls(doc: dict[str, Any]) -> list[Call]:
    """Every span of an OTLP document (and log-record groups with no span) as a Call, in document order."""
    calls: list[Call] = []
    by_span: dict[str, Call] = {}
    rs = doc.get("resourceSpans")
    for r in rs if isinstance(rs, list) else ():
        if not isinstance(r, dict):
            continue
        res = attributes(r.get("resource", {}).get("attributes") if isinstance(r.get("resource"), dict) else None)
        ss = r.get("scopeSpans") if isinstance(r.get("scopeSpans"), list) else r.get("instrumentationLibrarySpans")
        for s in ss if isinstance(ss, list) else ():
            if not isinstance(s, dict):
                continue
            scope = s.get("scope") if isinstance(s.get("scope"), dict) else {}
            for span in s.get("spans") if isinstance(s.get("spans"), list) else ():
                if isinstance(span, dict):
                    call = Call(span, res, opt_str(scope.get("name")))
                    calls.append(call)
                    sid = _hex_id(span.get("spanId"))
                    if sid:
                        by_span[sid] = call
    rl = doc.get("resourceLogs")
    for r in rl if isinstance(rl, list) else ():
        if not isinstance(r, dict):
            continue
        res = attributes(r.get("resource", {}).get("attributes") if isinstance(r.get("resource"), dict) else None)
        for s in r.get("scopeLogs") if isinstance(r.get("scopeLogs"), list) else ():
            if not isinstance(s, dict):
                continue
            scope = s.get("scope") if isinstance(s.get("scope"), dict) else {}
            for lr in s.get("logRecords") if isinstance(s.get("logRecords"), list) else ():
                if not isinstance(lr, dict):
                    continue
                sid = _hex_id(lr.get("spanId")) or content_id(lr)
                call = by_span.get(sid)
                if call is None:  # events with no span in this document: a call of their own
                    call = by_span[sid] = Call({"spanId": lr.get("spanId"), "traceId": lr.get("traceId")}, res,
                                               opt_str(scope.get("name")))
                    call.attrs.update(attributes(lr.get("attributes")))
                    call.attrs.pop("event.name", None)
                    calls.append(call)
                call.add_event(lr)
    return calls


def otel(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """One OTLP/JSON document (or one span) -> one record per choice of each GenAI inference span."""
    if not isinstance(row, dict):
        raise BadRecord(f"row is a JSON {type(row).__name__}, not an object")
    if "resourceSpans" in row or "resourceLogs" in row:
        calls = _calls(row)
    elif "spanId" in row or "attributes" in row:
        calls = [Call(row, {}, None)]
    else:
        raise BadRecord("not an OTLP/JSON document: no 'resourceSpans' or 'resourceLogs' (nor a span)")
    inference = [c for c in calls if c.is_inference()]
    if not inference:
        raise BadRecord(f"no GenAI inference span (gen_ai.operation.name chat, text_completion or generate_content) "
                        f"among {len(calls)} spans")
    records: list[dict[str, Any]] = []
    failed: list[tuple[Call, BadRecord]] = []
    for call in inference:
        try:
            records.extend(span_records(call, where, cfg, default_ts))
        except BadRecord as err:
            failed.append((call, err))
    if not records:
        call, err = failed[0]
        sid = _hex_id(call.span.get("spanId"))
        more = f" (and {len(failed) - 1} more spans)" if len(failed) > 1 else ""
        raise BadRecord(f"span {sid or 0}: {err}{more}")
    for call, err in failed:  # kept as failed records, so curate drops them with the reason
        sid = _hex_id(call.span.get("spanId")) or content_id(call.span)
        start = _nanos(call.span.get("startTimeUnixNano"))
        records.append(failed_item(sid, where, _time(start) if start else default_ts, cfg.function or "default",
                                   f"span {sid}: {err}", episode_id=_hex_id(call.span.get("traceId"))))
    return records
