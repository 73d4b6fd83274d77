"""Nightly increments: what each file gave tracked by position and record id (not time), only new rows read, no
record harvested twice, late rows and old files harvested, feedback that arrives later, crash safety, worker
processes, SQL pushdown."""

import json
import os
import sqlite3

import pytest
from harvest_helpers import by_id, harvest, in_tmp, jsonl, openai_row, quarantine, records, write_recipe  # noqa: F401

from curation.harvest import ingest
from pipeline.cli import main as cli

RUN = "runs/t/harvest"


def day(d: int, n: int, start: int = 0) -> list[dict]:
    return [openai_row(start + i, ts=f"2026-11-{d:02d}T{10 + i // 60:02d}:{i % 60:02d}:00Z") for i in range(n)]


def test_a_second_day_reads_only_what_is_new(tmp_path, capsys):
    log = jsonl(tmp_path / "logs" / "app.jsonl", day(23, 30))  # one log file, appended to every day
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]})
    first = harvest(recipe)
    assert first["counts"]["records"] == 30
    batch1 = sorted((tmp_path / RUN / "batches").glob("*.parquet"))
    inode = {p.name: p.stat().st_ino for p in batch1}

    # Day 2: 20 new lines appended; a re-export drops a copy of 5 day-1 lines plus 3 new ones into a new file,
    # and a late line older than the newest record kept turns up.
    new = day(24, 20, start=100)
    jsonl(log, new, mode="a")
    jsonl(tmp_path / "logs" / "reexport.jsonl", day(23, 30)[-5:] + day(24, 3, start=200) + new[:1]
          + [openai_row(999, ts="2026-11-22T09:00:00Z")])
    capsys.readouterr()
    second = harvest(recipe)
    c = second["counts"]["this_run"]
    # The grown file is read from where the last run stopped: only its 20 new lines.
    # The late line is harvested (files are not filtered by time); the day-1 copies and a day-2 line in both files
    # are dropped by id.
    assert c["lines"] == 20 + 10 and c["records"] == 24
    assert c["skipped_old"] == 0
    assert c["duplicates"] == 5 + 1
    for k in (c, second["counts"]):  # every row read is accounted for, tonight and in all
        assert k["lines"] == k["quarantined"] + k["records"] + k["skipped_old"] + k["duplicates"] - k["extra_choices"]
    assert second["counts"]["records"] == 54 and second["counts"]["sources"]["app"]["watermark"] == "2026-11-24T10:19:00Z"
    got = records(recipe)
    assert len(got) == len({r["id"] for r in got}) == 54 and "req_999" in {r["id"] for r in got}
    # Day-1 batches are carried forward by hard links, not rewritten.
    for name, ino in inode.items():
        assert (tmp_path / RUN / "batches" / name).stat().st_ino == ino
    # New lines of the grown file keep their line numbers.
    assert by_id(recipe)["req_100"]["source"] == "app.jsonl:31"
    wm = json.loads((tmp_path / RUN / "watermarks.json").read_text())
    assert wm["batch"] == 2 and len(wm["sources"]) == 1

    # Nothing new: harvest is skipped; forced, it reproduces the same data files byte for byte.
    capsys.readouterr()
    assert cli(["harvest", str(recipe)]) == 0
    assert "harvest: unchanged" in capsys.readouterr().out
    outputs = {k: v for k, v in second["outputs"].items() if k != "quarantine.jsonl"}
    forced = harvest(recipe, "--force")
    assert {k: v for k, v in forced["outputs"].items() if k != "quarantine.jsonl"} == outputs
    assert forced["counts"]["this_run"]["files_unchanged"] == 2 and forced["counts"]["this_run"]["lines"] == 0


def test_feedback_arriving_later_reaches_earlier_records(tmp_path):
    jsonl(tmp_path / "logs" / "d1.jsonl", day(23, 6) + ["{not json"])
    jsonl(tmp_path / "fb" / "d1.jsonl", [{"target_id": "req_1", "metric_name": "thumbs_up", "value": 1}, "[1"])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}],
                                     "feedback": [{"path": "fb/*.jsonl"}]})
    harvest(recipe)
    assert by_id(recipe)["req_1"]["feedback"] == {"thumbs_up": 1.0} and by_id(recipe)["req_4"]["feedback"] == {}
    batch = next((tmp_path / RUN / "batches").glob("*.parquet"))
    ino = batch.stat().st_ino
    # The next night: no new logs, but users rated yesterday's answers (episode ep2 = req_4, req_5).
    jsonl(tmp_path / "fb" / "d2.jsonl", [{"target_id": "req_4", "metric_name": "thumbs_up", "value": 0},
                                         {"target_id": "ep2", "metric_name": "resolved", "value": True}])
    m = harvest(recipe)
    r = by_id(recipe)
    assert r["req_4"]["feedback"] == {"thumbs_up": 0.0, "resolved": 1.0} and r["req_5"]["feedback"] == {"resolved": 1.0}
    assert r["req_1"]["feedback"] == {"thumbs_up": 1.0}
    assert m["counts"]["this_run"]["lines"] == 0 and m["counts"]["feedback"]["records_matched"] == 3
    assert (tmp_path / RUN / "batches" / batch.name).stat().st_ino == ino  # the imported batch is untouched
    # The quarantine keeps the unnamed log source's bad line of the first night, and the feedback file's bad line
    # (feedback is read whole every night) once.
    assert sorted((q["source"], q["file"].rsplit("/", 1)[-1], q["line"]) for q in quarantine(recipe)) == [
        ("feedback[0]", "d1.jsonl", 2), ("logs/*.jsonl", "d1.jsonl", 7)]
    assert m["counts"]["quarantined"] == 2


def test_a_changed_mapping_reharvests_that_source_only(tmp_path):
    jsonl(tmp_path / "a.jsonl", day(23, 4))
    jsonl(tmp_path / "b.jsonl", day(23, 3, start=50))
    src_a = {"path": "a.jsonl", "name": "a"}
    recipe = write_recipe(tmp_path, {"sources": [src_a, {"path": "b.jsonl", "name": "b"}]})
    harvest(recipe)
    assert {r["function"] for r in records(recipe)} == {"qa"}
    recipe = write_recipe(tmp_path, {"sources": [src_a, {"path": "b.jsonl", "name": "b", "function": "renamed"}]})
    m = harvest(recipe)
    assert m["counts"]["this_run"]["lines"] == 3 and m["counts"]["this_run"]["files_unchanged"] == 1
    fns = {r["id"]: r["function"] for r in records(recipe)}
    assert len(fns) == 7 and fns["req_50"] == "renamed" and fns["req_0"] == "qa"


def test_an_unfinished_last_line_waits_for_the_next_run(tmp_path):
    log = tmp_path / "live.jsonl"
    lines = [json.dumps(r) for r in day(23, 3)]
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # the writer is mid-line
    recipe = write_recipe(tmp_path, {"sources": [{"path": "live.jsonl"}]})
    m = harvest(recipe)
    assert m["counts"]["records"] == 2 and m["counts"]["quarantined"] == 0
    log.write_text("\n".join(lines) + "\n" + json.dumps(openai_row(7, ts="2026-11-23T12:00:00Z")) + "\n")
    m = harvest(recipe)
    assert m["counts"]["records"] == 4 and m["counts"]["quarantined"] == 0
    assert by_id(recipe)["req_2"]["source"] == "live.jsonl:3" and by_id(recipe)["req_7"]["source"] == "live.jsonl:4"


def test_a_killed_harvest_leaves_the_last_one_and_a_rerun_finishes(tmp_path, monkeypatch):
    jsonl(tmp_path / "logs" / "d1.jsonl", day(23, 10))
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}], "batch_size": 5})
    harvest(recipe)
    before = (tmp_path / RUN / "manifest.json").read_text()
    jsonl(tmp_path / "logs" / "d2.jsonl", day(24, 10, start=100))
    real = ingest.Ingest.done
    calls = []

    def dies(self, res):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # like a SIGINT between two chunks
        real(self, res)

    monkeypatch.setattr(ingest.Ingest, "done", dies)
    with pytest.raises(KeyboardInterrupt):
        cli(["harvest", str(recipe)])
    assert (tmp_path / RUN / "manifest.json").read_text() == before  # the complete harvest is untouched
    assert len(records(recipe)) == 10
    monkeypatch.setattr(ingest.Ingest, "done", real)
    m = harvest(recipe)
    assert m["counts"]["records"] == 20 and len({r["id"] for r in records(recipe)}) == 20


def test_worker_processes_give_the_same_records(tmp_path):
    import gzip

    from curation.harvest.demo_traffic import write_demo

    for p in write_demo(tmp_path / "gz", {"2026-11-23": 400}):  # plain files: workers read their own byte ranges
        (tmp_path / "logs").mkdir(exist_ok=True)
        (tmp_path / "logs" / p.name.removesuffix(".gz")).write_bytes(gzip.decompress(p.read_bytes()))
    out = {}
    for workers in (1, 2):
        recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}], "workers": workers,
                                         "batch_size": 150}, name=f"w{workers}")
        assert cli(["harvest", str(recipe)]) == 0
        folder = tmp_path / "runs" / f"w{workers}" / "harvest"
        m = json.loads((folder / "manifest.json").read_text())
        assert m["counts"]["this_run"]["workers"] == workers
        out[workers] = (records(folder), sorted((q["line"], q["reason"]) for q in
                                                map(json.loads, (folder / "quarantine.jsonl").read_text().splitlines())))
    assert out[1] == out[2] and len(out[1][0]) > 350 and out[1][1]


def test_sql_watermark_reads_only_new_rows(tmp_path):
    db = tmp_path / "calls.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE calls (id TEXT PRIMARY KEY, at TEXT, request TEXT, response TEXT)")

    def add(rows):
        con.executemany("INSERT INTO calls VALUES (?, ?, ?, ?)",
                        [(r["id"], r["timestamp"], json.dumps(r["request"]), json.dumps(r["response"])) for r in rows])
        con.commit()

    add(day(23, 5))
    recipe = write_recipe(tmp_path, {"sources": [{"sql": {"url": f"sqlite:///{db}", "table": "calls",
                                                          "timestamp_column": "at"}}]})
    assert harvest(recipe)["counts"]["records"] == 5
    assert cli(["harvest", str(recipe)]) == 0  # unchanged table: skipped (count and max(at) did not move)
    add(day(24, 4, start=10))
    m = harvest(recipe)
    # Only the rows at or after the watermark came back from the database: the 4 new ones and the 1 at it.
    assert m["counts"]["this_run"]["lines"] == 5 and m["counts"]["this_run"]["records"] == 4
    assert m["counts"]["records"] == 9 and m["counts"]["this_run"]["skipped_old"] == 1
    con.close()
    assert quarantine(recipe) == []
    assert os.path.getsize(tmp_path / RUN / "watermarks.json") > 0


def test_three_nights_of_late_rows_old_files_and_a_finished_line_harvest_each_once(tmp_path, capsys):
    """Position and id, not time, decide what is new: rows appended late to a file already read, a new file of
    rows older than the newest kept, and an unfinished last line completed later are each harvested once."""
    logs = tmp_path / "logs"
    app = jsonl(logs / "app.jsonl", day(23, 5))
    live = logs / "live.jsonl"
    cut = json.dumps(openai_row(300, ts="2026-11-23T08:00:00Z"))
    live.write_text(json.dumps(openai_row(299, ts="2026-11-23T07:00:00Z")) + "\n" + cut[:33])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]})

    # Night 1: 6 whole rows; the unfinished line is held back, counted, and named in the summary.
    capsys.readouterr()
    m = harvest(recipe)
    assert m["counts"]["records"] == 6 and m["counts"]["quarantined"] == 0
    assert m["counts"]["held_back_partial_line"] == [{"source": "app", "file": str(live), "bytes": 33}]
    assert "held back" in capsys.readouterr().out

    # Night 2: a late row appended to app.jsonl (older than the newest kept), a new file of last week's rows with
    # one copy of a row kept already, and the unfinished line completed.
    jsonl(app, [openai_row(100, ts="2026-11-20T09:00:00Z"), *day(24, 2, start=110)], mode="a")
    jsonl(logs / "backfill.jsonl", [*day(16, 3, start=200), openai_row(0, ts="2026-11-23T10:00:00Z")])
    with open(live, "a") as f:
        f.write(cut[33:] + "\n")
    m = harvest(recipe)
    c = m["counts"]["this_run"]
    assert c["lines"] == 3 + 4 + 1 and c["records"] == 3 + 3 + 1 and c["duplicates"] == 1
    assert c["skipped_old"] == 0 and c["held_back_partial_line"] == 0 and m["counts"]["held_back_partial_line"] == []
    assert by_id(recipe)["req_100"]["source"] == "app.jsonl:6" and by_id(recipe)["req_300"]["source"] == "live.jsonl:2"

    # Night 3: more late rows in every file, another old file, a new unfinished line; nothing read twice.
    jsonl(app, [openai_row(101, ts="2026-11-19T09:00:00Z")], mode="a")
    jsonl(logs / "backfill.jsonl", [openai_row(203, ts="2026-11-16T11:00:00Z")], mode="a")
    jsonl(logs / "older.jsonl", day(10, 2, start=400))
    with open(live, "a") as f:
        f.write(json.dumps(openai_row(301, ts="2026-11-18T08:00:00Z")) + "\n" + cut[:10])
    m = harvest(recipe)
    c = m["counts"]["this_run"]
    assert c["lines"] == 1 + 1 + 2 + 1 and c["records"] == 5 and c["duplicates"] == 0 and c["skipped_old"] == 0
    assert [h["bytes"] for h in m["counts"]["held_back_partial_line"]] == [10]
    got = [r["id"] for r in records(recipe)]
    assert len(got) == len(set(got)) == 6 + 7 + 5 == m["counts"]["records"]
    assert {"req_100", "req_101", "req_200", "req_203", "req_300", "req_301", "req_400", "req_401"} <= set(got)
    for k in (c, m["counts"]):
        assert k["lines"] == k["quarantined"] + k["records"] + k["skipped_old"] + k["duplicates"] - k["extra_choices"]
