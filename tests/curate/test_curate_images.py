"""Records with image parts (issue 13, defect 3): curate drops them for a text-only student, with a reason, counts
them like every operator, and never shows an image URL in the report."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from curate_helpers import batch, openai_line, plan, rec

from curation.curate.filters import PER_RECORD, image_counts, images, operators
from curation.curate.stage import OPERATOR_ORDER
from pipeline.config.curate import CurateConfig
from pipeline.record import message

SECRET_URL = "https://cdn.example.com/cat.png?X-Amz-Signature=deadbeefcafe"


def test_records_with_image_parts_are_dropped_with_the_count():
    pic = rec(1, messages=[message("user", "What is this?", images=[SECRET_URL, "data:image/png;base64,AAAA"])])
    one = rec(2, messages=[message("system", "s"), message("user", "and this?", images=["file_id:f1"])])
    tagged = rec(3, tags={"has_images": "2"})  # harvested before image parts were kept
    plain = rec(4)
    _, reasons = images(batch(pic, one, tagged, plain), plan())
    assert reasons == ["has 2 image parts; the student is text-only", "has 1 image part; the student is text-only",
                       "has 2 image parts; the student is text-only", None]
    assert SECRET_URL not in "".join(r or "" for r in reasons)


def test_the_operator_runs_after_pii_and_before_the_length_checks_and_can_be_turned_off():
    order = list(OPERATOR_ORDER)
    assert order.index("pii") < order.index("images") < order.index("length")
    assert CurateConfig().drop_images is True
    assert "images" in [op.name for op in operators(CurateConfig())]
    assert "images" not in [op.name for op in operators(CurateConfig(drop_images=False))]
    assert [op.name for op in PER_RECORD][1:3] == ["pii", "images"]  # after record_size, which comes first


def test_files_without_the_images_field_count_none():
    t = batch(rec(1), rec(2))
    msg = t.schema.field("messages").type.value_type
    old = pa.struct([f for f in msg if f.name != "images"])
    arr = pa.array([[{"role": "user", "content": "hi", "name": None, "tool_call_id": None, "tool_calls": None}]] * 2,
                   pa.list_(old))
    out = pa.array([{"role": "assistant", "content": "yo", "name": None, "tool_call_id": None,
                     "tool_calls": None}] * 2, old)
    t = t.set_column(t.schema.get_field_index("messages"), "messages", arr)
    t = t.set_column(t.schema.get_field_index("output"), "output", out)
    assert image_counts(t).tolist() == [0, 0]


def _project(tmp_path, drop_images: bool):
    from conftest import BASE_RECIPE, merge

    logs = tmp_path / "logs"
    logs.mkdir(parents=True)
    lines = [openai_line(f"r{i}", f"Question {i} about my order?", f"Answer {i}.") for i in range(12)]
    pic = json.loads(openai_line("pic", "What is wrong with this invoice?", "The total is off."))
    pic["request"]["messages"][-1]["content"] = [{"type": "text", "text": "What is wrong with this invoice?"},
                                                {"type": "image_url", "image_url": {"url": SECRET_URL}}]
    (logs / "a.jsonl").write_text("\n".join([*lines, json.dumps(pic)]) + "\n")
    recipe = merge(BASE_RECIPE, {"curate": {"drop_images": drop_images, "feedback": None}})
    recipe["harvest"] = {"sources": [{"path": "logs/*.jsonl"}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_curate_drops_images_counts_them_and_keeps_urls_out_of_the_report(tmp_path, monkeypatch):
    from pipeline.cli import main as cli

    monkeypatch.chdir(tmp_path)
    assert cli(["curate", str(_project(tmp_path, True))]) == 0
    cur = tmp_path / "runs" / "t" / "curate"
    rej = pq.read_table(cur / "rejected.parquet", columns=["id", "rejected_by", "reason"]).to_pylist()
    assert rej == [{"id": "pic", "rejected_by": "images", "reason": "has 1 image part; the student is text-only"}]
    report = json.loads((cur / "report.json").read_text())
    text = json.dumps(report)
    op = report["operators"]["images"]
    assert op["dropped"] == 1 and op["in"] == 13 and [e["id"] for e in op["examples"]] == ["pic"]
    assert list(report["operators"])[1:3] == ["pii", "images"]  # after record_size, which comes first
    assert SECRET_URL not in text and "X-Amz-Signature" not in text


def test_a_student_that_reads_images_keeps_them(tmp_path, monkeypatch):
    from pipeline.cli import main as cli

    monkeypatch.chdir(tmp_path)
    assert cli(["curate", str(_project(tmp_path, False))]) == 0
    cur = tmp_path / "runs" / "t" / "curate"
    kept = {r["id"]: r for s in ("train", "val", "test") for r in pq.read_table(cur / f"{s}.parquet").to_pylist()}
    # kept, with the signed URL's signature redacted (a presigned URL is a credential: pipeline.pii)
    assert kept["pic"]["messages"][-1]["images"] == ["https://cdn.example.com/cat.png?<SECRET>"]
    assert "images" not in json.loads((cur / "report.json").read_text())["operators"]

