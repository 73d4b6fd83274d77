"""Balance of the training split: per-function caps and weights, decided in the global half of the chain.

Caps keep the best-feedback records first and then follow a stable hash of the input, so a nightly run keeps the
same records it kept before (unless better ones arrive). Weights below 1 keep a stable share; above 1 they repeat
records in train.parquet (val and test keep traffic's natural mix, so evaluation reflects real traffic).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from curation.curate import columns
from pipeline.config.curate import Balance

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def stable_unit(keys: np.ndarray) -> np.ndarray:
    """A stable number in [0, 1) per input key (independent of the split hash)."""
    with np.errstate(over="ignore"):
        return ((keys.astype(np.uint64) * GOLDEN) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def balance(table: pa.Table, alive: np.ndarray, cfg: Balance) -> tuple[dict[int, str], np.ndarray]:
    """(reasons for dropped training rows, copies of each row in train.parquet: 1 unless weighted)."""
    copies = np.ones(table.num_rows, dtype=np.int64)
    train = np.flatnonzero(alive & columns.equals(table, "split", "train"))
    if len(train) == 0:
        return {}, copies
    codes, names = columns.codes(table, "function")
    keys = table.column("key").to_numpy()
    score = table.column("score").to_numpy()
    unit = stable_unit(keys)
    out: dict[int, str] = {}
    for c in np.unique(codes[train]):
        f = names[c] if c >= 0 else None
        rows = train[codes[train] == c]
        cap = cfg.caps.get(f, cfg.default_cap)
        if cap is not None and len(rows) > cap:
            order = rows[np.lexsort((keys[rows], -score[rows]))]
            for r in order[cap:]:
                out[int(r)] = f"balance: over the cap of {cap} training records for function {f!r}"
            rows = order[:cap]
        w = cfg.weights.get(f)
        if w is None or w == 1:
            continue
        whole, frac = math.floor(w), w - math.floor(w)
        n = whole + (unit[rows] < frac).astype(np.int64)
        copies[rows] = n
        for r in rows[n == 0]:
            out[int(r)] = f"balance: weight {w:g} keeps a stable {w:.0%} of function {f!r}"
    return out, copies
