"""Building the Trainer for a recipe: its arguments, the TRL trainer of the objective (SFT, sparse or dense logit
distillation, on-policy distillation), precision and dtype, and what a resumed run needs (the last complete
checkpoint, metrics logged after it forgotten)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from training.train.distributed import deepspeed_config_path, world_size

KD_OBJECTIVES = ("dense_kd", "sparse_kd")


def precision(name: str) -> dict[str, bool]:
    import torch

    if name == "auto":
        name = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def weights_dtype(cfg):
    """Weights dtype: fp32 master weights for full fine-tuning; the compute dtype for a frozen (Q)LoRA base."""
    import torch

    if cfg.method == "full":
        return torch.float32
    p = precision(cfg.precision)
    return torch.bfloat16 if p["bf16"] else torch.float16 if p["fp16"] else torch.float32


def main_first():
    """Rank 0 first, then the others (which then find on disk what rank 0 built)."""
    if world_size() > 1:
        from accelerate import PartialState

        return PartialState().main_process_first()
    return nullcontext()


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def last_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was written completely (trainer_state.json is saved last); incomplete ones,
    left by a kill in the middle of a save, are removed by rank 0."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    if is_main():
        for p in found:
            if p not in complete:
                shutil.rmtree(p, ignore_errors=True)
    return str(complete[-1]) if complete else None


@contextmanager
def env_defaults(**values: str):
    """Set environment variables that are not set, for the duration of the block."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget the metrics logged after the checkpoint: those steps run again."""
    if path.is_file():
        keep = [x for x in path.read_text().splitlines() if json.loads(x).get("step", 0) <= step]
        path.write_text("".join(x + "\n" for x in keep))


def counting(cls):
    """The trainer class, counting the real (non-padding) tokens of its training batches."""

    class Counting(cls):
        real_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            n = inputs.pop("real_tokens", None)
            if n is not None:
                self.real_tokens += int(n)
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs.pop("real_tokens", None)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    Counting.__name__ = cls.__name__
    return Counting


def training_arguments(cfg, output_dir: str, seed: int, run_name: str, has_val: bool) -> dict[str, Any]:
    """TrainingArguments shared by every objective, from the recipe's train section."""
    import torch

    if cfg.keeps_best and not has_val:
        field = "select_by: quality" if cfg.select_by == "quality" else "early_stopping_patience"
        raise ValueError(f"train.{field} needs a validation split: set curate.split.val_fraction > 0")
    if cfg.lr_scheduler == "plateau" and not has_val:
        raise ValueError("train.lr_scheduler: plateau follows the validation figure and needs a validation split: "
                         "set curate.split.val_fraction > 0, or choose another lr_scheduler")
    eval_strategy = "no" if not has_val else ("steps" if cfg.eval_steps else "epoch")
    args: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        # plateau: the warm-up schedule, whose base rates training.train.plateau scales after each evaluation
        lr_scheduler_type="constant_with_warmup" if cfg.lr_scheduler == "plateau" else cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        report_to=list(cfg.report_to) or "none",
        run_name=run_name,
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every parameter that trains is used in every forward
        disable_tqdm=True,
        deepspeed=deepspeed_config_path(cfg.deepspeed) if cfg.deepspeed else None,
        **precision(cfg.precision),
    )
    if cfg.keeps_best:  # the best evaluation's checkpoint is the trained model: save at every evaluation
        by_quality = cfg.select_by == "quality"
        args.update(load_best_model_at_end=True, greater_is_better=by_quality,
                    metric_for_best_model="eval_select" if by_quality else "eval_loss")
        if eval_strategy == "epoch":
            args["save_strategy"] = "epoch"
    return args


def _peft_config(cfg):
    if cfg.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def make_trainer(cfg, common: dict[str, Any], model, tokenizer, train_ds, val_ds=None, teacher=None,
                 callbacks=None, val_records=None, packed: bool | None = None):
    """The TRL trainer for the recipe's objective: SFTTrainer (sft), its KD subclass (dense_kd, sparse_kd) on
    examples tokenized by training.train.data, or TRL's DistillationTrainer (on_policy_kd) on prompts. With
    select_by 'quality', every evaluation also scores greedy answers to ``val_records`` (training.train.select).
    ``packed``: the datasets hold packed rows (default: as train.packing says)."""
    from training.train.packing import Collator
    from training.train.select import scoring

    def wrap(cls):
        return scoring(cls, val_records or [], cfg.select) if cfg.select_by == "quality" else cls

    if cfg.objective == "on_policy_kd":
        from trl import DistillationConfig, DistillationTrainer

        from training.train.kd import on_policy_beta

        args = DistillationConfig(**common, max_completion_length=cfg.distill.max_new_tokens,
                                  temperature=cfg.distill.temperature, beta=on_policy_beta(cfg.distill))
        tokenizer.padding_side = "left"
        trainer = wrap(DistillationTrainer)(model=model, teacher_model=teacher, args=args, train_dataset=train_ds,
                                      eval_dataset=val_ds, processing_class=tokenizer,
                                      peft_config=_peft_config(cfg), callbacks=callbacks)
    else:
        from trl import SFTConfig, SFTTrainer

        from training.train.kd import KDTrainer

        args = SFTConfig(**common, max_length=cfg.max_length, packing=False, assistant_only_loss=False,
                         remove_unused_columns=False, dataset_num_proc=None,
                         dataset_kwargs={"skip_prepare_dataset": True})
        kw = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                  data_collator=Collator(tokenizer.pad_token_id, packed=bool(cfg.packing if packed is None else packed)),
                  peft_config=_peft_config(cfg), callbacks=callbacks)
        if cfg.objective in KD_OBJECTIVES:
            trainer = counting(wrap(KDTrainer))(**kw, distill=cfg.distill, teacher=teacher)
        else:
            trainer = counting(wrap(SFTTrainer))(**kw)
    if cfg.method == "qlora":
        from training.train.qlora import keep_trainable

        keep_trainable(trainer.model)
    if cfg.deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(f"train.deepspeed is set ({cfg.deepspeed}) but the Trainer did not enable DeepSpeed")
    return trainer
