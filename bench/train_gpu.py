"""Training throughput and model FLOPs utilisation (MFU) on one GPU: a ~0.5B-parameter student built from config
(Qwen2.5-0.5B's shape: 24 layers, hidden 896, GQA 14/2 heads, vocab 151,936), full fine-tuning and LoRA, bf16,
packed rows, through distill's own training stack (training.train.data/packing + training.train.trainer.make_trainer, i.e.
TRL's SFTTrainer with the fused LM head and distill's position-id packing).

    python bench/train_gpu.py                       # on a GPU machine: both methods, 30 steps each after 5 warm-up
    python bench/train_gpu.py --methods full --seq 4096 --batch 4
    python bench/train_gpu.py --smoke               # anywhere (CPU): a tiny model, 3 steps; checks the script runs

Data are synthetic token ids (no tokenizer or download needed) in documents of log-normal length (median ~350
tokens, capped at --seq), the first 30% of each masked as prompt, packed best-fit-decreasing into rows of --seq.
Throughput counts real (non-padding) tokens. MFU = model FLOPs per second / the GPU's peak dense bf16 FLOPs, with
model FLOPs per token = 6 N (full) or 4 N + 6 N_lora (LoRA: no weight gradients for the frozen base) plus attention
12 * layers * hidden * (mean document length / 2), the useful causal attention inside each packed document;
N counts every matmul weight, the LM head included, not the embedding lookup. Peak: H100 SXM / H200 989 TFLOPS,
H100 PCIe 756, A100 312 (override with --peak-tflops). Results go to stdout and, on a GPU, bench/results/train.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "tie_word_embeddings": True, "rope_theta": 1000000.0}
SMOKE = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
         "tie_word_embeddings": True}
PEAKS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None


def documents(n: int, seq: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    import random

    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length = max(16, min(seq, int(rng.lognormvariate(math.log(350), 0.8))))
        doc = [rng.randrange(10, vocab) for _ in range(length)]
        prompt = int(0.3 * length)
        ids.append(doc)
        labels.append([-100] * prompt + doc[prompt:])
    return ids, labels


def matmul_params(model) -> tuple[int, int]:
    """(weights used in matmuls, LM head included; trainable ones)."""
    total = trainable = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name and not model.config.tie_word_embeddings:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def bench(method: str, args, config: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen2Config, TrainerCallback

    from pipeline.config.train import TrainConfig
    from training.train.chat_template import train_tokenizer
    from training.train.packing import pack
    from training.train.trainer import make_trainer, training_arguments

    cuda = torch.cuda.is_available()
    steps = args.warmup + args.steps
    cfg = TrainConfig.model_validate({
        "student": {"from_config": {"tokenizer": "synthetic"}}, "method": method, "packing": True,
        "max_length": args.seq, "batch_size": args.batch, "max_steps": steps, "learning_rate": 1e-5,
        "warmup_ratio": 0.0, "lr_scheduler": "constant", "logging_steps": 10_000, "save_steps": 10_000,
        "precision": "bf16" if cuda else "fp32", "gradient_checkpointing": args.gradient_checkpointing,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    })
    ids, labels = documents(args.batch * steps * max(1, args.seq // 300) + 64, args.seq, config["vocab_size"])
    ds = pack(Dataset.from_dict({"input_ids": ids, "labels": labels}), args.seq)
    doc_len = sum(len(x) for x in ids) / len(ids)
    torch.manual_seed(0)
    dtype = torch.float32 if method == "full" or not cuda else torch.bfloat16  # fp32 master weights for full FT
    model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=dtype,
                                             attn_implementation=args.attn)
    tok = train_tokenizer(["a b c d e f g"] * 8, 300)  # only its pad id is used; data are token ids already
    common = training_arguments(cfg, tempfile.mkdtemp(prefix="bench-gpu-"), seed=0, run_name="bench", has_val=False)
    trainer = make_trainer(cfg, common, model, tok, ds)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), trainer.real_tokens))

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Clock())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, n0), (t1, n1) = marks[args.warmup - 1], marks[-1]
    tps = (n1 - n0) / (t1 - t0)
    n_matmul, n_train = matmul_params(trainer.model)
    c = config
    attention = 12 * c["num_hidden_layers"] * c["hidden_size"] * (min(doc_len, args.seq) / 2)
    per_token = (6 * n_matmul if method == "full" else 4 * n_matmul + 2 * n_train) + attention
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    return {"method": method, "device": name, "params": sum(p.numel() for p in trainer.model.parameters()),
            "trainable": n_train, "tokens_per_s": tps, "tflops": tps * per_token / 1e12,
            "mfu": tps * per_token / peak if peak and cuda else None,
            "memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "step_s": (t1 - t0) / (len(marks) - args.warmup), "rows": len(ds), "doc_len": doc_len}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--steps", type=int, default=30, help="timed steps, after the warm-up ones")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="packed rows per step")
    p.add_argument("--seq", type=int, default=2048, help="row length (train.max_length)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2, flex_attention)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known here")
    p.add_argument("--smoke", action="store_true", help="tiny model, 3 steps: check the script runs (CPU is fine)")
    p.add_argument("--out", default=None, help="results file (default: bench/results/train.md on a GPU)")
    args = p.parse_args()

    import torch

    from pipeline.hf import quiet_hf

    quiet_hf()
    config = SMOKE if args.smoke else QWEN_05B
    if args.smoke:
        args.steps, args.warmup, args.batch, args.seq = 3, 1, 2, 256
    rows = [bench(m.strip(), args, config) for m in args.methods.split(",")]
    device = rows[0]["device"]
    lines = [
        "## Training throughput and MFU on one GPU (`bench/train_gpu.py`)",
        "",
        f"`{' '.join(['python', 'bench/train_gpu.py', *sys.argv[1:]])}` on {device}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}. Model: {'smoke-test config' if args.smoke else 'Qwen2.5-0.5B shape'} built "
        f"from config, {rows[0]['params'] / 1e6:,.0f}M parameters; bf16 autocast (fp32 master weights for full "
        f"fine-tuning, bf16 frozen base under LoRA r=16); packed rows of {args.seq} tokens x {args.batch} per step "
        f"(mean document {rows[0]['doc_len']:.0f} tokens); attention {args.attn}; {args.steps} timed steps after "
        f"{args.warmup} warm-up.",
        "",
        "| method | trainable params | real tokens/s | step time | model TFLOPS | MFU | peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        mem = f"{r['memory_gb']:.1f} GiB" if r["memory_gb"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['trainable'] / 1e6:,.1f}M | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_s']:.3f}s | {r['tflops']:.1f} | {mfu} | {mem} |")
    text = "\n".join(lines)
    print(text)
    out = args.out or (str(ROOT / "bench" / "results" / "train.md") if torch.cuda.is_available() else None)
    if out:
        path = Path(out)
        old = path.read_text() if path.exists() else ""
        marker = "## Training throughput and MFU on one GPU"
        if marker in old:
            head, _, tail = old.partition(marker)
            rest = tail.split("\n## ", 1)
            old = head + ("## " + rest[1] if len(rest) > 1 else "")
        path.write_text((old.rstrip() + "\n\n" if old.strip() else "") + text + "\n")


if __name__ == "__main__":
    main()
