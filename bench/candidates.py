"""Which checkpoint, which candidate: agreement with the teacher of a from-scratch student of the demo's size when
the kept checkpoint is chosen by validation loss, by validation quality (the evaluate stage's metric, greedy
answers), or is simply the last one, and of the best of three candidates chosen by validation quality; over 3
seeds, on the demo and on the harder support-triage workload (bench/triage_workload.py).

    nice -n 19 .venv/bin/python bench/candidates.py --workloads demo --epochs 16 --root /tmp/cand/demo
    nice -n 19 .venv/bin/python bench/candidates.py --workloads triage --epochs 12 --root /tmp/cand/triage
    .venv/bin/python bench/candidates.py --render --root /tmp/cand/demo --merge /tmp/cand/triage/rows.json
    nice -n 19 .venv/bin/python bench/candidates.py --workloads triage --seeds 0 --epochs 1 --max-steps 5  # smoke

How: each workload is harvested and curated once (`distill curate`, seed 0, so every run sees the same splits).
Each (candidate, seed) is then trained once by the train stage's own code (``training.train.stage``: the demo's
student built from config, tokenizer, assistant-only SFT, packing, TRL's trainer, the demo's optimiser settings)
for a fixed number of epochs, with a callback that, at every epoch's evaluation, scores the validation split with
the evaluate stage's engine (``training.evaluate.engine``: greedy, batched, the recipe's quality metric) and keeps
a copy of the weights. From that one trajectory four checkpoints are read: the last (what a run without selection
ships), the lowest validation loss (``select_by: loss`` with early stopping patience at infinity), the highest
validation quality (``select_by: quality``, no early stopping; ties to the lower loss), and what the demo recipe
does (``select_by: quality`` with ``early_stopping_patience: 5``: the best by quality among the epochs trained
before 5 evaluations in a row fail to improve on it, replayed from the curve as transformers'
EarlyStoppingCallback decides). Each chosen checkpoint answers the test split and is scored against the teacher.
The best candidate of a seed is the one whose quality-selected checkpoint has the highest validation quality
(ties: lower validation loss; all three have the same size, so serving cost does not separate them), as
``train.candidates`` chooses.

The seed varies the initialisation and the data order, not the splits. Torch uses --threads threads (1 by default).
Results: a table on stdout, --out (bench/results/candidates.md) and rows.json under --root.
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

# recipes/demo.yaml's student and optimiser as of f99b825 (batch 16, constant rate; fbb1d2c moved the demo to
# batch 8 and cosine); its train section less selection, which the bench replays
STUDENT = {"architecture": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "vocab_size": 1024}
TRAIN = {"method": "full", "batch_size": 16, "learning_rate": 4.0e-3, "lr_scheduler": "constant_with_warmup",
         "packing": True, "logging_steps": 20, "save_steps": 100_000}
CANDIDATES = {  # name -> overrides of the base train section (same student size)
    "lr 4e-3": {"learning_rate": 4.0e-3},
    "lr 2e-3": {"learning_rate": 2.0e-3},
    "lr 8e-3": {"learning_rate": 8.0e-3},
}
PATIENCE = 5  # recipes/demo.yaml's early_stopping_patience
SELECTIONS = ("last", "loss", "quality", "demo")  # demo: select_by quality with early stopping (PATIENCE)
EVALUATE = {"max_new_tokens": 48, "batch_size": 64, "bootstrap": 0, "latency_samples": 0,
            "teacher_price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}, "student_price": {"usd_per_hour": 0.1},
            "gate": {"max_points_below_teacher": 5}}
FOCUS = {"demo": "ticket_triage", "triage": "support_triage"}  # the function whose agreement the table shows


def recipe_for(workload: str, root: Path, epochs: int, max_steps: int | None) -> dict[str, Any]:
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
        "train": {"student": {"from_config": STUDENT}, **TRAIN, "epochs": epochs, "max_steps": max_steps,
                  "max_length": 192 if workload == "demo" else 128, "precision": "fp32"},
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
            t0, c0 = time.perf_counter(), time.process_time()
            rows, _ = evaluate_model(model, tok, val_records, ecfg)
            model.train()
            q = [r["quality"] for r in rows if r["quality"] is not None]
            log.append({"epoch": round(state.epoch or 0, 2), "step": state.global_step,
                        "eval_loss": (metrics or {}).get("eval_loss"), "val_quality": sum(q) / len(q),
                        "val_exact": sum(r["exact_match"] for r in rows) / len(rows),
                        "score_seconds": time.perf_counter() - t0, "score_cpu_seconds": time.process_time() - c0,
                        "at_cpu_seconds": time.process_time(),
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
    for x in log:  # CPU seconds since the start of training when this evaluation was done
        x["at_cpu_seconds"] = round(x["at_cpu_seconds"] - c0, 1)
    return {"log": log, "model": trainer.model, "tokenizer": tok, "seconds": seconds, "cpu_seconds": cpu,
            "score_seconds": sum(x["score_seconds"] for x in log),
            "score_cpu_seconds": sum(x["score_cpu_seconds"] for x in log), "steps": trainer.state.global_step}


def test_scores(model, tok, weights, test_records, ecfg, focus: str) -> dict[str, float]:
    """Agreement with the teacher on the test split: exact match and quality, overall and on the focus function."""
    from training.evaluate.engine import evaluate_model

    model.load_state_dict(weights)
    rows, _ = evaluate_model(model, tok, test_records, ecfg)
    mine = [r for r in rows if r["function"] == focus]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"exact": mean([float(r["exact_match"]) for r in mine]), "quality": mean([r["quality"] for r in mine]),
            "exact_all": mean([float(r["exact_match"]) for r in rows]), "n": len(mine)}


def early_stop_index(log: list[dict[str, Any]], patience: int = PATIENCE) -> int:
    """Index of the evaluation after which select_by: quality with early_stopping_patience stops (the last one
    when it never does): transformers' EarlyStoppingCallback on eval_select (quality, ties to lower loss), which
    counts evaluations that do not strictly improve on the best so far."""
    from training.train.select import selection_value

    best, waited = None, 0
    for i, x in enumerate(log):
        value = selection_value(x["val_quality"], x["eval_loss"])
        if best is None or value > best:
            best, waited = value, 0
        else:
            waited += 1
        if waited >= patience:
            return i
    return len(log) - 1


def pick(log: list[dict[str, Any]], how: str) -> dict[str, Any]:
    """The checkpoint a selection rule keeps from one trajectory."""
    if how == "last":
        return log[-1]
    if how == "loss":
        return min(log, key=lambda x: x["eval_loss"])
    if how == "demo":
        log = log[:early_stop_index(log) + 1]
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
    path.write_text(yaml.safe_dump(recipe_for(workload, root, args.epochs, args.max_steps)))
    base = load_recipe(path)
    run_pipeline(base, ["curate"], Console(quiet=True))
    run = RunDir(base.run_path)
    curate_dir = run.stage_dir("curate")
    return {"recipe": base, "run": run, "curate": curate_dir, "test": read_split(curate_dir, "test")}


def run_one(workload: str, w: dict[str, Any], name: str, seed: int, root: Path, args) -> dict[str, Any]:
    """One (candidate, seed) of a workload: the selections' test scores and the times."""
    base = w["recipe"]
    recipe = base.model_copy(update={"train": base.train.model_copy(update=CANDIDATES[name])})
    work = root / "work" / f"{workload}-{name.replace(' ', '')}-{seed}"
    t = train_one(recipe, w["run"], w["curate"], work, seed, args.threads)
    stop = early_stop_index(t["log"])
    row = {"workload": workload, "candidate": name, "seed": seed, "epochs": args.epochs, "steps": t["steps"],
           "threads": args.threads, "nice": os.nice(0), "load_average": round(os.getloadavg()[0], 1),
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "seconds": round(t["seconds"], 1), "cpu_seconds": round(t["cpu_seconds"], 1),
           "score_seconds": round(t["score_seconds"], 1), "score_cpu_seconds": round(t["score_cpu_seconds"], 1),
           "demo_stop_epoch": t["log"][stop]["epoch"], "demo_cpu_seconds": t["log"][stop]["at_cpu_seconds"],
           "curve": [{k: v for k, v in x.items() if k != "weights"} for x in t["log"]]}
    tested: dict[float, dict[str, float]] = {}  # the same checkpoint chosen twice answers the test split once
    for how in SELECTIONS:
        chosen = pick(t["log"], how)
        if chosen["epoch"] not in tested:
            tested[chosen["epoch"]] = test_scores(t["model"], t["tokenizer"], chosen["weights"], w["test"],
                                                  recipe.evaluate, FOCUS[workload])
        row[how] = {"epoch": chosen["epoch"], "val_quality": chosen["val_quality"], "eval_loss": chosen["eval_loss"],
                    **tested[chosen["epoch"]]}
    print(json.dumps({k: row[k] for k in ("workload", "candidate", "seed", "seconds", "cpu_seconds")}
                     | {h: [row[h]["epoch"], round(100 * row[h]["exact"], 1)] for h in SELECTIONS}), flush=True)
    return row


def best_of(rows: list[dict[str, Any]], workload: str, seed: int) -> dict[str, Any]:
    mine = [r for r in rows if r["workload"] == workload and r["seed"] == seed]
    return max(mine, key=lambda r: (r["quality"]["val_quality"], -r["quality"]["eval_loss"]))


def spread(xs: list[float], scale: float = 100, digits: int = 1) -> str:
    xs = [scale * x for x in xs]
    return f"{statistics.mean(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def epochs_of(rs: list[dict[str, Any]]) -> str:
    """The epochs each selection kept, per seed: loss / quality / demo rule (stopped at)."""
    return ", ".join(f"{r['loss']['epoch']:g}/{r['quality']['epoch']:g}/{r['demo']['epoch']:g}"
                     f"({r['demo_stop_epoch']:g})" for r in rs)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per workload, the mean (min-max over seeds) test exact match of each selection and candidate."""
    lines = ["| workload (function, test n) | candidate | seeds | epochs | last checkpoint | loss-selected | "
             "quality-selected | demo rule (quality, patience 5) | epoch kept per seed: loss/quality/demo (stop) | "
             "train CPU s per run (of it val scoring) | wall s per run |", "| --- " * 11 + "|"]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == wl]
        label = f"{wl} ({FOCUS[wl]}, n={mine[0]['last']['n']})"
        for cand in dict.fromkeys(r["candidate"] for r in mine):
            rs = sorted((r for r in mine if r["candidate"] == cand), key=lambda r: r["seed"])
            lines.append(f"| {label} | {cand} | {','.join(str(r['seed']) for r in rs)} | {rs[0]['epochs']} | "
                         + " | ".join(spread([r[h]["exact"] for r in rs]) for h in SELECTIONS)
                         + f" | {epochs_of(rs)} | {spread([r['cpu_seconds'] for r in rs], 1, 0)} "
                           f"({statistics.mean(r['score_cpu_seconds'] for r in rs):.0f}) | "
                           f"{spread([r['seconds'] for r in rs], 1, 0)} |")
        lines += best_lines(rows, wl, label)
    return "\n".join(lines)


def best_lines(rows: list[dict[str, Any]], wl: str, label: str) -> list[str]:
    """The best-of-N row of a workload, over the seeds where all N candidates were trained."""
    mine = [r for r in rows if r["workload"] == wl]
    n_cands = len({r["candidate"] for r in mine})
    seeds = sorted(s for s in {r["seed"] for r in mine} if sum(r["seed"] == s for r in mine) == n_cands)
    if n_cands < 2 or not seeds:
        return []
    best = [best_of(rows, wl, s) for s in seeds]
    test_best = [max(r["quality"]["exact"] for r in mine if r["seed"] == s) for s in seeds]
    hits = sum(b["quality"]["exact"] == t for b, t in zip(best, test_best, strict=True))
    cpu = [sum(r["cpu_seconds"] for r in mine if r["seed"] == s) for s in seeds]
    return [f"| {label} | **best of {n_cands}** by val quality (chose " + ", ".join(b["candidate"] for b in best)
            + f"; the test-best in {hits} of {len(seeds)}) | {','.join(map(str, seeds))} | - | - | - | "
            + spread([b["quality"]["exact"] for b in best]) + " | - | - | "
            + f"{spread(cpu, 1, 0)} (all {n_cands}) | - |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="demo,triage")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=None, help="Stop each training after N steps (smoke runs).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="Keep the runs rows.json under --root already holds.")
    ap.add_argument("--render", action="store_true", help="Only write the results of rows.json under --root again.")
    ap.add_argument("--merge", nargs="*", default=[], help="With --render: more rows.json files to add.")
    ap.add_argument("--note", default="", help="A paragraph to print under the run's description (what is missing).")
    ap.add_argument("--candidates", type=int, default=len(CANDIDATES), help="Train only the first N candidates.")
    ap.add_argument("--root", default="/tmp/distill-bench-candidates")
    ap.add_argument("--out", default=str(ROOT / "bench/results/candidates.md"))
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for name in list(CANDIDATES)[args.candidates:]:
        del CANDIDATES[name]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.render:
        rows = [r for f in [root / "rows.json", *args.merge] for r in json.loads(Path(f).read_text())]
        write(rows, args, root)
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
                write(rows, args, root)
    print(table(rows))


def write(rows: list[dict[str, Any]], args, root: Path) -> None:
    """The results so far: rows.json under the root (not when rendering) and the markdown file."""
    md = table(rows)
    meta = (f"{platform.machine()}, {os.cpu_count()} cores, student {STUDENT}, train {TRAIN} (learning rate per "
            f"candidate), {len(rows)} runs taking {sum(r['cpu_seconds'] for r in rows):.0f} training CPU s and "
            f"{sum(r['seconds'] for r in rows):.0f} s wall in all, finished "
            f"{min(r['finished'] for r in rows)} to {max(r['finished'] for r in rows)}, torch threads "
            f"{sorted({r['threads'] for r in rows})}, nice {sorted({r['nice'] for r in rows})}, load average (1 min) "
            f"at the runs' ends {min(r['load_average'] for r in rows)}-{max(r['load_average'] for r in rows)}")
    if not args.render:
        (root / "rows.json").write_text(json.dumps(rows, indent=1))
    note = f"{args.note}\n\n" if args.note else ""
    Path(args.out).write_text(f"# Checkpoint selection and candidates\n\n{__doc__}\n\n## Run\n\n{meta}\n\n{note}"
                              f"Test exact match with the teacher, mean (min-max) over seeds:\n\n{md}\n\n"
                              "Per run (validation curves in bench/results/candidates_rows.json); the per-run rows "
                              "follow.\n\n```json\n"
                              + "\n".join(json.dumps({k: v for k, v in r.items() if k != "curve"}) for r in rows)
                              + "\n```\n")


if __name__ == "__main__":
    main()
