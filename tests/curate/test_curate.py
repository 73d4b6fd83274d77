"""The curate stage on the demo traffic: every record accounted for, the audit matches the data, splits are
stable from one nightly run to the next."""

import json

import pyarrow.parquet as pq

from curation.curate.stage import SPLITS
from curation.harvest.demo_traffic import write_demo
from pipeline.cli import main as cli
from pipeline.record import from_table


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
    for op in ("http_error", "empty_output", "truncated_output", "refusal", "feedback", "exact_dedup", "near_dedup",
               "decontaminate"):
        assert by_op.get(op, 0) > 0, op
        ex = report["operators"][op]["examples"]
        assert ex and set(ex[0]) == {"id", "source", "reason"} and report["operators"][op]["seconds"] >= 0
    assert all(r["split"] == s for s, rows in kept.items() for r in rows)
    assert all(len(rows) > 0 for rows in kept.values())
    assert "no length limits" in report["lengths"] and report["executor"] == "inprocess"
    # No e-mail address or phone number from the logs reaches kept or rejected data.
    blob = "".join(json.dumps(r["messages"]) + json.dumps(r["output"]) for rows in [*kept.values(), rejected]
                   for r in rows)
    assert "@example" not in blob and "555-" not in blob and "<EMAIL>" in blob and "<PHONE>" in blob
    assert report["pii_redacted_in_kept"] > 0

    # A second day of logs arrives: no earlier record moves to another split.
    first = {r["id"]: s for s, rows in kept.items() for r in rows}
    write_demo(recipe.parent / "logs", {"2026-11-24": 300})
    assert cli(["curate", str(recipe)]) == 0
    again = {r["id"]: s for s in SPLITS for r in from_table(pq.read_table(run / "curate" / f"{s}.parquet"))}
    moved = [i for i, s in first.items() if i in again and again[i] != s]
    assert len(again) > len(first) and not moved
