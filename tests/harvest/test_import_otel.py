"""OpenTelemetry GenAI spans in OTLP/JSON (issue 13, new sources): the attribute form (gen_ai.input.messages,
gen_ai.output.messages, gen_ai.system_instructions, as JSON text and as structured AnyValue trees), the older event
form (span events and log records), failed spans, content capture off and non-GenAI spans; and the property test
rows in = harvested + quarantined. Fixtures in fixtures/ were written from the semantic-conventions docs."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from harvest_helpers import by_id, harvest, in_tmp, quarantine, write_recipe  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st
from test_import_properties import NOW, SETTINGS, _paths, _replace, json_values

from curation.harvest.chunks import Chunk, convert
from curation.harvest.importers.common import BadRecord, NotACall
from curation.harvest.importers.formats import IMPORTERS
from pipeline.config.harvest import Source
from pipeline.record import RECORD_SCHEMA, to_table

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_rows(name: str) -> list:
    text = (FIXTURES / name).read_text()
    if name.endswith(".json"):
        doc = json.loads(text)
        return doc if isinstance(doc, list) else [doc]
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def check_rows_in_equal_harvested_plus_quarantined(fmt: str, samples: list, data, tmp_path_factory) -> None:
    """The property every importer keeps: a chunk of rows (samples, samples with one part replaced by junk, junk,
    cut-off lines) -> rows in = rows with records + rows quarantined, and every record fits the canonical schema."""
    cfg = Source(format=fmt, path="x")

    @st.composite
    def mutated(draw):
        sample = draw(st.sampled_from(samples))
        path = draw(st.sampled_from(list(_paths(sample))))
        return _replace(sample, path, draw(json_values))

    lines = data.draw(st.lists(st.one_of(
        mutated().map(json.dumps), st.sampled_from(samples).map(json.dumps), json_values.map(json.dumps),
        st.sampled_from(samples).map(lambda r: json.dumps(r)[:40])), min_size=1, max_size=6))
    blob = b"\n".join(x.encode() for x in lines) + b"\n"
    out = tmp_path_factory.mktemp("chunk") / "part.parquet"
    res = convert(Chunk(cfg, "f.jsonl", "f.jsonl", blob, 1, NOW, str(out)))
    assert res.lines == len(lines)
    assert res.quarantined == len(res.quarantine) and all(q["reason"] for q in res.quarantine)
    not_calls = sum(n for k, n in res.notes.items() if k.startswith("not_calls:"))  # a student's, on purpose
    assert res.records == res.lines - res.quarantined - not_calls + res.extra_choices
    if res.records:
        table = pq.read_table(out)
        assert table.num_rows == res.records and table.schema == RECORD_SCHEMA
    for row in (data.draw(mutated()), data.draw(json_values)):  # the importer alone: records or a reason
        try:
            recs = IMPORTERS[fmt](row, "f:1", cfg, NOW)
        except (BadRecord, NotACall) as err:
            assert str(err)
        else:
            assert recs and to_table(recs).num_rows == len(recs)
            assert all(isinstance(r["id"], str) and r["id"] for r in recs)


def test_otel_attribute_form_document(tmp_path):
    shutil.copy(FIXTURES / "otel_attributes.json", tmp_path / "traces.json")
    recipe = write_recipe(tmp_path, {"sources": [{"format": "otel", "path": "traces.json"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    # one document = one row: 3 chat spans become records (2 extra), the execute_tool span gives none
    assert m["counts"]["records"] == 3 and m["counts"]["quarantined"] == 0
    first = r["00f067aa0ba902b7"]
    assert [x["role"] for x in first["messages"]] == ["system", "user"]
    assert first["messages"][0]["content"] == "You are a weather bot."
    assert first["tags"]["has_images"] == "1"  # the uri part with modality image is counted
    call = json.loads(first["output"]["tool_calls"])[0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
        "location": "Paris"}
    assert first["finish_reason"] == "tool_calls" and first["status_code"] == 200
    assert first["teacher"]["model"] == "gpt-4o-2024-08-06" and first["teacher"]["provider"] == "openai"
    assert json.loads(first["teacher"]["params"]) == {"temperature": 0.2, "max_tokens": 256}
    assert first["usage"] == {"input_tokens": 61, "output_tokens": 18} and first["latency_ms"] == 1250.0
    assert first["episode_id"] == "conv-7" and first["tags"]["response_id"] == "chatcmpl-AbC123"
    assert first["timestamp"].isoformat().startswith("2025-02-07T20:36:50")
    # structured (kvlist) messages, a tool round trip
    second = r["00f067aa0ba902b8"]
    assert [x["role"] for x in second["messages"]] == ["user", "assistant", "tool"]
    assert second["messages"][2]["tool_call_id"] == "call_1" and second["output"]["content"] == "Rainy, 14°C."
    assert second["finish_reason"] == "stop"
    # a failed span is kept with its error (curate drops it)
    failed = r["00f067aa0ba902ba"]
    assert failed["error"] == "Request timed out." and failed["status_code"] == 500 and failed["output"] is None


def test_otel_event_forms_content_off_and_other_spans(tmp_path):
    shutil.copy(FIXTURES / "otel_events.jsonl", tmp_path / "otel.jsonl")
    recipe = write_recipe(tmp_path, {"sources": [{"format": "otel", "path": "otel.jsonl"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert m["counts"]["records"] == 2 and m["counts"]["quarantined"] == 2
    span_events = r["10f067aa0ba902b7"]  # span events with gen_ai.event.content
    assert [x["content"] for x in span_events["messages"]] == ["Be brief.", "Weather in Paris?"]
    assert span_events["output"]["content"] == "Rainy, 14°C." and span_events["finish_reason"] == "stop"
    assert span_events["teacher"]["provider"] == "az.ai.inference"
    assert span_events["usage"] == {"input_tokens": 20, "output_tokens": 5}
    logs = r["20f067aa0ba902b7"]  # log records with kvlist bodies, eventName and event.name
    assert logs["messages"][0]["content"] == "Capital of France?" and logs["output"]["content"] == "Paris."
    reasons = {q["line"]: q["reason"] for q in quarantine(recipe)}
    assert "content capture was off" in reasons[3]
    assert "no GenAI inference span" in reasons[4]


def test_otel_bad_span_among_good_ones_is_kept_as_a_failed_record():
    doc = fixture_rows("otel_attributes.json")[0]
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[1]["attributes"].append({"key": "gen_ai.input.messages", "value": {"stringValue": "[1, 2]"}})
    spans[1]["attributes"] = [a for a in spans[1]["attributes"]
                              if a["key"] != "gen_ai.input.messages" or "stringValue" in a["value"]]
    cfg = Source(format="otel", path="x")
    recs = {r["id"]: r for r in IMPORTERS["otel"](doc, "f:1", cfg, NOW)}
    bad = recs["00f067aa0ba902b8"]
    assert bad["output"] is None and bad["error"].startswith("not imported: span 00f067aa0ba902b8")
    assert "import_error" in bad["tags"] and recs["00f067aa0ba902b7"]["output"] is not None


def test_otel_v127_prompt_events_and_single_span_rows():
    span = {"traceId": "9bf92f3577b34da6a3ce929d0e0e4736", "spanId": "50f067aa0ba902b7",
            "startTimeUnixNano": "1738960610000000000", "endTimeUnixNano": "1738960610500000000",
            "attributes": [{"key": "gen_ai.system", "value": {"stringValue": "openai"}},
                           {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-3.5-turbo"}}],
            "events": [{"name": "gen_ai.content.prompt", "timeUnixNano": "1738960610000000001", "attributes": [
                {"key": "gen_ai.prompt", "value": {"stringValue": "[{\"role\": \"user\", \"content\": \"Hi\"}]"}}]},
                {"name": "gen_ai.content.completion", "timeUnixNano": "1738960610400000000", "attributes": [
                    {"key": "gen_ai.completion",
                     "value": {"stringValue": "[{\"role\": \"assistant\", \"content\": \"Hello!\"}]"}}]}]}
    (rec,) = IMPORTERS["otel"](span, "f:1", Source(format="otel", path="x"), NOW)
    assert rec["messages"][0]["content"] == "Hi" and rec["output"]["content"] == "Hello!"
    assert rec["latency_ms"] == 500.0 and rec["teacher"]["model"] == "gpt-3.5-turbo"


@SETTINGS
@given(st.data())
def test_otel_rows_in_equal_harvested_plus_quarantined(tmp_path_factory, data):
    samples = fixture_rows("otel_attributes.json") + fixture_rows("otel_events.jsonl")[:2]
    check_rows_in_equal_harvested_plus_quarantined("otel", samples, data, tmp_path_factory)
