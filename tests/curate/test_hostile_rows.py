"""One bad row never stops curate: a logged schema that is itself invalid rejects its record with the reason,
and the schema checks take any JSON value without raising."""

from __future__ import annotations

import json

import orjson
from curate_helpers import batch, plan, rec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.curate import filters
from curation.curate.json_schema import check_output, check_tool_calls, response_format

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "properties", "items", "$ref", "required", "enum", "minimum", "pattern", "x"])
        | st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def test_an_invalid_logged_schema_rejects_its_record_and_the_rest_go_on():
    bad = json.dumps({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "nonsense"}}})
    ref = json.dumps({"type": "json_schema", "json_schema": {"name": "t", "schema": {"$ref": "#/nowhere"}}})
    good = json.dumps({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object"}}})
    _, r = filters.json_schema(batch(rec(0, out='{"a": 1}', response_format=bad),
                                     rec(1, out='{"a": 1}', response_format=good),
                                     rec(2, out='{"a": 1}', response_format=ref)), plan())
    assert r[0].startswith("the logged response_format's JSON schema is itself invalid (SchemaError")
    assert r[1] is None
    assert r[2].startswith("the logged response_format's JSON schema is itself invalid")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=json_values, instance=json_values)
def test_any_schema_and_output_give_a_verdict_never_an_exception(schema, instance):
    rf = orjson.dumps({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}).decode()
    kind, text = response_format(rf)
    verdict = check_output(kind, text, orjson.dumps(instance).decode()) if kind else None
    assert verdict is None or isinstance(verdict, str)
    tools = orjson.dumps([{"type": "function", "function": {"name": "f", "parameters": schema}}]).decode()
    calls = orjson.dumps([{"function": {"name": "f", "arguments": orjson.dumps(instance).decode()}}]).decode()
    verdict = check_tool_calls(calls, tools)
    assert verdict is None or isinstance(verdict, str)


@settings(max_examples=200, deadline=None)
@given(logged=json_values, calls=json_values)
def test_any_logged_response_format_and_tool_calls_json_are_handled(logged, calls):
    kind, text = response_format(orjson.dumps(logged).decode())
    assert kind in ("", "json_object", "json_schema")
    verdict = check_tool_calls(orjson.dumps(calls).decode(), orjson.dumps(logged).decode())
    assert verdict is None or isinstance(verdict, str)
