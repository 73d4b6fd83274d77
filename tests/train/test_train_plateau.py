"""train.lr_scheduler: plateau — a constant rate after warm-up, cut each time ``plateau.patience`` evaluations
bring no better select_by figure; and, for it and early stopping alike, a tie in quality with a lower validation
loss is not an improvement (before, it was, so early stopping with select_by: quality never fired on a plateau)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_train_select import SELECT, TINY
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from pipeline.cli import main as cli
from pipeline.recipe import RecipeError, parse_recipe
from training.train.plateau import early_stop_callback, improvement_threshold, reductions
from training.train.select import selection_value

from conftest import BASE_RECIPE, merge


def test_reductions_count_patience_long_runs_without_improvement():
    assert reductions([0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7], True, 0.0, 2) == 2
    assert reductions([0.5, 0.6, 0.7, 0.8], True, 0.0, 1) == 0
    assert reductions([3.0, 2.0, 2.5, 2.4, 1.0], False, 0.0, 2) == 1  # a loss: lower is better
    assert reductions([0.5, 0.55, 0.58], True, 0.1, 1) == 2  # under the threshold is no improvement


def _stops(cb, values: list[float], key: str = "eval_select") -> bool:
    """Feed evaluations to an early-stopping callback as the Trainer does (logged first, then on_evaluate)."""
    state, control = TrainerState(), TrainerControl()
    for v in values:
        state.log_history.append({key: v})
        cb.on_evaluate(None, state, control, metrics={key: v})
    return control.should_training_stop


def test_a_tie_in_quality_with_a_lower_loss_does_not_reset_early_stopping():
    """Evaluations of equal quality and falling loss: patience runs out (with transformers' EarlyStoppingCallback
    and the recipe's threshold 0, the code before, every one counted as better and it never stopped)."""
    cfg = parse_recipe(merge(BASE_RECIPE, {"train": {"select_by": "quality", "early_stopping_patience": 2}})).train
    values = [selection_value(0.9, loss) for loss in (0.50, 0.40, 0.30, 0.20)]
    assert len(set(values)) == 4 and reductions(values, True, improvement_threshold(cfg), 2) == 1
    assert _stops(early_stop_callback(cfg, "eval_select", True), values)
    assert not _stops(early_stop_callback(cfg, "eval_select", True), [0.5, 0.6, 0.6, 0.7, 0.7])


class _Flat(torch.nn.Module):
    """A model whose validation loss never moves: early stopping must stop it after `patience` evaluations."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, labels=None):
        return {"loss": 1.0 + 0 * self.w.sum() * x.sum()}


class _Ones(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": torch.ones(1), "labels": torch.ones(1)}


def _stop_step(out, callback, resume=None) -> int:
    args = TrainingArguments(str(out), max_steps=12, per_device_train_batch_size=4, eval_strategy="steps",
                             eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", greater_is_better=False, report_to="none",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(_Flat(), args, train_dataset=_Ones(), eval_dataset=_Ones(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer.state.global_step


def test_early_stopping_goes_on_counting_after_a_resume(tmp_path):
    """A real Trainer resumed from a checkpoint stops where the uninterrupted run stopped (transformers'
    EarlyStoppingCallback, which the stage used before, starts counting again: it stopped 2 steps later)."""
    cfg = parse_recipe(merge(BASE_RECIPE, {"train": {"early_stopping_patience": 3}})).train
    whole = _stop_step(tmp_path / "a", early_stop_callback(cfg, "eval_loss", False))
    assert whole == 4  # the first evaluation is the best; three more without a better one
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed = _stop_step(tmp_path / "b", early_stop_callback(cfg, "eval_loss", False),
                         str(tmp_path / "b" / "checkpoint-3"))
    assert resumed == whole


def test_the_rate_is_cut_after_each_plateau_as_logged_in_a_real_training(project):
    """A rate far too high makes validation quality go up and down; at every logged step the rate is the recipe's
    times factor ** (cuts the evaluations before it call for)."""
    recipe = project(train={**TINY, **SELECT, "max_steps": 24, "learning_rate": 3e-2, "lr_scheduler": "plateau",
                            "plateau": {"patience": 1, "factor": 0.5}, "logging_steps": 1, "eval_steps": 3,
                            "save_steps": 3})
    assert cli(["train", str(recipe)]) == 0
    rows = [json.loads(x) for x in (recipe.parent / "runs" / "t" / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_select"]) for r in rows if "eval_select" in r]
    rates = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    assert len(evals) == 8 and len(rates) == 24
    cuts = reductions([v for _, v in evals], True, 1e-7, 1)
    assert cuts >= 1, "the curve never stalled: the test could not see a cut"
    for step, lr in rates:
        n = reductions([v for s, v in evals if s < step], True, 1e-7, 1)
        assert lr == pytest.approx(3e-2 * 0.5 ** n, rel=1e-6), (step, lr, n)


def test_plateau_needs_a_validation_split(project, capsys):
    recipe = project(curate={"split": {"val_fraction": 0.0, "test_fraction": 0.2}},
                     train={**TINY, "lr_scheduler": "plateau", "max_steps": 2})
    assert cli(["train", str(recipe)]) != 0
    assert "train.lr_scheduler: plateau follows the validation figure" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="train.plateau.factor"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"lr_scheduler": "plateau", "plateau": {"factor": 1.5}}}))
