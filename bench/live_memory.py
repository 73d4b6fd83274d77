"""Memory of reading serve-router's call logs for `distill live` / `distill ledger` (the hourly `--decide` reads
the decision's window, 14 days by default): each call as the log holds it (the baseline, what they kept before
2026-12-07) against the slim form they keep now (``export.route.ledger.slim``: timestamp, latency, function,
routing's counts and prices; no request, answer or signals).

    python bench/live_memory.py                # 50,000 calls, about 20 s
    python bench/live_memory.py --calls 200000

Each log line is a typical triage call (a 1.7 kB user turn, a short JSON answer). Peak Python allocations are
measured with ``tracemalloc`` around each read, both in this process, on the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, ahead of bench/ (bench/export.py)

from export.route.drift import read_logs  # noqa: E402
from export.route.ledger import routed_lines  # noqa: E402


def _line(now: datetime, i: int) -> str:
    msg = "Please triage this ticket: " + "lorem ipsum dolor sit amet " * 60
    return json.dumps({
        "id": f"chatcmpl-{i}", "timestamp": now.isoformat(), "status_code": 200, "latency_ms": 12.5,
        "request": {"model": "m", "messages": [{"role": "system", "content": "You triage tickets."},
                                               {"role": "user", "content": msg}], "metadata": {"function": "triage"}},
        "response": {"id": f"chatcmpl-{i}", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": '{"queue": "billing"}'}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 400, "completion_tokens": 8, "total_tokens": 408}},
        "routing": {"request_id": f"req-{i}", "route": "student", "phase": "after", "version": "v1", "lane": "serving",
                    "reasons": ["function triage enabled", "min_logprob -0.21 >= -1.0: the student answers"],
                    "signals": {"function": "triage", "input_tokens": 400, "min_logprob": -0.21},
                    "policy_sha256": "ab" * 32,
                    "cost": {"usd": 5e-05, "student_usd": 5e-05, "teacher_usd": 0.0, "teacher_only_usd": 0.00108,
                             "saved_usd": 0.00103, "student_tokens": [400, 8], "teacher_tokens": None,
                             "student_basis": "per request (evaluate)", "teacher_only_basis": "student tokens"}}},
    ) + "\n"


def _peak(fn) -> tuple[int, float, int]:
    """(calls read, seconds, peak bytes allocated while reading)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    lines, _ = fn()
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return len(lines), took, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=50_000)
    args = ap.parse_args()
    now = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        with open(logs / f"student-{now:%Y-%m-%d}.jsonl", "w") as fh:
            for i in range(args.calls):
                fh.write(_line(now, i))
        size = (logs / f"student-{now:%Y-%m-%d}.jsonl").stat().st_size
        base = _peak(lambda: read_logs(logs / "student-*.jsonl*"))
        slim = _peak(lambda: routed_lines(logs))
    assert base[0] == slim[0] == args.calls
    print(f"{args.calls:,} calls, {size / 2**20:.0f} MiB of log (Python {sys.version.split()[0]})\n")
    print("| read | peak MiB | bytes per call | seconds |")
    print("| --- | --- | --- | --- |")
    for name, (n, took, peak) in (("whole lines (baseline)", base), ("slim (now)", slim)):
        print(f"| {name} | {peak / 2**20:.0f} | {peak / n:,.0f} | {took:.1f} |")
    print(f"\nratio: {base[2] / slim[2]:.1f}x less memory per call; at 1M calls a day, a 14-day window holds "
          f"{slim[2] / slim[0] * 14e6 / 2**30:.1f} GiB (baseline {base[2] / base[0] * 14e6 / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
