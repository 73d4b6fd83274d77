"""The evaluation engine: greedy, batched answers with per-token logprobs, each scored against the teacher's.

The evaluate stage runs it on the student; the export stage runs it again on every artefact it makes, on the
same records, so both score answers the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from pipeline.chat import prompt_messages, user_text
from pipeline.config.evaluate import EvaluateConfig
from training.evaluate import metrics
from training.evaluate import tables as eval_tables


def generate(model, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int,
             progress=None, label: str = "generate") -> list[dict[str, Any]]:
    """Greedy answers with per-token logprobs, batched with left padding."""
    import torch

    tokenizer.padding_side = "left"
    model.eval()
    device = getattr(model, "device", None) or torch.device("cpu")
    out: list[dict[str, Any]] = []
    task = progress.add_task(label, total=len(prompts)) if progress else None
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - t0
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        logprobs = model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
        for j in range(len(chunk)):
            ids, lps = [], []
            for tok, lp in zip(new[j].tolist(), logprobs[j].tolist(), strict=True):
                if tok == tokenizer.pad_token_id:
                    break
                ids.append(tok)
                lps.append(lp)
                if tok == tokenizer.eos_token_id:
                    break
            out.append({
                "prediction": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                "token_ids": ids,
                "input_tokens": int(enc["attention_mask"][j].sum()),
                "output_tokens": len(ids),
                "logprobs": [float(x) if math.isfinite(x) else -100.0 for x in lps],
                "batch_seconds": seconds,
                "batch_size": len(chunk),
            })
        if progress:
            progress.advance(task, len(chunk))
    return out


def single_request_latency(model, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int) -> list[float]:
    """Milliseconds of a lone request (batch of one, greedy) for each prompt."""
    out = []
    for p in prompts:
        t0 = time.perf_counter()
        generate(model, tokenizer, [p], max_new_tokens, 1)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def teacher_cost_usd(record: dict[str, Any], cfg: EvaluateConfig) -> float:
    """What the logged teacher call cost at the recipe's token prices."""
    usage = record.get("usage") or {}
    return ((usage.get("input_tokens") or 0) * cfg.teacher_price.input_per_mtok
            + (usage.get("output_tokens") or 0) * cfg.teacher_price.output_per_mtok) / 1e6


def evaluate_model(model, tokenizer, records: list[dict[str, Any]], cfg: EvaluateConfig, progress=None,
                   label: str = "student", detect: Callable[[list[str]], list[str]] | None = None,
                   metric: str | None = None) -> tuple[list[dict[str, Any]], float]:
    """Generate and score answers to ``records``; returns (rows, wall seconds of generation).

    ``metric`` is the per-answer quality written to each row (default: the recipe's; 'judge' rows get it once
    the judge has graded them)."""
    metric = metric or cfg.quality
    t0 = time.perf_counter()
    gens = generate(model, tokenizer, [prompt_messages(r) for r in records], cfg.max_new_tokens, cfg.batch_size,
                    progress, label)
    wall = time.perf_counter() - t0
    languages = detect([user_text(r["messages"]) for r in records]) if detect else [None] * len(records)
    rows = []
    for r, g, lang in zip(records, gens, languages, strict=True):
        ref = r["output"]["content"] or ""
        schema = metrics.response_schema(r.get("response_format"))
        usage = r.get("usage") or {}
        row = {
            "id": r["id"], "function": r["function"], "reference": ref,
            **{k: v for k, v in g.items() if k not in ("batch_seconds", "batch_size", "token_ids")},
            **metrics.score(g["prediction"], ref, schema),
            "latency_ms": 1000 * g["batch_seconds"],
            "latency_per_request_ms": 1000 * g["batch_seconds"] / g["batch_size"],
            "length_bucket": eval_tables.length_bucket(g["input_tokens"], cfg.length_buckets),
            "teacher_input_tokens": usage.get("input_tokens"),
            "teacher_output_tokens": usage.get("output_tokens"),
            "teacher_latency_ms": r.get("latency_ms"),
            "teacher_cost_usd": teacher_cost_usd(r, cfg),
        }
        if lang is not None:
            row["language"] = lang
        row["quality"] = metrics.quality(row, metric)
        rows.append(row)
    return rows, wall
