"""What the importers share: the quarantine error, dotted paths, timestamps, chat messages, stable ids."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from datetime import date, datetime, timezone
from typing import Any

import orjson

from pipeline.record import dumps, message

SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop", "n",
                 "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs")


class BadRecord(ValueError):
    """A row that cannot become a record; the message is the quarantine reason (never the row's text)."""


class NotACall(Exception):
    """A row that is whole but holds no teacher call, on purpose (a student's answer or a record serve-router
    keeps beside its calls): counted under ``kind`` in the harvest summary, not quarantined."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


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
# Image parts are kept in the canonical messages (a message's ``images``: the URL or data URI as logged, or a
# reference to where the image is stored); ``content`` keeps the text. The importers also count the image parts
# they meet here; harvest tags the row's records ``has_images`` with the number and counts them per source, and
# curate drops records with images for a text-only student (curate.drop_images), with the reason.

IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
IMAGE_PARTS = [0]  # image parts met in the row being imported (reset by harvest before each row)
NO_REFERENCE = "unreferenced:"  # an image part that names no URL, data, file or stored path


def is_image(part: dict[str, Any]) -> bool:
    """An image content part: OpenAI ``image_url`` / ``input_image``, an ``image`` block, a file of type image/*,
    an OpenTelemetry blob / uri / file part of modality image."""
    kind = part.get("type")
    if not isinstance(kind, str):
        return False
    if kind in IMAGE_TYPES:
        return True
    if kind in ("blob", "uri", "file") and part.get("modality") == "image":
        return True
    if kind == "file":
        f = part.get("file")
        mime = part.get("mime_type") or (f.get("mime_type") if isinstance(f, dict) else None)
        return isinstance(mime, str) and mime.startswith("image/")
    return False


def image_ref(part: dict[str, Any]) -> str:
    """What an image part points at, as logged: its URL or data URI (base64 data becomes a data URI); else
    ``file_id:<id>`` (an uploaded file) or ``storage:<path>`` (TensorZero's object store); else ``unreferenced:``."""
    for holder in (part, part.get("image_url"), part.get("image"), part.get("file"), part.get("source")):
        if isinstance(holder, str) and holder and holder is not part:
            return holder
        if not isinstance(holder, dict):
            continue
        for key in ("url", "uri", "image_url", "file_data"):
            v = holder.get(key)
            if isinstance(v, str) and v:
                return v
        data = holder.get("data") if holder is not part or part.get("type") != "blob" else part.get("content")
        if isinstance(data, str) and data:
            mime = holder.get("mime_type") or holder.get("media_type") or "image/*"
            return data if data.startswith("data:") else f"data:{mime};base64,{data}"
        if isinstance(holder.get("file_id"), str) and holder["file_id"]:
            return f"file_id:{holder['file_id']}"
    sp = part.get("storage_path")
    if isinstance(sp, dict) and isinstance(sp.get("path"), str) and sp["path"]:
        return f"storage:{sp['path']}"
    return NO_REFERENCE


# --- values coerced or dropped ---------------------------------------------------------------------------------------
# A value the record cannot hold as logged -- a latency, cost or token count that is not a number, tags or feedback
# that are not a map, a feedback value that is not a number, a fractional token count -- is dropped (or truncated),
# never silently: the helpers below count it here per record field when the caller names the field. Harvest moves
# the counts of each imported row into its chunk's notes ("coerced:<field>"), and the summary and the manifest show
# them per field; the counts of a row that is then quarantined are discarded with it.

COERCED: Counter[str] = Counter()


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


def content_parts(content: Any, where: str) -> tuple[str | None, list[str] | None]:
    """Message content as (text, image parts): a string, or the text parts of a list of content parts, and the
    references of its image parts (``image_ref``; None when there are none)."""
    if content is None or isinstance(content, str):
        return content, None
    if isinstance(content, list):
        out, images = [], []
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
                images.append(image_ref(p))
        return "".join(out), images or None
    raise BadRecord(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")


def text(content: Any, where: str) -> str | None:
    """Message content as text: a string, or the text parts of a list of content parts (image parts counted)."""
    return content_parts(content, where)[0]


def chat_message(m: Any, where: str) -> dict[str, Any]:
    """An OpenAI-style chat message to a canonical one."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRecord(f"{where} must be an object with a string 'role'")
    calls = m.get("tool_calls")
    if calls is None and isinstance(m.get("function_call"), dict):  # the legacy single function call
        calls = [{"type": "function", "function": m["function_call"]}]
    if calls is not None and not isinstance(calls, list):
        raise BadRecord(f"{where}.tool_calls must be a list")
    content, images = content_parts(m.get("content"), where)
    return message(m["role"], content, opt_str(m.get("name")), opt_str(m.get("tool_call_id")), calls, images)


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


def metrics(fb: Any, field: str | None = None) -> dict[str, float]:
    """An object of metric -> value, numbers and booleans only (free text is not a metric). With ``field``, a
    value dropped (not a number, or the whole value not an object) is counted in COERCED."""
    out: dict[str, float] = {}
    if isinstance(fb, dict):
        for k, v in fb.items():
            if isinstance(v, (bool, int, float)):
                out[str(k)] = float(v)
            elif field is not None and v is not None:
                COERCED[field] += 1
    elif field is not None and fb is not None:
        COERCED[field] += 1
    return out


def string_tags(d: Any, skip: tuple[str, ...] = (), field: str | None = None) -> dict[str, str]:
    """An object as string tags (values that are not text as JSON text). With ``field``, a value that is not an
    object is counted in COERCED (dropped)."""
    if not isinstance(d, dict):
        if field is not None and d is not None:
            COERCED[field] += 1
        return {}
    return {str(k): v if isinstance(v, str) else dumps(v) for k, v in d.items() if k not in skip and v is not None}


def opt_str(v: Any) -> str | None:
    """A string field as text: numbers become text, anything else that is not text is dropped."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def number(v: Any, field: str | None = None) -> float | None:
    """A number, or a number written as text; else None. With ``field``, a value dropped (present but not a
    number: a boolean, an object, text that is not a number) is counted in COERCED."""
    if isinstance(v, bool):
        x = None
    elif isinstance(v, (int, float)):
        return float(v)
    elif isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            x = None
    else:
        x = None
    if field is not None and v is not None and not (isinstance(v, str) and not v.strip()):
        COERCED[field] += 1
    return x


def integer(v: Any, field: str | None = None) -> int | None:
    """An integer (within 62 bits), or a number truncated to one; else None. With ``field``, a value dropped or
    truncated (a fractional count, NaN, out of range) is counted in COERCED."""
    if type(v) is int:
        if abs(v) < 2**62:
            return v
        x = None
    else:
        x = number(v, field)
        if x is None:
            return None
    out = int(x) if x is not None and x == x and abs(x) < 2**62 else None
    if field is not None and (out is None or out != x):
        COERCED[field] += 1
    return out


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
