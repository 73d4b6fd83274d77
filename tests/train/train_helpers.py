"""Shared pieces of the training tests: tiny checkpoints (a student and a teacher sharing one tokenizer), curated
records with teacher top-k logprobs, a reader for wandb's offline run files, and environments for launching
several processes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from conftest import ROOT

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}


def losses(run: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def tiny_tokenizer(vocab_size: int = 500):
    """A BPE tokenizer with distill's ChatML template, trained on demo prompts (deterministic)."""
    from curation.harvest.demo_traffic import generate
    from training.train.chat_template import train_tokenizer

    texts = []
    for line in generate(300, "2026-11-01"):
        try:
            row = json.loads(line)
            texts += [m["content"] for m in row["request"]["messages"]]
            texts += [c["message"]["content"] or "" for c in row["response"]["choices"]]
        except (ValueError, KeyError, TypeError):
            continue
    return train_tokenizer(texts, vocab_size)


def save_checkpoint(folder: Path, tokenizer, seed: int, sharpen: float = 1.0, max_positions: int = 512,
                    **sizes: int) -> Path:
    """A tiny pretrained-style model folder (safetensors + tokenizer). ``sharpen`` scales the output layer, which
    makes a random teacher's next-token distributions peaky, far from a fresh student's."""
    from pipeline.config.train import StudentFromConfig
    from training.train.student import build_from_config

    model = build_from_config(StudentFromConfig(**{**TINY, **sizes}), tokenizer, 64, seed=seed)
    model.config.max_position_embeddings = max_positions
    if sharpen != 1.0:
        model.config.tie_word_embeddings = False
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.clone() * sharpen)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def add_teacher_logprobs(records: list[dict[str, Any]], teacher_dir: Path, top_k: int = 5) -> list[dict[str, Any]]:
    """Score each record's output with a teacher checkpoint, as a serving engine logs it (OpenAI's logprobs
    shape: per generated token its text, logprob and the top-k alternatives)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat import training_messages
    from training.train.chat_template import CHATML_TEMPLATE
    from training.train.data import IGNORE, encode_chat

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    encoded = [encode_chat(tok, CHATML_TEMPLATE, training_messages(r), 4096)[:2] for r in records]
    out = []
    for first in range(0, len(records), 32):  # right-padded batches: a causal model's real positions are unchanged
        chunk = encoded[first:first + 32]
        width = max(len(ids) for ids, _ in chunk)
        ids_t = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
        with torch.no_grad():
            logps = model(input_ids=ids_t, attention_mask=mask).logits.log_softmax(-1)
        for r, (ids, labels), logp in zip(records[first:first + 32], chunk, logps, strict=True):
            end = max(i for i, x in enumerate(labels) if x != IGNORE)  # the closing <|im_end|> of the answer
            start = end
            while labels[start - 1] != IGNORE:
                start -= 1
            lps = []
            for p in range(start, end):  # the answer's content tokens (the end-of-turn token is not logged)
                dist = logp[p - 1]
                top = torch.topk(dist, top_k)
                lps.append({"token": tok.decode([ids[p]]), "logprob": float(dist[ids[p]]),
                            "top": [{"token": tok.decode([int(i)]), "logprob": float(v)}
                                    for v, i in zip(top.values, top.indices, strict=True)]})
            teacher = dict(r.get("teacher") or {})
            teacher["logprobs"] = lps
            out.append({**r, "teacher": teacher})
    return out


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of the offline wandb run under run_dir (its .wandb file is a LevelDB-style log of
    protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, block, chunks, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    rows = []
    for raw in chunks:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for `accelerate launch` in tests: this checkout importable, DeepSpeed on CPU with its compiled
    extensions cached in the repository (built once per machine), offline hubs, one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}
    return env
