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
from training.train.candidates import (
    DONE,
    candidate_fingerprint,
    check_length_tokens,
    choice_inputs,
    gate_metric,
    gate_on_validation,
    rank_key,
    train_one,
)

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


def test_a_gated_function_without_a_quality_score_fails_the_gate():
    gate = parse_recipe(merge(BASE_RECIPE, {"evaluate": {"gate": {"max_points_below_teacher": 5,
                                                                  "min_records": 5}}})).evaluate.gate
    val = {"functions": {"a": {"n": 10, "quality": None}, "b": {"n": 2, "quality": None}}}
    assert gate_on_validation(val, gate)["failures"] == [
        "a: no quality score on validation (allowed 5 points below the teacher)"]  # b: too few records to gate
    assert gate_on_validation(val, gate.model_copy(update={"max_points_below_teacher": None}))["passed"]  # no floor: nothing to fail


def test_candidates_are_gated_in_evaluates_quality_metric():
    r = parse_recipe(merge(BASE_RECIPE, {"train": {"select": {"metric": "exact_match"}},
                                         "evaluate": {"quality": "chrf"}}))
    assert gate_metric(r) == "chrf"
    assert gate_metric(r.model_copy(update={"evaluate": r.evaluate.model_copy(update={"quality": "judge"})})) == "auto"
    a = parse_recipe(merge(BASE_RECIPE, {"train": {"candidates": [{}]}, "evaluate": {"quality": "chrf"}}))
    b = parse_recipe(merge(BASE_RECIPE, {"train": {"candidates": [{}]}, "evaluate": {"quality": "exact_match"}}))
    assert choice_inputs(a) != choice_inputs(b)  # the metric that ranks the candidates reruns train


def _ctx(tmp_path: Path, **train):
    from rich.console import Console

    from pipeline.rundir import RunDir
    from pipeline.stages import StageContext

    return StageContext(_recipe(**train), RunDir(tmp_path / "run"), tmp_path / "work", {}, Console(quiet=True))


def test_what_does_not_change_the_weights_keeps_a_candidates_cache(tmp_path):
    base = candidate_fingerprint(_ctx(tmp_path), _recipe().train)
    for other in ({"logging_steps": 1}, {"report_to": ["tensorboard"]}, {"select": {"max_records": 3}},
                  {"candidates": [{"name": "x"}]}, {"candidates": [{"name": "x"}], "candidates_until": 0.5}):
        assert candidate_fingerprint(_ctx(tmp_path), _recipe(**other).train) == base, other
    for other in ({"learning_rate": 1e-4}, {"select_by": "quality"},
                  {"select_by": "quality", "select": {"max_records": 3}}):
        assert candidate_fingerprint(_ctx(tmp_path), _recipe(**other).train) != base, other
    q = candidate_fingerprint(_ctx(tmp_path), _recipe(select_by="quality").train)
    assert candidate_fingerprint(_ctx(tmp_path), _recipe(select_by="quality",
                                                         select={"max_records": 3}).train) != q


def test_a_cut_off_or_unmoved_candidate_is_recovered(tmp_path):
    """A candidate.json cut off mid-write is not done (it is retrained, not read); a candidate killed after its
    candidate.json was written but before its folder was moved is moved, not retrained."""
    calls = []

    def fake_train(cctx):
        calls.append(cctx.work.name)
        (cctx.work / "model").mkdir(parents=True, exist_ok=True)
        (cctx.work / "model" / "w.bin").write_text("weights")
        (cctx.work / "checkpoints").mkdir(exist_ok=True)
        return {"parameters": 1}

    ctx = _ctx(tmp_path)
    eff = ctx.recipe.train
    folder, reused = train_one(ctx, "a", eff, {}, fake_train)
    assert not reused and len(calls) == 1 and not (folder / "checkpoints").exists()
    (folder / DONE).write_text('{"fingerprint": "ab')  # killed mid-write
    folder, reused = train_one(ctx, "a", eff, {}, fake_train)
    assert not reused and len(calls) == 2 and json.loads((folder / DONE).read_text())["student"] == {"parameters": 1}

    partial = folder.parent / f".partial-{folder.name}"  # killed between candidate.json and the move
    folder.rename(partial)
    (partial / "checkpoints").mkdir()
    folder, reused = train_one(ctx, "a", eff, {}, fake_train)
    assert reused and len(calls) == 2 and (folder / "model" / "w.bin").is_file()
    assert not partial.exists() and not (folder / "checkpoints").exists()


def test_a_candidate_must_count_lengths_in_the_tokens_curate_counted(tmp_path):
    """Curate filters by length in train.student's tokens: a candidate with another tokenizer is refused; one
    with the same tokenizer (another checkpoint of the family) is fine, as is any candidate of a student built from
    config (curate counts those by its approximation)."""
    from train_helpers import tiny_tokenizer

    tok_a, tok_b = tiny_tokenizer(500), tiny_tokenizer(400)
    for name, tok in (("small", tok_a), ("large", tok_a), ("other", tok_b)):
        tok.save_pretrained(tmp_path / name)
    base = _recipe(student={"checkpoint": str(tmp_path / "small"), "from_config": None},
                   candidates=[{"student": {"checkpoint": str(tmp_path / "large")}},
                               {"student": {"checkpoint": str(tmp_path / "other")}},
                               {"student": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}}}]).train
    same, other, built = (eff for _, eff in effective_candidates(base))
    check_length_tokens(base, same)
    with pytest.raises(ValueError, match="the tokenizer of .*other differs from train.student's"):
        check_length_tokens(base, other)
    with pytest.raises(ValueError, match="train.student.from_config: curate counts lengths"):
        check_length_tokens(base, built)
    check_length_tokens(_recipe().train, _recipe(student={"checkpoint": str(tmp_path / "other"),
                                                          "from_config": None}).train)


def _sha(folder: Path) -> dict[str, str]:
    from pipeline.rundir import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}


def test_candidates_train_once_each_and_the_best_is_passed_on(project):
    cands = [{"name": "still", "learning_rate": 1e-6}, {"name": "moving", "learning_rate": 5e-3, "max_length": 176}]
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

    # a losing candidate (the winner's twin: same cache, same score, listed later) leaves train's output as it was,
    # so evaluate, route and export are not rerun; the table lives in candidates.json (a report file) alone
    from pipeline.rundir import RunDir
    from pipeline.stages import data_digest

    digest_before = data_digest("train", RunDir(run).manifest("train")["outputs"])
    winner = json.loads((run / "train" / "candidates.json").read_text())["chosen"]
    twin = next(c for c in data["train"]["candidates"] if c["name"] == winner)
    data["train"]["candidates"].append({**twin, "name": "twin"})
    recipe.write_text(yaml.safe_dump(data))
    assert cli(["train", str(recipe)]) == 0
    table = json.loads((run / "train" / "candidates.json").read_text())
    assert table["chosen"] == winner and len(table["candidates"]) == 4
    assert data_digest("train", RunDir(run).manifest("train")["outputs"]) == digest_before
    info = json.loads((run / "train" / "student.json").read_text())
    assert "candidates" not in info and info["candidate"] == winner
    assert info["max_length"] == twin.get("max_length", TINY["max_length"])  # the winner's own, which export uses


def test_each_candidate_is_checked_before_any_stage_works(project, capsys):
    """A candidate whose checkpoint cannot be loaded stops the run before harvest, naming the candidate."""
    recipe = project(train={**TINY, "candidates": [{"name": "fine"},
                                                   {"name": "gone", "student": {"checkpoint": "no/such-model"}}]})
    assert cli(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.candidates[1] (gone): train.student.checkpoint" in err and "no/such-model" in err
    assert not (recipe.parent / "runs" / "t" / "harvest").exists()


@pytest.mark.parametrize(("train", "says"), [
    ({"candidates_until": 0.9}, "candidates_until stops a search over train.candidates, and there are none"),
    ({"candidates": [{"name": "a", "candidates_until": 0.9}]}, "candidates[0].candidates_until: a candidate cannot"),
    ({"candidates": [{"name": "a"}], "candidates_until": 1.5}, "train.candidates_until: Input should be less than"),
])
def test_candidates_until_is_checked_with_the_recipe(train, says):
    with pytest.raises(RecipeError) as err:
        _recipe(**train)
    assert says in str(err.value)


def test_candidates_until_stops_at_the_first_good_enough_candidate(project, tmp_path, capsys, monkeypatch):
    """With train.candidates_until the candidates train in order and the first that clears the gate with that
    validation quality ends the search: the later ones are not trained (no cache folder, no training time), the
    table says so. Below the bar every candidate trains, and the best of them is passed on."""
    from conftest import make_project

    cands = [{"name": "first", "learning_rate": 5e-3}, {"name": "second", "learning_rate": 1e-6}]
    gate = {"quality": "chrf", "gate": {"max_points_below_teacher": 100}}  # chrF: partial credit from step 12 on
    recipe = project(train={**TINY, "candidates": cands, "candidates_until": 1.0}, evaluate=gate)
    assert cli(["train", str(recipe)]) == 0  # nothing reaches 1.0: both train
    table = json.loads((recipe.parent / "runs" / "t" / "train" / "candidates.json").read_text())
    assert [r["name"] for r in table["candidates"]] == ["first", "second"] and table["skipped"] == []
    first = table["candidates"][0]["val_quality"]
    assert 0 < first < 1, first  # the bar below is reachable by the first alone

    data = yaml.safe_load(recipe.read_text())  # the bar reached but the gate failed: the search goes on
    data["train"]["candidates_until"], data["evaluate"]["gate"]["max_points_below_teacher"] = first, 0
    recipe.write_text(yaml.safe_dump(data))
    assert cli(["train", str(recipe)]) == 0
    table = json.loads((recipe.parent / "runs" / "t" / "train" / "candidates.json").read_text())
    assert [r["name"] for r in table["candidates"]] == ["first", "second"] and table["skipped"] == []
    assert not any(r["gate"]["passed"] for r in table["candidates"])

    other = make_project(tmp_path / "b", train={**TINY, "candidates": cands, "candidates_until": first},
                         evaluate=gate)
    monkeypatch.chdir(other.parent)  # a fresh project: nothing cached
    capsys.readouterr()
    assert cli(["train", str(other)]) == 0
    run = other.parent / "runs" / "t"
    table = json.loads((run / "train" / "candidates.json").read_text())
    assert [r["name"] for r in table["candidates"]] == ["first"] and table["skipped"] == ["second"]
    assert table["chosen"] == "first" and table["candidates"][0]["val_quality"] == first
    cache = run / "cache" / "candidates"
    assert len(list(cache.iterdir())) == 1  # the second was never started
    out = capsys.readouterr().out
    assert "1 later candidate(s) skipped" in out and "reached train.candidates_until" in out
    assert "candidates_skipped" not in json.loads((run / "train" / "manifest.json").read_text())["student"]

    done = next(cache.iterdir()) / "candidate.json"
    stamp = done.stat().st_mtime_ns
    assert cli(["train", str(other), "--force"]) == 0  # --force retrains the candidates too, not only re-chooses
    table = json.loads((run / "train" / "candidates.json").read_text())
    assert done.stat().st_mtime_ns != stamp and not table["candidates"][0]["reused"]
    assert table["candidates"][0]["val_quality"] == first and table["skipped"] == ["second"]
