"""The canonical record: one logged teacher call. Importers map each log format to it; everything
downstream reads only this.

Records are plain dicts in Python and rows of ``RECORD_SCHEMA`` in Parquet. Free-form JSON parts
(tool calls, tools, sampling parameters, response format) are kept as JSON strings so that the Arrow
schema is stable whatever the logs hold.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import accumulate, chain
from typing import Any

import orjson
import pyarrow as pa

MESSAGE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("name", pa.string()),
        ("tool_call_id", pa.string()),
        ("tool_calls", pa.string()),  # JSON list, or null
        # Image parts of the message, in order, as logged: an image URL, a data URI, or a reference such as
        # ``file_id:<id>`` / ``storage:<path>``; null when it has none. ``content`` keeps the text parts only.
        ("images", pa.list_(pa.string())),
    ]
)

# One generated token with the teacher's top-k alternatives (OpenAI's ``logprobs.content`` shape). Kept when
# the logs or a re-generation hold them, for sparse logit distillation (across tokenizers, lined up by bytes).
# Compact: logprobs as float16 (3 significant digits, plenty for a distillation target), and a token's UTF-8
# ``bytes`` only where its text does not spell them (a token that ends inside a character); else null.
TOP_LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float16()), ("bytes", pa.binary())])
TOKEN_LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float16()), ("bytes", pa.binary()),
                           ("top", pa.list_(TOP_LOGPROB))])

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),  # "<file>:<line>" or "<table>:<row>": where the record came from
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("function", pa.string()),
        ("episode_id", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("tools", pa.string()),  # JSON list, or null
        ("response_format", pa.string()),  # JSON object, or null
        ("output", MESSAGE),
        ("finish_reason", pa.string()),
        ("status_code", pa.int32()),
        ("error", pa.string()),
        (
            "teacher",
            pa.struct([("model", pa.string()), ("provider", pa.string()), ("params", pa.string()),
                       ("logprobs", pa.list_(TOKEN_LOGPROB))]),
        ),
        ("usage", pa.struct([("input_tokens", pa.int64()), ("output_tokens", pa.int64())])),
        ("latency_ms", pa.float64()),
        ("cost_usd", pa.float64()),
        ("feedback", pa.map_(pa.string(), pa.float64())),
        ("tags", pa.map_(pa.string(), pa.string())),
        ("split", pa.string()),
    ]
)


def dumps(obj: Any) -> str:
    """Compact JSON with sorted keys: how free-form parts (tool calls, tools, parameters) are stored."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()


def message(role: str, content: str | None, name=None, tool_call_id=None, tool_calls=None,
            images: list[str] | None = None) -> dict[str, Any]:
    """A canonical chat message (``images``: its image parts, see MESSAGE)."""
    return {
        "role": role,
        "content": content,
        "name": name,
        "tool_call_id": tool_call_id,
        "tool_calls": dumps(tool_calls) if tool_calls else None,
        "images": list(images) if images else None,
    }


# A record as a flat row (what the fast importers produce and the Arrow builder reads): the fields in schema order,
# with messages as (role, content, name, tool_call_id, tool_calls, images) tuples, output likewise (or None), teacher as
# (model, provider, params, logprobs), usage as (input_tokens, output_tokens), maps as dicts, and the timestamp as
# milliseconds since the epoch.
ROW_FIELDS = tuple(f.name for f in RECORD_SCHEMA)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)


def epoch_ms(ts: Any) -> int | None:
    """Milliseconds since the epoch (naive times are UTC), as Arrow stores the record timestamp; a datetime, or
    anything Arrow takes as a timestamp (numpy datetime64, pandas Timestamp)."""
    if ts is None:
        return None
    if isinstance(ts, datetime):
        return ((ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)) - _EPOCH) // _ONE_MS
    return pa.scalar(ts).cast(RECORD_SCHEMA.field("timestamp").type).value


def _msg(m: dict[str, Any]) -> tuple:
    return (m.get("role"), m.get("content"), m.get("name"), m.get("tool_call_id"), m.get("tool_calls"), m.get("images"))


def record_row(r: dict[str, Any]) -> tuple:
    """A record dict as a flat row (see ROW_FIELDS)."""
    ms = r.get("messages")
    out = r.get("output")
    t = r.get("teacher")
    u = r.get("usage")
    ts = r.get("timestamp")
    return (
        r.get("id"), r.get("source"), ts if isinstance(ts, int) else epoch_ms(ts), r.get("function"),
        r.get("episode_id"), None if ms is None else [_msg(m) for m in ms], r.get("tools"),
        r.get("response_format"), None if out is None else _msg(out), r.get("finish_reason"), r.get("status_code"),
        r.get("error"),
        None if t is None else (t.get("model"), t.get("provider"), t.get("params"), t.get("logprobs")),
        None if u is None else (u.get("input_tokens"), u.get("output_tokens")),
        r.get("latency_ms"), r.get("cost_usd"), r.get("feedback"), r.get("tags"), r.get("split"),
    )


def _mask(values: Any) -> pa.Array | None:
    if None not in values:
        return None
    return pa.array([v is None for v in values], pa.bool_())


def _column(values: tuple, type_: pa.DataType) -> pa.Array:
    if pa.types.is_list(type_) and values.count(None) == len(values):  # all null, the usual case for lists (images,
        return pa.nulls(len(values), type_)  # logprobs): Arrow's conversion of Python lists is slow even for nulls
    return pa.array(values, type_)


def _struct(values: tuple, type_: pa.StructType, width: int) -> pa.Array:
    mask = _mask(values)
    if mask is not None:
        empty = (None,) * width
        values = tuple(v or empty for v in values)
    cols = list(zip(*values, strict=True)) if values else [()] * width
    return pa.StructArray.from_arrays([_column(c, f.type) for c, f in zip(cols, type_, strict=True)],
                                      fields=list(type_), mask=mask)


def _offsets(values: tuple) -> pa.Array:
    lengths = map(len, values) if None not in values else (len(v) if v else 0 for v in values)
    return pa.array(list(accumulate(lengths, initial=0)), pa.int32())


def _messages(values: tuple) -> pa.Array:
    mask = _mask(values)
    flat = tuple(chain.from_iterable(v for v in values if v) if mask is not None else chain.from_iterable(values))
    return pa.ListArray.from_arrays(_offsets(values), _struct(flat, MESSAGE, MESSAGE.num_fields), mask=mask)


def _map(values: tuple, type_: pa.MapType) -> pa.Array:
    mask = _mask(values)
    present = [v for v in values if v] if mask is not None else values
    if all(type(v) is dict for v in present):  # the usual case, gathered at C speed
        keys = list(chain.from_iterable(present))
        items = list(chain.from_iterable(map(dict.values, present)))
    else:
        keys = [k for v in present for k in (v if isinstance(v, dict) else (kv[0] for kv in v))]
        items = [x for v in present for x in (v.values() if isinstance(v, dict) else (kv[1] for kv in v))]
    return pa.MapArray.from_arrays(_offsets(values), pa.array(keys, type_.key_type), pa.array(items, type_.item_type),
                                   mask=mask)


def rows_to_table(rows: list[tuple]) -> pa.Table:
    """Flat rows (see ROW_FIELDS) to an Arrow table with the canonical schema, column by column."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(ROW_FIELDS)
    arrays = []
    for f, col in zip(RECORD_SCHEMA, cols, strict=True):
        if f.name == "messages":
            arrays.append(_messages(col))
        elif f.name == "output":
            arrays.append(_struct(col, MESSAGE, MESSAGE.num_fields))
        elif f.name in ("teacher", "usage"):
            arrays.append(_struct(col, f.type, f.type.num_fields))
        elif f.name in ("feedback", "tags"):
            arrays.append(_map(col, f.type))
        else:
            arrays.append(pa.array(col, f.type))
    return pa.Table.from_arrays(arrays, schema=RECORD_SCHEMA)


def to_table(records: list[dict[str, Any]]) -> pa.Table:
    """Records (dicts) to an Arrow table with the canonical schema. Maps are given as dicts (or lists of pairs);
    missing keys are nulls; extra keys are ignored."""
    return rows_to_table([record_row(r) for r in records])


def from_table(table: pa.Table) -> list[dict[str, Any]]:
    """Arrow rows back to record dicts; maps become dicts. Files written before a field was added (a message's
    ``images``) read as they are: the field is simply absent from their dicts."""
    out = table.to_pylist()
    for r in out:
        for key in ("feedback", "tags"):
            if key in r and r[key] is not None:
                r[key] = dict(r[key])
    return out
