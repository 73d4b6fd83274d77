"""Which checkpoint, which candidate: agreement with the teacher of a small from-scratch student when the kept
checkpoint is chosen by validation loss, by validation quality (the evaluate stage's metric, greedy answers), or
is simply the last one, and of the best of three candidates chosen by validation quality; over 3 seeds, on the demo
and on the harder support-triage workload (bench/triage_workload.py).

    nice -n 10 .venv/bin/python bench/candidates.py                       # both workloads, 3 seeds (~40 CPU minutes)
    nice -n 10 .venv/bin/python bench/candidates.py --workloads triage --seeds 0 --epochs 4   # a quick look

How: each workload is harvested and curated once (`distill curate`, seed 0, so every run sees the same splits).
Each (candidate, seed) is then trained once by the train stage's own code (``training.train.stage``: student built
from config, tokenizer, assistant-only SFT, packing, TRL's trainer) with a callback that, at every epoch's
evaluation, scores the validation split with the evaluate stage's engine (``training.evaluate.engine``: greedy,
batched, the recipe's quality metric) and keeps a copy of the weights. From that one trajectory three checkpoints
are read: the last (what a run without selection ships), the lowest validation loss (``select_by: loss`` with
early stopping patience at infinity), and the highest validation quality (``select_by: quality``; ties to the lower
loss). Each chosen checkpoint answers the test split and is scored against the teacher. The best candidate of a
seed is the one whose quality-selected checkpoint has the highest validation quality (ties: lower validation loss;
all three have the same size, so serving cost does not separate them), as ``train.candidates`` chooses.

The seed varies the initialisation and the data order, not the splits. Torch uses --threads threads (2 by default,
the machine's cores). Results: a table on stdout, bench/results/candidates.md and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

STUDENT = {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 1024}
CANDIDATES = {  # name -> overrides of the base train section (same student size)
    "lr 4e-3": {"learning_rate": 4.0e-3},
    "lr 1.5e-3": {"learning_rate": 1.5e-3},
    "lr 8e-3": {"learning_rate": 8.0e-3},
}
EVALUATE = {"max_new_tokens": 48, "batch_size": 64, "bootstrap": 0, "latency_samples": 0,
            "teacher_price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}, "student_price": {"usd_per_hour": 0.1},
            "gate": {"max_points_below_teacher": 5}}
FOCUS = {"demo": "ticket_triage", "triage": "support_triage"}  # the function whose agreement the table shows


def recipe_for(workload: str, root: Path, epochs: int) -> dict[str, Any]:
    """The bench recipe of a workload (data written under root for the triage one)."""
    if workload == "demo":
        source = {"format": "openai", "path": str(ROOT / "recipes/data/demo-traffic/*.jsonl.gz")}
        split = {"val_fraction": 0.05, "test_fraction": 0.15}
    else:
        from bench.triage_workload import write_workload

        source = {"format": "openai", "path": str(write_workload(root / "triage-data", 2500, 0))}
        split = {"val_fraction": 0.08, "test_fraction": 0.15}
    return {
        "name": f"cand-{workload}", "run_dir": str(root / "runs"), "seed": 0,
        "harvest": {"sources": [{**source, "function_field": "request.metadata.function"}]},
        "curate": {"feedback": {"metric": "thumbs_up", "min_value": 0.5}, "pii": "redact", "split": split},
        "train": {"student": {"from_config": STUDENT}, "method": "full", "epochs": epochs, "batch_size": 16,
                  "learning_rate": 4.0e-3, "max_length": 192 if workload == "demo" else 128, "packing": True, "logging_steps": 50,
                  "save_steps": 100_000, "precision": "fp32"},
        "evaluate": EVALUATE,
        "export": {"model_name": "bench"},
    }


def quality_callback(val_records, ecfg, log: list[dict[str, Any]]):
    """At every evaluation: the validation split's quality (evaluate's engine) and a copy of the weights."""
    from transformers import TrainerCallback

    from training.evaluate.engine import evaluate_model

    class Select(TrainerCallback):
        def __init__(self):
            self.trainer = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            model, tok = self.trainer.model, self.trainer.processing_class
            t0 = time.perf_counter()
            rows, _ = evaluate_model(model, tok, val_records, ecfg)
            model.train()
            q = [r["quality"] for r in rows if r["quality"] is not None]
            log.append({"epoch": round(state.epoch or 0, 2), "eval_loss": (metrics or {}).get("eval_loss"),
                        "val_quality": sum(q) / len(q), "val_exact": sum(r["exact_match"] for r in rows) / len(rows),
                        "score_seconds": time.perf_counter() - t0,
                        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}})

    return Select()


def train_one(recipe, run, curate_dir: Path, work: Path, seed: int, threads: int) -> dict[str, Any]:
    """One training with the per-epoch log of validation loss, quality and weights; the model and tokenizer."""
    import torch
    from rich.console import Console

    from pipeline.stages import StageContext
    from training.train import stage as train_stage
    from training.train.chat_template import check_assistant_mask

    torch.set_num_threads(threads)
    recipe = recipe.model_copy(update={"seed": seed})
    ctx = StageContext(recipe, run, work, {"curate": curate_dir}, Console(quiet=True))
    train_records = train_stage.read_split(curate_dir, "train")
    val_records = train_stage.read_split(curate_dir, "val")
    model, tok = train_stage.prepare_student(ctx, train_records)
    data = train_stage.load_data(recipe.train, tok, check_assistant_mask(tok), train_records, val_records)
    trainer = train_stage.build_trainer(ctx, model, tok, data)
    log: list[dict[str, Any]] = []
    cb = quality_callback(val_records, recipe.evaluate, log)
    cb.trainer = trainer
    trainer.add_callback(cb)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    scoring = sum(x["score_seconds"] for x in log)
    return {"log": log, "model": trainer.model, "tokenizer": tok, "seconds": seconds, "cpu_seconds": cpu,
            "train_seconds": seconds - scoring, "score_seconds": scoring, "steps": trainer.state.global_step}


def test_scores(model, tok, weights, test_records, ecfg, focus: str) -> dict[str, float]:
    """Agreement with the teacher on the test split: exact match and quality, overall and on the focus function."""
    from training.evaluate.engine import evaluate_model

    model.load_state_dict(weights)
    rows, _ = evaluate_model(model, tok, test_records, ecfg)
    mine = [r for r in rows if r["function"] == focus]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"exact": mean([float(r["exact_match"]) for r in mine]), "quality": mean([r["quality"] for r in mine]),
            "exact_all": mean([float(r["exact_match"]) for r in rows]), "n": len(mine)}


def pick(log: list[dict[str, Any]], how: str) -> dict[str, Any]:
    if how == "last":
        return log[-1]
    if how == "loss":
        return min(log, key=lambda x: x["eval_loss"])
    return max(log, key=lambda x: (x["val_quality"], -x["eval_loss"]))


def prepare(workload: str, root: Path, args) -> dict[str, Any]:
    """Harvest and curate a workload once; its recipe, run directory, curate folder and test split."""
    import yaml
    from rich.console import Console

    from pipeline.recipe import load_recipe
    from pipeline.rundir import RunDir
    from pipeline.stages import run_pipeline
    from training.train.stage import read_split

    path = root / f"{workload}.yaml"
    path.write_text(yaml.safe_dump(recipe_for(workload, root, args.epochs)))
    base = load_recipe(path)
    run_pipeline(base, ["curate"], Console(quiet=True))
    run = RunDir(base.run_path)
    curate_dir = run.stage_dir("curate")
    return {"recipe": base, "run": run, "curate": curate_dir, "test": read_split(curate_dir, "test")}


def run_one(workload: str, w: dict[str, Any], name: str, seed: int, root: Path, args) -> dict[str, Any]:
    """One (candidate, seed) of a workload: the three selections' test scores and the times."""
    base = w["recipe"]
    recipe = base.model_copy(update={"train": base.train.model_copy(update=CANDIDATES[name])})
    work = root / "work" / f"{workload}-{name.replace(' ', '')}-{seed}"
    t = train_one(recipe, w["run"], w["curate"], work, seed, args.threads)
    row = {"workload": workload, "candidate": name, "seed": seed, "steps": t["steps"],
           "seconds": round(t["seconds"], 1), "cpu_seconds": round(t["cpu_seconds"], 1),
           "train_seconds": round(t["train_seconds"], 1), "score_seconds": round(t["score_seconds"], 1),
           "curve": [{k: v for k, v in x.items() if k != "weights"} for x in t["log"]]}
    tested: dict[float, dict[str, float]] = {}  # the same checkpoint chosen twice answers the test split once
    for how in ("last", "loss", "quality"):
        chosen = pick(t["log"], how)
        if chosen["epoch"] not in tested:
            tested[chosen["epoch"]] = test_scores(t["model"], t["tokenizer"], chosen["weights"], w["test"],
                                                  recipe.evaluate, FOCUS[workload])
        row[how] = {"epoch": chosen["epoch"], "val_quality": chosen["val_quality"], "eval_loss": chosen["eval_loss"],
                    **tested[chosen["epoch"]]}
    print(json.dumps({k: row[k] for k in ("workload", "candidate", "seed", "seconds", "cpu_seconds")}
                     | {h: round(100 * row[h]["exact"], 1) for h in ("last", "loss", "quality")}), flush=True)
    return row


def best_of(rows: list[dict[str, Any]], workload: str, seed: int) -> dict[str, Any]:
    mine = [r for r in rows if r["workload"] == workload and r["seed"] == seed]
    return max(mine, key=lambda r: (r["quality"]["val_quality"], -r["quality"]["eval_loss"]))


def spread(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def table(rows: list[dict[str, Any]], args) -> str:
    """Markdown: per workload, the mean (min-max over seeds) test exact match of each selection and candidate."""
    lines = ["| workload (function, test n) | candidate | seeds | last checkpoint | loss-selected | quality-selected | "
             "train wall s / CPU s per run (+ val scoring s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == wl]
        label = f"{wl} ({FOCUS[wl]}, n={mine[0]['last']['n']})"
        for cand in dict.fromkeys(r["candidate"] for r in mine):
            rs = [r for r in mine if r["candidate"] == cand]
            lines.append(f"| {label} | {cand} | {len(rs)} | "
                         + " | ".join(spread([r[h]["exact"] for r in rs]) for h in ("last", "loss", "quality"))
                         + f" | {statistics.mean(r['train_seconds'] for r in rs):.0f} / "
                           f"{statistics.mean(r['cpu_seconds'] for r in rs):.0f} "
                           f"(+{statistics.mean(r['score_seconds'] for r in rs):.0f}) |")
        n_cands = len({r["candidate"] for r in mine})
        seeds = sorted(s for s in {r["seed"] for r in mine} if sum(r["seed"] == s for r in mine) == n_cands)
        if n_cands < 2 or not seeds:  # best of N only over the seeds where all N were trained
            continue
        best = [best_of(rows, wl, s) for s in seeds]
        lines.append(f"| {label} | **best of {n_cands}** by val quality (chose "
                     + ", ".join(b["candidate"] for b in best) + f") | {len(seeds)} | - | - | "
                     + spread([b["quality"]["exact"] for b in best])
                     + f" | {sum(r['train_seconds'] for r in mine) / len(seeds):.0f} (all {n_cands}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="demo,triage")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="Keep the runs rows.json under --root already holds.")
    ap.add_argument("--render", action="store_true", help="Only write the results of rows.json under --root again.")
    ap.add_argument("--candidates", type=int, default=len(CANDIDATES), help="Train only the first N candidates.")
    ap.add_argument("--root", default="/tmp/distill-bench-candidates")
    ap.add_argument("--out", default=str(ROOT / "bench/results/candidates.md"))
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for name in list(CANDIDATES)[args.candidates:]:
        del CANDIDATES[name]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.render:
        write(json.loads((root / "rows.json").read_text()), args, root, t0)
        return
    workloads = {wl: prepare(wl, root, args) for wl in args.workloads.split(",")}
    done = json.loads((root / "rows.json").read_text()) if args.resume and (root / "rows.json").is_file() else []
    rows = list(done)
    for seed in args.seeds:  # seed by seed, so that a stopped run leaves whole best-of-three comparisons
        for name in CANDIDATES:
            for wl, w in workloads.items():
                if any((r["workload"], r["candidate"], r["seed"]) == (wl, name, seed) for r in rows):
                    continue  # measured by an earlier, interrupted run (--resume)
                rows.append(run_one(wl, w, name, seed, root, args))
                write(rows, args, root, t0)
    print(table(rows, args))


def write(rows: list[dict[str, Any]], args, root: Path, t0: float) -> None:
    """The results so far: rows.json under the root and the markdown file."""
    md = table(rows, args)
    load = os.getloadavg()
    meta = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {args.threads}, nice 10, load average at the end {load[0]:.1f}, {len(rows)} runs taking "
            f"{sum(r['seconds'] for r in rows):.0f} s wall and {sum(r['cpu_seconds'] for r in rows):.0f} CPU s in all, "
            f"student {STUDENT}, {args.epochs} epochs, seeds {args.seeds}")
    (root / "rows.json").write_text(json.dumps(rows, indent=1))
    Path(args.out).write_text(f"# Checkpoint selection and candidates\n\n{__doc__}\n\n## Run\n\n{meta}\n\n"
                              f"Test exact match with the teacher, mean (min-max) over seeds:\n\n{md}\n\n"
                              f"Per run (validation curves included): `{root / 'rows.json'}` at the time of the run "
                              f"(copied to bench/results/candidates_rows.json); the per-run rows follow.\n\n```json\n"
                              + "\n".join(json.dumps({k: v for k, v in r.items() if k != "curve"}) for r in rows)
                              + "\n```\n")


if __name__ == "__main__":
    main()
