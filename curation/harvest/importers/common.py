"""What the importers share: the quarantine error, dotted paths, timestamps, chat messages, stable ids."""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timezone
from typing import Any

import orjson

from pipeline.record import dumps, message

SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop", "n",
                 "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs")


class BadRecord(ValueError):
    """A row that cannot become a record; the message is the quarantine reason (never the row's text)."""


def decode_json_text(v: Any) -> Any:
    """A string holding a JSON object or list, decoded; anything else as it is."""
    if isinstance(v, (str, bytes)) and v[:1] in ("{", "[", b"{", b"["):
        try:
            return orjson.loads(v)
        except orjson.JSONDecodeError:
            return v
    return v


def dotted(obj: Any, path: str) -> Any:
    """Value at a dotted path (``request.metadata.function``), or None. JSON text met on the way is decoded, so
    paths reach into JSON columns of CSV files and SQL tables; a numeric part indexes a list."""
    for part in path.split("."):
        obj = decode_json_text(obj)
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def timestamp(v: Any, where: str = "timestamp") -> datetime:
    """A UTC datetime from ISO 8601 text, epoch seconds / milliseconds / microseconds, or a datetime."""
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=timezone.utc)
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day, tzinfo=timezone.utc)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        x = float(v)
        x = x / 1e6 if x > 1e14 else x / 1e3 if x > 1e11 else x
        try:
            return datetime.fromtimestamp(x, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise BadRecord(f"{where} is out of range") from None
    if isinstance(v, str):
        s = v.strip()
        if s.replace(".", "", 1).isdigit():
            return timestamp(float(s), where)
        try:
            t = datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
        except ValueError:
            raise BadRecord(f"{where} is not ISO 8601") from None
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    if v is None:
        raise BadRecord(f"missing {where}")
    raise BadRecord(f"{where} must be text or a number, got {type(v).__name__}")


def text(content: Any, where: str) -> str | None:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"):
                t = p.get("text")
                if not isinstance(t, str):
                    raise BadRecord(f"{where}.content has a text part whose text is not a string")
                out.append(t)
        return "".join(out)
    raise BadRecord(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")


def chat_message(m: Any, where: str) -> dict[str, Any]:
    """An OpenAI-style chat message to a canonical one."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRecord(f"{where} must be an object with a string 'role'")
    calls = m.get("tool_calls")
    if calls is None and isinstance(m.get("function_call"), dict):  # the legacy single function call
        calls = [{"type": "function", "function": m["function_call"]}]
    if calls is not None and not isinstance(calls, list):
        raise BadRecord(f"{where}.tool_calls must be a list")
    return message(m["role"], text(m.get("content"), where), opt_str(m.get("name")), opt_str(m.get("tool_call_id")),
                   calls)


def chat_messages(msgs: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord(f"{where} must be a non-empty list")
    return [chat_message(m, f"{where}[{i}]") for i, m in enumerate(msgs)]


def json_text(v: Any) -> str | None:
    """A free-form part (tools, response format) as stored: compact JSON text, or None when empty."""
    if v is None or v == [] or v == {}:
        return None
    v = decode_json_text(v)
    return v if isinstance(v, str) else dumps(v)


def content_id(obj: Any) -> str:
    """A stable id for a row that has none: a hash of its content."""
    blob = obj if isinstance(obj, bytes) else orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                                                           default=str)
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def metrics(fb: Any) -> dict[str, float]:
    """An object of metric -> value, numbers and booleans only (free text is not a metric)."""
    out: dict[str, float] = {}
    if isinstance(fb, dict):
        for k, v in fb.items():
            if isinstance(v, (bool, int, float)):
                out[str(k)] = float(v)
    return out


def string_tags(d: Any, skip: tuple[str, ...] = ()) -> dict[str, str]:
    if not isinstance(d, dict):
        return {}
    return {str(k): v if isinstance(v, str) else dumps(v) for k, v in d.items() if k not in skip and v is not None}


def opt_str(v: Any) -> str | None:
    """A string field as text: numbers become text, anything else that is not text is dropped."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def integer(v: Any) -> int | None:
    if type(v) is int:
        return v if abs(v) < 2**62 else None
    x = number(v)
    return int(x) if x is not None and x == x and abs(x) < 2**62 else None


def new_record(rid: str, source: str, ts: datetime, function: str, messages: list[dict[str, Any]],
               **fields: Any) -> dict[str, Any]:
    """A canonical record with every field present (nulls and empty maps where the row says nothing)."""
    rec = {
        "id": rid, "source": source, "timestamp": ts, "function": function, "episode_id": None,
        "messages": messages, "tools": None, "response_format": None, "output": None, "finish_reason": None,
        "status_code": None, "error": None,
        "teacher": {"model": None, "provider": None, "params": None, "logprobs": None},
        "usage": {"input_tokens": None, "output_tokens": None}, "latency_ms": None, "cost_usd": None,
        "feedback": {}, "tags": {}, "split": None,
    }
    rec.update(fields)
    return rec
