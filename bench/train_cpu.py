"""Training throughput on CPU: real (non-padding) tokens per second of `distill train` (which packs by default; the
recipe here leaves train.packing unset), against a plain TRL SFTTrainer without packing on the same mixed-length
conversations, the same student, tokenizer, batch size and number of steps, in the same process (runs alternate so
that machine load affects both alike).

    .venv/bin/python bench/train_cpu.py                  # ~2,000 conversations, 24 steps per run, 2 rounds
    .venv/bin/python bench/train_cpu.py --hidden 256     # a wider student (attention is a smaller share)
    .venv/bin/python bench/train_cpu.py --steps 10 --rounds 1 --out /tmp/train.md

Data: the bundled demo traffic is harvested and curated (`distill curate`), then folded into multi-turn
conversations whose number of turns is log-normal (1 to 12), as real chat logs are: most short, a long tail. The
distill side runs the train stage itself (`run_stage(..., "train")`: tokenization with assistant-only labels,
best-fit-decreasing packing, position ids, TRL's SFTTrainer) and reports `tokens_per_second` and
`train_cpu_seconds` from student.json. The baseline is `trl.SFTTrainer(assistant_only_loss=True, packing=False)` on
the same chats, counting the real tokens of every batch it trains on.

Both sides run with one torch thread by default (--threads): on a machine shared with other jobs, two spinning
OpenMP threads make wall-clock and CPU-time figures swing by 2x between identical runs, while a single thread's CPU
time is stable. The ratio is taken on real tokens per CPU-second; wall-clock tokens/s is shown next to it. Results
go to stdout and bench/results/train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STUDENT = {"architecture": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4}


def conversations(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Multi-turn records: earlier exchanges of other records as history, one record's answer as the target."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = min(int(rng.lognormvariate(0.0, 0.9)) + 1, 12)
        picks = rng.sample(records, turns)
        history = []
        for r in picks[:-1]:
            history += [m for m in r["messages"] if m["role"] == "user"]
            history.append({**r["output"], "role": "assistant"})
        last = picks[-1]
        system = [m for m in last["messages"] if m["role"] == "system"]
        rest = [m for m in last["messages"] if m["role"] != "system"]
        out.append({**last, "id": f"conv-{i}", "messages": [*system, *history, *rest]})
    return out


def prepare(root: Path, n: int) -> tuple[Path, list[dict]]:
    """Demo logs -> `distill curate` -> mixed-length conversations; returns (recipe path, conversations)."""
    from curation.harvest.demo_traffic import write_demo
    from pipeline.cli import main as cli
    from training.train.stage import read_split

    write_demo(root / "logs", {"2026-11-23": 1500})
    recipe = {
        "name": "bench", "run_dir": str(root / "runs"),
        "harvest": {"sources": [{"format": "openai", "path": str(root / "logs" / "*.jsonl.gz")}]},
        "curate": {"feedback": {"metric": "thumbs_up", "min_value": 0.5}},
        "train": {"student": {"from_config": STUDENT}},
        "evaluate": {"teacher_price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
                     "student_price": {"usd_per_hour": 0.1}},
        "export": {"model_name": "bench"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["curate", str(path)]) == 0
    curated = read_split(root / "runs" / "bench" / "curate", "train")
    return path, conversations(curated, n)


def save_tokenizer(root: Path, convs: list[dict], vocab: int) -> Path:
    from training.train.chat_template import tokenizer_corpus, train_tokenizer

    folder = root / "tokenizer"
    train_tokenizer(tokenizer_corpus(convs), vocab).save_pretrained(folder)
    return folder


def run_distill(root: Path, recipe_path: Path, convs: list[dict], tok_dir: Path, args, round_: int) -> dict:
    """The train stage as a recipe gets it (packing is its default) on a curate folder holding the conversations."""
    import pyarrow.parquet as pq
    from rich.console import Console

    from pipeline.recipe import load_recipe
    from pipeline.record import to_table
    from pipeline.rundir import RunDir
    from pipeline.stages import run_stage

    data = yaml.safe_load(recipe_path.read_text())
    data["name"] = f"packed-{round_}"
    data["train"] = {"student": {"from_config": {**STUDENT, "tokenizer": str(tok_dir)}}, "method": "full",
                     "max_length": args.max_length, "batch_size": args.batch,
                     "max_steps": args.steps, "learning_rate": 1e-3, "logging_steps": args.steps,
                     "save_steps": 10_000, "precision": "fp32"}
    path = root / f"packed-{round_}.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    run = RunDir(recipe.run_path)
    work = run.begin("curate", "bench")
    pq.write_table(to_table(convs), work / "train.parquet")
    pq.write_table(to_table(convs[:0]), work / "val.parquet")
    run.complete("curate", {"stage": "curate", "fingerprint": "bench"})
    run_stage(recipe, run, "train", Console(quiet=True))
    info = json.loads((run.stage_dir("train") / "student.json").read_text())
    if info["packing"] is not True:
        raise SystemExit(f"the train stage did not pack by default: {info.get('packing_why')}")
    return {"tokens": info["tokens_seen"], "seconds": info["train_seconds"], "cpu": info["train_cpu_seconds"],
            "positions": info["rows"] and args.batch * args.steps * args.max_length, "rows": info["rows"],
            "steps": info["steps"]}


def run_trl(convs: list[dict], tok_dir: Path, args, round_: int) -> dict:
    """A plain TRL SFTTrainer: conversational dataset, assistant-only loss, no packing, padding per batch."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipeline.chat import training_messages
    from pipeline.config.train import StudentFromConfig
    from training.train.student import build_from_config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = build_from_config(StudentFromConfig(**STUDENT), tok, args.max_length, seed=0)
    seen = {"tokens": 0, "positions": 0}

    class Counting(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            seen["tokens"] += int(batch["attention_mask"].sum())
            seen["positions"] += batch["attention_mask"].numel()
            return batch

    cfg = SFTConfig(output_dir=str(Path(tempfile.mkdtemp()) / f"trl-{round_}"), assistant_only_loss=True,
                    max_length=args.max_length, packing=False, per_device_train_batch_size=args.batch,
                    max_steps=args.steps, learning_rate=1e-3, logging_steps=args.steps, save_strategy="no",
                    report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
                    dataloader_num_workers=0, seed=0)
    ds = Dataset.from_list([{"messages": training_messages(c)} for c in convs])
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         data_collator=Counting(pad_token_id=tok.pad_token_id))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    t0, cpu0 = time.time(), time.process_time()
    trainer.train()
    return {"tokens": seen["tokens"], "seconds": time.time() - t0, "cpu": time.process_time() - cpu0,
            "positions": seen["positions"], "rows": args.batch * args.steps, "steps": args.steps,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; medians are reported")
    p.add_argument("--hidden", type=int, default=STUDENT["hidden_size"], help="student width (4 layers, 4 heads)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 (default) makes CPU time a load-independent measure on a shared machine")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.md"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    STUDENT["hidden_size"] = args.hidden

    from pipeline.hf import quiet_hf

    quiet_hf()
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    recipe_path, convs = prepare(root, args.conversations)
    tok_dir = save_tokenizer(root, convs, 2048)
    from transformers import AutoTokenizer

    from pipeline.chat import training_messages

    tok = AutoTokenizer.from_pretrained(tok_dir)
    lengths = sorted(len(tok.apply_chat_template(training_messages(c), tokenize=True, return_dict=True)["input_ids"])
                     for c in convs)
    q = lambda f: lengths[min(int(f * len(lengths)), len(lengths) - 1)]  # noqa: E731

    results: dict[str, list[dict]] = {"trl": [], "distill": []}
    for r in range(args.rounds):
        results["trl"].append(run_trl(convs, tok_dir, args, r))
        results["distill"].append(run_distill(root, recipe_path, convs, tok_dir, args, r))
        for side in ("trl", "distill"):
            x = results[side][-1]
            print(f"round {r}: {side:8s} {x['tokens'] / x['seconds']:8.0f} real tokens/s, "
                  f"{x['tokens'] / x['cpu']:8.0f} per CPU-second ({x['tokens']:,} tokens in {x['seconds']:.1f}s, "
                  f"{x['cpu']:.1f} CPU-s)", flush=True)

    def med(side: str, key: str) -> float:
        return statistics.median(x[key] for x in results[side])

    tps = {s: statistics.median(x["tokens"] / x["seconds"] for x in results[s]) for s in results}
    tpc = {s: statistics.median(x["tokens"] / x["cpu"] for x in results[s]) for s in results}
    fill = {s: med(s, "tokens") / med(s, "positions") for s in results}  # real tokens / positions computed
    ratio, ratio_wall = tpc["distill"] / tpc["trl"], tps["distill"] / tps["trl"]
    lines = [
        "## Training throughput on CPU (`bench/train_cpu.py`)",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/train_cpu.py', *sys.argv[1:]])}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {args.threads}; "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Data: {len(convs):,} multi-turn conversations from the curated demo traffic, "
        f"{lengths[0]}-{lengths[-1]} tokens (median {q(0.5)}, p90 {q(0.9)}); student {STUDENT['num_layers']} "
        f"layers x {STUDENT['hidden_size']} wide (Llama, vocab 2,048), fp32, max_length {args.max_length}, "
        f"batch {args.batch}, {args.steps} optimizer steps per run, median of {args.rounds} alternating rounds.",
        "",
        "| trainer | rows per step | real tokens per step | real share of positions | real tokens per CPU-s | "
        "real tokens/s (wall) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| plain TRL `SFTTrainer` (padded batches, no packing) | {args.batch} | "
        f"{med('trl', 'tokens') / args.steps:,.0f} | {100 * fill['trl']:.0f} % | {tpc['trl']:,.0f} | "
        f"{tps['trl']:,.0f} |",
        f"| `distill train` (packing, its default) | {args.batch} packed rows | "
        f"{med('distill', 'tokens') / args.steps:,.0f} | {100 * fill['distill']:.0f} % | {tpc['distill']:,.0f} | "
        f"{tps['distill']:,.0f} |",
        "",
        f"**Ratio: {ratio:.2f}x** real tokens per CPU-second ({ratio_wall:.2f}x in wall-clock tokens/s, which other "
        "jobs on the machine disturb) (target >= 1.5x).",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.exists() else ""
    marker = "## Training throughput on CPU"
    if marker in old:  # replace this section, keep the others (e.g. the GPU one)
        head, _, tail = old.partition(marker)
        rest = tail.split("\n## ", 1)
        old = head + ("## " + rest[1] if len(rest) > 1 else "")
        out.write_text(old.rstrip() + "\n\n" + text + "\n" if old.strip() else text + "\n")
    else:
        out.write_text((old.rstrip() + "\n\n" if old.strip() else "") + text + "\n")


if __name__ == "__main__":
    main()
