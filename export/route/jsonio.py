"""serve-router's JSON: orjson for speed, the standard library for what orjson refuses or reads otherwise, so
values pass through as they came (integers beyond 64 bits, nesting past orjson's writer, a declared charset); log
lines and responses are strict JSON (NaN and infinities as null); a request that JSON allows but that is not text
and finite numbers, or nests too deep to forward, is refused naming the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

# Every digit to "0", what makes a number a float (. e E) to "f", an opening bracket to "[", anything else to " ":
# then " " and 19 digits in a row may be an integer beyond 64 bits, which orjson would read as a float. A
# fraction's digits follow an "f", so a logprob such as -0.0003353635978884995 (19 digits after the point) stays
# on the fast path.
_DIGITS = bytes(48 if 48 <= i <= 57 else 102 if i in b".eE" else 91 if i in b"[{" else 32 for i in range(256))
_LONG = b" " + b"0" * 19


def loads(data: bytes, charset: str | None = None) -> Any:
    """JSON -> Python with orjson (3x the standard library's speed on a completion with logprobs). What orjson
    refuses or reads otherwise (NaN and Infinity, lone surrogates, nesting over 1,024, an integer beyond 64 bits,
    which it would make a float) is read by the standard library, so values are as before; errors are its
    (ValueError, RecursionError). ``charset``: the body's declared one (UTF-8 when None or unknown)."""
    return _loads(utf8(data, charset))[0]


def utf8(data: bytes, charset: str | None) -> bytes:
    """The body re-encoded as UTF-8 when its Content-Type declares another charset (as aiohttp's ``json()`` read
    it); an unknown charset is taken for UTF-8."""
    if not charset or charset.lower().replace("_", "-") in ("utf-8", "utf8", "us-ascii", "ascii"):
        return data
    try:
        return data.decode(charset).encode("utf-8")
    except LookupError:
        return data


def _loads(data: bytes) -> tuple[Any, bool]:
    """(the value, whether the standard library read it). Strict UTF-8 either way."""
    return _read(data)[:2]


def _read(data: bytes) -> tuple[Any, bool, int]:
    """(the value, whether the standard library read it, how many opening brackets the text has)."""
    marks = data.translate(_DIGITS)  # ~1.5 us per kB
    if _LONG not in marks and not marks.startswith(_LONG[1:]):
        try:
            return orjson.loads(data), False, marks.count(b"[")
        except orjson.JSONDecodeError:
            pass
    return json.loads(data.decode("utf-8")), True, marks.count(b"[")


class NotText(ValueError):
    """A request that JSON's grammar allows but that is not text and numbers: a lone UTF-16 surrogate escape, a
    number beyond a double, NaN or Infinity."""


MAX_DEPTH = 500  # levels of nesting a request may have: forwarding and logging it must not run out of stack


def read_request(raw: bytes, charset: str | None = None) -> Any:
    """A request body, read by ``loads``. Refused with ``NotText`` naming the field: a string with a lone
    surrogate (a client that cut an emoji in half sends one: no tokenizer reads it, nor harvest from the log), a
    number that is not finite (forwarded, it would be null), nesting deeper than ``MAX_DEPTH`` (orjson reads 1,024
    levels; the standard library, which writes what orjson cannot, stops near 1,000 less the stack in use)."""
    body, slow, brackets = _read(utf8(raw, charset))
    where = not_text(body) if slow else None  # orjson refuses all of these: only the slow path can hold them
    if where is None and brackets > MAX_DEPTH and depth(body) > MAX_DEPTH:
        where = f"the body nests {depth(body)} levels deep: at most {MAX_DEPTH}"
    if where is not None:
        raise NotText(where)
    return body


def depth(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (no recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if items is not None:
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in items)
    return deepest


def not_text(value: Any, where: str = "") -> str | None:
    """What in ``value`` is not text or a finite number, and where: a lone surrogate in a string or key, a
    non-finite float; else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return (f"{where or 'the body'} holds a lone UTF-16 surrogate (half of a character, as a client that "
                    f"cut an emoji in two sends): not Unicode text; send whole characters")
    elif isinstance(value, float):
        if value - value != 0:
            return f"{where or 'the body'} is {value!r}: not a finite number (JSON has no NaN or Infinity)"
    elif isinstance(value, dict):
        for k, v in value.items():
            path = f"{where}.{k}" if where else str(k)
            found = not_text(k, f"a key in {where or 'the body'}") or not_text(v, path)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = not_text(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (what orjson writes), for the standard library's fallback. Plain
    loops: a comprehension would cost a second stack frame per level."""
    if isinstance(value, float):
        return value if value - value == 0 else None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k] = _finite(v)
        return out
    if isinstance(value, list | tuple):
        items = []
        for v in value:
            items.append(_finite(v))
        return items
    return value


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Python -> compact UTF-8 JSON with orjson; NaN and infinities are written as null (JSON has neither). What
    orjson refuses (integers over 64 bits, lone surrogates, nesting over 254) is written by the standard library,
    escaped to ASCII (RecursionError near 1,000 levels less the stack in use)."""
    try:
        return orjson.dumps(obj, default=default)
    except (orjson.JSONEncodeError, TypeError):
        pass
    try:
        return json.dumps(obj, default=default, separators=(",", ":"), allow_nan=False).encode("ascii")
    except ValueError:  # NaN or an infinity somewhere
        return json.dumps(_finite(obj), default=default, separators=(",", ":")).encode("ascii")
