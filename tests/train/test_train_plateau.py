"""train.lr_scheduler: plateau — a constant rate after warm-up, cut each time ``plateau.patience`` evaluations
bring no better select_by figure; and, for it and early stopping alike, a tie in quality with a lower validation
loss is not an improvement (before, it was, so early stopping with select_by: quality never fired on a plateau)."""

from __future__ import annotations

import json

import pytest
from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

from pipeline.cli import main as cli
from pipeline.recipe import RecipeError, parse_recipe
from training.train.plateau import improvement_threshold, reductions
from training.train.select import selection_value

from conftest import BASE_RECIPE, merge
from test_train_select import SELECT, TINY


def test_reductions_count_patience_long_runs_without_improvement():
    assert reductions([0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7], True, 0.0, 2) == 2
    assert reductions([0.5, 0.6, 0.7, 0.8], True, 0.0, 1) == 0
    assert reductions([3.0, 2.0, 2.5, 2.4, 1.0], False, 0.0, 2) == 1  # a loss: lower is better
    assert reductions([0.5, 0.55, 0.58], True, 0.1, 1) == 2  # under the threshold is no improvement


def test_a_tie_in_quality_with_a_lower_loss_does_not_reset_early_stopping(tmp_path):
    """The real EarlyStoppingCallback over evaluations of equal quality and falling loss: with the threshold the
    stage now gives it, patience runs out; with the recipe's 0 alone (the code before), it never did."""
    cfg = parse_recipe(merge(BASE_RECIPE, {"train": {"select_by": "quality", "early_stopping_patience": 2}})).train
    values = [selection_value(0.9, loss) for loss in (0.50, 0.40, 0.30, 0.20)]
    assert len(set(values)) == 4 and reductions(values, True, improvement_threshold(cfg), 2) == 1

    def stops(threshold: float) -> bool:
        args = TrainingArguments(str(tmp_path), metric_for_best_model="eval_select", greater_is_better=True,
                                 load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch")
        cb, state, control = EarlyStoppingCallback(2, threshold), TrainerState(), TrainerControl()
        for v in values:
            cb.on_evaluate(args, state, control, metrics={"eval_select": v})
            state.best_metric = v if state.best_metric is None else max(v, state.best_metric)  # as the Trainer
        return control.should_training_stop

    assert stops(improvement_threshold(cfg))
    assert not stops(cfg.early_stopping_threshold)


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
