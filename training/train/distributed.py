"""Glue for several processes: which rank this is, which DeepSpeed config applies, and a digest of the trained
weights that every rank can compute (gathering ZeRO-3 shards) to prove they agree.

Launch forms (see docs/train.md): ``accelerate launch --config_file recipes/accelerate/<ddp|zero2|zero3>.yaml
-m training.train RECIPE`` runs the same code path as ``distill train RECIPE``; rank 0 holds the run directory's
lock, runs the stages before train and writes the manifest, every rank trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

from pipeline.config.train import SHIPPED_DEEPSPEED, deepspeed_stage

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "recipes" / "deepspeed"
# When set, every rank writes rank<N>.json (world size, distributed type, digest of its final weights) there.
WEIGHTS_DIGEST_ENV = "DISTILL_WEIGHTS_DIGEST_DIR"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def require_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ImportError("DeepSpeed is not installed: pip install -c constraints.txt -e '.[deepspeed]'") from None
    return deepspeed


def deepspeed_config_path(value: str) -> str:
    """A shipped config name (zero2, zero3, zero3_offload) or a JSON path, as a file path for the Trainer."""
    if value in SHIPPED_DEEPSPEED:
        path = DEEPSPEED_DIR / f"{value}.json"
        if not path.is_file():
            raise FileNotFoundError(f"shipped DeepSpeed config {path} is missing: reinstall distill from a checkout")
        return str(path)
    return str(Path(value).resolve())


def launcher_zero_stage() -> int | None:
    """The ZeRO stage `accelerate launch --use_deepspeed` set up for this process, if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config and config.lower() != "none":
        return deepspeed_stage(config)
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def zero_stage(trainer) -> int | None:
    """The ZeRO stage a Trainer really runs under (None without DeepSpeed)."""
    if not trainer.is_deepspeed_enabled:
        return None
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)


def weights_digest(trainer) -> str:
    """sha256 of the trainable model's full parameters on this rank (ZeRO-3 shards are gathered first; a
    collective call: every rank must make it)."""
    model = trainer.model
    named = list(model.named_parameters())
    ctx = nullcontext()
    if zero_stage(trainer) == 3:
        ctx = require_deepspeed().zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    h = hashlib.sha256()
    with ctx:
        for name, p in named:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_weights_digest(trainer, info: dict) -> None:
    """If DISTILL_WEIGHTS_DIGEST_DIR is set, record this rank's view of the run and its weights' digest there."""
    folder = os.environ.get(WEIGHTS_DIGEST_ENV)
    if not folder:
        return
    digest = weights_digest(trainer)
    acc = trainer.accelerator
    row = {"rank": acc.process_index, "world_size": acc.num_processes, "distributed": str(acc.distributed_type),
           "zero_stage": zero_stage(trainer), "weights_sha256": digest, "steps": info.get("steps")}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{acc.process_index}.json").write_text(json.dumps(row))
