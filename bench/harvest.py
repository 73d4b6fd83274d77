"""Benchmark: `distill harvest` on 1M OpenAI chat-completions log lines, next to naive loops, in the same run.

    .venv/bin/python bench/harvest.py                      # 1,000,000 lines (several minutes on 2 cores)
    .venv/bin/python bench/harvest.py --lines 200000       # quicker

The log lines are the demo traffic (realistic calls, with its truncated lines, errors and health checks) repeated
with unique ids. Every run is a separate process, timed end to end, with the peak resident memory of its whole
process tree (workers included) sampled every 20 ms. Baselines:

- json.loads loop: ``for line in file: json.loads(line)`` -- parsing only, nothing mapped or written;
- naive harvester: json.loads per line, the importer's mapping to dicts, ``pa.Table.from_pylist`` and a Parquet
  file per 50,000 records -- what harvest did before it was made fast.

Prints a table and the ratios, and writes bench/results/harvest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JSON_LOADS = """
import json, sys
good = bad = 0
with open(sys.argv[1], "rb") as f:
    for line in f:
        if not line.strip():
            continue
        try:
            json.loads(line)
            good += 1
        except ValueError:
            bad += 1
print(good)
"""

NAIVE = """
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
from curation.harvest.importers.openai import BadRecord, parse_openai
from pipeline.record import RECORD_SCHEMA

def write(batch, part):
    rows = [{**r, "feedback": list(r["feedback"].items()), "tags": list(r["tags"].items())} for r in batch]
    pq.write_table(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), f"{sys.argv[2]}/naive-{part:05d}.parquet",
                   compression="zstd")

batch, part, n = [], 0, 0
with open(sys.argv[1], "rb") as f:
    for i, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            batch.extend(parse_openai(json.loads(line), f"traffic.jsonl:{i}"))
        except (ValueError, BadRecord):
            continue
        if len(batch) >= 50_000:
            n += len(batch); write(batch, part); part += 1; batch = []
n += len(batch); write(batch, part)
print(n)
"""


def write_logs(path: Path, lines: int) -> int:
    """The demo traffic, repeated with unique ids and later timestamps, to ``lines`` lines; returns the byte size."""
    from curation.harvest.demo_traffic import generate

    templates = generate(3000, "2026-11-23") + generate(3000, "2026-11-24", seed=1)
    with open(path, "w") as f:
        for i in range(lines):
            t = templates[i % len(templates)]
            if t.startswith('{"id": "req_'):
                end = t.index('"', 8)
                t = f'{{"id": "bench_{i:08d}' + t[end:]
            f.write(t + "\n")
    return path.stat().st_size


def measure(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict:
    """Run a command; wall time, CPU time and peak RSS of its process tree (workers included), stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    cpu: dict[int, float] = {}  # latest CPU seconds of every process seen in the tree
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            rss = 0
            try:
                for q in [p, *p.children(recursive=True)]:
                    with q.oneshot():
                        rss += q.memory_info().rss
                        t = q.cpu_times()
                        cpu[q.pid] = t.user + t.system
            except psutil.Error:
                pass
            peak = max(peak, rss)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}\n{err[-3000:]}")
    return {"seconds": seconds, "cpu_s": sum(cpu.values()), "peak_mb": peak / 2**20, "stdout": out}


def harvest(work: Path, name: str, log: Path, workers: int) -> dict:
    import yaml

    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": name, "run_dir": str(work / "runs"),
        "harvest": {"sources": [{"path": str(log)}], "workers": workers},
        "train": {"student": {"from_config": {}}},
        "evaluate": {"teacher_price": {"input_per_mtok": 1, "output_per_mtok": 1},
                     "student_price": {"usd_per_hour": 1}},
        "export": {"store": str(work / "store"), "model_name": "x"},
    }))
    code = "import sys; from pipeline.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    m = measure([sys.executable, "-c", code, "harvest", str(recipe)], work, env)
    manifest = json.loads((work / "runs" / name / "harvest" / "manifest.json").read_text())
    m["records"] = manifest["counts"]["records"]
    m["quarantined"] = manifest["counts"]["quarantined"]
    m["duplicates"] = manifest["counts"]["duplicates"]
    m["workers"] = manifest["counts"]["this_run"]["workers"]
    m["stage_s"] = manifest["duration_s"]
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "harvest.md"))
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        work = Path(tmp)
        log, small = work / "traffic.jsonl", work / "quarter.jsonl"
        size = write_logs(log, args.lines)
        write_logs(small, args.lines // 4)
        print(f"{args.lines:,} lines, {size / 2**20:,.0f} MiB; {os.cpu_count()} CPU cores", flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        rows = []
        loads = measure([sys.executable, "-c", JSON_LOADS, str(log)], work, env)
        rows.append(("json.loads loop (parse only)", int(loads["stdout"]), loads))
        print(f"  json.loads loop: {loads['seconds']:.1f}s", flush=True)
        (work / "naive").mkdir()
        naive = measure([sys.executable, "-c", NAIVE, str(log), str(work / "naive")], work, env)
        rows.append(("naive harvester (json.loads + dicts + from_pylist)", int(naive["stdout"]), naive))
        print(f"  naive harvester: {naive['seconds']:.1f}s", flush=True)
        runs = {}
        for label, name, path, workers in [("distill harvest, no worker processes (workers: 1)", "inline", log, 1),
                                           ("distill harvest (workers: auto)", "auto", log, 0),
                                           ("distill harvest (workers: auto), 1/4 of the lines", "quarter", small, 0)]:
            m = harvest(work, name, path, workers)
            runs[name] = m
            rows.append((f"{label} [{m['workers']} process{'es' if m['workers'] > 1 else ''}]", m["records"], m))
            print(f"  {label}: {m['seconds']:.1f}s ({m['stage_s']:.1f}s in the stage)", flush=True)

    base_loads = rows[0][1] / rows[0][2]["seconds"]
    base_naive = rows[1][1] / rows[1][2]["seconds"]
    cpu_loads = rows[0][1] / rows[0][2]["cpu_s"]
    cpu_naive = rows[1][1] / rows[1][2]["cpu_s"]
    table = ["| run | records | wall s | records/s | vs json.loads loop | vs naive harvester | CPU s | records per "
             "CPU-s | vs json.loads loop (CPU) | vs naive harvester (CPU) | peak RSS (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, n, m in rows:
        rate, crate = n / m["seconds"], n / m["cpu_s"]
        table.append(f"| {label} | {n:,} | {m['seconds']:.1f} | {rate:,.0f} | {rate / base_loads:.2f}x | "
                     f"{rate / base_naive:.2f}x | {m['cpu_s']:.1f} | {crate:,.0f} | {crate / cpu_loads:.2f}x | "
                     f"{crate / cpu_naive:.2f}x | {m['peak_mb']:,.0f} |")
    best = runs["auto"]
    rate = best["records"] / best["seconds"]
    verdict = [
        f"- `distill harvest` (workers: auto): **{rate:,.0f} records/s** end to end (process start, fingerprint "
        f"hashing and Parquet writing included), **{rate / base_loads:.2f}x** the bare json.loads loop and "
        f"**{rate / base_naive:.2f}x** the naive harvester; target >= 50,000/s and >= 3x. Per CPU-second (what the "
        f"cores actually gave each run on this shared machine): {best['records'] / best['cpu_s']:,.0f} records, "
        f"{best['records'] / best['cpu_s'] / cpu_loads:.2f}x the json.loads loop, "
        f"{best['records'] / best['cpu_s'] / cpu_naive:.2f}x the naive harvester.",
        f"- Peak memory of the whole process tree: {best['peak_mb']:,.0f} MiB for {args.lines:,} lines, "
        f"{runs['quarter']['peak_mb']:,.0f} MiB for a quarter of them (target < 2,048 MiB, flat in file size).",
        f"- {best['quarantined']:,} lines quarantined (the demo traffic's truncated lines and health checks), "
        f"{best['duplicates']:,} duplicates dropped.",
    ]
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} CPU cores, "
              f"Python {platform.python_version()}; {args.lines:,} lines ({size / 2**20:,.0f} MiB). Load average "
              f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after (other work shared the cores: absolute "
              "figures vary from run to run, the ratios less).")
    text = "\n".join(["# harvest benchmark", "", "Command: `.venv/bin/python bench/harvest.py"
                      + (f" --lines {args.lines}" if args.lines != 1_000_000 else "") + "`", "", header, "",
                      *table, "", *verdict, ""])
    print()
    print("\n".join(table))
    print()
    print(textwrap.fill(" ".join(verdict), 110))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = out.read_text().partition("\n## Assessment")[1:] if out.is_file() else ()
    out.write_text(text + "".join(notes))  # hand-written notes under '## Assessment' are kept
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
