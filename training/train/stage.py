"""The train stage: a full, LoRA or QLoRA student trained on the teacher's outputs (SFT, assistant tokens only)
or on the teacher's next-token distributions (dense, sparse or on-policy logit distillation).

    distill train RECIPE
    python -m training.train RECIPE                                   # the same code path
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m training.train RECIPE   # and under a launcher

Under a launcher every rank trains; rank 0 holds the run directory's lock, runs the stages before train and
writes the manifest (``pipeline.stages``). Writes ``model/`` (full) or ``adapter/`` (+ ``base/`` when the base was
built from config), ``metrics.jsonl`` (train and validation loss, distillation terms), ``checkpoints/`` and
``student.json``. A rerun of an interrupted training with the same fingerprint resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.hf import quiet_hf
from pipeline.record import from_table
from pipeline.stages import StageContext, StageResult
from pipeline.ui import stage_progress
from training.train.chat_template import check_assistant_mask, tokenizer_corpus, train_tokenizer
from training.train.distributed import deepspeed_config_path, world_size, write_weights_digest, zero_stage
from training.train.student import build_from_config, load_checkpoint, load_tokenizer

# The stage's contract (pipeline/stages.py): every process of a launch trains; rank 0 writes the manifest.
READS = ("curate",)
DISTRIBUTED = True
REPORT_FILES = ("metrics.jsonl",)


def preflight(recipe) -> None:
    """Checks that need files (tokenizers, model configs, the launcher's environment), before any stage works."""
    from training.train.preflight import check

    check(recipe)


KD_OBJECTIVES = ("dense_kd", "sparse_kd")
# bitsandbytes (imported by transformers) logs a hint about an optional CPU kernel package on import
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def read_split(curate_dir: Path, split: str) -> list[dict[str, Any]]:
    return from_table(pq.read_table(curate_dir / f"{split}.parquet"))


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        """Appends every logged metric dict to metrics.jsonl (main process only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": time.time(), **logs}
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    return MetricsToJsonl()


def _progress_callback(console):
    """A rich progress bar over optimizer steps showing the latest train and validation loss."""
    from rich.progress import (
        TextColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self):
            self.progress = None
            self.task = None
            self.loss = self.eval_loss = "-"

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.progress = stage_progress(console, "train", TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
                                               TimeRemainingColumn())
                self.progress.start()
                self.task = self.progress.add_task("", total=state.max_steps, completed=state.global_step,
                                                   loss="-", val="-")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress and logs:
                if "loss" in logs:
                    self.loss = f"{float(logs['loss']):.4f}"
                if "eval_loss" in logs:
                    self.eval_loss = f"{float(logs['eval_loss']):.4f}"
                self.progress.update(self.task, loss=self.loss, val=self.eval_loss)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress:
                self.progress.stop()
                self.progress = None

    return RichProgress()


def _precision(name: str) -> dict[str, bool]:
    import torch

    if name == "auto":
        name = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def _dtype(cfg):
    """Weights dtype: fp32 master weights for full fine-tuning; the compute dtype for a frozen (Q)LoRA base."""
    import torch

    if cfg.method == "full":
        return torch.float32
    p = _precision(cfg.precision)
    return torch.bfloat16 if p["bf16"] else torch.float16 if p["fp16"] else torch.float32


def _main_first():
    """Rank 0 first, then the others (which then find on disk what rank 0 built)."""
    if world_size() > 1:
        from accelerate import PartialState

        return PartialState().main_process_first()
    return nullcontext()


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_student(ctx: StageContext, train_records: list[dict[str, Any]]):
    """(model, tokenizer): loaded from the checkpoint, or built from config (with a tokenizer trained on the
    training split unless the recipe names one). What was built is saved in the work folder first (by rank 0),
    so a resumed run and the other ranks reuse it, and QLoRA can quantize it while loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.train.qlora import load_4bit

    cfg = ctx.recipe.train
    s = cfg.student
    dtype = _dtype(cfg)
    if s.checkpoint:
        if cfg.method == "qlora":
            model = load_4bit(s.checkpoint, cfg.qlora, dtype, s.revision, s.trust_remote_code)
            tokenizer = load_tokenizer(s.checkpoint, s.revision, s.trust_remote_code)
        else:
            model, tokenizer = load_checkpoint(s, dtype=dtype)
    else:
        tok_dir, base_dir = ctx.work / "tokenizer", ctx.work / "base"
        with _main_first():
            if not (base_dir / "config.json").is_file():
                fc = s.from_config
                if fc.tokenizer:
                    tokenizer = load_tokenizer(fc.tokenizer)
                else:
                    tokenizer = train_tokenizer(tokenizer_corpus(train_records), fc.vocab_size)
                model = build_from_config(fc, tokenizer, cfg.max_length, ctx.recipe.seed)
                if _is_main():
                    tokenizer.save_pretrained(tok_dir)
                    model.save_pretrained(base_dir, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        if cfg.method == "qlora":
            model = load_4bit(str(base_dir), cfg.qlora, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and cfg.max_length > limit:
        raise ValueError(f"train.max_length ({cfg.max_length}) exceeds the student's context ({limit} tokens)")
    return model, tokenizer


def last_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was written completely (trainer_state.json is saved last); incomplete ones,
    left by a kill in the middle of a save, are removed by rank 0."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    if _is_main():
        for p in found:
            if p not in complete:
                shutil.rmtree(p, ignore_errors=True)
    return str(complete[-1]) if complete else None


@contextmanager
def _env_defaults(**values: str):
    """Set environment variables that are not set, for the duration of the block."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _local_path(source: str | None) -> str | None:
    """The absolute path of a local checkpoint folder (None for a hub id), so later stages find it from anywhere."""
    return str(Path(source).resolve()) if source and Path(source).is_dir() else None


def _drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget the metrics logged after the checkpoint: those steps run again."""
    if path.is_file():
        keep = [x for x in path.read_text().splitlines() if json.loads(x).get("step", 0) <= step]
        path.write_text("".join(x + "\n" for x in keep))


def _counting(cls):
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

    if cfg.early_stopping_patience and not has_val:
        raise ValueError("train.early_stopping_patience needs a validation split: set curate.split.val_fraction > 0")
    eval_strategy = "no" if not has_val else ("steps" if cfg.eval_steps else "epoch")
    args: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
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
        **_precision(cfg.precision),
    )
    if cfg.early_stopping_patience:
        args.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return args


def _peft_config(cfg):
    if cfg.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def make_trainer(cfg, common: dict[str, Any], model, tokenizer, train_ds, val_ds=None, teacher=None,
                 callbacks=None):
    """The TRL trainer for the recipe's objective: SFTTrainer (sft), its KD subclass (dense_kd, sparse_kd) on
    examples tokenized by training.data, or TRL's DistillationTrainer (on_policy_kd) on prompts."""
    from training.train.packing import Collator

    if cfg.objective == "on_policy_kd":
        from trl import DistillationConfig, DistillationTrainer

        from training.train.kd import on_policy_beta

        args = DistillationConfig(**common, max_completion_length=cfg.distill.max_new_tokens,
                                  temperature=cfg.distill.temperature, beta=on_policy_beta(cfg.distill))
        tokenizer.padding_side = "left"
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=train_ds,
                                      eval_dataset=val_ds, processing_class=tokenizer,
                                      peft_config=_peft_config(cfg), callbacks=callbacks)
    else:
        from trl import SFTConfig, SFTTrainer

        from training.train.kd import KDTrainer

        args = SFTConfig(**common, max_length=cfg.max_length, packing=False, assistant_only_loss=False,
                         remove_unused_columns=False, dataset_num_proc=None,
                         dataset_kwargs={"skip_prepare_dataset": True})
        kw = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                  data_collator=Collator(tokenizer.pad_token_id, packed=cfg.packing),
                  peft_config=_peft_config(cfg), callbacks=callbacks)
        if cfg.objective in KD_OBJECTIVES:
            trainer = _counting(KDTrainer)(**kw, distill=cfg.distill, teacher=teacher)
        else:
            trainer = _counting(SFTTrainer)(**kw)
    if cfg.method == "qlora":
        from training.train.qlora import keep_trainable

        keep_trainable(trainer.model)
    if cfg.deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(f"train.deepspeed is set ({cfg.deepspeed}) but the Trainer did not enable DeepSpeed")
    return trainer


def train_student(ctx: StageContext) -> dict[str, Any]:
    """Train in ctx.work and save the result; returns facts for the manifest (and student.json)."""
    import torch
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback

    from training.train.data import prompt_dataset, tokenize_records
    from training.train.packing import pack, real_tokens

    quiet_hf()
    cfg = ctx.recipe.train
    train_records = read_split(ctx.inputs["curate"], "train")
    val_records = read_split(ctx.inputs["curate"], "val")
    if not train_records:
        raise ValueError("the training split is empty: check curate's report.json for what was dropped")
    model, tokenizer = prepare_student(ctx, train_records)
    template = check_assistant_mask(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    teacher = None
    if cfg.objective in ("dense_kd", "on_policy_kd"):
        from training.train.kd import load_teacher

        teacher = load_teacher(cfg.distill, dtype=torch.bfloat16 if _precision(cfg.precision)["bf16"] else None)

    stats = None
    if cfg.objective == "on_policy_kd":
        train_ds, val_ds = prompt_dataset(train_records), prompt_dataset(val_records) if val_records else None
        data_tokens = None
    else:
        top_k = cfg.distill.top_k if cfg.objective == "sparse_kd" else None
        train_ds, stats = tokenize_records(train_records, tokenizer, template, cfg.max_length, top_k)
        val_ds = tokenize_records(val_records, tokenizer, template, cfg.max_length, top_k)[0] if val_records else None
        if val_ds is not None and len(val_ds) == 0:
            val_ds = None
        if not len(train_ds):
            raise ValueError(f"no training example keeps an assistant token within train.max_length "
                             f"({cfg.max_length}); raise it")
        if top_k and not stats.sparse_aligned:
            why = "; ".join(f"{n} x {r}" for r, n in stats.reasons.items())
            raise ValueError("objective 'sparse_kd' found no record whose teacher logprobs line up with the "
                             f"student's tokens ({why}). The student must share the teacher's tokenizer, and the "
                             "harvested records must carry teacher.logprobs")
        data_tokens = real_tokens(train_ds)
        if cfg.packing:
            train_ds = pack(train_ds, cfg.max_length)
            val_ds = pack(val_ds, cfg.max_length) if val_ds is not None else None

    callbacks = [_metrics_callback(ctx.work / "metrics.jsonl"), _progress_callback(ctx.console)]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    common = training_arguments(cfg, str(ctx.work / "checkpoints"), ctx.recipe.seed, ctx.recipe.name,
                                val_ds is not None)
    trainer = make_trainer(cfg, common, model, tokenizer, train_ds, val_ds, teacher, callbacks)
    args = trainer.args
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the progress bar shows the losses
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    last = last_checkpoint(Path(args.output_dir))
    if last and _is_main():
        ctx.console.print(f"resuming from {last}")
        _drop_metrics_after(ctx.work / "metrics.jsonl", int(last.rsplit("-", 1)[-1]))
    t0, cpu0 = time.time(), time.process_time()
    # wandb: project 'distill' and files in the run folder (outside the stage's outputs) unless the user says else
    with _env_defaults(WANDB_PROJECT="distill", WANDB_DIR=str(ctx.run.path.resolve())):
        result = trainer.train(resume_from_checkpoint=last)
        if "wandb" in cfg.report_to and trainer.accelerator.is_main_process:
            import wandb

            wandb.finish()
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    out_dir = ctx.work / ("model" if cfg.method == "full" else "adapter")
    trainer.save_model(str(out_dir))
    acc = trainer.accelerator
    seen = getattr(trainer, "real_tokens", None)
    if seen is not None:
        seen = int(acc.reduce(torch.tensor(seen, device=acc.device), reduction="sum").item())

    logs = [json.loads(x) for x in (ctx.work / "metrics.jsonl").read_text().splitlines()] if (
        ctx.work / "metrics.jsonl").is_file() else []
    pick = lambda key: [x[key] for x in logs if key in x]  # noqa: E731
    losses, evals, kls = pick("loss"), pick("eval_loss"), pick("eval_kl_to_teacher")
    info = {
        "method": cfg.method,
        "objective": cfg.objective,
        "base": cfg.student.checkpoint or "built from config",
        "base_path": _local_path(cfg.student.checkpoint),
        "base_revision": cfg.student.revision,
        "trust_remote_code": cfg.student.trust_remote_code,
        "teacher": cfg.distill.teacher,
        "teacher_revision": cfg.distill.teacher_revision,
        "parameters": n_params,
        "trainable_parameters": trainable,
        "train_records": len(train_records),
        "val_records": len(val_records),
        "examples": stats.examples if stats else len(train_records),
        "truncated": stats.truncated if stats else None,
        "dropped_no_target": stats.dropped_no_target if stats else None,
        "sparse": None if not stats or cfg.objective != "sparse_kd" else {
            "records_with_logprobs": stats.sparse_records, "aligned": stats.sparse_aligned,
            "tokens_with_targets": stats.sparse_tokens, "target_tokens": stats.target_tokens,
            "not_used": stats.reasons},
        "packing": cfg.packing,
        "rows": len(train_ds),
        "data_tokens": data_tokens,
        "tokens_seen": seen,
        "tokens_per_second": round(seen / seconds, 1) if seen and seconds > 0 else None,
        "steps": result.global_step,
        "stopped_early": bool(cfg.early_stopping_patience) and result.global_step < trainer.state.max_steps,
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),  # this process's CPU time (all its threads)
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "first_kl_to_teacher": kls[0] if kls else None,
        "last_kl_to_teacher": kls[-1] if kls else None,
        "world_size": acc.num_processes,
        "distributed": str(acc.distributed_type).rsplit(".", 1)[-1],
        "zero_stage": zero_stage(trainer),
    }
    write_weights_digest(trainer, info)  # only when DISTILL_WEIGHTS_DIGEST_DIR asks for it; every rank
    if acc.is_main_process:
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(out_dir)
        (ctx.work / "student.json").write_text(json.dumps(info, indent=2) + "\n")
        if cfg.method == "full":  # model/ holds everything; base/ is only needed under an adapter
            shutil.rmtree(ctx.work / "tokenizer", ignore_errors=True)
            shutil.rmtree(ctx.work / "base", ignore_errors=True)
        else:
            shutil.rmtree(ctx.work / "tokenizer", ignore_errors=True)
    return info


def run(ctx: StageContext) -> StageResult:
    info = train_student(ctx)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    summary = [
        ("student", f"{info['method']}, {info['parameters']:,} parameters ({info['trainable_parameters']:,} "
                    f"trained), base: {info['base']}"),
        ("objective", info["objective"] + (f", teacher: {info['teacher']}" if info["teacher"] else "")),
        ("data", f"{info['train_records']:,} train / {info['val_records']:,} val records"
                 + (f", {info['truncated']:,} truncated" if info["truncated"] else "")
                 + (f", {info['dropped_no_target']:,} without an answer token after truncation"
                    if info["dropped_no_target"] else "")),
        ("steps", f"{info['steps']:,} in {info['train_seconds']:.0f}s"
                  + (f", {info['tokens_per_second']:,.0f} real tokens/s" if info["tokens_per_second"] else "")
                  + (f", packed into {info['rows']:,} rows" if info["packing"] else "")
                  + (" (stopped early)" if info["stopped_early"] else "")),
        ("train loss", f"{fmt(info['first_loss'])} -> {fmt(info['last_loss'])}"),
        ("val loss", fmt(info["eval_loss"])),
    ]
    if info["first_kl_to_teacher"] is not None:
        summary.append(("val KL to teacher", f"{fmt(info['first_kl_to_teacher'])} -> "
                                              f"{fmt(info['last_kl_to_teacher'])}"))
    if info["sparse"]:
        sp = info["sparse"]
        summary.append(("teacher logprobs", f"{sp['aligned']:,} of {info['train_records']:,} records "
                                            f"({sp['tokens_with_targets']:,} of {sp['target_tokens']:,} tokens)"))
    if info["world_size"] > 1:
        summary.append(("processes", f"{info['world_size']} ({info['distributed']}"
                                     + (f", ZeRO-{info['zero_stage']}" if info["zero_stage"] else "") + ")"))
    summary.append(("metrics", str(ctx.run.stage_dir("train") / "metrics.jsonl")))
    return StageResult(
        counts={k: info[k] for k in ("train_records", "val_records", "steps", "parameters", "trainable_parameters",
                                     "world_size")},
        summary=summary,
        extra={"student": info},
    )

