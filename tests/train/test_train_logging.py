"""What a training run reports: metrics.jsonl always (train and validation loss), wandb when the recipe asks
(offline here, read back from its run file), and early stopping on validation loss that keeps the best model."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import losses, wandb_history

from pipeline.cli import main as cli

TINY = {"student": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "vocab_size": 400}},
        "batch_size": 8, "max_length": 256, "warmup_ratio": 0.0}


def test_metrics_go_to_jsonl_and_to_wandb(project):
    pytest.importorskip("wandb")
    recipe = project(train={**TINY, "max_steps": 8, "logging_steps": 2, "eval_steps": 4, "report_to": ["wandb"]})
    assert cli(["train", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    train, val = losses(run), losses(run, "eval_loss")
    assert len(train) == 4 and len(val) == 2
    history = wandb_history(run)  # the offline run lives in the run folder, not in the stage's outputs
    assert not list((run / "train").rglob("*.wandb"))
    logged = [row["train/loss"] for row in history if "train/loss" in row]
    logged_val = [row["eval/loss"] for row in history if "eval/loss" in row]
    assert logged == pytest.approx(train) and logged_val == pytest.approx(val)
    assert history[-1]["train/global_step"] == 8


def test_early_stopping_keeps_the_best_checkpoint(project):
    """A learning rate far too high: validation loss gets worse, training stops and the best model is kept."""
    recipe = project(train={**TINY, "max_steps": 60, "learning_rate": 1.0, "lr_scheduler": "constant",
                            "logging_steps": 2, "eval_steps": 2, "save_steps": 2, "early_stopping_patience": 1})
    assert cli(["train", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    info = json.loads((run / "train" / "student.json").read_text())
    val = losses(run, "eval_loss")
    assert info["stopped_early"] and info["steps"] < 60
    assert info["best_eval_loss"] == min(val) < val[-1]

    # the saved model is the best one: its validation loss is the best logged, not the last
    from training.train.chat_template import check_assistant_mask
    from training.train.data import IGNORE, tokenize_records
    from training.train.outputs import load_trained_student
    from training.train.packing import Collator
    from training.train.stage import read_split

    model, tok = load_trained_student(run / "train")
    ds, _ = tokenize_records(read_split(run / "curate", "val"), tok, check_assistant_mask(tok), 256)
    per_batch = []  # as Trainer evaluates: token mean per batch of 8, then the mean over examples
    for start in range(0, len(ds), 8):
        batch = Collator(tok.pad_token_id)([ds[i] for i in range(start, min(start + 8, len(ds)))])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=IGNORE)
        per_batch += [float(ce)] * len(target)
    assert sum(per_batch) / len(per_batch) == pytest.approx(min(val), rel=1e-3)
