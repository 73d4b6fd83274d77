import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pipeline.cli import main as cli
from pipeline.config.train import StudentFromConfig
from training.train.chat_template import CHATML_TEMPLATE, check_assistant_mask, train_tokenizer
from training.train.student import build_from_config


def losses(run):
    rows = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_full_finetune_learns_and_changes_every_weight(project):
    recipe = project(train={"max_steps": 40, "eval_steps": 20})
    assert cli(["train", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    train, val = losses(run)
    assert train[-1] < 0.5 * train[0]
    assert len(val) >= 2 and val[-1] < val[0]
    tok = AutoTokenizer.from_pretrained(run / "train" / "model")
    init = build_from_config(StudentFromConfig(hidden_size=64, num_layers=2, num_heads=4, vocab_size=600), tok,
                             160, seed=0).state_dict()
    trained = load_file(run / "train" / "model" / "model.safetensors")
    assert trained, "no weights saved"
    unchanged = [k for k, v in trained.items() if torch.equal(v, init[k])]
    assert not unchanged, unchanged
    info = json.loads((run / "train" / "student.json").read_text())
    assert info["method"] == "full" and info["trainable_parameters"] == info["parameters"]
    assert info["world_size"] == 1


def test_lora_trains_only_the_adapter(project):
    recipe = project(train={"method": "lora", "max_steps": 24, "learning_rate": 1e-2, "lora": {"r": 8, "alpha": 16}})
    assert cli(["train", str(recipe)]) == 0
    run = recipe.parent / "runs" / "t"
    train, _ = losses(run)
    assert train[-1] < train[0]
    adapter = load_file(run / "train" / "adapter" / "adapter_model.safetensors")
    b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert b and all(v.abs().sum() > 0 for v in b.values()), "lora_B starts at zero and must have moved"
    assert (run / "train" / "base" / "model.safetensors").is_file()
    info = json.loads((run / "train" / "student.json").read_text())
    assert 0 < info["trainable_parameters"] < info["parameters"] / 2


def test_assistant_mask_is_checked_early():
    tok = train_tokenizer(["hello there", "general kenobi"] * 20, 300)
    check_assistant_mask(tok)
    tok.chat_template = CHATML_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    with pytest.raises(ValueError, match="no \\{% generation %\\} block"):
        check_assistant_mask(tok)


def _checkpoint(folder, max_positions=512):
    """A tiny pretrained-style student folder (safetensors + tokenizer), as a user's checkpoint would be."""
    from curation.harvest.demo_traffic import generate

    tok = train_tokenizer([json.loads(x)["request"]["messages"][-1]["content"] for x in generate(300, "2026-11-01")
                           if x.endswith("}") and '"request"' in x], 500)
    model = build_from_config(StudentFromConfig(hidden_size=64, num_layers=2, num_heads=4), tok, 64, seed=1)
    model.config.max_position_embeddings = max_positions
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_student_from_a_checkpoint_folder(project):
    recipe = project(train={"student": {"from_config": None, "checkpoint": "ckpt"}, "max_steps": 12,
                            "batch_size": 8})
    _checkpoint(recipe.parent / "ckpt")
    assert cli(["train", str(recipe)]) == 0
    info = json.loads((recipe.parent / "runs/t/train/student.json").read_text())
    assert info["base"] == "ckpt" and info["steps"] == 12
    train, _ = losses(recipe.parent / "runs" / "t")
    assert train[-1] < train[0]


def test_max_length_must_fit_the_model(project, capsys):
    """Checked before any stage does work (no harvest, no curate), with exit code 2 like any recipe error."""
    recipe = project(train={"student": {"from_config": None, "checkpoint": "ckpt"}, "max_length": 160})
    _checkpoint(recipe.parent / "ckpt", max_positions=128)
    assert cli(["train", str(recipe)]) == 2
    assert "train.max_length (160) exceeds the student's context (128 tokens)" in capsys.readouterr().err
    assert not (recipe.parent / "runs").exists()
