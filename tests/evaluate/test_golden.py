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
    assert len(pq.read_table(run / "evaluate" / "golden_predictions.parquet")) == 6
    gate = json.loads((run / "evaluate" / "gate.json").read_text())
    assert not gate["passed"] and all("on the golden set, below its floor of 50" in f for f in gate["failures"])
    assert cli(["report", str(recipe)]) == 0
    page = (run / "report.html").read_text()
    assert "Golden set" in page and "scored against their reviewed answers" in page and "golden set floor" in page

    golden.write_text(golden.read_text() + json.dumps({"messages": [{"role": "user", "content": "one more"},
                                                                    {"role": "assistant", "content": "ok"}]}) + "\n")
    assert expected_fingerprint(load_recipe(recipe), RunDir(run), "curate") != \
        RunDir(run).manifest("curate")["fingerprint"]  # a changed golden file reruns curate (and what follows)
