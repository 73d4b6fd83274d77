"""Training to the task (train.select_by: quality): every evaluation scores greedy answers to the validation split
with the evaluate stage's metric, metrics.jsonl holds the curve, the checkpoint kept is the best by it (ties broken
by validation loss) and early stopping follows it. Packing is on by default where a probe shows it is exact."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import tiny_tokenizer

from pipeline.cli import main as cli
from pipeline.config.train import SelectConfig, StudentFromConfig, TrainConfig
from pipeline.recipe import RecipeError, parse_recipe
from training.train.packing import decide, isolates
from training.train.select import selection_value, shard_batches, validation_quality
from training.train.student import build_from_config

from conftest import BASE_RECIPE, merge

TINY = {"student": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "vocab_size": 400}},
        "batch_size": 8, "max_length": 256, "warmup_ratio": 0.0}
SELECT = {"select_by": "quality", "select": {"metric": "chrf", "max_new_tokens": 12, "max_records": 16}}


def _rows(run, key):
    rows = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _quality_of_saved_model(run, select: dict) -> float:
    """Validation quality of the model the stage saved, measured again in this process."""
    from accelerate import Accelerator

    from training.train.outputs import load_trained_student
    from training.train.select import scored_records
    from training.train.stage import read_split

    model, tok = load_trained_student(run / "train")
    cfg = SelectConfig(**select)
    records = scored_records(read_split(run / "curate", "val"), cfg.max_records)
    return validation_quality(model, tok, records, cfg, Accelerator(cpu=True), synced=False)["quality"]


def test_quality_selection_logs_the_curve_and_keeps_the_best_checkpoint(project):
    """A constant learning rate far too high makes the curve go up and down; the model kept is the one whose
    validation quality (and, among equals, validation loss) was best, not the last one."""
    recipe = project(train={**TINY, **SELECT, "max_steps": 24, "learning_rate": 3e-2, "lr_scheduler": "constant",
                            "logging_steps": 4, "eval_steps": 4, "save_steps": 4})
    assert cli(["train", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    quality, loss, select = _rows(run, "eval_quality"), dict(_rows(run, "eval_loss")), _rows(run, "eval_select")
    assert [s for s, _ in quality] == [4, 8, 12, 16, 20, 24]  # each evaluation once, with the loss beside it
    assert len({q for _, q in quality}) > 1, "the curve is flat: the test could not tell checkpoints apart"
    for (step, q), (_, v) in zip(quality, select, strict=True):
        assert v == pytest.approx(selection_value(q, loss[step]), abs=1e-12)
    best_step = max(select, key=lambda sv: (sv[1], -sv[0]))[0]  # the first of the best, as the Trainer keeps it
    info = json.loads((run / "train" / "student.json").read_text())
    assert info["select_by"] == "quality" and info["kept_step"] == best_step
    assert info["val_quality"] == [{"step": s, "quality": q} for s, q in quality]
    assert info["kept_val_quality"] == dict(quality)[best_step] == info["val_quality_best"]
    assert info["packing"] is True  # the default, exact for this student
    assert _quality_of_saved_model(run, SELECT["select"]) == pytest.approx(dict(quality)[best_step], abs=1e-6)


def test_quality_early_stopping_and_loss_selection_unchanged(project):
    """Patience counts evaluations without a better quality; select_by: loss generates nothing."""
    recipe = project(train={**TINY, **SELECT, "max_steps": 60, "learning_rate": 1.0, "lr_scheduler": "constant",
                            "logging_steps": 2, "eval_steps": 2, "save_steps": 2, "early_stopping_patience": 1})
    assert cli(["train", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    info = json.loads((run / "train" / "student.json").read_text())
    select = [v for _, v in _rows(run, "eval_select")]
    assert info["stopped_early"] and info["steps"] < 60
    assert select[-1] <= select[-2] and max(select) == pytest.approx(select[[s for s, _ in _rows(
        run, "eval_select")].index(info["kept_step"])])

    plain = project(name="plain", train={**TINY, "max_steps": 4, "eval_steps": 2, "logging_steps": 2})
    assert cli(["train", str(plain)]) == 0
    rows = (recipe.parent / "runs" / "plain" / "train" / "metrics.jsonl").read_text()
    assert "eval_loss" in rows and "eval_quality" not in rows


@pytest.mark.parametrize("n, world, batch", [(0, 2, 4), (1, 2, 4), (7, 2, 3), (16, 3, 4), (5, 1, 8), (9, 4, 1)])
def test_every_rank_runs_the_same_number_of_batches_and_each_record_is_scored_once(n, world, batch):
    shards = [shard_batches(n, rank, world, batch) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    seen = sorted(i for s in shards for b in s for i in b)
    assert seen == list(range(n))
    assert all(len(b) <= batch for s in shards for b in s)


def test_selection_orders_by_quality_then_by_loss():
    assert selection_value(0.9, 0.1) > selection_value(0.899999, 0.0)  # quality first, down to 1e-6
    assert selection_value(0.9, 0.1) > selection_value(0.9, 0.2)  # then the lower loss
    assert selection_value(0.9, 5000.0) > selection_value(0.899999, 0.0)  # the loss term is capped
    assert selection_value(0.9, None) == selection_value(0.9, float("nan")) == 0.9


def test_recipe_rules_for_selection():
    ok = parse_recipe(merge(BASE_RECIPE, {"train": {"select_by": "quality"}}))
    assert ok.train.keeps_best and ok.train.select.metric == "auto"
    with pytest.raises(RecipeError, match="select_by: quality keeps the best checkpoint, so save_steps"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"select_by": "quality", "eval_steps": 7, "save_steps": 20}}))
    with pytest.raises(RecipeError, match="train.select.metric"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"select": {"metric": "judge"}}}))
    # early stopping no longer needs eval_steps: it then evaluates and saves each epoch
    assert parse_recipe(merge(BASE_RECIPE, {"train": {"early_stopping_patience": 2}})).train.keeps_best


def test_quality_selection_needs_a_validation_split(project, capsys):
    recipe = project(curate={"split": {"val_fraction": 0.0, "test_fraction": 0.2}},
                     train={**TINY, **SELECT, "max_steps": 2})
    assert cli(["train", str(recipe)]) != 0
    assert "train.select_by: quality needs a validation split" in capsys.readouterr().out


class IgnoresPositions(torch.nn.Module):
    """A causal LM whose forward drops position ids (as models with their own masking code do): packed examples
    then attend to the ones before them in the row."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @property
    def device(self):
        return self.model.device

    def forward(self, input_ids, position_ids=None, use_cache=False):
        return self.model(input_ids=input_ids, use_cache=use_cache)


def test_packing_is_the_default_where_the_probe_shows_it_exact():
    tok = tiny_tokenizer(400)
    model = build_from_config(StudentFromConfig(hidden_size=32, num_layers=2, num_heads=2), tok, 64, seed=0)
    model.train()
    student = {"student": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}}}
    auto, on, off = (TrainConfig.model_validate({**student, **x}) for x in ({}, {"packing": True},
                                                                             {"packing": False}))
    assert auto.packing is None
    exact, diff = isolates(model, len(tok))
    assert exact and diff < 1e-5
    assert decide(auto, model, len(tok))[0] and decide(on, model, len(tok))[0]
    assert decide(off, model, len(tok)) == (False, "off (train.packing: false)")
    leaky = IgnoresPositions(model)
    exact, diff = isolates(leaky, len(tok))
    assert not exact and diff > 1e-2
    packed, why = decide(auto, leaky, len(tok))
    assert not packed and "attends across packed examples" in why
    with pytest.raises(ValueError, match="train.packing is true but this student attends across"):
        decide(on, leaky, len(tok))
    assert model.training  # the probe leaves the model in the mode it found it in


def test_a_killed_quality_selected_training_resumes_to_the_same_choice(project):
    """Killed after its second checkpoint and run again, it resumes and keeps the same checkpoint, with the same
    quality curve (each evaluation logged once) and the same weights as the run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from conftest import ROOT

    recipe = project(train={**TINY, **SELECT, "max_steps": 12, "learning_rate": 3e-2, "lr_scheduler": "constant",
                            "logging_steps": 3, "eval_steps": 3, "save_steps": 3})
    root = recipe.parent
    killed = root / "killed.yaml"
    killed.write_text(recipe.read_text().replace("name: t", "name: killed"))
    assert cli(["train", str(recipe)]) == 0
    assert cli(["curate", str(killed)]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ckpts = root / "runs" / "killed" / ".partial" / "train" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "training.train", str(killed)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts / "checkpoint-6" / "trainer_state.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([sys.executable, "-m", "training.train", str(killed)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resuming from" in done.stdout
    whole, resumed = root / "runs" / "t", root / "runs" / "killed"
    assert [s for s, _ in _rows(resumed, "eval_quality")] == [3, 6, 9, 12]
    for (_, a), (_, b) in zip(_rows(whole, "eval_quality"), _rows(resumed, "eval_quality"), strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    info_w, info_r = (json.loads((r / "train" / "student.json").read_text()) for r in (whole, resumed))
    assert info_r["kept_step"] == info_w["kept_step"]
    a, b = (load_file(r / "train" / "model" / "model.safetensors") for r in (whole, resumed))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
