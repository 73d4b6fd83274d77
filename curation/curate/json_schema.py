"""JSON Schema checks for structured outputs and tool calls, used by the ``json_schema`` operator
(``curation.curate.filters``).

Two validators: fastjsonschema's compiled check (drafts 4, 6 and 7, about 20x faster) says "valid" for the common
case; anything else is decided and explained by jsonschema (any draft, best-match message with the path of the bad
value). Schemas arrive as canonical JSON text (sorted keys) so that the caches below key on them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson


class BadSchema(ValueError):
    """The logged schema itself is not a valid JSON Schema (or cannot be applied): the record is rejected for it,
    and the run goes on."""


@lru_cache(maxsize=256)
def validator(schema_text: str):
    """jsonschema's validator for a schema (the draft its $schema names, else 2020-12); raises on a bad schema."""
    from jsonschema import Draft202012Validator

    schema = orjson.loads(schema_text)
    cls = Draft202012Validator
    if isinstance(schema, dict) and "$schema" in schema:
        from jsonschema.validators import validator_for

        cls = validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


@lru_cache(maxsize=256)
def response_format(text: str) -> tuple[str, str | None]:
    """('json_schema', schema text) | ('json_object', None) | ('', None) from a logged response_format."""
    try:
        rf = orjson.loads(text)
    except orjson.JSONDecodeError:
        return "", None
    if not isinstance(rf, dict):
        return "", None
    kind = rf.get("type")
    if kind == "json_schema":
        js = rf.get("json_schema") or {}
        schema = js.get("schema") if isinstance(js, dict) else None
        if isinstance(schema, dict):
            return "json_schema", orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
        return "json_object", None
    if kind == "json_object":
        return "json_object", None
    return "", None


# Keywords of drafts 2019-09/2020-12 that fastjsonschema (drafts 4, 6, 7) does not know: schemas using them are
# checked by jsonschema alone.
NEW_KEYWORDS = {"prefixItems", "unevaluatedProperties", "unevaluatedItems", "dependentRequired", "dependentSchemas",
                "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "minContains", "maxContains",
                "$anchor", "$vocabulary", "$schema"}


def _keywords(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        return set(schema).union(*(_keywords(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_keywords(v) for v in schema))
    return set()


@lru_cache(maxsize=256)
def fast_validator(schema_text: str):
    """fastjsonschema's compiled check (about 20x faster than jsonschema) for schemas it reads the same way; None
    when it is not installed or the schema needs a newer draft."""
    try:
        import fastjsonschema
    except ImportError:
        return None
    schema = orjson.loads(schema_text)
    if _keywords(schema) & NEW_KEYWORDS:
        return None
    try:
        return fastjsonschema.compile(schema)
    except Exception:  # noqa: BLE001 - anything it cannot compile is left to jsonschema
        return None


def schema_error(schema_text: str, instance: Any) -> str | None:
    """None when the instance is valid; else jsonschema's best message with the path of the bad value. The fast
    check only ever says 'valid': anything else is decided and explained by jsonschema."""
    fast = fast_validator(schema_text)
    if fast is not None:
        try:
            fast(instance)
            return None
        except Exception:  # noqa: BLE001 - fastjsonschema.JsonSchemaException or odd input: ask jsonschema
            pass
    from jsonschema.exceptions import best_match

    try:
        check = validator(schema_text)
        if check.is_valid(instance):
            return None
        err = best_match(check.iter_errors(instance))
    except Exception as bad:  # noqa: BLE001 - SchemaError, an unresolvable $ref, a recursion: the schema is at fault
        first = (str(bad).strip().splitlines() or [""])[0]
        raise BadSchema(f"{type(bad).__name__}: {first}"[:200]) from None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return f"{where}: {err.message}"[:300]


@lru_cache(maxsize=32_768)
def check_output(kind: str, schema_text: str | None, text: str) -> str | None:
    """The reason a structured output is invalid, or None (cached: structured outputs repeat a lot)."""
    try:
        instance = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        return f"output is not valid JSON: {err}"[:300]
    if kind == "json_object" and not isinstance(instance, dict):
        return f"output is JSON but not an object (response_format json_object): {type(instance).__name__}"
    if schema_text is not None:
        try:
            problem = schema_error(schema_text, instance)
        except BadSchema as err:
            return f"the logged response_format's JSON schema is itself invalid ({err})"[:300]
        if problem:
            return f"output does not match the schema: {problem}"
    return None


@lru_cache(maxsize=256)
def _tool_schemas(tools_text: str) -> dict[str, str | None]:
    try:
        tools = orjson.loads(tools_text)
    except orjson.JSONDecodeError:
        return {}
    out = {}
    for t in tools if isinstance(tools, list) else []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = orjson.dumps(params, option=orjson.OPT_SORT_KEYS).decode() if isinstance(params, dict) else None
    return out


def check_tool_calls(calls_text: str, tools_text: str | None) -> str | None:
    try:
        calls = orjson.loads(calls_text)
    except orjson.JSONDecodeError as err:
        return f"tool calls are not valid JSON: {err}"[:300]
    known = _tool_schemas(tools_text) if tools_text else {}
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        name = fn.get("name") if isinstance(fn, dict) else None
        if known and name not in known:
            return f"tool call names unknown tool {name!r} (logged tools: {', '.join(sorted(known))})"[:300]
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                args = orjson.loads(args) if args.strip() else {}
            except orjson.JSONDecodeError as err:
                return f"tool call {name!r}: arguments are not valid JSON: {err}"[:300]
        schema = known.get(name) if known else None
        if schema is not None:
            try:
                problem = schema_error(schema, args)
            except BadSchema as err:
                return f"tool {name!r}: its logged parameters schema is itself invalid ({err})"[:300]
            if problem:
                return f"tool call {name!r} arguments do not match the tool's parameters: {problem}"[:300]
    return None
