"""Task metrics of a student answer against the teacher's: exact match, schema-aware JSON field accuracy,
schema validity and chrF (sacrebleu) for free text.

They live below the rooms because two stages score answers the same way: evaluate (the test split, the gate) and
train (the validation split, when ``train.select_by`` is 'quality'). ``training.evaluate.metrics`` re-exports them.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

QUALITY_METRICS = ("exact_match", "field_accuracy", "chrf", "judge")


def parse_json_object(text: str) -> dict[str, Any] | None:
    try:
        v = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return v if isinstance(v, dict) else None


def response_schema(response_format: str | dict | None) -> dict[str, Any] | None:
    """The JSON schema of an OpenAI ``response_format`` (``{"type": "json_schema", "json_schema": {"schema":
    ...}}``), or None when the request asked for none."""
    if isinstance(response_format, str):
        try:
            response_format = json.loads(response_format)
        except json.JSONDecodeError:
            return None
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after trimming whitespace; JSON objects compare by value, so key order does not matter."""
    if prediction.strip() == reference.strip():
        return True
    p, r = parse_json_object(prediction), parse_json_object(reference)
    return p is not None and r is not None and _same(p, r)


def _same(a: Any, b: Any) -> bool:
    """JSON equality where 1 == 1.0 but True != 1 and strings compare after trimming."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


_MISSING = object()


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects flattened to dotted paths; lists and scalars are leaves."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj} if prefix else {}


def _schema_fields(schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the fields a JSON schema defines (object properties, recursively)."""
    props = schema.get("properties")
    if schema.get("type") not in (None, "object") or not isinstance(props, dict):
        return [prefix[:-1]] if prefix else []
    out: list[str] = []
    for k, sub in props.items():
        out += _schema_fields(sub if isinstance(sub, dict) else {}, f"{prefix}{k}.")
    return out


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def field_accuracy(prediction: str, reference: str, schema: dict[str, Any] | None = None) -> float | None:
    """Share of the reference JSON object's fields that the prediction gets right (None if the reference is not
    a JSON object; 0 when the prediction does not parse).

    With the request's JSON schema, the fields are the ones the schema defines (nested objects field by field,
    a field the schema types as a whole, such as an array or a free-form object, as one value) that the teacher
    filled, plus any others the teacher filled; without it, the leaves of the teacher's object. A field is right
    when both hold the same JSON value (1 == 1.0, strings trimmed).
    """
    r = parse_json_object(reference)
    if r is None:
        return None
    p = parse_json_object(prediction)
    if schema is not None:
        fields = [f for f in _schema_fields(schema) if _get(r, f) is not _MISSING]
        fields += [f for f in _leaves(r) if f not in fields and not any(f.startswith(g + ".") for g in fields)]
    else:
        fields = list(_leaves(r))
    if not fields:
        return float(p == r) if p is not None else 0.0
    if p is None:
        return 0.0
    right = 0
    for f in fields:
        a, b = _get(p, f), _get(r, f)
        right += a is not _MISSING and _same(a, b)
    return right / len(fields)


@lru_cache(maxsize=64)
def _validator(schema_json: str):
    from jsonschema.validators import validator_for

    schema = json.loads(schema_json)
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_valid(prediction: str, schema: dict[str, Any] | None) -> bool | None:
    """Whether the prediction parses and validates against the request's JSON schema (None: no schema)."""
    if schema is None:
        return None
    try:
        value = json.loads(prediction)
    except (json.JSONDecodeError, TypeError):
        return False
    try:
        validator = _validator(json.dumps(schema, sort_keys=True))
    except Exception:  # noqa: BLE001 - an invalid schema in the logs cannot be checked against
        return None
    return validator.is_valid(value)


@lru_cache(maxsize=1)
def _chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF()


def chrf(prediction: str, reference: str) -> float:
    """chrF (character n-gram F-score, sacrebleu's default settings) scaled to 0-1."""
    return _chrf_metric().sentence_score(prediction, [reference]).score / 100


def score(prediction: str, reference: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every metric of one answer against the teacher's."""
    fa = field_accuracy(prediction, reference, schema)
    return {
        "exact_match": exact_match(prediction, reference),
        "field_accuracy": fa,
        "json_valid": None if fa is None else parse_json_object(prediction) is not None,
        "schema_valid": schema_valid(prediction, schema),
        "chrf": chrf(prediction, reference),
    }


def quality(row: dict[str, Any], metric: str) -> float | None:
    """The recipe's per-answer quality in 0-1: 'auto' is field accuracy on JSON answers, exact match elsewhere."""
    if metric == "auto":
        return row["field_accuracy"] if row.get("field_accuracy") is not None else float(row["exact_match"])
    if metric == "judge":
        return row.get("judge_student")
    v = row.get(metric)
    return None if v is None else float(v)


def describe_quality(metric: str) -> str:
    return {
        "auto": "JSON field accuracy on JSON answers, exact match elsewhere, against the teacher",
        "exact_match": "exact match with the teacher",
        "field_accuracy": "JSON field accuracy against the teacher",
        "chrf": "chrF against the teacher",
        "judge": "LLM judge grade (0-1)",
    }[metric]
