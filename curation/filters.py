"""Curation operators. Each takes a batch of canonical records and returns the batch (possibly
rewritten, e.g. redacted) and, per record, ``None`` to keep it or the reason it is dropped.

The chain in ``curation.curate`` applies them in order and keeps an audit of every drop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pipeline.config.curate import CurateConfig
from pipeline.record import input_key

Records = list[dict[str, Any]]
Operator = Callable[[Records, CurateConfig], tuple[Records, list[str | None]]]

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PHONE = re.compile(r"(?<![\w+])(?:\+?\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}(?!\w)")
PII_PATTERNS = {"email": (EMAIL, "<EMAIL>"), "phone": (PHONE, "<PHONE>")}
REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|')t (help|assist)|i cannot (help|assist)|"
    r"i'?m (not able|unable) to|i am (not able|unable) to|as an ai\b)",
    re.IGNORECASE,
)


def _content(msg: dict[str, Any] | None) -> str:
    return (msg or {}).get("content") or ""


def redact_text(text: str) -> tuple[str, list[str]]:
    """Text with PII replaced by placeholders, and the kinds found."""
    found = []
    for kind, (pattern, placeholder) in PII_PATTERNS.items():
        text, n = pattern.subn(placeholder, text)
        if n:
            found.append(kind)
    return text, found


def pii(batch: Records, cfg: CurateConfig) -> tuple[Records, list[str | None]]:
    """Redact e-mail addresses and phone numbers everywhere; with pii='drop', also drop those records.

    Redaction happens even for dropped records so that no PII reaches rejected.parquet either.
    """
    reasons: list[str | None] = []
    if cfg.pii == "keep":
        return batch, [None] * len(batch)
    for r in batch:
        kinds: set[str] = set()
        for m in [*r["messages"], r["output"]]:
            if m and m.get("content"):
                m["content"], found = redact_text(m["content"])
                kinds.update(found)
        reasons.append(f"contains {', '.join(sorted(kinds))}" if kinds and cfg.pii == "drop" else None)
        if kinds:
            r["tags"] = {**(r.get("tags") or {}), "pii_redacted": ",".join(sorted(kinds))}
    return batch, reasons


def http_error(batch: Records, cfg: CurateConfig) -> tuple[Records, list[str | None]]:
    """Drop calls that failed: HTTP status >= 400, an error body, or no output at all."""
    out: list[str | None] = []
    for r in batch:
        status = r.get("status_code") or 200
        if status >= 400 or r.get("error"):
            out.append(f"HTTP {status}: {r.get('error') or 'error'}")
        elif r.get("output") is None:
            out.append("no output in the response")
        else:
            out.append(None)
    return batch, out


def empty_output(batch: Records, cfg: CurateConfig) -> tuple[Records, list[str | None]]:
    """Drop teacher outputs that are empty (no text and no tool calls)."""
    return batch, [
        "empty output" if not _content(r["output"]).strip() and not (r["output"] or {}).get("tool_calls") else None
        for r in batch
    ]


def truncated_output(batch: Records, cfg: CurateConfig) -> tuple[Records, list[str | None]]:
    """Drop outputs the teacher stopped because of its length limit."""
    return batch, ["output cut off (finish_reason=length)" if r.get("finish_reason") == "length" else None
                   for r in batch]


def refusal(batch: Records, cfg: CurateConfig) -> tuple[Records, list[str | None]]:
    """Drop teacher refusals."""
    out: list[str | None] = []
    for r in batch:
        text = _content(r["output"])
        out.append(f"refusal: {text[:60]!r}" if REFUSAL.match(text) else None)
    return batch, out


def feedback(batch: Records, cfg: CurateConfig) -> tuple[Records, list[str | None]]:
    """Drop records whose feedback metric is on the wrong side of the threshold; missing feedback is kept."""
    fb = cfg.feedback
    assert fb is not None
    out: list[str | None] = []
    for r in batch:
        v = (r.get("feedback") or {}).get(fb.metric)
        bad = v is not None and (v < fb.min_value if fb.higher_is_better else v > fb.min_value)
        out.append(f"{fb.metric}={v:g} {'<' if fb.higher_is_better else '>'} {fb.min_value:g}" if bad else None)
    return batch, out


def _feedback_score(r: dict[str, Any], cfg: CurateConfig) -> float:
    if cfg.feedback is None:
        return 0.0
    v = (r.get("feedback") or {}).get(cfg.feedback.metric)
    if v is None:
        return 0.0
    return v if cfg.feedback.higher_is_better else -v


def exact_dedup(batch: Records, cfg: CurateConfig) -> tuple[Records, list[str | None]]:
    """Keep one record per (function, normalised user turns): the best feedback, then the earliest."""
    best: dict[str, int] = {}
    for i, r in enumerate(batch):
        k = input_key(r)
        j = best.get(k)
        if j is None or (-_feedback_score(r, cfg), r["timestamp"], r["id"]) < (
            -_feedback_score(batch[j], cfg), batch[j]["timestamp"], batch[j]["id"]
        ):
            best[k] = i
    winners = {k: batch[i]["id"] for k, i in best.items()}
    keep = set(best.values())
    return batch, [None if i in keep else f"duplicate of {winners[input_key(r)]}" for i, r in enumerate(batch)]


def chain(cfg: CurateConfig) -> list[tuple[str, Operator]]:
    """The operators a recipe turns on, in the order they run (cheap checks first)."""
    ops: list[tuple[str, Operator]] = [("pii", pii)]
    if cfg.drop_http_errors:
        ops.append(("http_error", http_error))
    if cfg.drop_empty_outputs:
        ops.append(("empty_output", empty_output))
    if cfg.drop_truncated_outputs:
        ops.append(("truncated_output", truncated_output))
    if cfg.drop_refusals:
        ops.append(("refusal", refusal))
    if cfg.feedback is not None:
        ops.append(("feedback", feedback))
    if cfg.dedup:
        ops.append(("exact_dedup", exact_dedup))
    return ops
