"""Streamed OpenAI responses (issue 13, defect 5 and the SSE part of defect 7): a stream that lost its final chunk
(no finish_reason in any chunk) is marked cut off, so curate's truncated_output drops it with a reason; an SSE body
logged as one string is parsed as the chunks it holds."""

import json

from harvest_helpers import by_id, harvest, in_tmp, jsonl, quarantine, stream_chunks, write_recipe  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st
from test_import_otel import check_rows_in_equal_harvested_plus_quarantined
from test_import_properties import SETTINGS

from curation.harvest.importers.openai import STREAM_CUT_OFF, parse_openai, sse_events

REQUEST = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Weather in Bergen?"}]}


def _no_finish(chunks):
    return [{**c, "choices": [{**ch, "finish_reason": None} for ch in c.get("choices") or ()]} for c in chunks]


def test_a_stream_without_its_final_chunk_is_marked_cut_off_and_curate_drops_it():
    chunks = _no_finish(stream_chunks())
    (rec,) = parse_openai({"id": "cut", "timestamp": "2026-11-23T14:00:00Z", "request": REQUEST,
                           "response": chunks}, "f:1")
    assert rec["status_code"] == 200 and rec["output"]["content"] == "Let me check."
    assert rec["finish_reason"] == "length" and rec["tags"]["stream_cut_off"] == STREAM_CUT_OFF

    import pyarrow as pa

    from curation.curate.filters import truncated_output
    from pipeline.record import to_table

    _, reasons = truncated_output(to_table([rec]), None)
    assert reasons == ["output cut off (finish_reason=length)"]
    # a complete stream keeps its own finish reason and no tag
    (full,) = parse_openai({"id": "ok", "timestamp": "2026-11-23T14:00:00Z", "request": REQUEST,
                            "response": stream_chunks()}, "f:1")
    assert full["finish_reason"] == "tool_calls" and "stream_cut_off" not in full["tags"]
    assert isinstance(pa.__version__, str)


def test_an_sse_body_logged_as_one_string_is_parsed(tmp_path):
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in stream_chunks()) + "data: [DONE]\n\n"
    crlf = body.replace("\n", "\r\n")
    with_events = ": keep-alive\n\n" + "".join(f"event: chunk\ndata: {json.dumps(c)}\n\n" for c in stream_chunks())
    rows = [{"id": f"sse{i}", "timestamp": "2026-11-23T14:00:00Z", "request": REQUEST, "response": b}
            for i, b in enumerate((body, crlf, with_events))]
    jsonl(tmp_path / "logs" / "sse.jsonl", rows)
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert m["counts"]["records"] == 3 and m["counts"]["quarantined"] == 0
    for i in range(3):
        s = r[f"sse{i}"]
        assert s["output"]["content"] == "Let me check." and s["finish_reason"] == "tool_calls"
        call = json.loads(s["output"]["tool_calls"])[0]
        assert json.loads(call["function"]["arguments"]) == {"city": "Bergen"}
        assert s["usage"] == {"input_tokens": 31, "output_tokens": 17}


def test_sse_events_joins_multi_line_data_and_skips_other_fields():
    assert sse_events("id: 1\ndata: {\"a\":\ndata: 1}\n\n: ping\n\ndata: [DONE]") == ["{\"a\":\n1}", "[DONE]"]


@SETTINGS
@given(st.data())
def test_streamed_openai_rows_in_equal_harvested_plus_quarantined(tmp_path_factory, data):
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in stream_chunks()) + "data: [DONE]"
    samples = [{"id": "a", "timestamp": "2026-11-23T14:00:00Z", "request": REQUEST, "response": body},
               {"id": "b", "timestamp": "2026-11-23T14:00:00Z", "request": REQUEST,
                "response": _no_finish(stream_chunks())}]
    check_rows_in_equal_harvested_plus_quarantined("openai", samples, data, tmp_path_factory)
