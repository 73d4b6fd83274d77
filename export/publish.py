"""The export stage: merge the student (LoRA folded in), save it as safetensors with its tokenizer and
config, check that the saved copy reloads with the same outputs, and publish it to the store with a
manifest of its lineage, scores and checksums.

Writes ``export/<model_name>/`` (the artefact, with the run's ``routing_policy.json``) and
``export/manifest.json``; the store gets a new version.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib.metadata import version as pkg_version
from typing import Any

import pyarrow.parquet as pq

from export.store import publish
from pipeline.artifacts import load_trained_student, student_info
from pipeline.rundir import digest, sha256_file
from pipeline.stages import StageContext, StageResult


def _reload_check(model, tokenizer, folder) -> float:
    """Max absolute logit difference between the in-memory model and the saved copy on a probe prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = tokenizer.apply_chat_template([{"role": "user", "content": "Where is my order?"}],
                                          add_generation_prompt=True, return_dict=True, return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype, use_safetensors=True)
    with torch.no_grad():
        a = model(input_ids=probe["input_ids"]).logits.float()
        b = reloaded(input_ids=probe["input_ids"]).logits.float()
    return float((a - b).abs().max())


def run(ctx: StageContext) -> StageResult:
    from training.train import quiet_hf

    quiet_hf()
    import torch

    cfg = ctx.recipe.export
    dtype = getattr(torch, cfg.dtype)
    train_dir, curate_dir = ctx.inputs["train"], ctx.inputs["curate"]
    model, tokenizer = load_trained_student(train_dir, merge=True)
    model = model.to(dtype)
    art = ctx.work / cfg.model_name
    model.save_pretrained(art, safe_serialization=True)
    tokenizer.save_pretrained(art)
    diff = _reload_check(model, tokenizer, art)
    # The routing policy fitted for this student travels with it; its tokenizer.json is the artefact's own.
    policy_src = ctx.inputs["route"] / "routing_policy.json"
    if (ctx.inputs["route"] / "tokenizer.json").read_bytes() != (art / "tokenizer.json").read_bytes():
        raise RuntimeError("the routing policy was fitted with another tokenizer than the exported student's")
    shutil.copyfile(policy_src, art / "routing_policy.json")
    if diff > (1e-4 if cfg.dtype == "float32" else 1e-2):
        raise RuntimeError(f"the saved student does not reproduce the merged model (max logit diff {diff:.3g})")
    info = student_info(train_dir)
    train_table = pq.read_table(curate_dir / "train.parquet", columns=["teacher"])
    teachers = sorted({t["model"] for t in train_table.column("teacher").to_pylist() if t and t.get("model")})
    scores = json.loads((ctx.inputs["evaluate"] / "scores.json").read_text())
    curate_manifest = ctx.run.manifest("curate")
    lineage: dict[str, Any] = {
        "recipe": ctx.recipe.name,
        "recipe_sha256": digest(ctx.recipe.model_dump(mode="json")),
        "data_sha256": curate_manifest["outputs"]["train.parquet"],
        "base_model": info["base"],
        "base_revision": info.get("base_revision"),
        "method": info["method"],
        "teacher_models": teachers,
        "train_records": info["train_records"],
    }
    manifest = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "format": f"safetensors ({cfg.dtype})",
        "lineage": lineage,
        "scores": {"overall": scores["overall"], "functions": scores["functions"],
                   "cost_per_1k_requests_usd": scores["cost_per_1k_requests_usd"]},
        "reload_max_logit_diff": diff,
        "routing_policy_sha256": sha256_file(art / "routing_policy.json"),
        "packages": {p: pkg_version(p) for p in ("distill", "torch", "transformers", "peft", "trl")},
    }
    version = publish(cfg.store, cfg.model_name, art, manifest)
    size = sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
    (ctx.work / "published.json").write_text(json.dumps({"store": cfg.store, "name": cfg.model_name,
                                                         "version": version}, indent=2) + "\n")
    return StageResult(
        counts={"bytes": size, "files": len(list(art.rglob("*")))},
        summary=[
            ("artefact", f"{art.name}: safetensors {cfg.dtype}, {size / 1e6:.1f} MB, reload logit diff {diff:.2g}"),
            ("published", f"{cfg.store}/{cfg.model_name}/{version} (latest -> {version})"),
            ("lineage", f"base {lineage['base_model']}, teacher {', '.join(teachers) or '?'}, "
                        f"data {lineage['data_sha256'][:12]}"),
            ("pull", f"distill pull {cfg.store} {cfg.model_name}@{version} DEST"),
        ],
        extra={"lineage": lineage, "published": {"store": cfg.store, "name": cfg.model_name, "version": version}},
    )
