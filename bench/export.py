"""Benchmark of export formats on the demo student: for each format, bytes of weights relative to the bf16 master
and quality change on the demo test split, next to the bf16 master evaluated in the same process (the baseline).

    .venv/bin/python bench/export.py                      # all six formats, the whole demo test split
    .venv/bin/python bench/export.py --formats gguf-q8_0 bnb-nf4 --records 100

Steps: reuse the demo run (runs/demo; trained first with `distill train recipes/demo.yaml` when missing), merge
the student into a bf16 master in a scratch folder (runs/demo is only read), make each format from that master
exactly as the export stage does (export.export.quantize.make; llm-compressor calibrated on 128 curated training
examples), load it back with transformers and answer the demo test split with the evaluation engine
(training.evaluate.engine: greedy, batched; float32 compute on CPU), then compare every answer with the master's.
Targets (issue 6): 8-bit within 0.5 point of the master at no more than 0.55x its bytes; 4-bit within 2 points.
Results go to stdout and bench/results/export.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow.parquet as pq  # noqa: E402

from export.export import quantize  # noqa: E402
from pipeline.chat import training_messages  # noqa: E402
from pipeline.config.export import FORMATS  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.record import from_table  # noqa: E402
from training.evaluate.engine import evaluate_model  # noqa: E402
from training.train.outputs import load_trained_student  # noqa: E402

TARGETS = {  # format: (max points lost, max bytes vs the bf16 master)
    "bnb-8bit": (0.5, 0.55), "w8a8": (0.5, 0.55), "gguf-q8_0": (0.5, 0.55),
    "bnb-nf4": (2.0, None), "w4a16": (2.0, None), "gguf-f16": (0.5, None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes/demo.yaml"))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--records", type=int, default=None, help="evaluate on at most this many test records")
    ap.add_argument("--calibration", type=int, default=128, help="curated examples calibrating llm-compressor")
    ap.add_argument("--out", default=str(ROOT / "bench/results/export.md"))
    args = ap.parse_args()

    import torch

    from pipeline.hf import quiet_hf

    quiet_hf()
    torch.manual_seed(0)
    os.chdir(ROOT)
    recipe = load_recipe(args.recipe)
    run = recipe.run_path
    if not (run / "train" / "manifest.json").is_file():
        from rich.console import Console

        from pipeline.stages import run_pipeline

        print(f"{run}/train is missing: training the demo student first (a few minutes)")
        run_pipeline(recipe, ["train"], Console())
    ecfg = recipe.evaluate
    records = from_table(pq.read_table(run / "curate" / "test.parquet"))[: args.records]
    train = from_table(pq.read_table(run / "curate" / "train.parquet"))
    work = Path(tempfile.mkdtemp(prefix="distill-bench-export-"))
    master = work / "master"
    model, tok = load_trained_student(run / "train", merge=True)
    model.to(torch.bfloat16).save_pretrained(master, safe_serialization=True)
    tok.save_pretrained(master)
    calibration = [tok.apply_chat_template(training_messages(r), tokenize=False)
                   for r in random.Random(recipe.seed).sample(train, min(args.calibration, len(train)))]
    print(f"demo student: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(records)} test records, scratch folder {work}")
    del model

    def evaluate(m, label):
        t0 = time.perf_counter()
        with quantize.quiet():
            rows, _ = evaluate_model(m, tok, records, ecfg, label=label, metric="auto")
        return rows, time.perf_counter() - t0

    base_rows, base_s = evaluate(quantize.load("master", master, "demo-student"), "master")
    base_q = sum(r["quality"] for r in base_rows) / len(base_rows)
    base_bytes = quantize.weight_bytes("master", master)
    table = [("master (bf16, baseline)", base_bytes, 1.0, base_q, 0.0, 1.0, 0.0, base_s, "")]
    for fmt in args.formats:
        out = work / fmt
        t0 = time.perf_counter()
        quantize.make(fmt, master, out, name="demo-student", dtype=torch.bfloat16, calibration=calibration,
                      max_length=recipe.train.max_length)
        make_s = time.perf_counter() - t0
        rows, eval_s = evaluate(quantize.load(fmt, out, "demo-student"), fmt)
        q = sum(r["quality"] for r in rows) / len(rows)
        agree = sum(a["prediction"] == b["prediction"] for a, b in zip(rows, base_rows, strict=True)) / len(rows)
        size = quantize.weight_bytes(fmt, out)
        points, ratio = 100 * (q - base_q), size / base_bytes
        max_lost, max_ratio = TARGETS[fmt]
        ok = -points <= max_lost + 1e-9 and (max_ratio is None or ratio <= max_ratio)
        target = f"<= {max_lost:g} pt" + (f", <= {max_ratio:g}x" if max_ratio else "")
        table.append((fmt, size, ratio, q, points, agree, make_s, eval_s, f"{target}: {'met' if ok else 'MISSED'}"))
        print(f"{fmt}: {size:,} bytes ({ratio:.3f}x), quality {100 * q:.2f} ({points:+.2f} points), "
              f"{100 * agree:.1f}% identical answers, made in {make_s:.1f}s, evaluated in {eval_s:.1f}s")

    head = ("| format | weight bytes | x bf16 master | quality | points vs master | identical answers | make s "
            "| eval s | target |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [f"| {n} | {b:,} | {r:.3f} | {100 * q:.2f} | {p:+.2f} | {100 * a:.1f}% | {m:.1f} | {e:.1f} | {t} |"
             for n, b, r, q, p, a, m, e, t in table]
    report = "\n".join([
        "# Export formats on the demo student", "",
        f"Command: `.venv/bin/python bench/export.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}  ",
        f"Student: runs/demo (recipes/demo.yaml), {len(records)} test records; quality = JSON field accuracy on "
        "JSON answers, exact match elsewhere, against the teacher (what the export stage compares); every "
        "format made from one bf16 master, evaluated with float32 compute on CPU; ratio = weight file bytes "
        "(safetensors or GGUF) / the bf16 master's.", "",
        head, *lines, "",
    ])
    print("\n" + head + "\n" + "\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
