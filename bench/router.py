"""Router throughput: routing decisions per second on the held-out requests of a run, per set of signals.

    python bench/router.py [RUN_DIR]        # default runs/demo (needs its route stage: bash scripts/demo.sh)

Each request is decided in both phases (before generation, then after it on the student's logprobs with top-k),
the way serve-router does. The baseline, run in the same process, is the first Router's algorithm: every
message tokenized on every request and the lowest token logprob. Prints a table and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from export.route.router import Router  # noqa: E402


def requests_of(run: Path) -> list[tuple[dict, list]]:
    """(request, OpenAI logprobs.content) for every held-out record, as serve-router sees them."""
    test = {r["id"]: r for r in pq.read_table(run / "curate" / "test.parquet", columns=["id", "messages"]).to_pylist()}
    out = []
    for h in pq.read_table(run / "route" / "heldout.parquet").to_pylist():
        msgs = [{"role": m["role"], "content": m["content"]} for m in test[h["id"]]["messages"]]
        tops = h["top_logprobs"] or [[] for _ in h["logprobs"]]
        lp = [{"logprob": c, "top_logprobs": [{"logprob": x} for x in t]} for c, t in zip(h["logprobs"], tops, strict=True)]
        out.append(({"messages": msgs, "metadata": {"function": h["function"]}}, lp))
    return out


def measure(router: Router, reqs, min_seconds: float, max_decisions: int | None = None) -> tuple[float, int]:
    """Decisions per second (a decision = phase 1, plus phase 2 when phase 1 said student)."""
    n, start = 0, time.perf_counter()
    while True:
        for req, lp in reqs:
            d = router.before(req)
            if d.to_student:
                router.after(req, lp, before=d)
            n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or (max_decisions and n >= max_decisions):
            return n / elapsed, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default="runs/demo", help="run directory with a route stage")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum time per configuration")
    ap.add_argument("--embeddings", action="store_true", help="also time the MiniLM distance rule (torch)")
    args = ap.parse_args()
    run = Path(args.run)
    policy_path = run / "route" / "routing_policy.json"
    policy = json.loads(policy_path.read_text())
    reqs = requests_of(run)
    full = Router.load(policy_path, language=True, embeddings=args.embeddings)
    encode = full.encode

    # Baseline: the first Router's algorithm (v1 policy: function, exact length, min logprob).
    v1 = {"schema": "distill-routing/v1", "functions": {
        fn: {"enabled": f["enabled"], "why": f.get("why", ""), "max_input_tokens": f["before"]["max_input_tokens"],
             "confidence": {"signal": "min_token_logprob", "threshold": f["after"]["threshold"]
                            if f["after"]["signal"] == "min_logprob" else -1.0}}
        for fn, f in policy["functions"].items()}}
    baseline = Router(v1, encode)
    baseline.counter.cache_size = 0  # v1 tokenized every message of every request

    def variant(count: str, language: bool, distance: bool) -> Router:
        p = {**policy, "length": {"count": count}}
        return Router(p, encode, language=full.language if language else None,
                      embed=full.embed if distance else None, reference=full.reference if distance else None,
                      skip=tuple(s for s, on in (("language", language), ("distance", distance)) if not on))

    configs = [
        ("baseline: v1 Router (every message tokenized, min logprob)", baseline, None),
        ("function + length (estimate) + confidence", variant("estimate", False, False), None),
        ("function + length (bounded: tokenized near the limit) + confidence", variant("bounded", False, False), None),
        ("function + length (exact, cached system prompt) + confidence", variant("exact", False, False), None),
        ("+ language (fastText lid.176)", variant("estimate", True, False), None),
    ]
    if args.embeddings:
        configs.append(("+ language + distance (MiniLM kNN, one request at a time)", variant("estimate", True, True),
                        2 * len(reqs)))
    table = Table(title=f"Router decisions on {len(reqs)} held-out requests of {run} (before + after phases)",
                  title_justify="left")
    for col in ("signals", "decisions/s", "µs/decision", "vs baseline"):
        table.add_column(col, justify="left" if col == "signals" else "right")
    base = None
    for name, router, cap in configs:
        measure(router, reqs[:50], 0.2)  # warm caches and code paths
        rate, n = measure(router, reqs, args.seconds, cap)
        base = base or rate
        table.add_row(name, f"{rate:,.0f}", f"{1e6 / rate:.1f}", f"{rate / base:.2f}x")
    share = sum(full.after(r, lp).to_student for r, lp in reqs) / len(reqs)
    Console().print(table)
    print(f"student share of these requests with every loaded rule: {share:.1%}; cpu: {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share them: compare ratios, not rates)")


if __name__ == "__main__":
    main()
