import json
from datetime import datetime, timezone

import pyarrow.parquet as pq

from curation import filters
from curation.curate import SPLITS
from pipeline.cli import main as cli
from pipeline.config.curate import CurateConfig, FeedbackFilter
from pipeline.record import from_table, message


def rec(i, user="hello", out="hi", **kw):
    base = {
        "id": f"r{i}", "source": "x", "timestamp": datetime(2026, 1, 1, 0, 0, i, tzinfo=timezone.utc),
        "function": "f", "messages": [message("user", user)], "output": message("assistant", out),
        "finish_reason": "stop", "status_code": 200, "error": None, "feedback": {}, "tags": {},
    }
    return {**base, **kw}


CFG = CurateConfig(feedback=FeedbackFilter(metric="thumbs_up", min_value=0.5))


def test_each_filter_drops_what_it_should_and_says_why():
    _, r = filters.http_error([rec(0), rec(1, status_code=503, error="overloaded"), rec(2, output=None)], CFG)
    assert r == [None, "HTTP 503: overloaded", "no output in the response"]
    _, r = filters.empty_output([rec(0), rec(1, out="  ")], CFG)
    assert r == [None, "empty output"]
    _, r = filters.truncated_output([rec(0), rec(1, finish_reason="length")], CFG)
    assert r[0] is None and "finish_reason=length" in r[1]
    _, r = filters.refusal([rec(0, out="Sorry, but I can't do that"), rec(1, out="I'm unable to help"),
                            rec(2, out="Sure! Here it is.")], CFG)
    assert r[0] and r[1] and r[2] is None
    _, r = filters.feedback([rec(0, feedback={"thumbs_up": 0.0}), rec(1, feedback={"thumbs_up": 1.0}), rec(2)], CFG)
    assert r == ["thumbs_up=0 < 0.5", None, None]


def test_dedup_keeps_the_best_feedback_copy():
    batch = [rec(0, user="Where is my order?"), rec(1, user="where  is my ORDER?", feedback={"thumbs_up": 1.0}),
             rec(2, user="Where is my order?"), rec(3, user="Something else")]
    _, r = filters.exact_dedup(batch, CFG)
    assert r == ["duplicate of r1", None, "duplicate of r1", None]


def test_pii_is_redacted_everywhere_or_dropped():
    batch = [rec(0, user="mail me: jane.doe@example.com or call +1 555-123-4567", out="I will email jane.doe@example.com")]
    out, r = filters.pii(batch, CFG)
    assert r == [None]
    assert out[0]["messages"][0]["content"] == "mail me: <EMAIL> or call <PHONE>"
    assert out[0]["output"]["content"] == "I will email <EMAIL>"
    _, r = filters.pii([rec(1, user="call 555-987-6543")], CurateConfig(pii="drop"))
    assert r == ["contains phone"]


def test_curate_accounts_for_every_record_and_splits_stably(project):
    recipe = project(days={"2026-11-23": 500})
    assert cli(["curate", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    report = json.loads((run / "curate" / "report.json").read_text())
    harvested = json.loads((run / "harvest" / "manifest.json").read_text())["counts"]["records"]
    kept = {s: from_table(pq.read_table(run / "curate" / f"{s}.parquet")) for s in SPLITS}
    rejected = pq.read_table(run / "curate" / "rejected.parquet").to_pylist()
    assert report["records_in"] == harvested == sum(map(len, kept.values())) + len(rejected)
    assert report["kept"] == sum(map(len, kept.values())) and report["rejected"] == len(rejected)
    by_op = {}
    for r in rejected:
        assert r["rejected_by"] and r["reason"]
        by_op[r["rejected_by"]] = by_op.get(r["rejected_by"], 0) + 1
    assert by_op == {k: v["dropped"] for k, v in report["operators"].items() if v["dropped"]}
    for op in ("http_error", "empty_output", "refusal", "feedback", "exact_dedup"):
        assert by_op.get(op, 0) > 0, op
    assert all(r["split"] == s for s, rows in kept.items() for r in rows)
    assert all(len(rows) > 0 for rows in kept.values())
    # No e-mail address or phone number from the logs reaches kept or rejected data.
    blob = "".join(json.dumps(r["messages"]) + json.dumps(r["output"]) for rows in [*kept.values(), rejected]
                   for r in rows)
    assert "@example" not in blob and "555-" not in blob and "<EMAIL>" in blob

    # A second day of logs arrives: no earlier record moves to another split.
    first = {r["id"]: s for s, rows in kept.items() for r in rows}
    from curation.demo_traffic import write_demo

    write_demo(recipe.parent / "logs", {"2026-11-24": 300})
    assert cli(["curate", str(recipe)]) == 0
    again = {r["id"]: s for s in SPLITS for r in from_table(pq.read_table(run / "curate" / f"{s}.parquet"))}
    moved = [i for i, s in first.items() if i in again and again[i] != s]
    assert len(again) > len(first) and not moved
