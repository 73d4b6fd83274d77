"""Sequential tests on a stream of live scores in [0, 1] (audited answer quality, or 1/0 for "escalated"), valid
whenever they are looked at: the nightly job may check every hour, and stop the moment a test decides.

Both are built from the betting (test) martingale of Waudby-Smith & Ramdas for bounded observations: with a
bound b and a bet lambda, each observation x multiplies the wealth by ``1 + lambda * d``, d = b - x to bet that the
mean is *below* b, d = x - b to bet that it is *above*. When the mean is really on the other side of b, every
factor has expectation <= 1, so the wealth is a non-negative supermartingale and, by Ville's inequality, it ever
reaches 1/alpha with probability at most alpha.

- ``evidence`` (promotion): the wealth from the first observation on; reaching 1/alpha is evidence, at level
  alpha, that the mean is above the floor. It only grows when the data keep saying so, so a lucky hour cannot
  promote a version alone: the evidence has to add up across all its audits.
- ``detector`` (rollback): the CUSUM form, ``S = max(0, S) + log(1 + lambda * d)`` (an e-detector, Shin, Ramdas
  and Rinaldo 2023): the log-wealth of the best bet started at any past time. A version that holds its floor
  drives S back to 0 after every bad hour, and the mean number of observations between false alarms is at least
  1/alpha; a real drop makes S grow by ``E[log(1 + lambda * d)]`` per observation, so it is caught within about
  ``log(1/alpha) / E[log(1 + lambda * d)]`` audited requests (``expected_delay``), however long the good
  history before it.

The bet is sized for a shift of ``delta`` past the bound (lambda = delta / (v + delta^2), v = b(1 - b), the
largest variance a score with mean b can have), clipped to half of what keeps every factor positive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Outcome:
    decided: bool  # evidence reached / alarm raised
    statistic: float  # log-wealth now (detector: the CUSUM statistic; evidence: the largest log-wealth so far)
    threshold: float  # log(1 / alpha)
    n: int  # observations used
    at: int | None  # index of the observation at which it decided (None: not decided)

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {"decided": self.decided, "statistic": round(self.statistic, 4), "threshold": round(self.threshold, 4),
                "n": self.n, "at": self.at}


def bet(bound: np.ndarray | float, side: str, delta: float) -> np.ndarray:
    """The bet per observation for bounds ``bound`` (array or scalar), betting the mean is ``side`` of them."""
    b = np.clip(np.asarray(bound, dtype=np.float64), 1e-6, 1 - 1e-6)
    lam = delta / (b * (1 - b) + delta * delta)
    worst = (1 - b) if side == "below" else b  # the largest |d| against the bet
    return np.minimum(lam, 0.5 / worst)


def _log_factors(xs: Sequence[float], bound: Sequence[float] | float, side: str, delta: float) -> np.ndarray:
    if side not in ("below", "above"):
        raise ValueError(f"side must be 'below' or 'above', not {side!r}")
    x = np.asarray(xs, dtype=np.float64)
    if x.size and (np.isnan(x).any() or x.min() < 0 or x.max() > 1):
        raise ValueError("observations must be numbers in [0, 1]")
    b = np.broadcast_to(np.asarray(bound, dtype=np.float64), x.shape)
    d = (b - x) if side == "below" else (x - b)
    return np.log1p(bet(b, side, delta) * d)


def evidence(xs: Sequence[float], bound: Sequence[float] | float, side: str = "above", alpha: float = 0.01,
             delta: float = 0.05) -> Outcome:
    """Whether the scores give evidence, at level alpha, that their mean is ``side`` of ``bound`` (one bound, or
    one per observation: each observation's own function's floor)."""
    thr = math.log(1 / alpha)
    w = np.cumsum(_log_factors(xs, bound, side, delta))
    hit = np.flatnonzero(w >= thr)
    return Outcome(bool(hit.size), float(w.max()) if w.size else 0.0, thr, len(w),
                   int(hit[0]) if hit.size else None)


def detector(xs: Sequence[float], bound: Sequence[float] | float, side: str = "below", alpha: float = 0.01,
             delta: float = 0.05) -> Outcome:
    """CUSUM e-detector: alarm once the scores' recent mean is credibly ``side`` of ``bound``."""
    thr = math.log(1 / alpha)
    s, at, top = 0.0, None, 0.0
    for i, f in enumerate(_log_factors(xs, bound, side, delta)):
        s = max(0.0, s) + float(f)
        top = max(top, s)
        if s >= thr and at is None:
            at = i
    return Outcome(at is not None, s if at is None else top, thr, len(xs), at)


def expected_delay(bound: float, true_mean: float, side: str = "below", alpha: float = 0.01,
                   delta: float = 0.05) -> float:
    """About how many observations until ``detector`` (or ``evidence``) decides when the scores are 0/1 with mean
    ``true_mean`` on the far side of ``bound`` (inf when that mean gives the bet no edge): Wald's approximation
    log(1/alpha) / E[log factor], the last step's overshoot ignored; an approximation of the mean, not a bound."""
    lam = float(bet(bound, side, delta))
    sign = 1 if side == "below" else -1
    grow = true_mean * math.log1p(sign * lam * (bound - 1)) + (1 - true_mean) * math.log1p(sign * lam * bound)
    return math.log(1 / alpha) / grow if grow > 0 else math.inf
