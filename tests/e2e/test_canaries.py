"""Canaries: e-mail addresses, phone numbers and API-key-like secrets planted in the logs (in user and system turns,
outputs, tool calls, metadata, sampling parameters, error texts, and rows that are quarantined) never reach any
file of the run directory -- harvest's Parquet files, quarantine, manifests, curate's splits and rejects, the
tokenizer, metrics, predictions, the report, the routing policy -- nor the store, after all six stages of a small
recipe."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli

from conftest import make_project

EMAIL = "canary.e2e.7731@example.org"
PHONE = "+44 20 7946 0321"
OPENAI_KEY = "sk-proj-CANARYe2eQ8xZ4k2LmN0pQrStUvWx"
AWS_KEY = "AKIACANARYE2E0000001"
GITHUB = "ghp_CANARYe2e0123456789abcdefghijklmnopqr"
# what must not appear anywhere (a distinctive part of each, so a masked or half-redacted copy is caught too)
CANARIES = ("canary.e2e.7731", "7946 0321", "CANARYe2eQ8x", "CANARYE2E0000001", "CANARYe2e0123456789")


def _row(i: int) -> dict:
    """A well-formed logged call with canaries in every text field harvest keeps."""
    return {
        "id": f"canary_{i}", "timestamp": f"2026-11-23T12:{i:02d}:00Z", "status_code": 200, "latency_ms": 300,
        "request": {"model": "gpt-4o", "temperature": 0, "user": EMAIL, "stop": [f"call {PHONE}"],
                    "messages": [{"role": "system", "content": f"Internal key {OPENAI_KEY}; AWS {AWS_KEY}."},
                                 {"role": "user", "content": f"Order {i}: reach me at {EMAIL} or {PHONE}."}],
                    "metadata": {"function": "product_faq", "customer": EMAIL}},
        "response": {"id": f"chatcmpl-c{i}", "model": "gpt-4o-2024-08-06", "created": 1795392000 + i,
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                         "role": "assistant", "content": f"We will email {EMAIL} and call {PHONE}.",
                         "tool_calls": [{"id": "c1", "type": "function", "function": {
                             "name": "crm", "arguments": json.dumps({"token": GITHUB, "phone": PHONE})}}]}}],
                     "usage": {"prompt_tokens": 30, "completion_tokens": 12}},
    }


def _plant(logs: Path) -> None:
    rows = [json.dumps(_row(i)) for i in range(12)]
    rows.append(json.dumps({**_row(50), "status_code": 500, "response": {"error": {
        "message": f"invalid api key {OPENAI_KEY} for {EMAIL}", "type": "auth"}}}))
    rows.append(json.dumps({"id": "q1", "request": f"not an object {EMAIL} {OPENAI_KEY}"}))  # quarantined
    rows.append(f'{{"id": "q2", "request": {{"messages": [{{"role": "user", "content": "{EMAIL} {PHONE}')  # torn
    with gzip.open(logs / "2026-11-23-canaries.jsonl.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")


def _texts(folder: Path):
    """(file, its text) for every file under a folder: Parquet decoded, gzip opened, the rest read leniently."""
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".parquet":
            yield p, json.dumps(pq.read_table(p).to_pylist(), default=str)
        elif p.suffix == ".gz":
            yield p, gzip.decompress(p.read_bytes()).decode("utf-8", "replace")
        else:
            yield p, p.read_bytes().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("canaries")
    recipe = make_project(root, {"2026-11-23": 240}, train={"max_steps": 12, "save_steps": 6},
                          evaluate={"max_records": 24})
    _plant(root / "logs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli(["run", str(recipe)]) in (0, 5)  # 5: the gate kept a 12-step student from the store
    finally:
        os.chdir(cwd)
    return root


def test_the_canaries_were_harvested_and_curated(canary_run):
    """Not vacuous: the planted rows are in harvest's and curate's files, redacted."""
    run = canary_run / "runs" / "t"
    harvested = {r["id"]: r for f in (run / "harvest").glob("records-*.parquet") for r in pq.read_table(f).to_pylist()}
    assert {f"canary_{i}" for i in range(12)} <= set(harvested)
    rec = harvested["canary_3"]
    assert "<EMAIL>" in rec["messages"][1]["content"] and "<SECRET>" in rec["messages"][0]["content"]
    quarantine = (run / "harvest" / "quarantine.jsonl").read_text()
    assert "canaries.jsonl.gz" in quarantine
    curated = sum(pq.read_table(run / "curate" / f"{s}.parquet").num_rows for s in ("train", "val", "test"))
    assert curated > 0 and (run / "report.html").is_file()


def test_no_canary_in_any_file_of_the_run_directory_or_the_store(canary_run):
    found = []
    checked = 0
    for where in (canary_run / "runs", canary_run / "store"):
        for path, text in _texts(where):
            checked += 1
            found += [(str(path.relative_to(canary_run)), c) for c in CANARIES if c in text]
    assert checked > 30
    assert found == []
