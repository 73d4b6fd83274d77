"""The curate stage as users run it: no PII or secret escapes the run, every executor gives the same files,
nightly runs dedup against earlier nights through the index, and a failed run leaves nothing half done."""

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from curate_helpers import openai_line

from curation.curate import stage as curate_stage
from curation.curate.stage import SPLITS
from curation.harvest.demo_traffic import write_demo
from pipeline.cli import main as cli

OUTPUTS = ("train", "val", "test", "rejected")
# Unique values planted in the raw logs; none may leave the harvest folder.
CANARIES = {
    "email": "quillon.marsh83@vextramail.org",
    "phone": "+1 628-555-0147",
    "card": "4539 1488 0343 6467",
    "ip": "198.51.100.233",
    "iban": "DE44500105175407324931",
    "openai": "sk-proj-Qv7Lm2Xw9Rt5Yp1Hs6Dj4Gf7Ba0CzK3",
    "aws": "AKIAQV7LM2XW9RT5YP1H",
    "github": "ghp_Qv7Lm2Xw9Rt5Yp1Hs6Dj4Gf7Ba0CzK3NwE8x",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJxdWlsbG9uIn0.Qv7Lm2Xw9Rt5Yp1Hs6Dj4Gf7",
    "bearer": "Qv7Lm2Xw9Rt5Yp1Hs6Dj4Bearer",
    "pem": "MIIEowIBAAKCAQEAqv7Lm2Xw9Rt5Yp1Hs6",
}


def _canary_lines() -> list[str]:
    c = CANARIES
    triage = '{"intent": "billing_error", "priority": "high", "product": "Echo Speaker"}'
    lines = []
    for i in range(6):  # several copies with different text so that some land in every split
        lines.append(openai_line(
            f"canary_{i}", f"Ticket {i}: I was charged twice for the Echo Speaker. Card {c['card']}, mail "
            f"{c['email']}, call {c['phone']}, login from {c['ip']}. Variant {i * 7919}.",
            triage, metadata={"user_email": c["email"], "note": f"key {c['openai']}"}, ts=f"2026-11-23T1{i}:00:00Z"))
    lines.append(openai_line(
        "canary_secrets", f"Our integration fails. AWS {c['aws']}, token {c['github']}, jwt {c['jwt']}.",
        f"Rotate the key and send requests with the header Authorization: Bearer {c['bearer']} again.",
        function="product_faq", system=f"Internal: refunds go to IBAN {c['iban']}."))
    lines.append(openai_line(
        "canary_refusal", f"Decrypt this for me: -----BEGIN RSA PRIVATE KEY-----\n{c['pem']}\n-----END RSA PRIVATE KEY-----",
        "I'm sorry, but I can't help with that request.", function="product_faq"))
    lines.append(openai_line(
        "canary_error", f"Why was {c['email']} billed?", "", status=401,
        error=f"Incorrect API key provided: {c['openai']} for {c['email']}"))
    return lines


def _texts_of(path: Path) -> str:
    """Everything a file could reveal: decoded Parquet, or the raw bytes of anything else."""
    if path.suffix == ".parquet":
        return json.dumps(pq.read_table(path).to_pylist(), default=str)
    return path.read_bytes().decode("utf-8", errors="replace")


def test_no_planted_pii_or_secret_leaves_the_harvest_folder(project, capsys):
    # Every stage runs; the parts that cost time and do not touch record text are turned down.
    recipe = project({"2026-11-23": 240}, train={"max_steps": 4, "save_steps": 4, "logging_steps": 2},
                     evaluate={"max_records": 8, "max_new_tokens": 8},
                     route={"distance": {"enabled": False}, "language": {"enabled": False}},
                     export={"formats": ["gguf-q8_0"]})
    logs = recipe.parent / "logs"
    with gzip.open(logs / "2026-11-23-canary.jsonl.gz", "wt") as f:
        f.write("\n".join(_canary_lines()) + "\n")
    assert cli(["run", str(recipe)]) == 0
    printed = capsys.readouterr()
    run = recipe.parent / "runs" / "t"
    harvested = [r for p in (run / "harvest").glob("records-*.parquet") for r in pq.read_table(p).to_pylist()]
    assert sum(r["id"].startswith("canary") for r in harvested) == 9  # harvested (and redacted there: below)
    rejected = pq.read_table(run / "curate" / "rejected.parquet").to_pylist()
    assert {r["id"]: r["rejected_by"] for r in rejected if r["id"] in ("canary_refusal", "canary_error")} == {
        "canary_refusal": "refusal", "canary_error": "http_error"}
    kept = [r for s in ("train", "val", "test") for r in pq.read_table(run / "curate" / f"{s}.parquet").to_pylist()]
    assert sum(r["id"].startswith("canary") for r in kept) >= 2
    assert any("<EMAIL>" in m["content"] and "<CARD>" in m["content"] for r in kept for m in r["messages"])
    files = [p for stage in ("harvest", "curate", "train", "evaluate", "route", "export") for p in (run / stage).rglob("*")
             if p.is_file()]
    files += [p for p in (recipe.parent / "store").rglob("*") if p.is_file()]
    assert any(p.name == "report.json" for p in files) and any(p.suffix == ".safetensors" for p in files)
    leaks = {name: [str(p.relative_to(recipe.parent)) for p in files if value in _texts_of(p)]
             for name, value in CANARIES.items()}
    leaks["printed"] = [n for n, v in CANARIES.items() if v in printed.out + printed.err]
    assert not any(leaks.values()), leaks
    report = json.loads((run / "curate" / "report.json").read_text())
    assert report["pii_and_secrets_found"]["email_address"] >= 7
    assert {"openai_api_key", "aws_access_key", "github_token", "jwt", "bearer_token", "private_key",
            "credit_card", "ip_address", "iban_code", "phone_number"} <= set(report["pii_and_secrets_found"])


def _hashes(run: Path) -> dict[str, str]:
    return {s: hashlib.sha256((run / "curate" / f"{s}.parquet").read_bytes()).hexdigest() for s in OUTPUTS}


def test_every_executor_writes_identical_files(project):
    pytest.importorskip("ray")
    recipe = project({"2026-11-23": 900})
    base = yaml.safe_load(recipe.read_text())
    hashes = {}
    for kind, batch_size in (("inprocess", 200), ("datasets", 128), ("ray", 300)):
        base["curate"]["executor"] = {"kind": kind, "batch_size": batch_size, "num_proc": 2}
        recipe.write_text(yaml.safe_dump(base))
        assert cli(["curate", str(recipe)]) == 0
        run = recipe.parent / "runs" / "t"
        report = json.loads((run / "curate" / "report.json").read_text())
        assert report["executor"] == kind and report["mode"] == "full"  # the executor is not in the index key...
        hashes[kind] = _hashes(run)
        (run / "curate" / "index" / "state.json").unlink()  # ...so drop the index: each executor redoes it all
    assert hashes["inprocess"] == hashes["datasets"] == hashes["ray"]


def _ids(run: Path) -> dict[str, list]:
    out = {s: sorted(pq.read_table(run / "curate" / f"{s}.parquet", columns=["id"]).column("id").to_pylist())
           for s in ("train", "val", "test")}
    rej = pq.read_table(run / "curate" / "rejected.parquet", columns=["id", "rejected_by", "reason"]).to_pylist()
    out["rejected"] = sorted((r["id"], r["rejected_by"], r["reason"]) for r in rej)
    return out


def test_nightly_runs_dedup_against_earlier_nights_through_the_index(tmp_path, monkeypatch):
    from conftest import make_project

    over = {"curate": {"balance": {"caps": {"product_faq": 120}}}}
    nightly = make_project(tmp_path / "nightly", {"2026-11-23": 600}, **over)
    monkeypatch.chdir(nightly.parent)
    assert cli(["curate", str(nightly)]) == 0
    run = nightly.parent / "runs" / "t"
    first = json.loads((run / "curate" / "report.json").read_text())
    assert first["mode"] == "full"
    write_demo(nightly.parent / "logs", {"2026-11-24": 400})
    assert cli(["curate", str(nightly)]) == 0
    second = json.loads((run / "curate" / "report.json").read_text())
    assert second["mode"] == "incremental" and 0 < second["new_records"] < second["records_in"]
    assert second["operators"]["http_error"]["in"] == second["new_records"]  # earlier nights were not re-read
    assert second["operators"]["exact_dedup"]["in"] > second["new_records"]  # but were deduped against
    assert second["records_in"] == second["kept"] + second["rejected"]
    assert second["retracted"] > 0  # tonight's better copies and the cap push some earlier records out
    state = json.loads((run / "curate" / "index" / "state.json").read_text())
    assert len(state["parts"]) == 2 and len(state["harvest_files"]) == 2
    # The same logs curated in one go give exactly the same data, reasons included.
    full = make_project(tmp_path / "full", {"2026-11-23": 600, "2026-11-24": 400}, **over)
    monkeypatch.chdir(full.parent)
    assert cli(["curate", str(full)]) == 0
    assert _ids(run) == _ids(full.parent / "runs" / "t")
    # Changing the curate config rebuilds from scratch, and says why.
    monkeypatch.chdir(nightly.parent)
    cfg = yaml.safe_load(nightly.read_text())
    cfg["curate"]["near_dedup"] = {"threshold": 0.9}
    nightly.write_text(yaml.safe_dump(cfg))
    assert cli(["curate", str(nightly)]) == 0
    third = json.loads((run / "curate" / "report.json").read_text())
    assert third["mode"] == "full" and "config" in third["mode_reason"]


def test_a_failed_run_leaves_the_previous_data_and_a_rerun_finishes(project, monkeypatch):
    recipe = project({"2026-11-23": 300})
    assert cli(["curate", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    before = _hashes(run)
    write_demo(recipe.parent / "logs", {"2026-11-24": 200})

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(curate_stage, "decontaminate", boom)
    assert cli(["curate", str(recipe)]) == 1
    assert _hashes(run) == before and json.loads((run / "curate" / "manifest.json").read_text())["status"] == "complete"
    assert not list((run / ".partial").glob("curate-tmp-*"))  # temporary files are cleaned up
    monkeypatch.undo()
    monkeypatch.chdir(recipe.parent)
    assert cli(["curate", str(recipe)]) == 0
    report = json.loads((run / "curate" / "report.json").read_text())
    assert report["mode"] == "incremental" and report["records_in"] == report["kept"] + report["rejected"]
    assert _hashes(run) != before


def _tool_loop(order: str, status: str, i: int, question: str) -> list[str]:
    """The two calls of a tool loop as serve-router logs them: the question gets a tool call; the question with
    the call and the tool's result gets the answer written from it."""
    question = {"role": "user", "content": question}
    call = {"id": f"call_{i}", "type": "function", "function": {"name": "lookup_order",
                                                                 "arguments": json.dumps({"order": order})}}
    step2 = [question, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"status": status})}]
    lines = []
    for n, (messages, msg) in enumerate((([question], {"role": "assistant", "content": None, "tool_calls": [call]}),
                                         (step2, {"role": "assistant", "content": f"Your order is {status}."}))):
        lines.append(json.dumps({"id": f"loop-{order}-{n}", "timestamp": f"2026-11-23T12:0{i}:0{n}Z",
                                 "status_code": 200, "request": {"model": "gpt-4o", "messages": messages,
                                                                 "metadata": {"function": "order_status"}},
                                 "response": {"model": "gpt-4o", "choices": [{"index": 0, "message": msg,
                                                                              "finish_reason": "stop"}]}}))
    return lines


def test_each_step_of_a_tool_loop_is_its_own_input(project):
    """Trial: exact dedup keyed on (function, user turns), so the second step of a tool loop (the same question,
    plus the tool's result) was a duplicate of the first: 6 calls of 3 loops in, the 3 answers written from a tool
    result all dropped, the student never learnt to answer from one. A repeated call is still a duplicate."""
    recipe = project()
    loops = (("A1", "shipped", "What is the status of my order A1?"),
             ("B2", "delayed", "Has the blender I bought last week (B2) left your warehouse yet?"),
             ("C3", "cancelled", "Why can I not see order C3 in my account any more?"))
    lines = [x for i, (order, status, q) in enumerate(loops) for x in _tool_loop(order, status, i, q)]
    again = json.loads(lines[1])
    again.update(id="again", timestamp="2026-11-23T13:00:00Z")
    text = "\n".join([*lines, json.dumps(again)]) + "\n"
    (recipe.parent / "logs" / "tools.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert cli(["curate", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t" / "curate"
    split_of = {r["id"]: s for s in SPLITS for r in pq.read_table(run / f"{s}.parquet", columns=["id"]).to_pylist()}
    assert {f"loop-{o}-{n}" for o in ("A1", "B2", "C3") for n in (0, 1)} <= set(split_of)  # was: loop-A1-0 alone
    assert all(split_of[f"loop-{o}-0"] == split_of[f"loop-{o}-1"] for o in ("A1", "B2", "C3"))  # a loop: one split
    rejected = {r["id"]: r for r in pq.read_table(run / "rejected.parquet").to_pylist()}
    assert "again" in rejected and "again" not in split_of  # the same call twice: one copy
    assert "duplicate of loop-A1-1" in json.dumps(rejected["again"], default=str)


def test_a_tool_loop_step_that_copies_a_test_prompt_is_still_decontaminated(project):
    """Review: with decontamination reading the whole prompt, a tool result beside an eval question copied word
    for word diluted its share of matching n-grams below min_overlap, and it went into train. It reads the user
    turns, as before."""
    recipe = project()
    question = ("Please tell me every step needed to reset the password of the premium family plan account that "
                "my daughter uses on her tablet at school")
    (recipe.parent / "eval.jsonl").write_text(json.dumps({"prompt": question}) + "\n")
    result = " ".join(f"field{i} value{i}" for i in range(60))  # a long tool result
    lines = _tool_loop("Z9", result, 5, question)
    (recipe.parent / "logs" / "tools.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    data = yaml.safe_load(recipe.read_text())
    data["curate"]["decontaminate"] = {"external": ["eval.jsonl"]}
    recipe.write_text(yaml.safe_dump(data))
    assert cli(["curate", str(recipe)]) == 0
    rejected = {r["id"]: r for r in pq.read_table(recipe.parent / "runs" / "t" / "curate" / "rejected.parquet")
                .to_pylist()}
    assert rejected["loop-Z9-1"]["rejected_by"] == "decontaminate", rejected.get("loop-Z9-1")
