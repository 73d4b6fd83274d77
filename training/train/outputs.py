"""Reading what the train stage wrote: the contract between train and the stages after it.

``train/student.json`` says what was trained: ``{"method": "full"|"lora"|"qlora", "objective": ..., "base": ...,
"base_path": ..., "base_revision": ..., "teacher": ..., "world_size": ...}`` (``base`` as the recipe names it,
``base_path`` its absolute path when it is a local folder). Full fine-tuning leaves ``train/model/`` (weights,
config, tokenizer). LoRA and QLoRA leave ``train/adapter/`` (adapter and tokenizer) and, when the base was built
from config rather than loaded, ``train/base/``; a QLoRA adapter is applied to the unquantized base here (so
``merge`` gives a full-precision model). Weights are loaded from safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def student_info(train_dir: Path) -> dict[str, Any]:
    return json.loads((train_dir / "student.json").read_text())


def load_trained_student(train_dir: Path, merge: bool = False, dtype=None):
    """(model, tokenizer) from a train stage folder; ``merge`` folds a LoRA adapter into the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = student_info(train_dir)
    dtype = dtype or torch.float32
    remote = bool(info.get("trust_remote_code"))
    if info["method"] == "full":
        path = train_dir / "model"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=remote)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        return model, tokenizer
    from peft import PeftModel

    base = train_dir / "base"
    if not base.is_dir():
        local = info.get("base_path")
        base = local if local and Path(local).is_dir() else info["base"]
    model = AutoModelForCausalLM.from_pretrained(
        base, revision=None if Path(str(base)).is_dir() else info.get("base_revision"), dtype=dtype,
        use_safetensors=True, trust_remote_code=remote,
    )
    model = PeftModel.from_pretrained(model, train_dir / "adapter")
    if merge:
        model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(train_dir / "adapter", trust_remote_code=remote)
    return model, tokenizer
