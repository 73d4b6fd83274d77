"""Three simulated nights of the live loop (issue 16, "Tested"): a real `distill serve-router` process in front of
loopback students (one per store version) and a teacher, all answering from tables; versions published with the
store's own API; the nightly `distill live RECIPE --decide` doing every change.

- night 1: v1 is published; the nightly job makes it serve.
- night 2: v2 is published; the job shadows it, then (on the shadow's evidence) canaries it, then (on the canary's
  audits) promotes it; serve-router follows each change of the deployment file without a restart.
- night 3: triage traffic drifts to questions v2 gets wrong (v1 does not); the audits show it and the job rolls
  v2 back by itself; v1 answers again.

The ledger's totals match the logs, priced independently from their token counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from live_stubs import TableServer, free_port, lines, publish_version, wait_for
from openai import OpenAI

from export.route import deployment
from pipeline.cli import main as cli

FAQ = {f"faq {i}": f"answer {i}" for i in range(8)}
TRIAGE = {f"ticket {i}": json.dumps({"team": ("billing", "tech")[i % 2]}) for i in range(8)}
DRIFT = {f"new ticket kind {i}": json.dumps({"team": "returns"}) for i in range(8)}
TEACHER = {**FAQ, **TRIAGE, **DRIFT}
V1 = dict(TEACHER)  # v1 knows every kind of question
V2 = {**FAQ, **TRIAGE, **{k: json.dumps({"team": "billing"}) for k in DRIFT}}  # v2 never saw the new kind
LIVE = {"audit_share": 0.5, "canary_audit_share": 1.0, "shadow_share": 1.0, "canary_share": 0.5,
        "min_audits": 20, "max_quality_drop": 0.1, "alpha": 0.05, "reload_s": 0.05}
PRICES = {"teacher": (2.5, 10.0), "student_per_request": 0.05 / 1000}  # live_stubs.policy's operating point


@pytest.fixture
def world(tmp_path):
    servers = {"v1": TableServer(V1, True).start(), "v2": TableServer(V2, True).start(),
               "teacher": TableServer(TEACHER, False).start()}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "nights", "harvest": {"sources": [{"format": "openai", "path": str(tmp_path / "logs/teacher-*")}]},
        "export": {"store": str(tmp_path / "store"), "model_name": "tiny"},
        "route": {"bootstrap": 200, "live": {**LIVE, "log_dir": str(tmp_path / "logs")}}}))
    yield {"root": tmp_path, "recipe": recipe, "servers": servers}
    for s in servers.values():
        s.stop()


def _serve_router(world: dict, port: int) -> subprocess.Popen:
    root = world["root"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve-router", str(world["recipe"]), "--deployment",
         str(root / "store/tiny/deployment.json"), "--teacher-url", world["servers"]["teacher"].url, "--log-dir",
         str(root / "logs"), "--port", str(port), "--seed", "0", "--no-embeddings", "--no-language"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(proc.stdout.read()) from None
            time.sleep(0.1)


def _traffic(client: OpenAI, n: int, triage: dict[str, str]) -> list[tuple[str, str, str]]:
    """n requests, faq and triage alternating; (version that answered, answer, the teacher's answer)."""
    out = []
    for i in range(n):
        fn, table = ("faq", FAQ) if i % 2 == 0 else ("triage", triage)
        question = list(table)[(i // 2) % len(table)]
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": question}],
            extra_body={"metadata": {"function": fn}})
        out.append((raw.headers["x-distill-version"], raw.parse().choices[0].message.content, TEACHER[question]))
    return out


def _decide(world: dict, *urls: str) -> tuple[int, dict]:
    out = world["root"] / "decide.json"
    code = cli(["live", str(world["recipe"]), "--decide", "--json", str(out),
                *[a for u in urls for a in ("--version-url", u)]])
    return code, json.loads(out.read_text())


def _deployed(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health").json()["deployment"]


def _priced(line: dict) -> float:
    """What one logged call cost, from its usage and the prices alone."""
    r, usage = line["routing"], (line["response"] or {}).get("usage") or {}
    teacher = (usage["prompt_tokens"] * PRICES["teacher"][0] + usage["completion_tokens"] * PRICES["teacher"][1]) / 1e6
    tried = r.get("phase") == "after" and not r.get("audit")
    return (PRICES["student_per_request"] if tried else 0.0) + (teacher if r["route"] == "teacher" else 0.0)


def test_three_nights(world, monkeypatch):
    monkeypatch.chdir(world["root"])
    root, s = world["root"], world["servers"]
    urls = (f"v1={s['v1'].url}", f"v2={s['v2'].url}")
    sent = 0
    # Night 1: v1 is published and the nightly job makes it serve.
    publish_version(root / "store", "tiny", "v1", root)
    code, out = _decide(world, *urls)
    assert code == 9 and [d["action"] for d in out["decisions"]] == ["serve"] and out["deployment"]["serving"] == "v1"
    port = free_port()
    proc = _serve_router(world, port)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        night1 = _traffic(client, 60, TRIAGE)
        sent += len(night1)
        assert {v for v, _, _ in night1} == {"v1"} and all(a == t for _, a, t in night1)
        assert _decide(world)[0] == 0  # v1 holds its floors; nothing new in the store

        # Night 2: v2 is published: shadow, canary, promoted, each on the evidence of the logs since the last step.
        publish_version(root / "store", "tiny", "v2", root)
        code, out = _decide(world)
        assert code == 9 and out["deployment"]["candidate"]["stage"] == "shadow"
        wait_for(lambda: (_deployed(port)["candidate"] or {}).get("stage") == "shadow", what="shadow reload")
        shadowed = _traffic(client, 80, TRIAGE)
        sent += len(shadowed)
        assert {v for v, _, _ in shadowed} == {"v1"}  # the client never sees the shadow
        code, out = _decide(world)
        assert code == 9 and out["deployment"]["candidate"]["stage"] == "canary", out["decisions"]
        evidence = out["decisions"][0]["evidence"]["promotion"]
        assert evidence["ready"] and evidence["n"] >= LIVE["min_audits"] and evidence["mean"] == 1.0
        wait_for(lambda: (_deployed(port)["candidate"] or {}).get("stage") == "canary", what="canary reload")
        canary = _traffic(client, 200, TRIAGE)  # ~50 audits per function: each must show its own evidence
        sent += len(canary)
        share = sum(v == "v2" for v, _, _ in canary) / len(canary)
        assert 0.35 < share < 0.65 and all(a == t for _, a, t in canary)
        code, out = _decide(world)
        assert code == 9 and out["deployment"]["serving"] == "v2" and out["deployment"]["previous"] == ["v1"]
        wait_for(lambda: _deployed(port)["serving"] == "v2", what="promotion reload")

        # Night 3: triage drifts to a kind of ticket v2 gets wrong; the job rolls v2 back by itself.
        drifted = _traffic(client, 200, DRIFT)
        sent += len(drifted)
        assert {v for v, _, _ in drifted} == {"v2"} and sum(a != t for _, a, t in drifted) == 100
        assert cli(["live", str(world["recipe"])]) == 8  # the report alone says so and changes nothing
        assert deployment.load(root / "store/tiny/deployment.json")["serving"] == "v2"
        code, out = _decide(world)
        assert code == 7 and out["deployment"]["serving"] == "v1" and out["deployment"]["rejected"] == ["v2"]
        rollback = out["decisions"][0]
        broken = [t for t in rollback["evidence"]["tests"] if t["outcome"]["decided"]]
        assert [(t["function"], t["what"]) for t in broken] == [("triage", "quality")]
        assert broken[0]["outcome"]["at"] < 30  # caught within a bounded number of audited answers
        wait_for(lambda: _deployed(port)["serving"] == "v1", what="rollback reload")
        after = _traffic(client, 40, DRIFT)
        sent += len(after)
        assert {v for v, _, _ in after} == {"v1"} and all(a == t for _, a, t in after)
        assert _decide(world)[0] == 0  # v2 stays rejected: no flapping back
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    history = deployment.load(root / "store/tiny/deployment.json")["history"]
    assert [h["action"] for h in history] == ["serve", "shadow", "canary", "promote", "rollback"]
    assert all(h["by"] == "decide" for h in history) and history[-1]["evidence"]["tests"]
    _check_ledger(root, sent)
    # Tomorrow's training data: the real harvest stage reads the teacher's log, audits included.
    assert cli(["harvest", str(world["recipe"])]) == 0
    records = pq.read_table(sorted((root / "runs/nights/harvest").glob("records-*.parquet"))).to_pylist()
    teacher = lines(root / "logs", "teacher-*.jsonl")
    assert len(records) == len(teacher) and sum(bool(x["routing"].get("audit")) for x in teacher) > 100


def _check_ledger(root: Path, sent: int) -> None:
    logs = root / "logs"
    calls = lines(logs, "[st]*-*.jsonl")
    audits = [x for x in calls if x["routing"].get("audit")]
    assert len(calls) - len(audits) == sent  # every request logged once, nothing lost
    scored = [r for r in lines(logs, "live-*.jsonl") if r["kind"] == "audit"]
    assert len(scored) == len(audits) and not [r for r in lines(logs, "live-*.jsonl") if r["kind"] == "dropped"]
    out = root / "ledger.json"
    assert cli(["ledger", "--logs", str(logs), "--json", str(out)]) == 0
    ledger = json.loads(out.read_text())
    total = ledger["total"]
    assert total["requests"] == sent and total["audits"] == len(audits) and total["unpriced"] == 0
    assert total["spent_usd"] == pytest.approx(sum(_priced(x) for x in calls), rel=1e-9)
    assert total["live_audits"] == len(scored)
    assert sum(r["requests"] for r in ledger["rows"]) == sent
    by_version = {v: sum(r["requests"] for r in ledger["rows"] if r["version"] == v) for v in ("v1", "v2")}
    assert by_version["v1"] + by_version["v2"] == sent and by_version["v2"] > 200
