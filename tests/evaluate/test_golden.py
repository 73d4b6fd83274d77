"""The golden set (evaluate.golden): files in any harvest format with reviewed answers, read by harvest's importers,
kept out of training by curate's decontamination (changing them reruns curate), scored beside the test split against
the reviewed answers, reported on their own and gated by gate.golden_min_quality."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.harvest.golden import load_golden
from pipeline.cli import main as cli
from pipeline.config.evaluate import GateConfig
from pipeline.recipe import RecipeError, load_recipe, parse_recipe
from pipeline.rundir import RunDir
from pipeline.stages import expected_fingerprint
from training.evaluate.gate import check

from conftest import BASE_RECIPE, merge


def _finetune_rows(path: Path, pairs: list[tuple[str, str, str]]) -> Path:
    """OpenAI fine-tuning JSONL: (function, user text, reviewed answer) per line."""
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                        "metadata": {"function": fn}}) + "\n" for fn, q, a in pairs))
    return path


def test_golden_files_in_several_formats_become_records(tmp_path):
    a = _finetune_rows(tmp_path / "a.jsonl", [("faq", "Is the lamp in stock?", "Yes."), ("faq", "Warranty?", "2 y")])
    with open(tmp_path / "b.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "task"])
        w.writerow(["Where is my order?", "It ships Monday.", "triage"])
    sources = parse_recipe(merge(BASE_RECIPE, {"evaluate": {"golden": [
        {"path": str(a), "format": "openai_finetune"},
        {"path": str(tmp_path / "b.csv"), "format": "mapped",
         "fields": {"prompt": "question", "output": "answer", "function": "task"}}]}})).evaluate.golden
    records = load_golden(sources)
    assert [(r["function"], r["messages"][-1]["content"], r["output"]["content"]) for r in records] == [
        ("faq", "Is the lamp in stock?", "Yes."), ("faq", "Warranty?", "2 y"),
        ("triage", "Where is my order?", "It ships Monday.")]
    assert [r["tags"]["golden_file"] for r in records] == ["a.jsonl", "a.jsonl", "b.csv"]
    assert len({r["id"] for r in records}) == 3


@pytest.mark.parametrize(("line", "says"), [
    ('{"messages": [{"role": "user", "content": "q"}]}', "b.jsonl:2: the last message must be the assistant's"),
    ("{not json", "b.jsonl:2:"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     "b.jsonl:2: a golden row needs a reviewed answer"),
])
def test_a_bad_golden_row_is_an_error_naming_file_and_line(tmp_path, line, says):
    path = _finetune_rows(tmp_path / "b.jsonl", [("f", "fine", "ok")])
    path.write_text(path.read_text() + line + "\n")
    sources = parse_recipe(merge(BASE_RECIPE, {"evaluate": {"golden": [
        {"path": str(path), "format": "openai_finetune"}]}})).evaluate.golden
    with pytest.raises(ValueError) as err:
        load_golden(sources)
    assert says in str(err.value) and str(path) in str(err.value)


def test_recipe_checks_of_the_golden_section():
    with pytest.raises(RecipeError, match="golden_min_quality and gate.golden_functions need evaluate.golden"):
        parse_recipe(merge(BASE_RECIPE, {"evaluate": {"gate": {"golden_min_quality": 90}}}))
    with pytest.raises(RecipeError, match="evaluate.golden needs curate.decontaminate"):
        parse_recipe(merge(BASE_RECIPE, {"curate": {"decontaminate": None},
                                         "evaluate": {"golden": [{"path": "g.jsonl", "format": "openai_finetune"}]}}))
    with pytest.raises(RecipeError, match="evaluate.golden.0.format"):
        parse_recipe(merge(BASE_RECIPE, {"evaluate": {"golden": [{"path": "g.jsonl", "format": "csv"}]}}))
    with pytest.raises(RecipeError, match="a golden set is read from files"):
        parse_recipe(merge(BASE_RECIPE, {"evaluate": {"golden": [{"sql": {"url": "sqlite:///x.db", "table": "t"}}]}}))


def test_the_gate_holds_each_golden_function_to_its_floor():
    golden = {"faq": {"n": 20, "quality": 0.9}, "triage": {"n": 30, "quality": 0.97}}
    gate = GateConfig(max_regression_points=None, golden_min_quality=95)
    result = check({}, gate, "auto", None, golden)
    assert not result["passed"] and result["failures"] == ["faq: 90.0 on the golden set, below its floor of 95 (n=20)"]
    gate = GateConfig(max_regression_points=None, golden_min_quality=95, golden_functions={"faq": 85})
    assert check({}, gate, "auto", None, golden)["passed"]
    assert check({}, GateConfig(max_regression_points=None), "auto", None, golden)["passed"]  # no floor: reported only
    unscored = {**golden, "faq": {"n": 20, "quality": None}}  # a floor with nothing measured is not cleared
    assert check({}, GateConfig(max_regression_points=None, golden_min_quality=50), "auto", None, unscored)[
        "failures"] == ["faq: no quality score on the golden set, which has a floor of 50 (n=20)"]
    gate = GateConfig(max_regression_points=None, golden_functions={"missing_fn": 50})
    assert check({}, gate, "auto", None, golden)["failures"] == [
        "missing_fn: not in the golden set, which gate.golden_functions names"]


def _train_prompts(run: Path, n: int) -> list[tuple[str, str, str]]:
    from pipeline.record import from_table

    rows = from_table(pq.read_table(run / "curate" / "train.parquet"))
    return [(r["function"], next(m["content"] for m in r["messages"] if m["role"] == "user"), "REVIEWED ANSWER")
            for r in rows[:n]]


def test_golden_set_leaves_training_and_is_scored_and_gated_on_its_own(project):
    recipe = project()
    assert cli(["curate", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    taken = _train_prompts(run, 6)  # six training prompts become golden requests, with answers no teacher gave
    taken[0] = (taken[0][0], taken[0][1], "REVIEWED ANSWER, by ops.lead@example.org")  # raw PII in a golden file
    golden = _finetune_rows(recipe.parent / "golden.jsonl", taken)
    before = expected_fingerprint(load_recipe(recipe), RunDir(run), "curate")

    recipe.write_text(recipe.read_text().replace("evaluate:", "evaluate:\n  golden:\n  - {path: golden.jsonl, "
                                                 "format: openai_finetune}\n  gate: {golden_min_quality: 50, "
                                                 "max_regression_points: null}", 1))
    assert expected_fingerprint(load_recipe(recipe), RunDir(run), "curate") != before  # the golden set reruns curate
    assert cli(["evaluate", str(recipe)]) == 0
    report = json.loads((run / "curate" / "report.json").read_text())
    assert report["operators"]["decontaminate"]["dropped"] >= 6
    from pipeline.record import from_table

    kept = {next(m["content"] for m in r["messages"] if m["role"] == "user")
            for s in ("train", "val") for r in from_table(pq.read_table(run / "curate" / f"{s}.parquet"))}
    assert not kept & {q for _, q, _ in taken}
    rejected = pq.read_table(run / "curate" / "rejected.parquet", columns=["rejected_by", "reason"]).to_pylist()
    assert sum(r["rejected_by"] == "decontaminate" and r["reason"].endswith("occur in golden set golden.jsonl")
               for r in rejected) >= 6

    scores = json.loads((run / "evaluate" / "scores.json").read_text())
    g = scores["golden"]
    assert g["records"] == 6 and g["files"] == {"golden.jsonl": 6}
    assert g["overall"]["exact_match"] == 0.0  # scored against the reviewed answers, which no student can give
    assert scores["overall"]["n"] > 6  # the test split is reported apart
    predictions = pq.read_table(run / "evaluate" / "golden_predictions.parquet")
    assert len(predictions) == 6 and "<EMAIL>" in str(predictions.to_pylist())
    assert not [p for p in run.rglob("*") if p.is_file() and b"ops.lead@example.org" in p.read_bytes()]
    gate = json.loads((run / "evaluate" / "gate.json").read_text())
    assert not gate["passed"] and all("on the golden set, below its floor of 50" in f for f in gate["failures"])
    assert cli(["report", str(recipe)]) == 0
    page = (run / "report.html").read_text()
    assert "Golden set" in page and "scored against their reviewed answers" in page and "golden set floor" in page

    golden.write_text(golden.read_text() + json.dumps({"messages": [{"role": "user", "content": "one more"},
                                                                    {"role": "assistant", "content": "ok"}]}) + "\n")
    assert expected_fingerprint(load_recipe(recipe), RunDir(run), "curate") != \
        RunDir(run).manifest("curate")["fingerprint"]  # a changed golden file reruns curate (and what follows)


SHORT = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "juniper"]


def _short_tickets_with_email(logs: Path) -> list[tuple[str, str, str]]:
    """Adds logs/short.jsonl.gz: demo requests whose ticket is cut to a few words ending in an e-mail address
    (fewer words than decontamination's n-gram, so each is one n-gram); returns them raw as golden rows."""
    import gzip
    import re

    out, lines = [], []
    with gzip.open(logs / "2026-11-23.jsonl.gz", "rt") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            user = [m for m in (row.get("request") or {}).get("messages", []) if m["role"] == "user"]
            if row.get("status_code") != 200 or len(user) != 1 or "@" not in user[0]["content"]:
                continue
            email = re.search(r"\S+@\S+[a-z]", user[0]["content"]).group(0)
            user[0]["content"] = f"Ticket {SHORT[len(out)]}: refund please, reach me at {email}"
            row["id"] = f"short-{len(out)}"
            out.append(("support", user[0]["content"], "Reviewed answer"))
            lines.append(json.dumps(row))
            if len(out) == len(SHORT):
                break
    with gzip.open(logs / "short.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return out


def test_golden_records_are_redacted_like_training_text(tmp_path):
    """A golden prompt with an e-mail address is loaded redacted (curate.pii), so it matches the training copy
    harvest redacted, and its raw address never reaches the run directory; curate.pii keep leaves it."""
    from curation.harvest.golden import golden_redaction

    path = _finetune_rows(tmp_path / "g.jsonl", [("faq", "Refund? You can reach me at ana.97@inbox.example.net.",
                                                  "Sure, we wrote to ana.97@inbox.example.net")])
    recipe = parse_recipe(merge(BASE_RECIPE, {"evaluate": {"golden": [{"path": str(path),
                                                                        "format": "openai_finetune"}]}}))
    (r,) = load_golden(recipe.evaluate.golden, golden_redaction(recipe))
    assert r["messages"][-1]["content"] == "Refund? You can reach me at <EMAIL>."
    assert r["output"]["content"] == "Sure, we wrote to <EMAIL>"
    kept = parse_recipe(merge(BASE_RECIPE, {"curate": {"pii": {"action": "keep", "secrets": []}}}))
    assert golden_redaction(kept) is None  # curate.pii looks for nothing: nor does the golden set


def test_a_golden_prompt_with_pii_leaves_training_where_it_was_redacted(project):
    """Harvest redacts the training copy (<EMAIL>); the golden set holds the raw prompt. Decontamination must
    compare like with like: a short ticket is a single 13-gram, so one raw address would hide the match."""
    recipe = project()
    taken = _short_tickets_with_email(recipe.parent / "logs")
    _finetune_rows(recipe.parent / "golden.jsonl", taken)
    recipe.write_text(recipe.read_text().replace("evaluate:", "evaluate:\n  golden:\n  - {path: golden.jsonl, "
                                                 "format: openai_finetune}", 1))
    assert cli(["curate", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    from pipeline.record import from_table

    kept = [m["content"] for s in ("train", "val") for r in from_table(pq.read_table(run / "curate" / f"{s}.parquet"))
            for m in r["messages"] if m["role"] == "user"]
    assert not [t for t in kept if t.startswith("Ticket ")]
    rejected = pq.read_table(run / "curate" / "rejected.parquet", columns=["rejected_by", "reason", "messages"])
    dropped = [r for r in rejected.to_pylist() if r["rejected_by"] == "decontaminate"
               and any(m["content"].startswith("Ticket ") for m in r["messages"] if m["role"] == "user")]
    assert len(dropped) >= 3 and all(r["reason"].endswith("occur in golden set golden.jsonl") for r in dropped)
    assert all("@" not in m["content"] for r in dropped for m in r["messages"])  # harvest's redacted copies
