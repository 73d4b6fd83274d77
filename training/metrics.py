"""Task metrics of a student answer against the teacher's: exact match and JSON field accuracy."""

from __future__ import annotations

import json
from typing import Any


def parse_json_object(text: str) -> dict[str, Any] | None:
    try:
        v = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return v if isinstance(v, dict) else None


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after trimming whitespace; JSON objects compare by value, so key order does not matter."""
    if prediction.strip() == reference.strip():
        return True
    p, r = parse_json_object(prediction), parse_json_object(reference)
    return p is not None and r is not None and p == r


def field_accuracy(prediction: str, reference: str) -> float | None:
    """Share of the reference JSON object's fields the prediction gets right (None if the reference is not
    a JSON object; 0 when the prediction does not parse)."""
    r = parse_json_object(reference)
    if r is None:
        return None
    p = parse_json_object(prediction)
    if p is None or not r:
        return 0.0 if r else float(p == r)
    return sum(1 for k, v in r.items() if p.get(k) == v) / len(r)


def score(prediction: str, reference: str) -> dict[str, Any]:
    fa = field_accuracy(prediction, reference)
    return {
        "exact_match": exact_match(prediction, reference),
        "field_accuracy": fa,
        "json_valid": None if fa is None else parse_json_object(prediction) is not None,
    }
