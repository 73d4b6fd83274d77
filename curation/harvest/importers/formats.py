"""Importers for the formats besides OpenAI request/response logs: OpenAI fine-tuning JSONL, TensorZero inference
rows, OpenPipe exports, and any rows with a field mapping from the recipe.

Each takes one row (a dict: a JSON line, a Parquet/CSV row or a SQL row), where it came from ("file:line") and
the source's config, and returns the row's records or raises BadRecord with the reason.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from curation.harvest.importers.common import (
    COERCED,
    IMAGE_PARTS,
    BadRecord,
    NotACall,
    chat_message,
    chat_messages,
    content_id,
    decode_json_text,
    dotted,
    image_ref,
    integer,
    is_image,
    json_text,
    metrics,
    new_record,
    number,
    opt_str,
    string_tags,
    text,
    timestamp,
)
from curation.harvest.importers.langfuse import langfuse
from curation.harvest.importers.litellm import litellm
from curation.harvest.importers.openai import from_call, parse_openai
from curation.harvest.importers.openai_stored import openai_stored
from curation.harvest.importers.otel import otel
from pipeline.config.harvest import Source
from pipeline.record import dumps, message


def _function(cfg: Source, row: Any, default_path: str) -> str:
    if cfg.function:
        return cfg.function
    v = dotted(row, cfg.function_field or default_path)
    return str(v) if v not in (None, "") else "default"


def _row(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise BadRecord(f"row is a JSON {type(row).__name__}, not an object")
    return row


# --- OpenAI fine-tuning chat JSONL -------------------------------------------------------------------------------

def openai_finetune(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """``{"messages": [..., {"role": "assistant", ...}], "tools": [...]}``: the last assistant turn is the output."""
    row = _row(row)
    msgs = chat_messages(decode_json_text(row.get("messages")), "messages")
    if msgs[-1]["role"] != "assistant":
        raise BadRecord("the last message must be the assistant's answer (role 'assistant')")
    if len(msgs) < 2:
        raise BadRecord("messages hold only the answer, no input")
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    ts = row.get("timestamp") if row.get("timestamp") is not None else meta.get("timestamp")
    return [new_record(
        str(row["id"]) if row.get("id") not in (None, "") else content_id(row), where,
        timestamp(ts) if ts is not None else default_ts, _function(cfg, row, "metadata.function"), msgs[:-1],
        output=msgs[-1], tools=json_text(row.get("tools") or row.get("functions")),
        response_format=json_text(row.get("response_format")), finish_reason="stop", status_code=200,
        teacher={"model": meta.get("model"), "provider": "openai_finetune", "params": "{}", "logprobs": None},
        tags=string_tags(meta, skip=("function", "timestamp", "model"), field="tags"),
        split=str(row["split"]).lower() if isinstance(row.get("split"), str) else None,
    )]


# --- TensorZero ----------------------------------------------------------------------------------------------------

def uuid7_time(u: Any) -> datetime | None:
    """The creation time a UUIDv7 holds (TensorZero ids), or None."""
    if not isinstance(u, str):
        return None
    h = u.replace("-", "")
    if len(h) != 32 or h[12] != "7":
        return None
    try:
        return datetime.fromtimestamp(int(h[:12], 16) / 1000, tz=timezone.utc)
    except ValueError:
        return None


def _tz_text(block: dict[str, Any]) -> str:
    if isinstance(block.get("text"), str):
        return block["text"]
    value = block.get("value")
    if isinstance(value, str):  # raw_text
        return value
    if "arguments" in block:  # a templated text block: the template's arguments
        args = decode_json_text(block["arguments"])
        return args if isinstance(args, str) else dumps(args)
    if isinstance(value, (dict, list)):  # the older form of template arguments: {"type": "text", "value": {...}}
        return dumps(value)
    raise BadRecord("a text content block has no text")


def _tz_call(block: dict[str, Any]) -> dict[str, Any]:
    args = block.get("raw_arguments")
    if not isinstance(args, str):
        args = block.get("arguments")
        args = args if isinstance(args, str) else dumps(args if args is not None else {})
    return {"id": block.get("id"), "type": "function",
            "function": {"name": block.get("raw_name") or block.get("name"), "arguments": args}}


def _tz_messages(msg: Any, where: str) -> list[dict[str, Any]]:
    """One TensorZero input message (content: text or blocks) -> canonical messages (tool results apart)."""
    if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
        raise BadRecord(f"{where} must be an object with role 'user' or 'assistant'")
    content = decode_json_text(msg.get("content"))
    if isinstance(content, str):
        return [message(msg["role"], content)]
    if not isinstance(content, list):
        raise BadRecord(f"{where}.content must be text or a list of content blocks")
    out, texts, calls, images = [], [], [], []
    for j, b in enumerate(content):
        if isinstance(b, str):
            texts.append(b)
            continue
        if not isinstance(b, dict):
            raise BadRecord(f"{where}.content[{j}] is not an object")
        kind = b.get("type")
        if kind in ("text", "raw_text", "template"):
            texts.append(_tz_text(b))
        elif kind == "tool_call":
            calls.append(_tz_call(b))
        elif kind == "tool_result":
            result = b.get("result")
            out.append(message("tool", result if isinstance(result, str) else dumps(result), opt_str(b.get("name")),
                               opt_str(b.get("id"))))
        elif is_image(b):  # kept in the message's images; counted and tagged by harvest
            IMAGE_PARTS[0] += 1
            images.append(image_ref(b))
        # thought, other file and unknown blocks carry nothing the student trains on
    if texts or calls or images or not out:
        out.append(message(msg["role"], "".join(texts) if texts else None, tool_calls=calls or None, images=images))
    return out


def _tz_output(out: Any, kind: str) -> dict[str, Any] | None:
    out = decode_json_text(out)
    if out is None:
        return None
    if kind == "json" or isinstance(out, dict):
        if not isinstance(out, dict):
            raise BadRecord("a JSON inference's output must be an object with 'raw' and 'parsed'")
        raw = out.get("raw")
        if not isinstance(raw, str):
            raw = dumps(out["parsed"]) if out.get("parsed") is not None else None
        return message("assistant", raw)
    if not isinstance(out, list):
        raise BadRecord("a chat inference's output must be a list of content blocks")
    texts, calls = [], []
    for j, b in enumerate(out):
        if not isinstance(b, dict):
            raise BadRecord(f"output[{j}] is not an object")
        if b.get("type") in ("text", "raw_text"):
            texts.append(_tz_text(b))
        elif b.get("type") == "tool_call":
            calls.append(_tz_call(b))
    return message("assistant", "".join(texts) if texts else None, tool_calls=calls or None)


def _tz_tools(row: dict[str, Any]) -> str | None:
    tools = []
    for t in row.get("dynamic_tools") or ():
        t = decode_json_text(t)
        if isinstance(t, dict):
            tools.append(t)
    params = decode_json_text(row.get("tool_params"))
    if isinstance(params, dict):
        tools.extend(t for t in params.get("tools_available") or () if isinstance(t, dict))
    return json_text([t if "function" in t else
                      {"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                          "strict") if k in t}}
                      for t in tools])


# The variants of distill's own TensorZero config (export.route.gateways.tensorzero_config) whose answers are not
# the teacher's: the student, and serve-router (the student or the teacher: it cannot be told from the row).
TZ_NOT_TEACHER = {"student": "student answers (TensorZero variant 'student' of distill's config)",
                  "router": "answers of TensorZero variant 'router' (serve-router: the student or the teacher)"}


def tensorzero(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """A ChatInference / JsonInference row (ClickHouse export) or a stored inference from the TensorZero API."""
    row = _row(row)
    if isinstance(row.get("variant_name"), str) and row["variant_name"] in TZ_NOT_TEACHER:
        raise NotACall(TZ_NOT_TEACHER[row["variant_name"]])
    rid = row.get("inference_id") or row.get("id")
    if not isinstance(rid, str) or not rid:
        raise BadRecord("no inference id ('id' or 'inference_id')")
    inp = decode_json_text(row.get("input"))
    if not isinstance(inp, dict):
        raise BadRecord("'input' must be an object with 'messages' (and optionally 'system')")
    msgs: list[dict[str, Any]] = []
    system = decode_json_text(inp.get("system"))
    if system is not None:
        msgs.append(message("system", system if isinstance(system, str) else dumps(system)))
    raw_msgs = decode_json_text(inp.get("messages"))
    if not isinstance(raw_msgs, list):
        raise BadRecord("input.messages must be a list")
    for i, m in enumerate(raw_msgs):
        msgs.extend(_tz_messages(m, f"input.messages[{i}]"))
    # No system and no messages is a function whose fixed template needs no arguments: the record has no input
    # messages (the prompt lives in the function's configuration), but its output is still the teacher's answer.
    schema = decode_json_text(row.get("output_schema"))
    kind = row.get("type") or ("json" if schema is not None else "chat")
    function = _function(cfg, row, "function_name")
    ts = row.get("timestamp")
    params = decode_json_text(row.get("inference_params"))
    if isinstance(params, dict) and len(params) == 1 and isinstance(next(iter(params.values())), dict):
        params = next(iter(params.values()))  # {"chat_completion": {...}}
    tags = string_tags(decode_json_text(row.get("tags")), field="tags")
    if opt_str(row.get("variant_name")):
        tags["variant"] = str(row["variant_name"])
    return [new_record(
        rid, where, timestamp(ts) if ts is not None else (uuid7_time(rid) or timestamp(None)), function, msgs,
        episode_id=opt_str(row.get("episode_id")) or None,
        tools=_tz_tools(row),
        response_format=dumps({"type": "json_schema", "json_schema": {"name": function, "schema": schema}})
        if isinstance(schema, dict) else None,
        output=_tz_output(row.get("output"), kind),
        finish_reason=opt_str(row.get("finish_reason")),
        status_code=200,
        teacher={"model": opt_str(row.get("model_name") or row.get("variant_name")),
                 "provider": opt_str(row.get("model_provider_name")) or "tensorzero",
                 "params": dumps({k: v for k, v in params.items() if v is not None}) if isinstance(params, dict)
                 else "{}", "logprobs": None},
        usage={"input_tokens": integer(row.get("input_tokens"), "usage.input_tokens"),
               "output_tokens": integer(row.get("output_tokens"), "usage.output_tokens")},
        latency_ms=number(row.get("processing_time_ms") if row.get("processing_time_ms") is not None
                          else row.get("response_time_ms"), "latency_ms"),
        tags=tags,
    )]


# --- OpenPipe ------------------------------------------------------------------------------------------------------

def openpipe(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """An OpenPipe export line ``{"input", "output", "tags"}`` or a logged call ``{"reqPayload", "respPayload",
    "statusCode", "errorMessage", "requestedAt", "durationMs", "tags"}``."""
    row = _row(row)
    req = decode_json_text(row["input"] if "input" in row else row.get("reqPayload"))
    resp = decode_json_text(row["output"] if "output" in row else row.get("respPayload"))
    raw_tags = decode_json_text(row.get("tags"))
    if isinstance(raw_tags, list):  # LoggedCallTag rows
        raw_tags = {t.get("name"): t.get("value") for t in raw_tags if isinstance(t, dict) and t.get("name")}
    tags = string_tags(raw_tags, field="tags")
    if isinstance(req, dict) and isinstance(req.get("metadata"), dict):
        tags = {**string_tags(req["metadata"], skip=("function",), field="tags"), **tags}
    if row.get("errorMessage") and not isinstance(resp, dict):
        resp = {"error": {"message": str(row["errorMessage"])}}
    fn = cfg.function or dotted(row, cfg.function_field or "tags.prompt_id") or dotted(req, "metadata.function")
    ts = next((row[k] for k in ("requestedAt", "timestamp", "createdAt") if row.get(k) is not None), None)
    if ts is None and isinstance(resp, dict):
        ts = resp.get("created")
    return from_call(req, resp, rid=row.get("id") or (resp.get("id") if isinstance(resp, dict) else None),
                     source=where, ts=ts, status=row.get("statusCode"), latency=row.get("durationMs"),
                     feedback=metrics(row.get("feedback"), "feedback"), tags=tags, function=fn, choices=cfg.choices,
                     provider="openpipe")


# --- any rows, with a field mapping --------------------------------------------------------------------------------

def _mapped_output(v: Any) -> dict[str, Any] | None:
    v = decode_json_text(v)
    if v is None:
        return None
    if isinstance(v, str):
        return message("assistant", v)
    if isinstance(v, dict) and "role" not in v and isinstance(v.get("message"), dict):  # a choice
        v = v["message"]
    if isinstance(v, dict):
        return chat_message({"role": "assistant", **v}, "output")
    if isinstance(v, list):
        return message("assistant", text(v, "output"))
    return message("assistant", str(v))


def mapped(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """Any row; the recipe's ``fields`` say where each record field is (dotted paths)."""
    row = _row(row)
    f = cfg.fields

    def get(name: str) -> Any:
        return dotted(row, f[name]) if name in f else None

    msgs: list[dict[str, Any]] = []
    raw = decode_json_text(get("messages"))
    if raw is not None:
        msgs = [message("user", raw)] if isinstance(raw, str) else chat_messages(raw, f"{f['messages']}")
    system = get("system")
    if system is not None and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, message("system", str(system)))
    if "prompt" in f and (raw is None or get("prompt") is not None):
        prompt = get("prompt")
        if not isinstance(prompt, (str, int, float)) or isinstance(prompt, bool) or str(prompt) == "":
            raise BadRecord(f"{f['prompt']} (the prompt) is missing or not text")
        msgs.append(message("user", str(prompt)))
    if not msgs:
        raise BadRecord(f"{f.get('messages') or f.get('prompt')}: no input messages")
    ts = get("timestamp")
    rid = get("id")
    feedback = metrics(get("feedback"), "feedback")
    tags = string_tags(get("tags"), field="tags")
    for key, path in f.items():
        head, _, name = key.partition(".")
        if head == "feedback" and name:
            v = dotted(row, path)
            if isinstance(v, str):
                v = number(v) if v.lower() not in ("true", "false") else float(v.lower() == "true")
            if isinstance(v, (bool, int, float)) and v == v:
                feedback[name] = float(v)
            elif v is not None and v != "":
                COERCED["feedback"] += 1  # a feedback value that is not a number: dropped
        elif head == "tags" and name:
            v = dotted(row, path)
            if v is not None and v != "":
                tags[name] = v if isinstance(v, str) else dumps(v)
    status, error = integer(get("status_code"), "status_code"), get("error")
    if status is not None and not 0 <= status < 1000:
        raise BadRecord(f"{f['status_code']} is not an HTTP status")
    fn = cfg.function or get("function") or (dotted(row, cfg.function_field) if cfg.function_field else None)
    return [new_record(
        str(rid) if rid not in (None, "") else content_id(row), where,
        timestamp(ts) if "timestamp" in f else default_ts, str(fn) if fn not in (None, "") else "default", msgs,
        episode_id=str(get("episode_id")) if get("episode_id") not in (None, "") else None,
        tools=json_text(get("tools")), response_format=json_text(get("response_format")),
        output=_mapped_output(get("output")),
        finish_reason=str(get("finish_reason")) if get("finish_reason") not in (None, "") else None,
        status_code=status, error=str(error) if error not in (None, "") else None,
        teacher={"model": str(get("model")) if get("model") not in (None, "") else None,
                 "provider": str(get("provider")) if get("provider") not in (None, "") else None,
                 "params": "{}", "logprobs": None},
        usage={"input_tokens": integer(get("input_tokens"), "usage.input_tokens"),
               "output_tokens": integer(get("output_tokens"), "usage.output_tokens")},
        latency_ms=number(get("latency_ms"), "latency_ms"), cost_usd=number(get("cost_usd"), "cost_usd"), feedback=feedback, tags=tags,
    )]


def openai(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    return parse_openai(row, where, cfg.function_field, cfg.feedback_field, cfg.choices, cfg.function)


IMPORTERS = {
    "openai": openai,
    "openai_finetune": openai_finetune,
    "tensorzero": tensorzero,
    "openpipe": openpipe,
    "mapped": mapped,
    # observability and gateway logs: each also has its own test module (tests/harvest/test_import_<name>.py)
    "otel": otel,
    "langfuse": langfuse,
    "litellm": litellm,
    "openai_stored": openai_stored,
}


def has_timestamps(cfg: Source) -> bool:
    """Whether every record of a source carries its own time (else the watermark cannot filter it)."""
    if cfg.format == "openai_finetune":
        return False
    return cfg.format != "mapped" or "timestamp" in cfg.fields
