"""One bad file never stops the night: a truncated .jsonl.gz gives every row before the cut, a file that is not
gzip at all is quarantined with its name and reason, and the other files are harvested; the books balance."""

from __future__ import annotations

import gzip
import json

import pytest

from pipeline.cli import main as cli


def _manifest(recipe):
    return json.loads((recipe.parent / "runs" / "t" / "harvest" / "manifest.json").read_text())


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_and_non_gzip_files_are_quarantined_and_the_rest_harvested(project, workers):
    recipe = project(harvest={"workers": workers})
    logs = recipe.parent / "logs"
    good = sorted(logs.glob("*.jsonl.gz"))[0]
    lines = gzip.decompress(good.read_bytes()).splitlines()
    whole = gzip.compress(b"\n".join(lines) + b"\n")
    (logs / "cut.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])  # the same rows, cut short
    (logs / "plain.jsonl.gz").write_bytes(lines[0] + b"\n")  # named .gz, but not gzip
    assert cli(["harvest", str(recipe)]) == 0
    m = _manifest(recipe)["counts"]
    q = [json.loads(x) for x in (recipe.parent / "runs/t/harvest/quarantine.jsonl").read_text().splitlines()]
    damaged = {x["file"].rsplit("/", 1)[-1]: x for x in q if x["reason"].startswith("file damaged")}
    assert set(damaged) == {"cut.jsonl.gz", "plain.jsonl.gz"}
    assert "EOFError" in damaged["cut.jsonl.gz"]["reason"] and "BadGzipFile" in damaged["plain.jsonl.gz"]["reason"]
    assert damaged["plain.jsonl.gz"]["line"] == 1 and damaged["cut.jsonl.gz"]["line"] > len(lines) // 3
    # The readable part of the cut file is read: its rows are copies of the good file's, so they count as duplicates.
    assert m["duplicates"] >= damaged["cut.jsonl.gz"]["line"] - 1 - m["quarantine_reasons"].get("invalid JSON", 0)
    assert m["lines"] == m["records"] + m["quarantined"] + m["skipped_old"] + m["duplicates"] - m["extra_choices"]
    assert m["quarantine_reasons"]["file damaged"] == 2
