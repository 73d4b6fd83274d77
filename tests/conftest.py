"""Shared fixtures: small recipes over freshly generated demo traffic, and one end-to-end run per session.

Everything is built inside the test run: logs by the demo generator, the tokenizer from the curated data,
the student from a tiny config. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

from curation.harvest.demo_traffic import write_demo  # noqa: E402
from pipeline.cli import main as cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

BASE_RECIPE: dict[str, Any] = {
    "name": "t",
    "seed": 0,
    "harvest": {"sources": [{"format": "openai", "path": "logs/*.jsonl.gz"}]},
    "curate": {"feedback": {"metric": "thumbs_up", "min_value": 0.5},
               "split": {"val_fraction": 0.05, "test_fraction": 0.2}},
    "train": {
        "student": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 600}},
        "method": "full", "max_steps": 40, "batch_size": 16, "learning_rate": 3e-3, "max_length": 160,
        "logging_steps": 5, "save_steps": 20,
    },
    "evaluate": {"max_new_tokens": 40, "batch_size": 64, "max_records": 64,
                 "teacher_price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
                 "student_price": {"usd_per_hour": 0.1}},
    "export": {"store": "store", "model_name": "tiny-student", "dtype": "float32"},
    "route": {"tolerance": 0.05, "min_records": 3},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_project(root: Path, days: dict[str, int] | None = None, **overrides: Any) -> Path:
    """A folder with generated logs under logs/ and a recipe.yaml; returns the recipe path."""
    root.mkdir(parents=True, exist_ok=True)
    write_demo(root / "logs", days or {"2026-11-23": 500})
    recipe = merge(BASE_RECIPE, overrides)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A small project in tmp_path (the working directory for the test)."""
    monkeypatch.chdir(tmp_path)

    def _make(days=None, **overrides):
        return make_project(tmp_path, days, **overrides)

    return _make


@pytest.fixture(scope="session")
def e2e(tmp_path_factory) -> Path:
    """All six stages run once on a small project; returns its folder (runs/t, store/ inside)."""
    root = tmp_path_factory.mktemp("e2e")
    recipe = make_project(root, {"2026-11-23": 700}, train={"max_steps": 250})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli(["run", str(recipe)]) == 0
    finally:
        os.chdir(cwd)
    return root
