"""The canonical record: one logged teacher call. Importers map each log format to it; everything
downstream reads only this.

Records are plain dicts in Python and rows of ``RECORD_SCHEMA`` in Parquet. Free-form JSON parts
(tool calls, tools, sampling parameters, response format) are kept as JSON strings so that the Arrow
schema is stable whatever the logs hold.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

MESSAGE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("name", pa.string()),
        ("tool_call_id", pa.string()),
        ("tool_calls", pa.string()),  # JSON list, or null
    ]
)

# One generated token with the teacher's top-k alternatives (OpenAI's ``logprobs.content`` shape). Kept when
# the logs or a re-generation hold them, for sparse logit distillation.
TOP_LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float32())])
TOKEN_LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float32()), ("top", pa.list_(TOP_LOGPROB))])

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


def message(role: str, content: str | None, name=None, tool_call_id=None, tool_calls=None) -> dict[str, Any]:
    """A canonical chat message."""
    return {
        "role": role,
        "content": content,
        "name": name,
        "tool_call_id": tool_call_id,
        "tool_calls": json.dumps(tool_calls, sort_keys=True) if tool_calls else None,
    }


def to_table(records: list[dict[str, Any]]) -> pa.Table:
    """Records (dicts) to an Arrow table with the canonical schema; maps are given as dicts."""
    rows = []
    for r in records:
        row = dict(r)
        for key in ("feedback", "tags"):
            v = row.get(key)
            row[key] = list(v.items()) if isinstance(v, dict) else v
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def from_table(table: pa.Table) -> list[dict[str, Any]]:
    """Arrow rows back to record dicts; maps become dicts."""
    out = table.to_pylist()
    for r in out:
        for key in ("feedback", "tags"):
            if key in r and r[key] is not None:
                r[key] = dict(r[key])
    return out


def user_text(record: dict[str, Any]) -> str:
    """The user turns of a record joined with newlines (what dedup and splits key on)."""
    return "\n".join(m["content"] or "" for m in record["messages"] if m["role"] == "user")


def input_key(record: dict[str, Any]) -> str:
    """Stable key of a record's input: function plus normalised user turns."""
    normalised = " ".join(user_text(record).split()).lower()
    return hashlib.sha256(f"{record['function']}\x00{normalised}".encode()).hexdigest()
