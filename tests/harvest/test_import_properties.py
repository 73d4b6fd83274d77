"""Property-based tests (hypothesis): every importer, fed anything -- valid rows, valid rows with one part replaced
by junk, junk -- never crashes: each row becomes records that fit the canonical schema, or is quarantined with a
reason; rows in = rows with records + rows quarantined. And the fast Arrow builder equals pyarrow's own."""

import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from harvest_helpers import SEVERAL_CHOICES, STRUCTURED, TOOL_ROUND_TRIP, openai_row, stream_chunks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.harvest.chunks import Chunk, convert
from curation.harvest.importers.common import BadRecord, NotACall
from curation.harvest.importers.formats import IMPORTERS
from pipeline.config.harvest import Source
from pipeline.record import RECORD_SCHEMA, to_table

# DISTILL_HYPOTHESIS_EXAMPLES=5000 for a deeper search than the suite's quick one.
SETTINGS = settings(max_examples=int(os.environ.get("DISTILL_HYPOTHESIS_EXAMPLES", "60")), deadline=None, suppress_health_check=list(HealthCheck))
NOW = datetime(2026, 11, 23, tzinfo=timezone.utc)

KEYS = ["id", "timestamp", "request", "response", "messages", "role", "content", "choices", "message", "tool_calls",
        "function", "name", "arguments", "input", "output", "tags", "type", "text", "usage", "metadata", "error",
        "status_code", "episode_id", "inference_id", "function_name", "raw", "parsed", "system", "delta", "index",
        "reqPayload", "respPayload", "statusCode", "requestedAt", "feedback", "model", "value", "logprobs"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["user", "assistant", "tool", "text", "2026-11-23T10:00:00Z",
                                                           "tool_call", "{\"a\": 1}", "[1]", ""]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner,
                                                 max_size=5)), max_leaves=25)

TZ_ROW = {"id": "0192ce8e-7b2a-7c53-8f3e-2a7d9c6b1e01", "function_name": "f", "variant_name": "v",
          "episode_id": "0192ce8e-7000-7abc-8def-000000000001",
          "input": {"system": "s", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                                {"role": "assistant", "content": [{"type": "tool_call", "id": "1",
                                                                                   "name": "t", "arguments": {}}]},
                                                {"role": "user", "content": [{"type": "tool_result", "id": "1",
                                                                              "name": "t", "result": "ok"}]}]},
          "output": [{"type": "text", "text": "hello"}], "tags": {"a": "b"}, "processing_time_ms": 3}
FIXTURES = Path(__file__).parent / "fixtures"


def _fixture_rows(*names: str) -> list[Any]:
    """Rows of the fixture files written from each format's documentation (a .json file is one row)."""
    rows: list[Any] = []
    for name in names:
        text = (FIXTURES / name).read_text()
        rows += [json.loads(text)] if name.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return rows


SAMPLES = {
    "otel": _fixture_rows("otel_attributes.json", "otel_events.jsonl"),
    "langfuse": _fixture_rows("langfuse_observations.jsonl", "langfuse_page.json"),
    "litellm": _fixture_rows("litellm_payloads.jsonl", "litellm_spend_logs.json"),
    "openai_stored": _fixture_rows("openai_stored.jsonl", "openai_stored_page.json"),
    "openai": [openai_row(1), TOOL_ROUND_TRIP, STRUCTURED, SEVERAL_CHOICES,
               {**openai_row(2), "response": stream_chunks()}],
    "openai_finetune": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    "tensorzero": [TZ_ROW, {**TZ_ROW, "output": {"raw": "{}", "parsed": {}}, "output_schema": {"type": "object"}}],
    "openpipe": [{"input": openai_row(3)["request"], "output": openai_row(3)["response"], "tags": {"prompt_id": "p"}},
                 {"reqPayload": openai_row(4)["request"], "respPayload": None, "statusCode": 500,
                  "errorMessage": "x", "requestedAt": 1795392000000}],
    "mapped": [{"k": "1", "t": "2026-11-23T10:00:00Z", "q": "question", "a": {"content": "answer"}, "s": 1}],
}
CONFIGS = {fmt: Source(format=fmt, path="x") for fmt in IMPORTERS if fmt != "mapped"}
CONFIGS["mapped"] = Source(format="mapped", path="x", fields={
    "id": "k", "timestamp": "t", "prompt": "q", "output": "a", "feedback.score": "s", "tags.who": "w",
    "messages": "m", "model": "a.model", "input_tokens": "u.0"})


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _replace(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


@st.composite
def mutated(draw, fmt):
    sample = draw(st.sampled_from(SAMPLES[fmt]))
    path = draw(st.sampled_from(list(_paths(sample))))
    return _replace(sample, path, draw(json_values))


def check(fmt, row):
    try:
        recs = IMPORTERS[fmt](row, "f:1", CONFIGS[fmt], NOW)
    except (BadRecord, NotACall) as err:  # a reason, or a row that is whole but no teacher call
        assert str(err)
        return 0
    assert recs
    table = to_table(recs)  # every record fits the canonical schema
    assert table.num_rows == len(recs) and table.schema == RECORD_SCHEMA
    assert all(isinstance(r["id"], str) and r["id"] for r in recs)
    return len(recs)


def _imports_some(fmt: str, row: Any) -> bool:
    try:
        return bool(IMPORTERS[fmt](row, "f:1", CONFIGS[fmt], NOW))
    except (BadRecord, NotACall):
        return False


# The fixtures also hold rows that are rightly quarantined or give no record (spans that are not model calls,
# content capture off): mutations start from the rows that import.
for _fmt in ("otel", "langfuse", "litellm", "openai_stored"):
    SAMPLES[_fmt] = [r for r in SAMPLES[_fmt] if _imports_some(_fmt, r)]


def test_the_samples_are_valid():
    assert all(SAMPLES[fmt] for fmt in IMPORTERS if fmt != "mapped"), "every format needs a sample that imports"
    for fmt, rows in SAMPLES.items():
        for row in rows:
            assert check(fmt, row) >= 1, fmt


@SETTINGS
@given(st.sampled_from(sorted(IMPORTERS)), st.data())
def test_importers_never_crash_on_mutated_rows(fmt, data):
    check(fmt, data.draw(mutated(fmt)))


@SETTINGS
@given(st.sampled_from(sorted(IMPORTERS)), json_values)
def test_importers_never_crash_on_junk(fmt, row):
    check(fmt, row)


@SETTINGS
@given(st.sampled_from(sorted(IMPORTERS)), st.data())
def test_a_chunk_accounts_for_every_line(tmp_path_factory, fmt, data):
    lines = data.draw(st.lists(st.one_of(
        mutated(fmt).map(json.dumps), st.sampled_from(SAMPLES[fmt]).map(json.dumps),
        json_values.map(json.dumps), st.binary(max_size=30).filter(lambda b: b"\n" not in b),
        st.sampled_from(SAMPLES[fmt]).map(lambda r: json.dumps(r)[:25])), min_size=1, max_size=12))
    blob = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"
    out = tmp_path_factory.mktemp("chunk") / "part.parquet"
    res = convert(Chunk(CONFIGS[fmt], "f.jsonl", "f.jsonl", blob, 1, NOW, str(out)))
    rows = sum(1 for x in blob.split(b"\n") if x.strip())
    assert res.lines == rows
    assert res.quarantined == len(res.quarantine) and res.lines >= res.quarantined
    good = res.lines - res.quarantined - sum(n for k, n in res.notes.items() if k.startswith("not_calls:"))
    assert res.records == good + res.extra_choices  # no watermark here, so nothing is skipped
    assert all(q["reason"] and q["file"] == "f.jsonl" and 1 <= q["line"] <= len(lines) for q in res.quarantine)
    if res.records:
        assert pq.read_table(out).num_rows == res.records
    else:
        assert not out.exists()


records_strategy = st.lists(st.fixed_dictionaries({
    "id": st.text(min_size=1, max_size=5),
    "timestamp": st.one_of(st.none(), st.datetimes(timezones=st.just(timezone.utc))),
    "function": st.sampled_from(["a", "b"]),
    "messages": st.one_of(st.none(), st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system"]), "content": st.one_of(st.none(), st.text(max_size=5))}),
        max_size=3)),
    "output": st.one_of(st.none(), st.fixed_dictionaries({"role": st.just("assistant"),
                                                          "content": st.text(max_size=5)})),
    "teacher": st.one_of(st.none(), st.fixed_dictionaries({"model": st.text(max_size=3), "logprobs": st.one_of(
        st.none(), st.lists(st.fixed_dictionaries({"token": st.text(max_size=2), "logprob": st.floats(-5, 0),
                                                   "top": st.lists(st.fixed_dictionaries(
                                                       {"token": st.text(max_size=2), "logprob": st.floats(-5, 0)}),
                                                       max_size=2)}), max_size=2))})),
    "usage": st.one_of(st.none(), st.fixed_dictionaries({"input_tokens": st.integers(0, 99)})),
    "feedback": st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.floats(0, 1), max_size=2)),
    "tags": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    "latency_ms": st.one_of(st.none(), st.floats(0, 1e4)),
}), max_size=6)


@SETTINGS
@given(records_strategy)
def test_fast_arrow_builder_equals_pyarrow(recs):
    rows = [{**r, "feedback": list(r["feedback"].items()) if r["feedback"] is not None else None,
             "tags": list(r["tags"].items())} for r in recs]
    assert to_table(recs).equals(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))


def test_the_builder_takes_every_kind_of_timestamp():
    import numpy as np
    import pandas as pd

    from pipeline.record import from_table

    aware = datetime(2026, 11, 23, 11, 0, 0, 123000, tzinfo=timezone(timedelta(hours=1)))
    kinds = [aware, aware.astimezone(timezone.utc).replace(tzinfo=None), np.datetime64("2026-11-23T10:00:00.123"),
             pd.Timestamp("2026-11-23T10:00:00.123Z"), 1795428000123]
    got = from_table(to_table([{"id": str(i), "timestamp": t} for i, t in enumerate(kinds)]))
    assert {r["timestamp"] for r in got} == {datetime(2026, 11, 23, 10, 0, 0, 123000, tzinfo=timezone.utc)}


@SETTINGS
@given(st.data())
def test_the_fast_openai_path_gives_the_same_record_as_the_full_importer(data):
    from curation.harvest.importers.openai import fast_row, parse_openai
    from pipeline.record import record_row

    row = data.draw(st.one_of(mutated("openai"), st.sampled_from(SAMPLES["openai"])))
    try:
        fast = fast_row(row, "f:1")
    except BadRecord as err:  # then the full importer refuses the row for the same reason
        with pytest.raises(BadRecord, match=re.escape(str(err))):
            parse_openai(row, "f:1")
        return
    if fast is not None:
        assert [record_row(r) for r in parse_openai(row, "f:1")] == [fast]


FEEDBACK = [
    {"id": "0192ce8e-7b2a-7c53-8f3e-2a7d9c6b1e01", "target_id": "x", "metric_name": "ok", "value": True},
    {"target_id": "x", "target_type": "episode", "value": "nice"},
    {"inference_id": "x", "value": "[{\"type\": \"text\", \"text\": \"better\"}]"},
    {"metric_name": "score", "episode_id": "e", "value": 0.5},
]


@SETTINGS
@given(st.sampled_from(["tensorzero", "mapped"]), st.data())
def test_feedback_rows_never_crash(fmt, data):
    from curation.harvest.feedback import FeedbackIndex, add_row
    from pipeline.config.harvest import FeedbackSource

    src = FeedbackSource(format=fmt, path="x", comments="tag")
    row = data.draw(st.one_of(json_values, st.sampled_from(FEEDBACK).flatmap(
        lambda r: st.sampled_from(list(_paths(r))).flatmap(lambda p: json_values.map(lambda v: _replace(r, p, v))))))
    index = FeedbackIndex()
    try:
        add_row(index, row, src, 1)
    except BadRecord as err:
        assert str(err)
        return
    rec = {"id": "x", "episode_id": "e", "feedback": {}, "tags": {}, "output": None}
    index.apply(rec)
    assert all(isinstance(v, float) for v in rec["feedback"].values())
    assert rec["output"] is None or to_table([{**rec, "messages": []}]).num_rows == 1
