"""Training to the task: at every evaluation the student answers the validation split greedily and the answers are
scored with the evaluate stage's own metric (``pipeline.metrics``), so the checkpoint kept and the early stop follow
task quality rather than validation loss (``train.select_by: quality``).

The scores join the Trainer's evaluation metrics as ``eval_quality`` (the mean per-answer quality of
``train.select.metric``, 0-1) and ``eval_exact_match``; they go to metrics.jsonl with the validation loss, and
the Trainer keeps the best checkpoint by ``eval_select`` (``metric_for_best_model``): quality first, then
validation loss among checkpoints of equal quality. Under a launcher each rank
answers its share of the records and the sums are added up across ranks, so every rank sees the same figure; the
ranks run the same number of generate calls (ZeRO-3 gathers weights in every forward, in step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.chat import prompt_messages
from pipeline.config.train import SelectConfig
from pipeline.metrics import quality, response_schema, score

QUALITY_KEY = "quality"  # reported as eval_quality
SELECT_KEY = "select"  # eval_select: what picks the checkpoint (quality, ties broken by validation loss)


def selection_value(quality_: float, loss: float | None) -> float:
    """Quality first, then validation loss, as one number that the Trainer maximizes: quality rounded to 6
    digits, less 1e-9 x the loss (capped at 99), which can only order checkpoints of equal quality and stays below
    training.train.plateau.TIE_SPAN, the least change that counts as an improvement."""
    tie = 0.0 if loss is None or not math.isfinite(loss) else min(loss, 99.0) * 1e-9
    return round(quality_, 6) - tie


def scored_records(records: list[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """The validation records scored at every evaluation: the first ``cap`` by id (the same ones every time)."""
    return sorted(records, key=lambda r: str(r["id"]))[:cap]


def greedy_answers(model, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                   synced: bool = False) -> list[str]:
    """Greedy answers to one batch of chat prompts (left padding); decoded as the evaluate stage decodes them:
    the tokens up to the first padding or end-of-sequence token, special tokens skipped, whitespace trimmed."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             synced_gpus=synced)
    stops = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    answers = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ids = []
        for tok in row:
            if tok in stops:
                break
            ids.append(tok)
        answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


def shard_batches(n: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's record indices (every world-th from rank), in batches; every rank gets the same number of
    batches (an empty one where its share is shorter), so that generate calls line up across ranks."""
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world) if n else 0
    count = math.ceil(per_rank / batch_size)
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def score_answers(records: list[dict[str, Any]], answers: list[str], metric: str) -> list[float]:
    """[quality sum, records with a quality, exact matches, records] of answers against the teacher's."""
    sums = [0.0, 0.0, 0.0, 0.0]
    for r, answer in zip(records, answers, strict=True):
        row = score(answer, r["output"]["content"] or "", response_schema(r.get("response_format")))
        q = quality(row, metric)
        if q is not None:
            sums[0] += q
            sums[1] += 1
        sums[2] += float(row["exact_match"])
        sums[3] += 1
    return sums


def validation_quality(model, tokenizer, records: list[dict[str, Any]], cfg: SelectConfig, accelerator,
                       synced: bool) -> dict[str, float]:
    """{quality, exact_match} over the scored records, each rank answering its share (sums all-reduced)."""
    import torch

    rank, world = accelerator.process_index, accelerator.num_processes
    sums = [0.0, 0.0, 0.0, 0.0]
    was_training = model.training
    model.eval()
    try:
        for idx in shard_batches(len(records), rank, world, cfg.batch_size):
            chunk = [records[i] for i in idx] or records[:1]  # a stand-in batch keeps ranks in step; not scored
            answers = greedy_answers(model, tokenizer, [prompt_messages(r) for r in chunk], cfg.max_new_tokens,
                                     synced)
            if idx:
                sums = [a + b for a, b in zip(sums, score_answers(chunk, answers, cfg.metric), strict=True)]
    finally:
        model.train(was_training)
    total = torch.tensor(sums, dtype=torch.float64, device=accelerator.device)
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    q, n_q, em, n = total.tolist()
    return {QUALITY_KEY: q / n_q if n_q else 0.0, "exact_match": em / n if n else 0.0}


def scoring(cls, records: list[dict[str, Any]], cfg: SelectConfig):
    """The trainer class, adding validation quality (greedy answers, task metric) to every evaluation's metrics."""
    chosen = scored_records(records, cfg.max_records)

    class Scoring(cls):
        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                          metric_key_prefix)
            from transformers.integrations import is_deepspeed_zero3_enabled

            acc = self.accelerator
            model = acc.unwrap_model(self.model)
            synced = acc.num_processes > 1 and is_deepspeed_zero3_enabled()
            found = validation_quality(model, self.processing_class, chosen, cfg, acc, synced)
            out.metrics.update({f"{metric_key_prefix}_{k}": round(v, 6) for k, v in found.items()})
            loss = out.metrics.get(f"{metric_key_prefix}_loss")
            out.metrics[f"{metric_key_prefix}_{SELECT_KEY}"] = selection_value(found[QUALITY_KEY], loss)
            return out

    Scoring.__name__ = cls.__name__
    return Scoring


def select_info(metrics_path: Path, state) -> dict[str, Any]:
    """What student.json says about the validation quality curve (metrics.jsonl) and the checkpoint kept (the
    Trainer's state: its step, and the figure that chose it)."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    curve = [(r["step"], r["eval_quality"]) for r in rows if "eval_quality" in r]
    kept = getattr(state, "best_global_step", None) if state.best_metric is not None else None
    return {
        "val_quality": [{"step": step, "quality": q} for step, q in curve],
        "val_quality_best": max(q for _, q in curve) if curve else None,
        "kept_step": kept,
        "kept_val_quality": dict(curve).get(kept),
    }


def select_summary(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The stage summary's lines about validation quality and the checkpoint kept."""
    out = []
    curve = info.get("val_quality") or []
    if curve:
        out.append(("val quality", f"{curve[0]['quality']:.3f} -> {curve[-1]['quality']:.3f} over "
                                   f"{len(curve)} evaluations, best {info['val_quality_best']:.3f}"))
    if info.get("kept_step") is not None:
        by = "quality, then loss" if info["select_by"] == "quality" else "loss"
        out.append(("kept", f"checkpoint of step {info['kept_step']:,} (best validation {by})"))
    if info.get("packing_why"):
        out.append(("packing", info["packing_why"]))
    return out
