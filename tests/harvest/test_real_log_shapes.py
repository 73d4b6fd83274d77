"""Shapes that real exports hold and that harvest once lost (issue 13): TensorZero template arguments given as an
object ``value``, functions with no input, image parts, honest feedback counts, pretty-printed ``.json`` files,
byte order marks and raw control characters inside JSON strings. Each test is built from a row of that shape."""

import csv
import json

from harvest_helpers import (
    by_id,
    harvest,
    in_tmp,  # noqa: F401
    jsonl,
    openai_row,
    quarantine,
    write_recipe,
)


def uuid7(ms: int, n: int) -> str:
    h = f"{ms:012x}7{n:03x}8{n:015x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


T0 = 1795392000000  # 2026-11-23T00:00:00Z in ms


def tz_row(n: int, inp, output=None, **over):
    return {"id": uuid7(T0 + n * 1000, n), "function_name": "f", "variant_name": "v",
            "episode_id": uuid7(T0, 900 + n), "input": inp,
            "output": output if output is not None else [{"type": "text", "text": f"answer {n}"}],
            "timestamp": f"2026-11-23T00:00:{n:02d}Z", **over}


def tz_recipe(tmp_path, rows, feedback=None):
    jsonl(tmp_path / "tz" / "ChatInference.jsonl", rows)
    h = {"sources": [{"format": "tensorzero", "path": "tz/*.jsonl"}]}
    if feedback is not None:
        jsonl(tmp_path / "fb" / "feedback.jsonl", feedback)
        h["feedback"] = [{"format": "tensorzero", "path": "fb/*.jsonl"}]
    return write_recipe(tmp_path, h)


# --- 1. TensorZero's older template arguments: a text block whose value is an object ---------------------------------

def test_tensorzero_text_block_with_an_object_value_is_template_arguments(tmp_path):
    old = tz_row(1, {"system": {"persona": "judge"}, "messages": [
        {"role": "user", "content": [{"type": "text", "value": {"topic": "refunds", "n": 3}}]}]},
        output=[{"type": "text", "text": "ok"}])
    new = tz_row(2, {"messages": [{"role": "user", "content": [{"type": "text", "arguments": {"topic": "refunds"}}]}]})
    recipe = tz_recipe(tmp_path, [old, new])
    harvest(recipe)
    r = by_id(recipe)
    assert quarantine(recipe) == []
    assert json.loads(r[old["id"]]["messages"][1]["content"]) == {"topic": "refunds", "n": 3}
    # the same rendering as the newer ``arguments`` form
    assert r[new["id"]]["messages"][0]["content"] == json.dumps({"topic": "refunds"}, separators=(",", ":"))


# --- 2. A function whose fixed system template needs no arguments: input {"messages": []} ----------------------------

def test_tensorzero_function_with_no_input_is_harvested(tmp_path):
    bare = tz_row(1, {"messages": []})
    with_system = tz_row(2, {"system": "Write a haiku.", "messages": []})
    null_system = tz_row(3, json.dumps({"system": None, "messages": []}))
    recipe = tz_recipe(tmp_path, [bare, with_system, null_system])
    m = harvest(recipe)
    r = by_id(recipe)
    assert quarantine(recipe) == []
    assert m["counts"]["records"] == 3
    assert r[bare["id"]]["messages"] == [] and r[bare["id"]]["output"]["content"] == "answer 1"
    assert r[null_system["id"]]["messages"] == []
    assert [x["role"] for x in r[with_system["id"]]["messages"]] == ["system"]


# --- 3. Image parts: kept visible (a tag and counts), never dropped silently --------------------------------------------

def test_image_parts_are_tagged_and_counted(tmp_path):
    pic = openai_row(1)
    pic["request"]["messages"][1]["content"] = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    plain = openai_row(2)
    jsonl(tmp_path / "logs" / "a.jsonl", [pic, plain])
    tz = tz_row(3, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Which city?"},
        {"type": "file", "file": {"url": "https://example.com/p.jpg", "mime_type": "image/jpeg"},
         "storage_path": {"kind": {"type": "s3_compatible"}, "path": "x"}},
        {"type": "image", "url": "https://example.com/q.png"}]}]})
    jsonl(tmp_path / "tz" / "ChatInference.jsonl", [tz])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "oa"},
                                                 {"format": "tensorzero", "path": "tz/*.jsonl", "name": "tz"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert r["req_1"]["tags"]["has_images"] == "2"
    assert r["req_1"]["messages"][1]["content"] == "What is in this image?"
    assert "has_images" not in r["req_2"]["tags"]
    assert r[tz["id"]]["tags"]["has_images"] == "2" and r[tz["id"]]["messages"][0]["content"] == "Which city?"
    src = m["counts"]["sources"]
    assert src["oa"]["images"] == 2 and src["oa"]["records_with_images"] == 1
    assert src["tz"]["images"] == 2 and src["tz"]["records_with_images"] == 1
    assert m["counts"]["images"] == {"images": 4, "records_with_images": 2}


# --- 6. Honest feedback counts; feedback on a replaced answer does not judge its replacement ---------------------------

def test_feedback_counts_applied_and_unmatched_and_a_demonstration_sets_old_scores_aside(tmp_path):
    a, b = tz_row(1, {"messages": [{"role": "user", "content": "q1"}]}), \
        tz_row(2, {"messages": [{"role": "user", "content": "q2"}]})
    ghost = uuid7(T0, 777)
    fb = [
        {"id": uuid7(T0 + 9000, 10), "target_id": a["id"], "metric_name": "thumbs_up", "value": False},
        {"id": uuid7(T0 + 9100, 11), "inference_id": a["id"], "value": json.dumps([{"type": "text",
                                                                                     "text": "fixed"}])},
        {"id": uuid7(T0 + 9200, 12), "target_id": b["id"], "metric_name": "thumbs_up", "value": True},
        {"id": uuid7(T0 + 9300, 13), "target_id": ghost, "metric_name": "thumbs_up", "value": True},
        {"id": uuid7(T0 + 9400, 14), "inference_id": uuid7(T0, 778), "value": "a correction for nothing"},
    ]
    recipe = tz_recipe(tmp_path, [a, b], fb)
    m = harvest(recipe)
    r = by_id(recipe)
    ra = r[a["id"]]
    assert ra["output"]["content"] == "fixed" and ra["tags"]["output_source"] == "demonstration"
    assert "thumbs_up" not in ra["feedback"]  # it judged the replaced answer, not the correction
    assert json.loads(ra["tags"]["replaced_output_feedback"]) == {"thumbs_up": 0.0}
    assert r[b["id"]]["feedback"] == {"thumbs_up": 1.0}
    f = m["counts"]["feedback"]
    assert f["demonstrations"] == 2 and f["demonstrations_applied"] == 1
    assert f["rows_matched"] == 3 and f["rows_unmatched"] == 2
    assert f["scores_set_aside"] == 1


# --- 7. Clear reasons: JSON documents, byte order marks, control characters -------------------------------------------

def test_pretty_printed_json_files_are_read_as_documents(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "one.json").write_text(json.dumps(openai_row(1), indent=2))
    (logs / "many.json").write_text(json.dumps([openai_row(2), openai_row(3), 42], indent=2))
    # a JSON-lines file named .json is still read line by line
    (logs / "lines.json").write_text(json.dumps(openai_row(4)) + "\n" + json.dumps(openai_row(5)) + "\n{oops\n")
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.json"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert sorted(r) == ["req_1", "req_2", "req_3", "req_4", "req_5"]
    q = sorted((x["file"].rsplit("/", 1)[-1], x["line"], x["reason"].split(":")[0]) for x in quarantine(recipe))
    assert q == [("lines.json", 3, "invalid JSON"), ("many.json", 3, "line is a JSON int, not an object")]
    assert m["counts"]["lines"] == 7 and m["counts"]["quarantined"] == 2


def test_a_byte_order_mark_is_stripped(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(openai_row(1)).encode() + b"\n"
                                   + json.dumps(openai_row(2)).encode() + b"\n")
    (logs / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([openai_row(3)], indent=1).encode())
    with open(logs / "c.csv", "w", encoding="utf-8-sig", newline="") as fh:
        w = csv.DictWriter(fh, ["id", "q", "a"])
        w.writeheader()
        w.writerow({"id": "c1", "q": "question", "a": "answer"})
    recipe = write_recipe(tmp_path, {"sources": [
        {"path": "logs/*.json*"},
        {"format": "mapped", "path": "logs/*.csv", "fields": {"id": "id", "prompt": "q", "output": "a"}}]})
    harvest(recipe)
    assert quarantine(recipe) == []
    assert sorted(by_id(recipe)) == ["c1", "req_1", "req_2", "req_3"]


def test_raw_control_characters_are_read_leniently_and_flagged(tmp_path):
    raw = json.dumps(openai_row(1)).replace("Question number 1?", "Question\tnumber\x01 1?")
    assert "\t" in raw  # a raw tab inside a JSON string: invalid JSON, yet real rows have them
    logs = tmp_path / "logs"
    jsonl(logs / "a.jsonl", [raw, openai_row(2)])
    (logs / "b.json").write_text("[" + raw.replace("req_1", "req_3") + "]")
    fb = tmp_path / "fb.jsonl"
    fb.write_text(json.dumps({"target_id": "req_2", "metric_name": "thumbs_up", "value": True, "note": "a\tb"})
                  .replace("\\t", "\t") + "\n")
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*", "name": "oa"}],
                                     "feedback": [{"format": "tensorzero", "path": "fb.jsonl"}]})
    m = harvest(recipe)
    r = by_id(recipe)
    assert quarantine(recipe) == []
    assert r["req_1"]["messages"][1]["content"] == "Question\tnumber\x01 1?"
    assert r["req_1"]["tags"]["lenient_json"] == "control characters in strings"
    assert r["req_3"]["tags"]["lenient_json"] == "control characters in strings"
    assert "lenient_json" not in r["req_2"]["tags"] and r["req_2"]["feedback"] == {"thumbs_up": 1.0}
    assert m["counts"]["sources"]["oa"]["lenient_json"] == 2
