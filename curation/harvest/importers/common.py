"""What the importers share: the quarantine error, dotted paths, timestamps, chat messages, stable ids."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date, datetime, timezone
from typing import Any

import orjson

from pipeline.record import dumps, message

SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop", "n",
                 "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs")


class BadRecord(ValueError):
    """A row that cannot become a record; the message is the quarantine reason (never the row's text)."""


# --- reading JSON text: the fast parser first, the lenient fallback only where it fails -----------------------------

BOM = b"\xef\xbb\xbf"
LENIENT = "control characters in strings"  # the tag lenient_json's value, and the summary's note
_CONTROL = re.compile(rb"[\x00-\x1f]")


class Parsed(dict):
    """A row already parsed from a JSON document (not a CSV or SQL row whose JSON text columns need decoding)."""


class Lenient(Parsed):
    """A row read leniently: its JSON held raw control characters inside strings (invalid JSON, common in real
    logs). Harvest tags its records ``lenient_json`` and counts them."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def invalid_json(err: Exception) -> BadRecord:
    """The quarantine reason for JSON text that cannot be read (the parser's message without the position)."""
    text = str(err)
    return BadRecord(f"invalid JSON: {text.split(':')[0] if 'utf-8' not in text.lower() else 'not valid UTF-8'}")


def loads_fallback(raw: bytes, err: Exception) -> tuple[Any, bool]:
    """Read JSON text that orjson refused: (value, read leniently); else raises BadRecord with the reason.

    A UTF-8 byte order mark in front is dropped. Raw control characters inside strings (a tab, a stray \\x01) are
    read with ``json.loads(strict=False)``; what that reads must still be what orjson could write (no lone
    surrogates, integers within 64 bits), and NaN / Infinity stay refused. Only the failure path pays for this."""
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
        try:
            return orjson.loads(raw), False
        except orjson.JSONDecodeError as e:
            err = e
    if _CONTROL.search(raw):
        try:
            value = json.loads(raw.decode("utf-8"), strict=False, parse_constant=_no_constant)
            orjson.dumps(value)
        except (ValueError, TypeError, RecursionError, orjson.JSONEncodeError):
            pass
        else:
            return value, True
    raise invalid_json(err)


def loads_row(raw: bytes, err: Exception) -> Any:
    """One JSON line that orjson refused, read by ``loads_fallback``: a lenient object comes back as ``Lenient``."""
    value, lenient = loads_fallback(raw, err)
    return Lenient(value) if lenient and isinstance(value, dict) else value


# --- image parts ---------------------------------------------------------------------------------------------------
# The canonical record keeps message content as text (pipeline/record.py), so an image part cannot be kept there.
# The importers count the image parts they meet here instead; harvest tags the row's records ``has_images`` with
# the number and counts them per source, so that no image vanishes silently.

IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
IMAGE_PARTS = [0]  # image parts met in the row being imported (reset by harvest before each row)


def is_image(part: dict[str, Any]) -> bool:
    """An image content part: OpenAI ``image_url`` / ``input_image``, an ``image`` block, a file of type image/*."""
    kind = part.get("type")
    if not isinstance(kind, str):
        return False
    if kind in IMAGE_TYPES:
        return True
    if kind == "file":
        f = part.get("file")
        mime = part.get("mime_type") or (f.get("mime_type") if isinstance(f, dict) else None)
        return isinstance(mime, str) and mime.startswith("image/")
    return False


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
            elif isinstance(p, dict) and is_image(p):
                IMAGE_PARTS[0] += 1
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


# --- documents holding many calls (an OTLP export, a list page) ------------------------------------------------------

def failed_item(rid: str, source: str, ts: datetime, function: str, reason: str, **fields: Any) -> dict[str, Any]:
    """A call inside a many-call row that cannot be imported while its neighbours can: kept as a failed record (no
    output, ``error`` = the reason, tag ``import_error``) so that curate's http_error step drops it with the reason
    rather than the row's good calls being quarantined with it."""
    return new_record(rid, source, ts, function, [], error=f"not imported: {reason}",
                      tags={"import_error": reason}, **fields)


def many(items: list[Any], convert: Any, source: str, function: str, default_ts: datetime,
         what: str) -> list[dict[str, Any]]:
    """The records of every item of a many-call row (``convert(item, index)``). Row counting: the row is one row;
    its first record counts for it and the rest as extra records. No good item: the row is quarantined with the
    first item's reason; some bad items among good ones: each becomes a ``failed_item``."""
    records: list[dict[str, Any]] = []
    failed: list[tuple[int, Any, BadRecord]] = []
    for i, item in enumerate(items):
        try:
            records.extend(convert(item, i))
        except BadRecord as err:
            failed.append((i, item, err))
    if not records:
        if not failed:
            raise BadRecord(f"{what} is empty: no calls in the row")
        i, _, err = failed[0]
        more = f" (and {len(failed) - 1} more items)" if len(failed) > 1 else ""
        raise BadRecord(f"{what}[{i}]: {err}{more}")
    for i, item, err in failed:
        rid = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"] else None
        records.append(failed_item(rid or f"{content_id(item)}#{what}{i}", source, default_ts, function,
                                   f"{what}[{i}]: {err}"))
    return records
