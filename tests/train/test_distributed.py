"""Real multi-process training on CPU: `accelerate launch` with 2 processes, DDP over gloo and DeepSpeed ZeRO-2 and
ZeRO-3, through the same code path as `distill train` (python -m training.train).

Several launch forms silently run one process or two independent trainings, so each test checks, from inside the
training, that the world size was 2 and that both ranks ended with the same weights (each rank writes a digest of
its final parameters when DISTILL_WEIGHTS_DIGEST_DIR is set; ZeRO-3 shards are gathered first).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import launch_env, losses, save_checkpoint, tiny_tokenizer

from pipeline.cli import main as cli
from pipeline.rundir import RunDir

from conftest import BASE_RECIPE, ROOT, make_project, merge

pytest.importorskip("deepspeed")

TRAIN = {"max_steps": 6, "batch_size": 4, "max_length": 256, "logging_steps": 2, "save_steps": 100,
         "learning_rate": 5e-3, "student": {"from_config": None, "checkpoint": "student"}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_project(root, {"2026-11-23": 160})
    tok = tiny_tokenizer()
    save_checkpoint(root / "student", tok, seed=1)
    save_checkpoint(root / "teacher", tok, seed=2, sharpen=25.0)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root: Path, name: str, config: str, train: dict) -> tuple[Path, dict, list[dict]]:
    """accelerate launch --config_file recipes/accelerate/<config>.yaml -m training.train RECIPE, 2 processes."""
    recipe = root / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(merge(BASE_RECIPE, {"name": name, "train": {**TRAIN, **train}})))
    digests = root / f"digests-{name}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
           "--main_process_port", str(_free_port())]
    if config.startswith("zero"):  # the accelerate configs name the JSON relative to the repository root
        cmd += ["--deepspeed_config_file", str(ROOT / "recipes" / "deepspeed" / f"{config}.json")]
    cmd += ["-m", "training.train", str(recipe)]
    proc = subprocess.run(cmd, cwd=root, env=launch_env(DISTILL_WEIGHTS_DIGEST_DIR=str(digests)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = root / "runs" / name
    info = json.loads((run / "train" / "student.json").read_text())
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info["world_size"] == 2, "the launch ran a single process"
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"], "the two ranks ended with different weights"
    assert proc.stdout.count("train done in") == 1, "only rank 0 reports and writes the manifest"
    manifest = RunDir(run).manifest("train")
    assert manifest["counts"]["world_size"] == 2 and not (run / ".partial" / "train").exists()
    return run, info, ranks


def test_ddp_over_gloo_runs_prior_stages_once_then_trains_on_two_ranks(cluster, monkeypatch):
    """Harvest and curate are not done yet: rank 0 runs them while rank 1 waits, then both train."""
    run, info, ranks = launch(cluster, "ddp", "ddp", {"method": "full"})
    assert info["distributed"] == "MULTI_CPU" and info["zero_stage"] is None
    assert RunDir(run).manifest("harvest") and RunDir(run).manifest("curate")
    train = losses(run)
    assert train[-1] < train[0]
    before = load_file(cluster / "student" / "model.safetensors")
    after = load_file(run / "train" / "model" / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before)
    monkeypatch.chdir(cluster)
    assert cli(["train", str(cluster / "ddp.yaml")]) == 0  # the lock was released, and nothing reruns
    assert RunDir(run).manifest("train")["finished_at"] == json.loads(
        (run / "train" / "manifest.json").read_text())["finished_at"]


def test_deepspeed_zero2_with_a_teacher(cluster):
    """Dense logit distillation under ZeRO-2: the teacher runs replicated (stage 0) next to the sharded student."""
    run, info, ranks = launch(cluster, "zero2", "zero2",
                              {"method": "full", "objective": "dense_kd",
                               "distill": {"teacher": "teacher", "ce_weight": 0.0}})
    assert info["distributed"] == "DEEPSPEED" and info["zero_stage"] == 2
    assert ranks[0]["zero_stage"] == 2
    kls = losses(run, "kl_to_teacher")
    assert kls[-1] < kls[0]


def test_deepspeed_zero3_saves_a_full_lora_adapter(cluster):
    """Under ZeRO-3 every parameter is sharded; the saved adapter must hold the gathered, trained tensors."""
    from training.train.outputs import load_trained_student

    run, info, ranks = launch(cluster, "zero3", "zero3",
                              {"method": "lora", "lora": {"r": 4, "alpha": 8}, "learning_rate": 2e-2})
    assert info["distributed"] == "DEEPSPEED" and info["zero_stage"] == 3
    adapter = load_file(run / "train" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(b) == 2 * 7 and all(v.shape[-1] == 4 and v.abs().sum() > 0 for v in b)
    model, tok = load_trained_student(run / "train", merge=True)
    ids = tok("hello", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
