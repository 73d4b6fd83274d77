"""Builders for curate tests: canonical records, Arrow batches, plans, and the compact table the global half
of the chain reads."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from curation.curate.chain import input_key, uid
from curation.curate.filters import Plan, plan_for
from curation.curate.index import REDUCE_SCHEMA
from pipeline.config.curate import CurateConfig
from pipeline.record import message, to_table

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def rec(i: int, user: str = "hello", out: str | None = "hi", function: str = "f", system: str | None = None,
        **kw: Any) -> dict[str, Any]:
    """A canonical record; keyword arguments override fields."""
    messages = ([message("system", system)] if system else []) + [message("user", user)]
    base = {
        "id": f"r{i}", "source": f"x.jsonl:{i}", "timestamp": T0 + timedelta(seconds=i), "function": function,
        "messages": messages, "output": message("assistant", out) if out is not None else None,
        "finish_reason": "stop", "status_code": 200, "error": None, "feedback": {}, "tags": {},
        "teacher": {"model": "gpt-4o", "provider": "openai", "params": "{}", "logprobs": None},
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    return {**base, **kw}


def batch(*records: dict[str, Any]) -> pa.Table:
    return to_table(list(records))


def plan(**cfg: Any) -> Plan:
    return plan_for(CurateConfig(**cfg))


def reduce_table(rows: list[dict[str, Any]], split: str = "train") -> pa.Table:
    """The global half's input: rows with id, user text and optional function, split, score."""
    out = []
    for i, r in enumerate(rows):
        function = r.get("function", "f")
        text = r["text"]
        rid = r.get("id", f"r{i}")
        out.append({"uid": uid(rid, f"s:{i}"), "id": rid, "source": f"s:{i}", "function": function,
                    "split": r.get("split", split), "key": int(input_key(function, text)[:16], 16), "text": text,
                    "score": float(r.get("score", 0.0)), "timestamp": T0 + timedelta(seconds=i), "emb": None})
    return pa.Table.from_pylist(out, schema=REDUCE_SCHEMA)


def alive(n: int) -> np.ndarray:
    return np.ones(n, dtype=bool)


def openai_line(rid: str, user: str, output: str, *, ts: str = "2026-11-23T12:00:00Z", status: int = 200,
                system: str | None = None, function: str = "ticket_triage", metadata: dict | None = None,
                error: str | None = None, tool_calls: list | None = None, feedback: dict | None = None) -> str:
    """One chat-completions log line in the format the harvest stage reads."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    request = {"model": "gpt-4o", "messages": messages, "metadata": {"function": function, **(metadata or {})}}
    line: dict[str, Any] = {"id": rid, "timestamp": ts, "status_code": status, "latency_ms": 500, "request": request}
    if status >= 400:
        line["response"] = {"error": {"message": error or "server error", "type": "server_error"}}
    else:
        msg: dict[str, Any] = {"role": "assistant", "content": output}
        if tool_calls:
            msg["tool_calls"] = tool_calls
        line["response"] = {"model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "message": msg,
                                                                        "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 20, "completion_tokens": 10}}
    if feedback:
        line["feedback"] = feedback
    return json.dumps(line)
