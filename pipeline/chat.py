"""A canonical record as chat messages: the prompt a student is asked, and the conversation it is trained on.
Train, evaluate, route and export all format records this one way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The input turns of a canonical record as plain chat messages."""
    return [{"role": m["role"], "content": m["content"] or ""} for m in record["messages"]]


def training_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Input turns plus the teacher's output as the final assistant turn."""
    return [*prompt_messages(record), {"role": "assistant", "content": record["output"]["content"] or ""}]


def message_text(m: dict[str, Any]) -> str:
    """A message's text: its content, or the text parts of a content list (other parts, such as images, skipped)."""
    c = m.get("content")
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c or ""


def user_text(messages: Sequence[dict[str, Any]]) -> str:
    """The user turns joined by newlines: what dedup and splits key on (curate's columns.user_texts is the same
    over an Arrow table), and what evaluate's language table and route's language and distance rules look at
    (system prompts are fixed per function and would only dilute them)."""
    return "\n".join(message_text(m) for m in messages if m.get("role") == "user")
