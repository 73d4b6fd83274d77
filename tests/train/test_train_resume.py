"""A training killed mid-run (SIGKILL) and started again resumes from its last complete checkpoint and ends with
the same weights as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import losses

from pipeline.cli import main as cli

from conftest import ROOT

TRAIN = {"student": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "vocab_size": 400}},
         "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "packing": True, "max_steps": 16,
         "batch_size": 4, "max_length": 256, "learning_rate": 1e-2, "save_steps": 4, "logging_steps": 4}


def test_killed_training_resumes_to_the_same_weights(project, monkeypatch):
    recipe = project(train=TRAIN)
    root = recipe.parent
    killed = root / "killed.yaml"
    killed.write_text(recipe.read_text().replace("name: t", "name: killed"))
    assert cli(["train", str(recipe)]) == 0  # the uninterrupted run, in this process
    assert cli(["curate", str(killed)]) == 0

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = root / "runs" / "killed"
    ckpts = run / ".partial" / "train" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "training.train", str(killed)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "checkpoint-8" / "trainer_state.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpts / "checkpoint-8").is_dir(), "training never wrote its checkpoint"
    assert not (run / "train").exists(), "a killed stage must not look complete"
    (ckpts / "checkpoint-999").mkdir()  # as if killed in the middle of writing a checkpoint: no trainer_state.json

    done = subprocess.run([sys.executable, "-m", "training.train", str(killed)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resuming from" in done.stdout and "checkpoint-999" not in done.stdout
    info = json.loads((run / "train" / "student.json").read_text())
    assert info["steps"] == 16

    whole = load_file(root / "runs" / "t" / "train" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(run / "train" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and len(whole) > 4
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=1e-4, atol=1e-5, msg=k)
    steps = [json.loads(x)["step"] for x in (run / "train" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(4, 17, 4)), "each step is logged once, also across the restart"
    for a, b in zip(losses(run), losses(root / "runs" / "t"), strict=True):  # before and after the kill
        assert a == pytest.approx(b, abs=1e-4)
