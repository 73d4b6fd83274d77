"""Benchmark of the curate stage: N canonical records (default 1M) from the demo traffic generator through the
default chain, records/s per operator and in total, peak memory, next to a plain datasketch MinHash baseline of
near-duplicate removal run in the same process.

    .venv/bin/python bench/curate.py                        # 1M records, datasets executor on all cores
    .venv/bin/python bench/curate.py --records 200000 --executor inprocess

Steps: write N log lines over several days (curation.harvest.demo_traffic), harvest them (not timed here; see
bench/harvest.py), run `distill curate` in a child process while sampling the memory of its process tree, read
the per-operator counts and timings from report.json, then time near-duplicate removal on a sample of the
curated user turns with datasketch (MinHash + MinHashLSH, the same shingles, threshold and bands) and with ours.
Results go to stdout and bench/results/curate.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.curate.dedup import SKETCH_CHUNK, band_keys, lsh_params, near_dedup, rank, signatures  # noqa: E402
from curation.curate.index import REDUCE_SCHEMA  # noqa: E402
from pipeline.config.curate import NearDedup  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}


SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ra", "ti", "po", "ve", "da", "zu", "fi", "go", "he", "ju", "be", "co",
             "xa", "wy", "qe", "an", "or", "el", "is"]


def _vocab(rng: random.Random, n: int = 5000) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def synth_lines(n: int, day: str, seed: int = 0) -> list[str]:
    """n OpenAI chat-completions log lines for one day, shaped like production support traffic: the demo's two
    functions, system prompts, response_format schema and teacher answers, but user turns with their own details
    (so most are unique), 12% client retries (exact duplicates), 4% small edits of earlier tickets (near
    duplicates), e-mail addresses and phone numbers in 14% of tickets, order numbers of 5 to 9 digits in half of
    them, a few API keys, and the demo's rates of HTTP errors, empty, cut-off and refused outputs and negative
    feedback."""
    from curation.harvest import demo_traffic as d

    rng = random.Random(f"bench-{seed}-{day}")
    vocab = _vocab(random.Random(seed))
    start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
    history: list[tuple[dict, str]] = []
    lines = []
    for i in range(n):
        roll = rng.random()
        if history and roll < 0.12:  # the client retried
            body, out = rng.choice(history)
            body = json.loads(json.dumps(body))
        elif history and roll < 0.16:  # the same ticket again with a small edit
            body, out = rng.choice(history)
            body = json.loads(json.dumps(body))
            words = body["messages"][-1]["content"].split(" ")
            k = rng.randrange(len(words))
            words[k] = words[k][:-1] + "x" if len(words[k]) > 2 else words[k]
            body["messages"][-1]["content"] = " ".join(words)
        else:
            order = (f" (order #{rng.randint(10, 99)}{rng.randint(0, 10 ** rng.randint(3, 7))})"
                     if rng.random() < 0.5 else "")
            detail = (f"I ordered it {rng.choice(['last week', 'on Monday', 'in March', 'yesterday', 'today'])}"
                      f"{order} and " + " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 18))) + ".")
            if rng.random() < 0.65:
                intent, priority, p = rng.choice(list(d.INTENTS)), rng.choice(["low", "medium", "high"]), \
                    rng.choice(list(d.PRODUCTS))
                parts = [rng.choice(d.GREETINGS), rng.choice(d.INTENTS[intent]).format(p=p), detail,
                         rng.choice(d.URGENCY[priority])]
                name = rng.choice(d.NAMES)
                r = rng.random()
                if r < 0.08:
                    parts.append(f"Mail me at {name.lower()}.{rng.randint(10, 9999)}@{rng.choice(d.DOMAINS)}.")
                elif r < 0.14:
                    parts.append(f"Call me at +1 {rng.randint(200, 999)}-555-{rng.randint(1000, 9999)}.")
                elif r < 0.1405:
                    parts.append(f"Our key is sk-proj-{''.join(rng.choice('abcdefghijkLMNOP0123456789') for _ in range(32))}.")
                parts.append(rng.choice([f"Thanks, {name}", f"Regards, {name}", name, ""]))
                body = {"model": "gpt-4o", "temperature": 0, "response_format": d.TRIAGE_SCHEMA,
                        "messages": [{"role": "system", "content": d.TRIAGE_SYSTEM},
                                     {"role": "user", "content": " ".join(x for x in parts if x)}],
                        "metadata": {"function": "ticket_triage"}}
                out = json.dumps({"intent": intent, "priority": priority, "product": p})
            else:
                topic, p = rng.choice(list(d.FAQ_QUESTIONS)), rng.choice(list(d.PRODUCTS))
                q = " ".join(x for x in (rng.choice(d.FAQ_OPENERS), rng.choice(d.FAQ_QUESTIONS[topic]).format(p=p),
                                         detail, rng.choice(d.FAQ_CLOSERS)) if x)
                body = {"model": "gpt-4o", "temperature": 0.2, "max_tokens": 60,
                        "messages": [{"role": "system", "content": d.FAQ_SYSTEM}, {"role": "user", "content": q}],
                        "metadata": {"function": "product_faq"}}
                out = d.faq_answer(topic, p)
            history.append((body, out))
            if len(history) > 5000:
                history.pop(0)
        ts = start + timedelta(seconds=int(i * 86400 / n))
        status, out, finish, r = d.teacher_outcome(rng, out)
        feedback = {"thumbs_up": 0} if 0.075 <= r < 0.095 else None
        if feedback is None and rng.random() < 0.3:
            feedback = {"thumbs_up": 1}
        line = {"id": f"b{day.replace('-', '')}_{i:07d}", "timestamp": ts.isoformat().replace("+00:00", "Z"),
                "status_code": status, "latency_ms": 500, "request": body}
        if status == 200:
            line["response"] = {"model": d.TEACHER, "choices": [{"index": 0, "finish_reason": finish, "message": {
                "role": "assistant", "content": out}}], "usage": {"prompt_tokens": 80, "completion_tokens": 20}}
        else:
            line["response"] = {"error": {"message": f"HTTP {status}", "type": "server_error"}}
        if feedback:
            line["feedback"] = feedback
        lines.append(json.dumps(line))
    return lines


def make_project(root: Path, records: int, days: int, executor: str) -> Path:
    (root / "logs").mkdir(parents=True, exist_ok=True)
    per_day = records // days
    for k in range(days):
        n = per_day + (records - per_day * days if k == 0 else 0)
        with gzip.open(root / "logs" / f"2026-10-{k + 1:02d}.jsonl.gz", "wt", compresslevel=1) as f:
            f.write("\n".join(synth_lines(n, f"2026-10-{k + 1:02d}")) + "\n")
    recipe = {
        "name": "bench", "run_dir": str(root / "runs"),
        "harvest": {"sources": [{"format": "openai", "path": str(root / "logs" / "*.jsonl.gz")}]},
        "curate": {"feedback": {"metric": "thumbs_up", "min_value": 0.5}, "executor": {"kind": executor}},
        "train": {"student": {"from_config": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}}},
        "evaluate": {"teacher_price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
                     "student_price": {"usd_per_hour": 0.1}},
        "export": {"model_name": "bench"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_measured(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak memory of the process tree, peak RSS of the main process) of a command. The tree's
    memory is the sum of PSS (proportional set size), so pages forked workers share are counted once."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_tree = peak_main = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree, peak_main
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                main = p.memory_info().rss
                tree = sum(q.memory_full_info().pss for q in [p, *p.children(recursive=True)])
                peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
            except psutil.Error:
                pass
            time.sleep(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peak_tree, peak_main


def byte_shingles(text: str, k: int) -> list[bytes]:
    """The shingles ours hashes: k-byte windows of the lower-cased text without whitespace."""
    data = "".join(text.lower().split()).encode()
    return [data[i:i + k] for i in range(len(data) - k + 1)] or [data]


def datasketch_near_dedup(texts: list[str], functions: list[str], cfg: NearDedup) -> tuple[set[int], set[int], float]:
    """The plain datasketch way: one MinHash per record over the same shingles, MinHashLSH with the same bands,
    candidates verified by estimated Jaccard, clusters by union-find; returns (dropped rows, rows in a cluster of
    two or more, seconds)."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    bands, rows = lsh_params(cfg)
    hashes = []
    for t in texts:
        m = MinHash(num_perm=bands * rows, seed=cfg.seed)
        m.update_batch(byte_shingles(t, cfg.ngram))
        hashes.append(m)
    parent = list(range(len(texts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_function: dict[str, MinHashLSH] = {}
    for i, (m, f) in enumerate(zip(hashes, functions, strict=True)):
        lsh = by_function.setdefault(f, MinHashLSH(num_perm=bands * rows, params=(bands, rows)))
        for j in lsh.query(m):
            if m.jaccard(hashes[j]) >= cfg.threshold:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        lsh.insert(i, m)
    clusters: dict[int, list[int]] = {}
    for i in range(len(texts)):
        clusters.setdefault(find(i), []).append(i)
    dropped = {i for members in clusters.values() for i in members[1:]}
    clustered = {i for members in clusters.values() if len(members) > 1 for i in members}
    return dropped, clustered, time.perf_counter() - t0


def signature_rates(texts: list[str], cfg: NearDedup) -> tuple[float, float, float]:
    """Per second: LSH band keys from our sketch, rensa signatures as Python rows (what band keys from rensa would
    need), datasketch MinHash.bulk; same shingles and permutations."""
    from datasketch import MinHash

    bands, rows = lsh_params(cfg)
    arr = pa.array(texts, pa.string())
    t0 = time.perf_counter()
    band_keys(arr, cfg)
    sketch_rate = len(texts) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for s in range(0, len(texts), SKETCH_CHUNK):
        signatures(arr.slice(s, SKETCH_CHUNK), cfg, bands * rows).to_rows()
    rensa_rate = len(texts) / (time.perf_counter() - t0)
    sample = texts[:20_000]
    shingled = [byte_shingles(t, cfg.ngram) for t in sample]
    t0 = time.perf_counter()
    MinHash.bulk(shingled, num_perm=bands * rows, seed=cfg.seed)
    return sketch_rate, rensa_rate, len(sample) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--executor", default="datasets", choices=["inprocess", "datasets", "ray", "auto"])
    ap.add_argument("--baseline-records", type=int, default=50_000, help="records for the datasketch comparison")
    ap.add_argument("--keep", help="keep the project in this folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "curate.md"))
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-curate-"))
    root.mkdir(parents=True, exist_ok=True)
    distill = [sys.executable, "-m", "pipeline.cli"]
    print(f"building {args.records:,} log lines in {root} ...", flush=True)
    t0 = time.perf_counter()
    recipe = make_project(root, args.records, args.days, args.executor)
    build_s = time.perf_counter() - t0
    harvest_s, _, _ = run_measured([*distill, "harvest", str(recipe)])
    print(f"harvested in {harvest_s:.1f}s; curating with {args.executor} ...", flush=True)
    curate_s, peak_tree, peak_main = run_measured([*distill, "curate", str(recipe)])
    load = os.getloadavg()
    report = json.loads((root / "runs" / "bench" / "curate" / "report.json").read_text())
    n_in = report["records_in"]

    # near-duplicate removal: ours and plain datasketch on the same sample of curated user turns
    index = pa.concat_tables([pq.read_table(p, schema=REDUCE_SCHEMA)
                              for p in sorted((root / "runs" / "bench" / "curate" / "index").glob("part-*.parquet"))])
    sample = index.slice(0, min(args.baseline_records, index.num_rows))
    cfg = NearDedup()
    alive = np.ones(sample.num_rows, dtype=bool)
    t0, c0 = time.perf_counter(), time.process_time()
    ours = near_dedup(sample, alive, rank(sample), cfg)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    row_of = {rid: i for i, rid in enumerate(sample.column("id").to_pylist())}
    ours_clustered = set(ours) | {row_of[r.split(" ")[2]] for r in ours.values()}
    texts = sample.column("text").to_pylist()
    c0 = time.process_time()
    theirs, theirs_clustered, theirs_s = datasketch_near_dedup(texts, sample.column("function").to_pylist(), cfg)
    theirs_cpu = time.process_time() - c0
    agree = len(ours_clustered & theirs_clustered) / max(1, len(ours_clustered | theirs_clustered))
    sketch_rate, rensa_rate, ds_rate = signature_rates(texts, cfg)

    rows = []
    for name, op in report["operators"].items():
        rows.append((name, op["phase"], op["in"], op["dropped"], op["seconds"], op["cpu_seconds"],
                     f"{op['records_per_s']:,}" if op["records_per_s"] else "-",
                     f"{op['records_per_cpu_s']:,}" if op["records_per_cpu_s"] else "-"))
    stage_s = report["seconds"]
    ph = report.get("phases_seconds", {})
    cpu_bound = sum(v["cpu"] / (2 if name.startswith("per-record") else 1) for name, v in ph.items()) or stage_s
    total_rate = n_in / stage_s
    near = report["operators"].get("near_dedup", {})
    keys_cpu = near.get("of_which_band_keys_cpu_seconds", 0.0)
    near_2core = near.get("in", 0) / max(keys_cpu / 2 + near.get("cpu_seconds", 0) - keys_cpu, 1e-9)
    lines = [
        f"# curate benchmark: {n_in:,} records, executor `{report['executor']}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"command: `.venv/bin/python bench/curate.py --records {args.records} --executor {args.executor}`.",
        "Data: bench.curate.synth_lines (the demo traffic's functions, prompts, schemas and answers; user turns "
        "with their own details; 12% retries, 4% edited resends, PII in 14% of tickets, order numbers in half) "
        f"over {args.days} days (built in {build_s:.0f}s, harvested in {harvest_s:.0f}s, not counted below).",
        "",
        "| operator | phase | records in | dropped | wall s | CPU s | records/s (wall) | records per CPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]:,} | {r[4]:.2f} | {r[5]:.2f} | {r[6]} | {r[7]} |" for r in rows],
        "",
        "Per-record operators' seconds are summed over the worker processes; global operators run once, in the "
        "stage's process. Wall seconds include waiting for a CPU while other jobs run (see the load average).",
        "",
        "| whole stage | value |",
        "| --- | ---: |",
        f"| records in / kept / rejected | {n_in:,} / {report['kept']:,} / {report['rejected']:,} |",
        f"| stage wall time (report.json) | {stage_s:.1f} s |",
        *[f"| - {name}: wall / CPU | {v['wall']:.1f} s / {v['cpu']:.1f} s |"
          for name, v in report.get("phases_seconds", {}).items()],
        f"| **records/s, whole default chain** | **{total_rate:,.0f}** (target 20,000) |",
        f"| CPU-bound estimate on 2 idle cores (per-record CPU / 2 + the rest) | {n_in / cpu_bound:,.0f} records/s |",
        f"| load average while it ran (other jobs share these 2 cores) | {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) |",
        f"| process wall time (imports, startup included) | {curate_s:.1f} s ({n_in / curate_s:,.0f} records/s) |",
        f"| peak RSS, stage process | {peak_main / 2**20:,.0f} MiB |",
        f"| peak memory, process tree (workers included; PSS) | {peak_tree / 2**20:,.0f} MiB |",
        "| of which imports alone (presidio pulls in torch and transformers) | about 550 MiB per process |",
        "",
        f"Near-duplicate removal, {sample.num_rows:,} curated user turns (5-byte shingles, threshold 0.8, "
        f"{lsh_params(cfg)[0]} bands x {lsh_params(cfg)[1]} rows):",
        "",
        "| near-duplicate removal | wall s | records/s | CPU s | records per CPU s | dropped |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| ours (band keys from a numpy one-permutation sketch; rensa MinHash verifies candidates) | {ours_s:.2f} | "
        f"{sample.num_rows / ours_s:,.0f} | {ours_cpu:.2f} | {sample.num_rows / ours_cpu:,.0f} | {len(ours):,} |",
        f"| baseline: plain datasketch MinHash + MinHashLSH | {theirs_s:.2f} | {sample.num_rows / theirs_s:,.0f} | "
        f"{theirs_cpu:.2f} | {sample.num_rows / theirs_cpu:,.0f} | {len(theirs):,} |",
        f"| **ratio (ours / datasketch)** | | **{theirs_s / ours_s:.1f}x** | | **{theirs_cpu / ours_cpu:.1f}x** | |",
        f"| records in a duplicate cluster: ours / datasketch / Jaccard of the two sets | | | | | "
        f"{len(ours_clustered):,} / {len(theirs_clustered):,} / {agree:.3f} |",
        f"| in the stage: all {near.get('in', 0):,} records reaching it (CPU: band keys in the per-record half "
        f"{keys_cpu:.1f} s + global {near.get('cpu_seconds', 0) - keys_cpu:.1f} s) | {near.get('seconds', 0):.2f} "
        f"(global part) | | {near.get('cpu_seconds', 0):.2f} | {near.get('records_per_cpu_s') or 0:,} | "
        f"{near.get('dropped', 0):,} |",
        f"| **in the stage, on 2 idle cores** (band keys CPU / 2 + global CPU) | | **{near_2core:,.0f}** "
        f"(target 100,000) | | | |",
        "",
        f"Band keys alone, one process: our sketch {sketch_rate:,.0f} records/s; rensa's signatures as Python rows "
        f"(to_rows, its only export, which band keys from rensa need) {rensa_rate:,.0f}/s; ratio "
        f"**{sketch_rate / rensa_rate:.1f}x**. datasketch MinHash.bulk: {ds_rate:,.0f}/s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
