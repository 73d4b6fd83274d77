"""`distill route-check`: logs like the calibration pass, logs that moved are flagged with exit code 6."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest
from route_helpers import FAQ, FAR_FAQ, IN_BAND_FAQ, ITALIAN_FAQ, completion, full_router, request

from export.route.drift import check, psi, read_logs
from pipeline.cli import EXIT_DRIFT
from pipeline.cli import main as cli


def _write(path, bodies, routing=None):
    lines = []
    for i, body in enumerate(bodies):
        line = {"id": f"r{i}", "timestamp": "2026-11-25T10:00:00Z", "status_code": 200, "request": body,
                "response": completion("ok", "gpt-4o-2024-08-06")}
        if routing:
            line["routing"] = {"route": routing(i)}
        lines.append(json.dumps(line))
    lines.append('{"truncated": ')  # a torn last line, as a killed proxy leaves
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def held_out(e2e):
    """The held-out requests of the e2e run, as a client sent them (function in metadata)."""
    rows = pq.read_table(e2e / "runs/t/curate/test.parquet", columns=["function", "messages"]).to_pylist()
    return [{"model": "gpt-4o", "messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]],
             "metadata": {"function": r["function"]}} for r in rows]


def test_psi():
    ref = {"edges": [1.0, 2.0, 3.0], "probs": [0.25, 0.25, 0.25, 0.25]}
    assert psi(ref, [0.5, 1.5, 2.5, 3.5] * 10) == pytest.approx(0.0)
    assert psi(ref, [3.5] * 40) > 1.0


def test_traffic_like_the_calibration_shows_no_drift(e2e, held_out, tmp_path, capsys):
    path = _write(tmp_path / "today.jsonl.gz", held_out)
    lines, bad = read_logs(path)
    assert len(lines) == len(held_out) and bad == 1
    report = check(full_router(str(e2e / "runs/t/route")), lines, min_requests=10)
    assert not report["drift"], [r for r in report["rows"] if r["drift"]]
    metrics = {(r["function"], r["metric"]) for r in report["rows"]}
    assert (FAQ, "escalated before generation") in metrics and (FAQ, "distance from training inputs (PSI)") in metrics
    assert cli(["route-check", str(e2e / "runs/t/route"), "--logs", str(tmp_path), "--min-requests", "10",
                "--no-embeddings"]) == 0
    assert "no drift" in capsys.readouterr().out


def test_moved_traffic_is_flagged(e2e, held_out, tmp_path, capsys):
    """Two thirds of today's FAQ traffic is off-topic or foreign, and a function nobody trained appears:
    escalations and distances move (by more than sampling explains: the held-out reference is small)."""
    faq = [b for b in held_out if b["metadata"]["function"] == FAQ]
    off = (FAR_FAQ, ITALIAN_FAQ, "Tell me a joke about cats.", "Explain quantum computing simply.",
           "What is the capital of Australia?", "Summarise the plot of Hamlet in two lines.",
           "Translate 'good morning' into Japanese.", "How do I bake sourdough bread?")
    moved = faq[: len(faq) // 2] + [request(t) for t in off * 4]
    moved += [request(IN_BAND_FAQ, function="new_feature")] * 20
    _write(tmp_path / "today.jsonl", moved, routing=lambda i: "student")  # serve-router's decisions moved too
    out_json = tmp_path / "report.json"
    code = cli(["route-check", str(e2e / "runs/t/route"), "--logs", str(tmp_path / "*.jsonl"), "--min-requests", "10",
                "--json", str(out_json)])
    assert code == EXIT_DRIFT
    report = json.loads(out_json.read_text())
    flagged = {(r["function"], r["metric"]) for r in report["rows"] if r["drift"]}
    assert ("*", "requests for functions the policy does not know") in flagged
    assert (FAQ, "escalated before generation") in flagged
    assert (FAQ, "answered by the teacher (serve-router decisions)") in flagged
    assert (FAQ, "distance from training inputs (PSI)") in flagged
    assert "DRIFT" in capsys.readouterr().out
    assert cli(["route-check", str(e2e / "runs/t/route"), "--logs", str(tmp_path / "nothing-here")]) == 2


def test_live_loop_files_and_audit_calls_are_not_counted_as_requests(tmp_path):
    """The live loop adds teacher calls that audit a student answer and live-*.jsonl score files beside the request
    logs: route-check must count each client request once and not call the score lines unreadable."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    _write(tmp_path / "student-2026-12-06.jsonl", [body, body], routing=lambda i: "student")
    _write(tmp_path / "teacher-2026-12-06.jsonl", [body], routing=lambda i: "teacher")
    audit = {"id": "a1", "status_code": 200, "request": body, "response": completion("ok", "gpt-4o"),
             "routing": {"route": "teacher", "audit": True, "audit_of": "r0"}}
    with open(tmp_path / "teacher-2026-12-06.jsonl", "a") as f:
        f.write(json.dumps(audit) + "\n")
    with open(tmp_path / "teacher-2026-12-06.jsonl", "a") as f:
        f.write("5\nnull\n[]\n")  # valid JSON but not a log line: unreadable, not a traceback
    (tmp_path / "live-2026-12-06.jsonl").write_text(json.dumps({"kind": "audit", "quality": 1.0}) + "\n")
    lines, bad = read_logs(tmp_path, requests_only=True)
    assert len(lines) == 3 and bad == 5  # the two torn last lines _write leaves and the three non-objects
    everything, bad_all = read_logs(tmp_path)  # the ledger reads audits too (they cost money)
    assert len(everything) == 4 and bad_all == 5  # the live line is no call: not read, not unreadable
