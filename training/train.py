"""The train stage: SFT of a LoRA or full student on the teacher's outputs, assistant tokens only.

    distill train RECIPE
    python -m training.train RECIPE        # the same code path, for `accelerate launch`

Writes ``model/`` (full) or ``adapter/`` (+ ``base/`` when the base was built from config),
``metrics.jsonl`` (train and validation loss), ``checkpoints/`` and ``student.json``. A rerun of an
interrupted training with the same fingerprint resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.record import from_table
from pipeline.stages import StageContext, StageResult
from training.chat import check_assistant_mask, tokenizer_corpus, train_tokenizer, training_messages
from training.student import build_from_config, load_checkpoint


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
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
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
                self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
                                         TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
                self.progress.start()
                self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
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


def quiet_hf() -> None:
    """Silence transformers' and datasets' own progress bars and info logs: stages print their own."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def _precision(name: str) -> dict[str, bool]:
    import torch

    if name == "auto":
        name = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def prepare_student(ctx: StageContext, train_records: list[dict[str, Any]]):
    """(model, tokenizer): loaded from the checkpoint, or built from config with a tokenizer trained on the
    training split. What was built is saved in the work folder first, so a resumed run reuses it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ctx.recipe.train
    s = cfg.student
    if s.checkpoint:
        model, tokenizer = load_checkpoint(s)
    else:
        tok_dir, base_dir = ctx.work / "tokenizer", ctx.work / "base"
        if (base_dir / "config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
        else:
            tokenizer = train_tokenizer(tokenizer_corpus(train_records), s.from_config.vocab_size)
            model = build_from_config(s.from_config, tokenizer, cfg.max_length, ctx.recipe.seed)
            if _is_main():
                tokenizer.save_pretrained(tok_dir)
                model.save_pretrained(base_dir, safe_serialization=True)
    check_assistant_mask(tokenizer)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and cfg.max_length > limit:
        raise ValueError(f"train.max_length ({cfg.max_length}) exceeds the student's context ({limit} tokens)")
    return model, tokenizer


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_student(ctx: StageContext) -> dict[str, Any]:
    """Train in ctx.work and save the result; returns facts for the manifest."""
    import torch
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    quiet_hf()
    cfg = ctx.recipe.train
    train_records = read_split(ctx.inputs["curate"], "train")
    val_records = read_split(ctx.inputs["curate"], "val")
    if not train_records:
        raise ValueError("the training split is empty: check curate's report.json for what was dropped")
    model, tokenizer = prepare_student(ctx, train_records)
    n_params = sum(p.numel() for p in model.parameters())
    train_ds = Dataset.from_list([{"messages": training_messages(r)} for r in train_records])
    val_ds = Dataset.from_list([{"messages": training_messages(r)} for r in val_records]) if val_records else None
    peft_config = None
    if cfg.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    eval_strategy = "no" if val_ds is None else ("steps" if cfg.eval_steps else "epoch")
    args = SFTConfig(
        output_dir=str(ctx.work / "checkpoints"),
        assistant_only_loss=True,
        max_length=cfg.max_length,
        packing=cfg.packing,
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
        seed=ctx.recipe.seed,
        data_seed=ctx.recipe.seed,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        disable_tqdm=True,
        **_precision(cfg.precision),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[_metrics_callback(ctx.work / "metrics.jsonl"), _progress_callback(ctx.console)])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the progress bar shows the losses
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if last and _is_main():
        ctx.console.print(f"resuming from {last}")
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.time() - t0
    out_dir = ctx.work / ("adapter" if cfg.method == "lora" else "model")
    trainer.save_model(str(out_dir))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(out_dir)
    logs = [json.loads(x) for x in (ctx.work / "metrics.jsonl").read_text().splitlines()] if (
        ctx.work / "metrics.jsonl").is_file() else []
    losses = [x["loss"] for x in logs if "loss" in x]
    evals = [x["eval_loss"] for x in logs if "eval_loss" in x]
    info = {
        "method": cfg.method,
        "base": cfg.student.checkpoint or "built from config",
        "base_revision": cfg.student.revision,
        "trust_remote_code": cfg.student.trust_remote_code,
        "parameters": n_params,
        "trainable_parameters": trainable,
        "train_records": len(train_records),
        "val_records": len(val_records),
        "steps": result.global_step,
        "train_seconds": round(seconds, 2),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "world_size": trainer.accelerator.num_processes,
    }
    if trainer.accelerator.is_main_process:
        (ctx.work / "student.json").write_text(json.dumps(info, indent=2) + "\n")
        if (ctx.work / "tokenizer").is_dir() and cfg.method == "full":
            import shutil

            shutil.rmtree(ctx.work / "tokenizer")  # kept in model/; base/ is only needed under an adapter
            shutil.rmtree(ctx.work / "base", ignore_errors=True)
    return info


def run(ctx: StageContext) -> StageResult:
    info = train_student(ctx)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    return StageResult(
        counts={k: info[k] for k in ("train_records", "val_records", "steps", "parameters", "trainable_parameters")},
        summary=[
            ("student", f"{info['method']}, {info['parameters']:,} parameters ({info['trainable_parameters']:,} "
                        f"trained), base: {info['base']}"),
            ("data", f"{info['train_records']:,} train / {info['val_records']:,} val records"),
            ("steps", f"{info['steps']:,} in {info['train_seconds']:.0f}s"),
            ("train loss", f"{fmt(info['first_loss'])} -> {fmt(info['last_loss'])}"),
            ("val loss", fmt(info["eval_loss"])),
            ("metrics", str(ctx.run.stage_dir("train") / "metrics.jsonl")),
        ],
        extra={"student": info},
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m training.train RECIPE`: the train stage (and what it needs), as `distill train` runs it."""
    from pipeline.cli import main as cli_main

    argv = sys.argv[1:] if argv is None else argv
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
