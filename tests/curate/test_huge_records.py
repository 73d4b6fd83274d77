"""One huge record is rejected with its size before any other work, its texts blanked so nothing downstream holds
them, and curate's memory stays bounded (issue 14: a 50 MB message used 4.6 GB and was kept)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
from curate_helpers import batch, plan, rec

from curation.curate import filters
from pipeline.record import from_table


def test_a_record_over_the_byte_limit_is_dropped_first_and_blanked():
    big = "x" * 3_000_000
    b = batch(rec(0), rec(1, user=big), rec(2, out=big), rec(3, user="é" * 600_000, out="ok"))
    out, reasons = filters.record_size(b, plan())
    assert reasons[0] is None and reasons[3] is None  # 1.2 MB of UTF-8: under the 2 MB default
    assert reasons[1].startswith("record texts are 3,000,00") and "curate.max_record_bytes (2,000,000)" in reasons[1]
    assert reasons[2] is not None
    rows = from_table(out)
    assert rows[1]["messages"][0]["content"].startswith("[removed by curate") and len(rows[2]["output"]["content"]) < 200
    assert rows[0]["messages"][0]["content"] == "hello" and rows[3]["output"]["content"] == "ok"
    assert [op.name for op in filters.PER_RECORD][:2] == ["record_size", "pii"]
    _, reasons = filters.record_size(b, plan(max_record_bytes=1_000))
    assert reasons[0] is None and all(r is not None for r in reasons[1:])


SCRIPT = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
from pipeline.cli import main
code = main(["curate", sys.argv[2]])
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would count the pytest process this one was forked from
peak_kib = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"code": code, "rss_mb": peak_kib / 1024}))
"""


def test_curate_rejects_a_50_mb_message_with_bounded_memory(project, tmp_path):
    """Peak RSS of a whole curate run with one 50 MB message stays within 400 MB of the same run without it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recipe = project(curate={"pii": "redact", "near_dedup": None})
    logs = recipe.parent / "logs"
    huge = {"id": "huge-1", "timestamp": "2026-11-23T12:00:00Z", "status_code": 200, "latency_ms": 5,
            "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": "y " * 25_000_000}],
                        "metadata": {"function": "ticket_triage"}},
            "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                      "finish_reason": "stop"}]}}

    def peak(path) -> float:
        # harvest first, in a process of its own: what is measured is curate (harvest reads a 50 MB line whole; since
        # presidio is imported without torch, curate's baseline no longer hides harvest's peak)
        subprocess.run([sys.executable, "-m", "pipeline.cli", "harvest", str(path)], cwd=path.parent, check=True,
                       capture_output=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(root), str(path)], capture_output=True, text=True,
                              cwd=path.parent, timeout=600)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["code"] == 0, done.stderr[-2000:]
        return result["rss_mb"]

    baseline = peak(recipe)
    (logs / "huge.jsonl.gz").write_bytes(gzip.compress((json.dumps(huge) + "\n").encode(), compresslevel=1))
    with_huge = peak(recipe)
    rejected = from_table(pq.read_table(recipe.parent / "runs/t/curate/rejected.parquet"))
    mine = [r for r in rejected if r["id"] == "huge-1"]
    assert len(mine) == 1 and mine[0]["rejected_by"] == "record_size"
    assert len(mine[0]["messages"][0]["content"]) < 200  # blanked: rejected.parquet does not hold 50 MB
    print(f"peak RSS without the huge record {baseline:.0f} MB, with it {with_huge:.0f} MB")
    assert with_huge - baseline < 400, (baseline, with_huge)
