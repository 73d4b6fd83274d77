"""Importer: OpenAI chat-completions request/response logs (one JSON object per line) -> canonical records.

A line holds ``request`` (the body sent to /v1/chat/completions), ``response`` (the body received, or an
``error`` object), and optionally ``id``, ``timestamp``, ``status_code``, ``latency_ms`` and ``feedback``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from pipeline.record import message

SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop", "n",
                 "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs")


class BadRecord(ValueError):
    """A log line that cannot become a record; the message is the quarantine reason."""


def dotted(obj: Any, path: str) -> Any:
    """Value at a dotted path (``request.metadata.function``), or None."""
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise BadRecord(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRecord(f"{where} must be an object with a string 'role'")
    return message(m["role"], _text(m.get("content"), where), m.get("name"), m.get("tool_call_id"),
                   m.get("tool_calls"))


def _timestamp(v: Any) -> datetime:
    if isinstance(v, (int, float)):
        return datetime.fromtimestamp(v / 1000 if v > 1e11 else v, tz=timezone.utc)
    if isinstance(v, str):
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise BadRecord(f"timestamp {v!r} is not ISO 8601") from None
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    raise BadRecord("missing timestamp")


def parse_line(
    line: dict[str, Any], source: str, function_field: str = "request.metadata.function",
    feedback_field: str = "feedback",
) -> dict[str, Any]:
    """One parsed log line to a canonical record; raises BadRecord with the reason."""
    if not isinstance(line, dict):
        raise BadRecord(f"line is a JSON {type(line).__name__}, not an object")
    req = line.get("request")
    if not isinstance(req, dict):
        raise BadRecord("no 'request' object")
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord("request.messages must be a non-empty list")
    messages = [_message(m, f"request.messages[{i}]") for i, m in enumerate(msgs)]
    resp = line.get("response") if isinstance(line.get("response"), dict) else {}
    status = line.get("status_code")
    if status is None:
        status = 200 if resp.get("choices") else (500 if resp.get("error") else None)
    output, finish, error = None, None, None
    if isinstance(resp.get("error"), dict):
        error = str(resp["error"].get("message") or resp["error"].get("type") or "error")
    choices = resp.get("choices")
    if isinstance(choices, list) and choices:
        first = choices[0]
        if not isinstance(first, dict) or not isinstance(first.get("message"), dict):
            raise BadRecord("response.choices[0].message must be an object")
        output = _message(first["message"], "response.choices[0].message")
        finish = first.get("finish_reason")
    elif error is None and (status or 0) < 400:
        raise BadRecord("response has neither choices nor an error")
    usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
    metadata = req.get("metadata") if isinstance(req.get("metadata"), dict) else {}
    function = dotted(line, function_field) or "default"
    fb = dotted(line, feedback_field)
    feedback = {}
    if isinstance(fb, dict):
        for k, v in fb.items():
            if isinstance(v, (bool, int, float)):
                feedback[str(k)] = float(v)
    raw_id = line.get("id") or resp.get("id")
    rid = str(raw_id) if raw_id else hashlib.sha256(json.dumps(line, sort_keys=True).encode()).hexdigest()[:24]
    latency = line.get("latency_ms")
    return {
        "id": rid,
        "source": source,
        "timestamp": _timestamp(line.get("timestamp") if line.get("timestamp") is not None else resp.get("created")),
        "function": str(function),
        "episode_id": metadata.get("episode_id"),
        "messages": messages,
        "tools": json.dumps(req["tools"], sort_keys=True) if req.get("tools") else None,
        "response_format": json.dumps(req["response_format"], sort_keys=True) if req.get("response_format") else None,
        "output": output,
        "finish_reason": finish,
        "status_code": int(status) if status is not None else None,
        "error": error,
        "teacher": {
            "model": resp.get("model") or req.get("model"),
            "provider": "openai",
            "params": json.dumps({k: req[k] for k in SAMPLING_KEYS if k in req}, sort_keys=True),
        },
        "usage": {"input_tokens": usage.get("prompt_tokens"), "output_tokens": usage.get("completion_tokens")},
        "latency_ms": float(latency) if isinstance(latency, (int, float)) else None,
        "cost_usd": None,
        "feedback": feedback,
        "tags": {str(k): str(v) for k, v in metadata.items() if k != "function" and v is not None},
        "split": None,
    }
