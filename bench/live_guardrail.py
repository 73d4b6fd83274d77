"""The live loop's sequential tests, simulated: false rollbacks of a version that holds its floor, audits until a
real drop is caught, audits until a good candidate is promoted (docs/live.md).

    python bench/live_guardrail.py                   # about 10 s
    python bench/live_guardrail.py --append-results  # and append the table to bench/RESULTS.md

Audited answers are 0/1 (exact match) with a given true mean, 400 simulated streams per row, seed 0. The settings
are route.live's defaults: held-out quality 0.90, ``max_quality_drop`` 0.05 (floor 0.85), ``guardrail_alpha``
0.001 split over 4 tests (2 functions x quality, escalation), ``alpha`` 0.05 for promotion. Baselines, run in the
same process on the same streams: the same bet without the CUSUM restart (a plain test martingale, which must
first climb back from the low wealth a long good history leaves), and a fixed nightly test (one-sided z-test at
5 % on each night's 200 audits, the usual dashboard alert), which flaps.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, ahead of bench/ (bench/export.py)

from export.route.sequential import bet, expected_delay  # noqa: E402

FLOOR, DELTA, G_ALPHA, P_ALPHA, STREAMS, CAP = 0.85, 0.05, 0.001 / 4, 0.05, 400, 40_000


def _run_lengths(p: float, history: int = 0, history_p: float = 0.95, cusum: bool = True, side: str = "below",
                 alpha: float = G_ALPHA, seed: int = 0) -> np.ndarray:
    """Audits after ``history`` good ones until the test decides (CAP when it never does), per stream."""
    rng = np.random.default_rng(seed)
    lam = float(bet(FLOOR, side, DELTA))
    sign = 1 if side == "below" else -1
    up, down = math.log1p(sign * lam * FLOOR), math.log1p(sign * lam * (FLOOR - 1))  # x = 0, x = 1
    thr = math.log(1 / alpha)
    s = np.zeros(STREAMS)
    for _ in range(history):
        s = (np.maximum(s, 0) if cusum else s) + np.where(rng.random(STREAMS) < history_p, down, up)
    out = np.full(STREAMS, CAP)
    live = np.ones(STREAMS, dtype=bool)
    for t in range(CAP):
        s = (np.maximum(s, 0) if cusum else s) + np.where(rng.random(STREAMS) < p, down, up)
        hit = live & (s >= thr)
        out[hit], live = t + 1, live & ~hit
        if not live.any():
            break
    return out


def _nightly_false_alarms(p: float, nights: int = 100, per_night: int = 200, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    means = rng.binomial(per_night, p, size=(STREAMS, nights)) / per_night
    z = (means - FLOOR) / math.sqrt(FLOOR * (1 - FLOOR) / per_night)
    return float((z < -1.645).any(axis=1).mean())


def _fmt(x: np.ndarray) -> str:
    capped = (x >= CAP).mean()
    if capped > 0.5:
        return f"> {CAP:,} ({100 * capped:.0f} % never)"
    return f"{np.median(x):,.0f} (p90 {np.quantile(x, 0.9):,.0f})"


def table() -> str:
    rows = ["| true audited quality | what | CUSUM e-detector (ours) | plain test martingale | nightly z-test |",
            "| --- | --- | --- | --- | --- |"]
    for p in (0.87, 0.85):
        rows.append(f"| {p:.2f} ({'at' if p == FLOOR else 'holds'} its floor) | audits until a false rollback, median | "
                    f"{_fmt(_run_lengths(p))} "
                    f"| {_fmt(_run_lengths(p, cusum=False))} | {100 * _nightly_false_alarms(p):.0f} % of versions "
                    f"rolled back within 100 nights |")
    for p in (0.80, 0.75, 0.65):
        ours, plain = _run_lengths(p, history=5000), _run_lengths(p, history=5000, cusum=False)
        rows.append(f"| {p:.2f} after 5,000 audits at 0.95 | audits until the drop is caught | {_fmt(ours)} "
                    f"(approx. {expected_delay(FLOOR, p, 'below', G_ALPHA, DELTA):,.0f}) | {_fmt(plain)} | "
                    f"next night (200 audits), but see the false alarms |")
    for p in (0.90, 0.95):
        ev = _run_lengths(p, cusum=False, side="above", alpha=P_ALPHA)
        rows.append(f"| {p:.2f} (a good candidate) | audits until promotion evidence | {_fmt(ev)} "
                    f"(approx. {expected_delay(FLOOR, p, 'above', P_ALPHA, DELTA):,.0f}) | (the same test) | - |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append-results", action="store_true")
    args = ap.parse_args()
    out = table()
    print(out)
    if args.append_results:
        path = Path(__file__).with_name("RESULTS.md")
        head = ("\n## Live loop: the sequential tests (`bench/live_guardrail.py`)\n\n"
                f"0/1 audits, {STREAMS} simulated streams per row, seed 0; floor {FLOOR} (held-out 0.90 - 0.05); "
                f"guardrail alpha {G_ALPHA:g} per test, promotion alpha {P_ALPHA}. Medians (90th percentiles).\n\n")
        path.write_text(path.read_text() + head + out + "\n")


if __name__ == "__main__":
    main()
