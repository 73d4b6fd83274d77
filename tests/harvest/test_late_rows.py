"""Late rows: what a file gave is tracked by position (byte offset of the last whole line) and by record id, not by
time, so a row appended to a file already read, a new file of old rows, and an unfinished last line completed later
are each harvested on the next run, exactly once."""

import gzip
import json

from harvest_helpers import by_id, harvest, in_tmp, jsonl, openai_row, records, write_recipe  # noqa: F401

from pipeline.cli import main as cli

RUN = "runs/t/harvest"


def row(i: int, d: int, minute: int = 0) -> dict:
    return openai_row(i, ts=f"2026-11-{d:02d}T10:{minute:02d}:00Z")


def balanced(c: dict) -> bool:
    """Every row read is accounted for."""
    return c["lines"] == c["quarantined"] + c["records"] + c["skipped_old"] + c["duplicates"] - c["extra_choices"]


def ids(recipe) -> list[str]:
    got = [r["id"] for r in records(recipe)]
    assert len(got) == len(set(got)), "a record was harvested twice"
    return sorted(got)


def test_a_row_appended_to_a_file_already_read_is_harvested_next_run_once(tmp_path):
    a = jsonl(tmp_path / "logs" / "a.jsonl", [row(1, 22), row(2, 22)])
    jsonl(tmp_path / "logs" / "b.jsonl", [row(3, 24)])  # newer rows elsewhere move the newest time kept on
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]})
    assert harvest(recipe)["counts"]["records"] == 3
    jsonl(a, [row(4, 22, 5)], mode="a")  # a late row, older than the newest kept
    m = harvest(recipe)
    c = m["counts"]["this_run"]
    assert c["lines"] == 1 and c["records"] == 1 and c["skipped_old"] == 0 and c["files_unchanged"] == 1
    assert ids(recipe) == ["req_1", "req_2", "req_3", "req_4"]
    assert by_id(recipe)["req_4"]["source"] == "a.jsonl:3"
    assert balanced(c) and balanced(m["counts"])
    # A third run with one more late row: each row still once.
    jsonl(a, [row(5, 21)], mode="a")
    m = harvest(recipe)
    assert m["counts"]["this_run"]["lines"] == 1 and m["counts"]["this_run"]["records"] == 1
    assert ids(recipe) == ["req_1", "req_2", "req_3", "req_4", "req_5"] and by_id(recipe)["req_5"]["source"] == "a.jsonl:4"


def test_a_new_file_of_rows_older_than_the_newest_kept_is_harvested(tmp_path):
    jsonl(tmp_path / "logs" / "today.jsonl", [row(i, 24, i) for i in range(3)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]})
    harvest(recipe)
    # A backfill of last week turns up, one row of it a copy of a row harvested already.
    jsonl(tmp_path / "logs" / "backfill.jsonl", [row(10 + i, 17, i) for i in range(4)] + [row(1, 24, 1)])
    m = harvest(recipe)
    c = m["counts"]["this_run"]
    assert c["lines"] == 5 and c["records"] == 4 and c["duplicates"] == 1 and c["skipped_old"] == 0
    assert ids(recipe) == sorted(["req_0", "req_1", "req_2", "req_10", "req_11", "req_12", "req_13"])
    assert balanced(m["counts"])


def test_an_unfinished_last_line_is_held_back_counted_then_harvested_once(tmp_path, capsys):
    log = tmp_path / "logs" / "live.jsonl"
    jsonl(tmp_path / "logs" / "other.jsonl", [row(9, 25)])  # newer than the unfinished row
    whole = [json.dumps(row(i, 23, i)) for i in range(3)]
    log.write_text(whole[0] + "\n" + whole[1] + "\n" + whole[2][:50])  # the writer is mid-line
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]})
    capsys.readouterr()
    m = harvest(recipe)
    out = capsys.readouterr().out
    assert m["counts"]["records"] == 3 and m["counts"]["quarantined"] == 0
    assert m["counts"]["held_back_partial_line"] == [{"source": "app", "file": str(log), "bytes": 50}]
    assert m["counts"]["this_run"]["held_back_partial_line"] == 1
    assert "held back" in out and "live.jsonl" in out
    assert balanced(m["counts"])
    # The writer finishes the line (and nothing else): it is read, once, with its own line number.
    with open(log, "a") as f:
        f.write(whole[2][50:] + "\n")
    m = harvest(recipe)
    assert m["counts"]["this_run"]["lines"] == 1 and m["counts"]["this_run"]["records"] == 1
    assert m["counts"]["held_back_partial_line"] == [] and m["counts"]["this_run"]["held_back_partial_line"] == 0
    assert by_id(recipe)["req_2"]["source"] == "live.jsonl:3"
    # Next run: more lines; the completed one is not read again.
    jsonl(log, [row(3, 23, 3)], mode="a")
    m = harvest(recipe)
    assert m["counts"]["this_run"]["lines"] == 1 and m["counts"]["this_run"]["duplicates"] == 0
    assert ids(recipe) == ["req_0", "req_1", "req_2", "req_3", "req_9"] and by_id(recipe)["req_3"]["source"] == "live.jsonl:4"


def test_an_unchanged_unfinished_line_stays_held_back_and_the_file_unread(tmp_path):
    log = tmp_path / "live.jsonl"
    log.write_text(json.dumps(row(0, 23)) + "\n" + json.dumps(row(1, 23))[:30])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "live.jsonl"}]})
    harvest(recipe)
    m = harvest(recipe, "--force")
    assert m["counts"]["this_run"]["files_unchanged"] == 1 and m["counts"]["this_run"]["lines"] == 0
    assert [h["bytes"] for h in m["counts"]["held_back_partial_line"]] == [30]


def test_a_last_line_without_a_newline_that_is_whole_is_kept_and_appends_go_on(tmp_path):
    log = tmp_path / "live.jsonl"
    log.write_text(json.dumps(row(0, 23)) + "\n" + json.dumps(row(1, 23)))  # no final newline, but whole
    recipe = write_recipe(tmp_path, {"sources": [{"path": "live.jsonl"}]})
    assert harvest(recipe)["counts"]["records"] == 2
    with open(log, "a") as f:
        f.write("\n" + json.dumps(row(2, 22)) + "\n")
    m = harvest(recipe)
    assert m["counts"]["this_run"]["records"] == 1 and m["counts"]["this_run"]["duplicates"] == 0
    assert ids(recipe) == ["req_0", "req_1", "req_2"] and by_id(recipe)["req_2"]["source"] == "live.jsonl:3"


def test_a_rewritten_file_is_read_whole_and_deduplicated_by_id(tmp_path):
    log = jsonl(tmp_path / "app.jsonl", [row(i, 23, i) for i in range(4)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "app.jsonl"}]})
    harvest(recipe)
    # Rotated: the file now holds two old rows (a copy), then a late one and a new one; the prefix differs.
    jsonl(log, [row(2, 23, 2), row(3, 23, 3), row(7, 20), row(8, 25)])
    m = harvest(recipe)
    c = m["counts"]["this_run"]
    assert c["lines"] == 4 and c["records"] == 2 and c["duplicates"] == 2 and c["skipped_old"] == 0
    assert ids(recipe) == ["req_0", "req_1", "req_2", "req_3", "req_7", "req_8"]


def test_a_changed_gzip_file_is_reread_whole_and_deduplicated(tmp_path):
    gz = tmp_path / "logs" / "day.jsonl.gz"
    gz.parent.mkdir()
    lines = [json.dumps(row(i, 23, i)) for i in range(3)]
    gz.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl.gz"}]})
    harvest(recipe)
    lines.append(json.dumps(row(5, 21)))  # late, and the file is recompressed
    gz.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    m = harvest(recipe)
    c = m["counts"]["this_run"]
    assert c["lines"] == 4 and c["records"] == 1 and c["duplicates"] == 3
    assert ids(recipe) == ["req_0", "req_1", "req_2", "req_5"]


def test_late_rows_with_worker_processes(tmp_path):
    a = jsonl(tmp_path / "logs" / "a.jsonl", [row(i, 22, i % 60) for i in range(40)])
    jsonl(tmp_path / "logs" / "b.jsonl", [row(100, 25)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}], "workers": 2, "batch_size": 15})
    harvest(recipe)
    with open(a, "a") as f:
        f.write("\n".join(json.dumps(row(200 + i, 21, i)) for i in range(20)) + "\n" + json.dumps(row(300, 21))[:20])
    m = harvest(recipe)
    assert m["counts"]["this_run"]["records"] == 20 and m["counts"]["this_run"]["held_back_partial_line"] == 1
    with open(a, "a") as f:
        f.write(json.dumps(row(300, 21))[20:] + "\n")
    m = harvest(recipe)
    assert m["counts"]["this_run"]["records"] == 1 and len(ids(recipe)) == 62
    assert by_id(recipe)["req_300"]["source"] == "a.jsonl:61"


def _as_version_1(path) -> None:
    """Rewrite a watermarks.json the way the code before format version 2 wrote it: per file only how far it was
    read (size = offset for a plain JSON-lines file, a hash of that part), no held-back bytes, no version 2."""
    wm = json.loads(path.read_text())
    for st in wm["sources"].values():
        st["files"] = {url: {"size": e["offset"], "offset": e["offset"], "lines": e["lines"],
                             "sample": e["read_sample"], "version": e["version"]} for url, e in st["files"].items()}
    wm["version"] = 1
    path.write_text(json.dumps(wm, indent=2) + "\n")


def test_a_run_directory_of_the_earlier_format_goes_on_without_loss_or_duplicates(tmp_path):
    log = tmp_path / "logs" / "live.jsonl"
    whole = [json.dumps(row(i, 23, i)) for i in range(4)]
    log.parent.mkdir()
    log.write_text("\n".join(whole[:3]) + "\n" + whole[3][:25])
    jsonl(tmp_path / "logs" / "new.jsonl", [row(50, 26)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]})
    harvest(recipe)
    _as_version_1(tmp_path / RUN / "watermarks.json")
    with open(log, "a") as f:
        f.write(whole[3][25:] + "\n" + json.dumps(row(4, 20)) + "\n")
    jsonl(tmp_path / "logs" / "older.jsonl", [row(60, 19)])
    m = harvest(recipe)
    c = m["counts"]["this_run"]
    assert c["lines"] == 3 and c["records"] == 3 and c["duplicates"] == 0
    assert ids(recipe) == ["req_0", "req_1", "req_2", "req_3", "req_4", "req_50", "req_60"]
    assert by_id(recipe)["req_4"]["source"] == "live.jsonl:5"
    assert json.loads((tmp_path / RUN / "watermarks.json").read_text())["version"] == 2
    assert cli(["harvest", str(recipe)]) == 0 and len(ids(recipe)) == 7
