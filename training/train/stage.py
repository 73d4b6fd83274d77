"""The train stage: a full, LoRA or QLoRA student trained on the teacher's outputs (SFT, assistant tokens only)
or on the teacher's next-token distributions (dense, sparse or on-policy logit distillation).

    distill train RECIPE
    python -m training.train RECIPE                                   # the same code path
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m training.train RECIPE   # and under a launcher

Under a launcher every rank trains; rank 0 holds the run directory's lock, runs the stages before train and
writes the manifest (``pipeline.stages``). Writes ``model/`` (full) or ``adapter/`` (+ ``base/`` when the base was
built from config), ``metrics.jsonl`` (train and validation loss, distillation terms, and validation quality with
``select_by: quality``: training.train.select), ``checkpoints/`` and ``student.json``. A rerun of an interrupted
training with the same fingerprint resumes from its last checkpoint. Packing is decided by training.train.packing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.hf import quiet_hf
from pipeline.record import from_table
from pipeline.stages import StageContext, StageResult
from training.train.callbacks import metrics_callback, progress_callback
from training.train.chat_template import check_assistant_mask, tokenizer_corpus, train_tokenizer
from training.train.distributed import write_weights_digest, zero_stage
from training.train.packing import decide as decide_packing
from training.train.plateau import early_stop_callback, plateau_callback
from training.train.select import select_info, select_summary
from training.train.student import build_from_config, load_checkpoint, load_tokenizer
from training.train.trainer import (
    drop_metrics_after,
    env_defaults,
    is_main,
    last_checkpoint,
    main_first,
    make_trainer,
    precision,
    training_arguments,
    weights_dtype,
)

# The stage's contract (pipeline/stages.py): every process of a launch trains; rank 0 writes the manifest.
READS = ("curate",)
DISTRIBUTED = True
REPORT_FILES = ("metrics.jsonl", "candidates.json")


def preflight(recipe) -> None:
    """Checks that need files (tokenizers, model configs, the launcher's environment), before any stage works."""
    from pipeline.config.candidates import effective_candidates
    from training.train.candidates import check_length_tokens
    from training.train.preflight import check

    check(recipe)
    for i, (name, section) in enumerate(effective_candidates(recipe.train)):  # each candidate's student too
        try:
            check(recipe.model_copy(update={"train": section}))
            check_length_tokens(recipe.train, section)
        except ValueError as err:
            raise ValueError(f"train.candidates[{i}] ({name}): {err}") from None


# bitsandbytes (imported by transformers) logs a hint about an optional CPU kernel package on import
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def read_split(curate_dir: Path, split: str) -> list[dict[str, Any]]:
    return from_table(pq.read_table(curate_dir / f"{split}.parquet"))


def prepare_student(ctx: StageContext, train_records: list[dict[str, Any]]):
    """(model, tokenizer): loaded from the checkpoint, or built from config (with a tokenizer trained on the
    training split unless the recipe names one). What was built is saved in the work folder first (by rank 0),
    so a resumed run and the other ranks reuse it, and QLoRA can quantize it while loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.train.qlora import load_4bit

    cfg = ctx.recipe.train
    s = cfg.student
    dtype = weights_dtype(cfg)
    if s.checkpoint:
        if cfg.method == "qlora":
            model = load_4bit(s.checkpoint, cfg.qlora, dtype, s.revision, s.trust_remote_code)
            tokenizer = load_tokenizer(s.checkpoint, s.revision, s.trust_remote_code)
        else:
            model, tokenizer = load_checkpoint(s, dtype=dtype)
    else:
        tok_dir, base_dir = ctx.work / "tokenizer", ctx.work / "base"
        with main_first():
            if not (base_dir / "config.json").is_file():
                fc = s.from_config
                if fc.tokenizer:
                    tokenizer = load_tokenizer(fc.tokenizer)
                else:
                    tokenizer = train_tokenizer(tokenizer_corpus(train_records), fc.vocab_size)
                model = build_from_config(fc, tokenizer, cfg.max_length, cfg.seed_or(ctx.recipe.seed))
                if is_main():
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


def _local_path(source: str | None) -> str | None:
    """The absolute path of a local checkpoint folder (None for a hub id), so later stages find it from anywhere."""
    return str(Path(source).resolve()) if source and Path(source).is_dir() else None


@dataclass
class TrainData:
    """The training and validation sets as the trainer takes them, and what tokenizing them found."""

    records: list[dict[str, Any]]
    val_records: list[dict[str, Any]]
    train_ds: Any
    val_ds: Any
    stats: Any  # training.train.data's statistics (None for on-policy distillation, which trains on prompts)
    data_tokens: int | None
    packed: bool = False  # several examples per row (training.train.packing)
    packing_why: str = ""


def load_data(cfg, tokenizer, template: str, train_records: list[dict[str, Any]],
              val_records: list[dict[str, Any]], packing: tuple[bool, str] | None = None) -> TrainData:
    """Tokenize the curated splits for the objective (assistant tokens only; sparse targets when asked), then pack
    when ``packing`` (training.train.packing.decide's verdict; default: as train.packing says) is on."""
    from training.train.data import prompt_dataset, tokenize_records
    from training.train.packing import pack, real_tokens

    if cfg.objective == "on_policy_kd":
        val_ds = prompt_dataset(val_records) if val_records else None
        return TrainData(train_records, val_records, prompt_dataset(train_records), val_ds, None, None)
    top_k = cfg.distill.top_k if cfg.objective == "sparse_kd" else None
    train_ds, stats = tokenize_records(train_records, tokenizer, template, cfg.max_length, top_k)
    val_ds = tokenize_records(val_records, tokenizer, template, cfg.max_length, top_k)[0] if val_records else None
    if val_ds is not None and len(val_ds) == 0:
        val_ds = None
    if not len(train_ds):
        raise ValueError(f"no training example keeps an assistant token within train.max_length "
                         f"({cfg.max_length}); raise it")
    if top_k:
        from training.train.preflight import check_sparse_coverage

        check_sparse_coverage(stats)
    data_tokens = real_tokens(train_ds)
    packed, why = packing or (bool(cfg.packing), "")
    if packed:  # validation stays unpacked: its loss then compares across runs with and without packing
        train_ds = pack(train_ds, cfg.max_length)
    return TrainData(train_records, val_records, train_ds, val_ds, stats, data_tokens, packed, why)


def build_trainer(ctx: StageContext, model, tokenizer, data: TrainData):
    """The TRL trainer with the stage's callbacks (metrics.jsonl, progress bar, early stopping) and the teacher."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    cfg = ctx.recipe.train
    teacher = None
    if cfg.objective in ("dense_kd", "on_policy_kd"):
        from training.train.kd import load_teacher

        teacher = load_teacher(cfg.distill, dtype=torch.bfloat16 if precision(cfg.precision)["bf16"] else None)
    callbacks = [metrics_callback(ctx.work / "metrics.jsonl"), progress_callback(ctx.console)]
    by_quality = cfg.select_by == "quality"
    key = "eval_select" if by_quality else "eval_loss"
    if cfg.early_stopping_patience:  # counted from the log history: a resumed run goes on counting
        callbacks.append(early_stop_callback(cfg, key, by_quality))
    if cfg.lr_scheduler == "plateau":
        callbacks.append(plateau_callback(cfg, key, by_quality, ctx.console.print))
    common = training_arguments(cfg, str(ctx.work / "checkpoints"), cfg.seed_or(ctx.recipe.seed), ctx.recipe.name,
                                data.val_ds is not None)
    trainer = make_trainer(cfg, common, model, tokenizer, data.train_ds, data.val_ds, teacher, callbacks,
                           val_records=data.val_records, packed=data.packed)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the progress bar shows the losses
    return trainer


def fit(ctx: StageContext, trainer) -> tuple[Any, float, float, int | None]:
    """Train (resuming from the last complete checkpoint): (TrainOutput, seconds, CPU seconds, real tokens seen)."""
    import torch

    last = last_checkpoint(Path(trainer.args.output_dir))
    if last and is_main():
        ctx.console.print(f"resuming from {last}")
        drop_metrics_after(ctx.work / "metrics.jsonl", int(last.rsplit("-", 1)[-1]))
    t0, cpu0 = time.time(), time.process_time()
    # wandb: project 'distill' and files in the run folder (outside the stage's outputs) unless the user says else
    with env_defaults(WANDB_PROJECT="distill", WANDB_DIR=str(ctx.run.path.resolve())):
        result = trainer.train(resume_from_checkpoint=last)
        if "wandb" in ctx.recipe.train.report_to and trainer.accelerator.is_main_process:
            import wandb

            wandb.finish()
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    acc, seen = trainer.accelerator, getattr(trainer, "real_tokens", None)
    if seen is not None:
        seen = int(acc.reduce(torch.tensor(seen, device=acc.device), reduction="sum").item())
    return result, seconds, cpu_seconds, seen


def _data_info(cfg, data: TrainData) -> dict[str, Any]:
    stats = data.stats
    return {
        "train_records": len(data.records),
        "val_records": len(data.val_records),
        "examples": stats.examples if stats else len(data.records),
        "truncated": stats.truncated if stats else None,
        "dropped_no_target": stats.dropped_no_target if stats else None,
        "sparse": None if not stats or cfg.objective != "sparse_kd" else {
            "records_with_logprobs": stats.sparse_records, "aligned": stats.sparse_aligned,
            "tokens_with_targets": stats.sparse_tokens, "target_tokens": stats.target_tokens,
            "not_used": stats.reasons, "methods": stats.methods, "answer_tokens": stats.token_outcomes},
        "packing": data.packed,
        "packing_why": data.packing_why,
        "rows": len(data.train_ds),
        "data_tokens": data.data_tokens,
    }


def _loss_info(work: Path) -> dict[str, Any]:
    path = work / "metrics.jsonl"
    logs = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    pick = lambda key: [x[key] for x in logs if key in x]  # noqa: E731
    losses, evals, kls = pick("loss"), pick("eval_loss"), pick("eval_kl_to_teacher")
    return {
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "first_kl_to_teacher": kls[0] if kls else None,
        "last_kl_to_teacher": kls[-1] if kls else None,
    }


def student_info(ctx: StageContext, trainer, n_params: int, trainable: int, data: TrainData, fitted) -> dict[str, Any]:
    """What student.json says: what was trained, on what, how long, and how the losses went."""
    cfg, (result, seconds, cpu_seconds, seen) = ctx.recipe.train, fitted
    acc = trainer.accelerator
    return {
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
        "max_length": cfg.max_length,  # the trained section's (a candidate's own): export reads it from here
        **_data_info(cfg, data),
        "tokens_seen": seen,
        "tokens_per_second": round(seen / seconds, 1) if seen and seconds > 0 else None,
        "steps": result.global_step,
        "stopped_early": bool(cfg.early_stopping_patience) and result.global_step < trainer.state.max_steps,
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),  # this process's CPU time (all its threads)
        **_loss_info(ctx.work),
        "select_by": cfg.select_by,
        **select_info(ctx.work / "metrics.jsonl", trainer.state),
        "world_size": acc.num_processes,
        "distributed": str(acc.distributed_type).rsplit(".", 1)[-1],
        "zero_stage": zero_stage(trainer),
    }


def save(ctx: StageContext, trainer, tokenizer, info: dict[str, Any]) -> None:
    """The weights (model/ or adapter/), the tokenizer beside them and student.json; rank 0 writes the files."""
    cfg = ctx.recipe.train
    out_dir = ctx.work / ("model" if cfg.method == "full" else "adapter")
    trainer.save_model(str(out_dir))
    write_weights_digest(trainer, info)  # only when DISTILL_WEIGHTS_DIGEST_DIR asks for it; every rank
    if trainer.accelerator.is_main_process:
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(out_dir)
        (ctx.work / "student.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(ctx.work / "tokenizer", ignore_errors=True)
        if cfg.method == "full":  # model/ holds everything; base/ is only needed under an adapter
            shutil.rmtree(ctx.work / "base", ignore_errors=True)


def train_student(ctx: StageContext) -> dict[str, Any]:
    """The stage's steps: the student, its data, the trainer, the fit, then what was trained, saved."""
    quiet_hf()
    train_records, val_records = read_split(ctx.inputs["curate"], "train"), read_split(ctx.inputs["curate"], "val")
    if not train_records:
        raise ValueError("the training split is empty: check curate's report.json for what was dropped")
    model, tokenizer = prepare_student(ctx, train_records)
    template = check_assistant_mask(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    packing = decide_packing(ctx.recipe.train, model, len(tokenizer))
    data = load_data(ctx.recipe.train, tokenizer, template, train_records, val_records, packing)
    trainer = build_trainer(ctx, model, tokenizer, data)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # before ZeRO-3 partitions
    fitted = fit(ctx, trainer)
    info = student_info(ctx, trainer, n_params, trainable, data, fitted)
    save(ctx, trainer, tokenizer, info)
    return info


def external_inputs(recipe) -> dict[str, str]:
    """With train.candidates, the gate that chooses among them (evaluate.gate) joins the fingerprint."""
    from training.train.candidates import choice_inputs

    return choice_inputs(recipe)


def run(ctx: StageContext) -> StageResult:
    if ctx.recipe.train.candidates:  # each candidate trains through train_student; the best one is the output
        from training.train.candidates import train_candidates

        info = train_candidates(ctx, train_student)
    else:
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
        *select_summary(info),
    ]
    if info["first_kl_to_teacher"] is not None:
        summary.append(("val KL to teacher", f"{fmt(info['first_kl_to_teacher'])} -> "
                                              f"{fmt(info['last_kl_to_teacher'])}"))
    if info["sparse"]:
        sp = info["sparse"]
        summary.append(("teacher logprobs", f"{sp['aligned']:,} of {info['train_records']:,} records "
                                            f"({sp['tokens_with_targets']:,} of {sp['target_tokens']:,} tokens"
                                            + (", across tokenizers" if sp.get("methods", {}).get("aligned") else "")
                                            + ")"))
    if info["world_size"] > 1:
        summary.append(("processes", f"{info['world_size']} ({info['distributed']}"
                                     + (f", ZeRO-{info['zero_stage']}" if info["zero_stage"] else "") + ")"))
    from training.train.candidates import candidates_summary

    summary += candidates_summary(info)
    summary.append(("metrics", str(ctx.run.stage_dir("train") / "metrics.jsonl")))
    return StageResult(
        counts={k: info[k] for k in ("train_records", "val_records", "steps", "parameters", "trainable_parameters",
                                     "world_size")},
        summary=summary,
        extra={"student": {k: v for k, v in info.items()  # the table: candidates.json
                            if k not in ("candidates", "candidates_skipped")}},
    )

