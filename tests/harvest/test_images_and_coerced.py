"""Issue 13, defect 3 (images kept in the canonical messages, not only counted) and the rest of defect 7 (values
coerced or dropped are counted per field, not dropped silently). Each test is built from a row of that shape."""

import pyarrow as pa
import pyarrow.parquet as pq
from harvest_helpers import (
    by_id,
    harvest,
    in_tmp,  # noqa: F401
    jsonl,
    openai_row,
    quarantine,
    write_recipe,
)

from curation.harvest import stage as harvest_stage
from curation.harvest.importers.common import image_ref
from curation.harvest.importers.otel import _parts_message
from pipeline.chat import prompt_messages, training_messages
from pipeline.record import RECORD_SCHEMA, from_table, to_table

CAT = "https://example.com/cat.png?token=abc"
DATA = "data:image/png;base64,AAAA"


def _tz(n: int, content) -> dict:
    return {"id": f"0190b2c1-0000-7000-8000-00000000000{n}", "function_name": "f", "variant_name": "v",
            "input": {"messages": [{"role": "user", "content": content}]},
            "output": [{"type": "text", "text": "a city"}], "timestamp": f"2026-11-23T00:00:0{n}Z"}


# --- defect 3: image parts kept in the canonical messages --------------------------------------------------------------

def test_image_parts_are_kept_in_the_messages_as_logged(tmp_path):
    pic = openai_row(1)
    pic["request"]["messages"][1]["content"] = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": CAT, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": DATA}},
        {"type": "input_image", "file_id": "file-123"}]
    jsonl(tmp_path / "logs" / "a.jsonl", [pic, openai_row(2)])
    tz = _tz(3, [{"type": "text", "text": "Which city?"},
                 {"type": "file", "file": {"url": "https://example.com/p.jpg", "mime_type": "image/jpeg"},
                  "storage_path": {"kind": {"type": "s3_compatible"}, "path": "obs/p.jpg"}},
                 {"type": "image", "image": {"url": None, "mime_type": "image/png"},
                  "storage_path": {"kind": {"type": "filesystem"}, "path": "obs/q.png"}},
                 {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "BBBB"}}])
    jsonl(tmp_path / "tz" / "ChatInference.jsonl", [tz])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "oa"},
                                                 {"format": "tensorzero", "path": "tz/*.jsonl", "name": "tz"}]})
    m = harvest(recipe)
    assert quarantine(recipe) == []
    r = by_id(recipe)
    user = r["req_1"]["messages"][1]
    assert user["content"] == "What is in these?"
    assert user["images"] == [CAT, DATA, "file_id:file-123"]
    assert r["req_1"]["messages"][0]["images"] is None and r["req_2"]["messages"][1]["images"] is None
    assert r[tz["id"]]["messages"][0]["images"] == ["https://example.com/p.jpg", "storage:obs/q.png",
                                                    "data:image/png;base64,BBBB"]
    assert r[tz["id"]]["tags"]["has_images"] == "3"
    assert m["counts"]["images"] == {"images": 6, "records_with_images": 2}
    # the file holds the field; the text the student sees is unchanged
    f = next((tmp_path / "runs" / "t" / "harvest").glob("records-*.parquet"))
    assert pq.read_schema(f).field("messages").type == RECORD_SCHEMA.field("messages").type
    assert prompt_messages(r["req_1"])[1] == {"role": "user", "content": "What is in these?"}
    assert training_messages(r["req_1"])[-1] == {"role": "assistant", "content": "Answer 1."}


def test_images_of_a_file_read_again_whole_are_not_counted_again(tmp_path):
    """Trial: a log gzip'd after it was harvested (logrotate's compress) is read again whole: its rows count
    again as lines, its records as duplicates, and its images were counted again (2 image parts in 2 records,
    for one record with one)."""
    import gzip

    pic = openai_row(1)
    pic["request"]["messages"][1]["content"] = [{"type": "text", "text": "What is this?"},
                                                {"type": "image_url", "image_url": {"url": CAT}}]
    path = tmp_path / "logs" / "a.jsonl"
    jsonl(path, [pic, openai_row(2)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl*"}]})
    assert harvest(recipe)["counts"]["images"] == {"images": 1, "records_with_images": 1}
    path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    m = harvest(recipe)
    assert m["counts"]["this_run"]["duplicates"] == 2
    assert m["counts"]["images"] == {"images": 1, "records_with_images": 1}  # was 2 and 2


def test_a_clients_own_has_images_tag_does_not_stop_the_count(tmp_path):
    """Review: a client's metadata tag has_images: "yes" (tags come from request metadata) made the recount of a
    re-read file raise ValueError."""
    import gzip

    pic, plain, late = openai_row(1), openai_row(2), openai_row(3)
    pic["request"]["messages"][1]["content"] = [{"type": "text", "text": "What is this?"},
                                                {"type": "image_url", "image_url": {"url": CAT}}]
    late["request"]["metadata"]["has_images"] = "yes"
    path = tmp_path / "logs" / "a.jsonl"
    jsonl(path, [pic, plain])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl*"}]})
    harvest(recipe)
    jsonl(path, [pic, plain, late])  # a line came late, then the file was gzip'd: read again whole
    path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    m = harvest(recipe)
    assert m["counts"]["this_run"]["duplicates"] == 2 and m["counts"]["images"]["images"] == 1


def test_an_image_only_message_is_kept_with_its_images(tmp_path):
    tz = _tz(1, [{"type": "image", "url": "https://example.com/only.png"}])
    jsonl(tmp_path / "tz" / "ChatInference.jsonl", [tz])
    recipe = write_recipe(tmp_path, {"sources": [{"format": "tensorzero", "path": "tz/*.jsonl"}]})
    harvest(recipe)
    msgs = by_id(recipe)[tz["id"]]["messages"]
    assert msgs == [{"role": "user", "content": None, "name": None, "tool_call_id": None, "tool_calls": None,
                     "images": ["https://example.com/only.png"]}]


def test_otel_image_parts_are_kept():
    got = _parts_message({"role": "user", "parts": [
        {"type": "text", "content": "Describe"},
        {"type": "uri", "modality": "image", "mime_type": "image/png", "uri": "https://example.com/x.png"},
        {"type": "blob", "modality": "image", "mime_type": "image/jpeg", "content": "CCCC"},
        {"type": "file", "modality": "image", "file_id": "file-9"}]}, "m")
    assert got[0]["content"] == "Describe"
    assert got[0]["images"] == ["https://example.com/x.png", "data:image/jpeg;base64,CCCC", "file_id:file-9"]


def test_image_refs():
    assert image_ref({"type": "image_url", "image_url": CAT}) == CAT
    assert image_ref({"type": "input_image", "image_url": DATA}) == DATA
    assert image_ref({"type": "image"}) == "unreferenced:"


def test_files_harvested_before_images_were_kept_still_read():
    old_msg = pa.struct([(f.name, f.type) for f in RECORD_SCHEMA.field("output").type if f.name != "images"])
    old_schema = pa.schema([pa.field(f.name, pa.list_(old_msg) if f.name == "messages" else
                                     old_msg if f.name == "output" else f.type) for f in RECORD_SCHEMA])
    new = to_table([{"id": "a", "messages": [{"role": "user", "content": "hi"}],
                     "output": {"role": "assistant", "content": "yo"}}])
    old = new.drop_columns(["messages", "output"])
    old = old.add_column(5, "messages", pa.array([[{"role": "user", "content": "hi", "name": None,
                                                    "tool_call_id": None, "tool_calls": None}]], pa.list_(old_msg)))
    old = old.add_column(8, "output", pa.array([{"role": "assistant", "content": "yo", "name": None,
                                                 "tool_call_id": None, "tool_calls": None}], old_msg))
    assert old.schema == old_schema
    rec = from_table(old)[0]
    assert prompt_messages(rec) == [{"role": "user", "content": "hi"}] and "images" not in rec["messages"][0]
    unified = pa.unify_schemas([old.schema, new.schema], promote_options="permissive")
    assert from_table(old.cast(unified))[0]["messages"][0]["images"] is None


# --- defect 7, rest: values coerced or dropped are counted per field ----------------------------------------------------

def test_coerced_and_dropped_values_are_counted_per_field(tmp_path):
    fast = openai_row(1, latency_ms="n/a")  # the fast path: a plain row whose latency is not a number
    slow = openai_row(2, latency_ms={"ms": 3}, feedback={"thumbs_up": True, "comment": "nice"})
    slow["request"]["metadata"] = "priority=high"  # tags that are not a map
    slow["response"]["usage"] = {"prompt_tokens": "many", "completion_tokens": 2.5}
    clean = openai_row(3, latency_ms="120")  # a number written as text is read, not coerced
    bad = openai_row(4, latency_ms="n/a")
    bad["request"]["messages"] = []  # quarantined: its values were never coerced into a record
    jsonl(tmp_path / "logs" / "a.jsonl", [fast, slow, clean, bad])
    tz = _tz(5, "Which city?")
    tz.update(tags=["a", "b"], processing_time_ms="slow", input_tokens=1e30)
    jsonl(tmp_path / "tz" / "ChatInference.jsonl", [tz])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "oa"},
                                                 {"format": "tensorzero", "path": "tz/*.jsonl", "name": "tz"}]})
    m = harvest(recipe)
    assert len(quarantine(recipe)) == 1
    r = by_id(recipe)
    assert r["req_1"]["latency_ms"] is None and r["req_3"]["latency_ms"] == 120.0
    assert r["req_2"]["usage"] == {"input_tokens": None, "output_tokens": 2}
    assert r["req_2"]["feedback"] == {"thumbs_up": 1.0}
    assert m["counts"]["coerced"] == {"feedback": 1, "latency_ms": 3, "tags": 2, "usage.input_tokens": 2,
                                      "usage.output_tokens": 1}
    src = m["counts"]["sources"]
    assert src["oa"]["coerced:latency_ms"] == 2 and src["tz"]["coerced:latency_ms"] == 1
    assert src["tz"]["coerced:tags"] == 1 and "coerced:tags" in src["oa"]
    # rows in = harvested + quarantined still
    assert m["counts"]["lines"] == len(r) + 1


def test_coerced_counts_add_up_over_nightly_runs(tmp_path):
    log = tmp_path / "logs" / "a.jsonl"
    jsonl(log, [openai_row(1, latency_ms="n/a")])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "oa"}]})
    assert harvest(recipe)["counts"]["coerced"] == {"latency_ms": 1}
    jsonl(log, [openai_row(2, latency_ms=[1])], mode="a")
    assert harvest(recipe)["counts"]["coerced"] == {"latency_ms": 2}


def test_the_summary_names_each_coerced_field():
    counts: dict = {}
    summary: list = []
    st = type("S", (), {"label": "oa", "counts": {"coerced:latency_ms": 3, "coerced:tags": 1, "records": 9}})()
    harvest_stage._notes(counts, summary, {"k": st})
    assert counts["coerced"] == {"latency_ms": 3, "tags": 1}
    line = dict(summary)["coerced"]
    assert line.startswith("4 values dropped or truncated") and "latency_ms 3, tags 1" in line


def test_clean_rows_count_nothing(tmp_path):
    jsonl(tmp_path / "logs" / "a.jsonl", [openai_row(i) for i in range(5)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]})
    m = harvest(recipe)
    assert "coerced" not in m["counts"] and "images" not in m["counts"]
