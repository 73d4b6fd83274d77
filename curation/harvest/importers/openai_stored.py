"""Importer: OpenAI stored chat completions (``store: true``) -> canonical records.

The list API (``GET /v1/chat/completions``) gives ``chat.completion`` objects with their ``metadata`` but not the
input messages, which come from ``GET /v1/chat/completions/{id}/messages``. A row is one stored completion that
carries its input as ``messages`` -- a list of messages, or that endpoint's list object ``{"data": [...]}`` (its
``content_parts`` are read where set) -- as a JSON export joins them. A list page ``{"object": "list", "data":
[...]}`` is one row whose completions each give records. A completion without its input messages is quarantined
("no input messages"): fetch them and join them in. The completion's request-side fields (``temperature``,
``top_p``, ``seed``, ``tools``, ...) are kept where the export has them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from curation.harvest.importers.common import (
    COERCED,
    SAMPLING_KEYS,
    BadRecord,
    decode_json_text,
    dotted,
    many,
    string_tags,
)
from curation.harvest.importers.openai import from_call
from pipeline.config.harvest import Source

NO_INPUT = ("stored completion has no input messages: the list API leaves them out; fetch them from "
            "GET /v1/chat/completions/{id}/messages and put them in 'messages'")


def _input(v: Any) -> list[dict[str, Any]]:
    v = decode_json_text(v)
    if isinstance(v, dict) and isinstance(v.get("data"), list):  # the /messages list object
        v = v["data"]
    if v in (None, []):
        raise BadRecord(NO_INPUT)
    if not isinstance(v, list):
        raise BadRecord("messages must be a list of messages or the /messages list object")
    out = []
    for m in v:
        if isinstance(m, dict):
            m = {k: x for k, x in m.items() if k not in ("id", "content_parts")} | (
                {"content": m["content_parts"]} if isinstance(m.get("content_parts"), list) else {})
        out.append(m)
    return out


def _completion(item: Any, where: str, cfg: Source) -> list[dict[str, Any]]:
    if not isinstance(item, dict):
        raise BadRecord(f"a stored completion is a JSON {type(item).__name__}, not an object")
    if item.get("object") not in (None, "chat.completion"):
        raise BadRecord(f"object '{str(item.get('object'))[:40]}' is not a chat.completion")
    if "choices" not in item:
        raise BadRecord("a stored completion has no 'choices'")
    meta = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
    if item.get("metadata") is not None and not isinstance(item["metadata"], dict):
        COERCED["tags"] += 1  # metadata that is not an object: no tags from it
    request = {k: item[k] for k in (*SAMPLING_KEYS, "tools", "response_format") if item.get(k) is not None}
    request["messages"] = _input(item.get("messages"))
    request["model"] = item.get("model")
    request["metadata"] = meta
    tags = string_tags(meta, skip=("function",))
    for key in ("request_id", "service_tier", "system_fingerprint"):
        if isinstance(item.get(key), str) and item[key]:
            tags[key] = item[key]
    fn = cfg.function or dotted(item, cfg.function_field or "metadata.function")
    return from_call(request, item, rid=item.get("id"), source=where, ts=item.get("created"), tags=tags,
                     function=fn, choices=cfg.choices, provider="openai")


def openai_stored(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """One stored completion with its messages, or a list page of them -> one record per choice."""
    if not isinstance(row, dict):
        raise BadRecord(f"row is a JSON {type(row).__name__}, not an object")
    if row.get("object") == "list" and isinstance(row.get("data"), list):
        return many(row["data"], lambda item, _i: _completion(item, where, cfg), where, cfg.function or "default",
                    default_ts, "data")
    return _completion(row, where, cfg)
