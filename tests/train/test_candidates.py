"""train.candidates: each candidate (overrides of the train section) is trained, cached by its effective section,
scored on the validation split, and the best that clears the gate (quality, then serving cost) is the stage's
output; a bad candidate fails recipe validation naming its index and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli
from pipeline.config.candidates import effective_candidates
from pipeline.recipe import RecipeError, parse_recipe
from training.train.candidates import choice_inputs, gate_on_validation, rank_key

from conftest import BASE_RECIPE, merge

TINY = {"student": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "vocab_size": 400}},
        "batch_size": 8, "max_steps": 12, "max_length": 192, "logging_steps": 4, "save_steps": 100,
        "select": {"max_new_tokens": 24, "max_records": 12}}


def _recipe(**train):
    return parse_recipe(merge(BASE_RECIPE, {"train": train}))


@pytest.mark.parametrize(("candidates", "says"), [
    ([{"name": "ok"}, {"learning_rate": -1}], "candidates[1].learning_rate: Input should be greater than 0"),
    ([{"lernig_rate": 1e-3}], "candidates[0].lernig_rate: Extra inputs are not permitted"),
    ([{"student": {"from_config": {"num_heads": 3}}}], "candidates[0].student.from_config"),
    ([{"name": "a"}, {"name": "a"}], "the name 'a' is used twice"),
    ([{"name": "no spaces"}], "candidates[0].name"),
    ([{"candidates": []}], "candidates[0].candidates: a candidate cannot hold candidates"),
    (["lr"], "train.candidates.0: Input should be a valid dictionary"),
])
def test_a_bad_candidate_is_refused_naming_its_index_and_field(candidates, says):
    with pytest.raises(RecipeError) as err:
        _recipe(candidates=candidates)
    assert says in str(err.value)


def test_overrides_merge_into_the_section():
    r = _recipe(candidates=[{"name": "narrow", "student": {"from_config": {"hidden_size": 32, "num_heads": 2}}},
                            {"student": {"checkpoint": "some/model"}, "method": "lora", "lora": {"r": 4}},
                            {"learning_rate": 1e-3, "seed": 7}])
    (n0, c0), (n1, c1), (n2, c2) = effective_candidates(r.train)
    assert (n0, n1, n2) == ("narrow", "candidate-1", "candidate-2")
    assert c0.student.from_config.hidden_size == 32 and c0.student.from_config.vocab_size == 600  # merged
    assert c0.learning_rate == r.train.learning_rate and c0.candidates == []
    assert c1.student.from_config is None and c1.student.checkpoint == "some/model"  # the source is replaced
    assert c1.lora.r == 4 and c1.lora.alpha == r.train.lora.alpha
    assert (c2.learning_rate, c2.seed, c2.max_steps) == (1e-3, 7, r.train.max_steps)


def test_the_gate_joins_the_fingerprint_only_with_candidates():
    plain = _recipe()
    assert choice_inputs(plain) == {}
    a = parse_recipe(merge(BASE_RECIPE, {"train": {"candidates": [{}]},
                                         "evaluate": {"gate": {"max_points_below_teacher": 5}}}))
    b = parse_recipe(merge(BASE_RECIPE, {"train": {"candidates": [{}]},
                                         "evaluate": {"gate": {"max_points_below_teacher": 2}}}))
    assert choice_inputs(a) and choice_inputs(a) != choice_inputs(b)


def _row(i, q, params, loss=1.0, passed=True):
    return {"index": i, "val": {"quality": q}, "student": {"parameters": params, "best_eval_loss": loss},
            "gate": {"passed": passed}}


def test_the_winner_clears_the_gate_then_has_quality_then_costs_less():
    rows = [_row(0, 0.99, 100, passed=False), _row(1, 0.90, 500), _row(2, 0.95, 900), _row(3, 0.95, 300, 2.0)]
    assert min(rows, key=rank_key)["index"] == 3  # 0 fails the gate; 2 and 3 tie on quality; 3 is smaller
    rows[3]["student"]["parameters"] = 900
    assert min(rows, key=rank_key)["index"] == 2  # same size: the lower validation loss
    val = {"functions": {"a": {"n": 10, "quality": 0.93}, "b": {"n": 2, "quality": 0.5}}}
    gate = parse_recipe(merge(BASE_RECIPE, {"evaluate": {"gate": {"max_points_below_teacher": 5, "min_records": 5,
                                                                  "functions": {"a": 8}}}})).evaluate.gate
    assert gate_on_validation(val, gate)["passed"]  # a: 7 below, allowed 8; b: too few records to gate
    gate.functions["a"] = 6
    assert gate_on_validation(val, gate)["failures"] == ["a: 7.0 points below the teacher (allowed 6)"]


def _sha(folder: Path) -> dict[str, str]:
    from pipeline.rundir import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}


def test_candidates_train_once_each_and_the_best_is_passed_on(project):
    cands = [{"name": "still", "learning_rate": 1e-6}, {"name": "moving", "learning_rate": 5e-3}]
    recipe = project(train={**TINY, "candidates": cands}, evaluate={"gate": {"max_points_below_teacher": 100}})
    assert cli(["train", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    table = json.loads((run / "train" / "candidates.json").read_text())
    rows = {r["name"]: r for r in table["candidates"]}
    assert set(rows) == {"still", "moving"} and not any(r["reused"] for r in rows.values())
    for r in rows.values():
        assert r["val_n"] == 12 and 0 <= r["val_quality"] <= 1 and r["gate"]["passed"]
        assert r["steps"] == 12 and r["best_eval_loss"] is not None
    best = min(rows.values(), key=lambda r: (-round(r["val_quality"], 6), r["parameters"], r["best_eval_loss"]))
    assert table["chosen"] == best["name"] and rows[best["name"]]["chosen"]
    assert rows["moving"]["best_eval_loss"] < rows["still"]["best_eval_loss"]  # the two really differ
    info = json.loads((run / "train" / "student.json").read_text())
    assert info["candidate"] == best["name"]
    cache = run / "cache" / "candidates"
    assert _sha(run / "train" / "model") == _sha(cache / best["cache"] / "model")
    assert not list(cache.glob("*/checkpoints"))  # finished candidates keep their model, not their checkpoints

    # a third candidate: only it trains; the other two come from the cache unchanged
    stamps = {n: (cache / r["cache"] / "candidate.json").stat().st_mtime_ns for n, r in rows.items()}
    data = yaml.safe_load(recipe.read_text())
    data["train"]["candidates"].append({"name": "third", "learning_rate": 2e-3, "seed": 3})
    recipe.write_text(yaml.safe_dump(data))
    assert cli(["train", str(recipe)]) == 0
    again = {r["name"]: r for r in json.loads((run / "train" / "candidates.json").read_text())["candidates"]}
    assert {n: r["reused"] for n, r in again.items()} == {"still": True, "moving": True, "third": False}
    assert {n: (cache / again[n]["cache"] / "candidate.json").stat().st_mtime_ns for n in stamps} == stamps
    assert again["moving"]["val_quality"] == rows["moving"]["val_quality"]


def test_each_candidate_is_checked_before_any_stage_works(project, capsys):
    """A candidate whose checkpoint cannot be loaded stops the run before harvest, naming the candidate."""
    recipe = project(train={**TINY, "candidates": [{"name": "fine"},
                                                   {"name": "gone", "student": {"checkpoint": "no/such-model"}}]})
    assert cli(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.candidates[1] (gone): train.student.checkpoint" in err and "no/such-model" in err
    assert not (recipe.parent / "runs" / "t" / "harvest").exists()
