"""The bootstrap every stage uses: records redrawn with replacement, as draw counts per record."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def bootstrap_counts(n: int, resamples: int, seed: int = 0, max_cells: int = 4_000_000) -> Iterator[np.ndarray]:
    """``resamples`` bootstrap resamples of n records, as float arrays of shape (b, n) holding how often each
    record was drawn (each row sums to n), in chunks of at most ``max_cells`` cells so memory stays flat. The same
    seed gives the same resamples whatever the chunk size."""
    rng = np.random.default_rng(seed)
    chunk = max(1, max_cells // max(n, 1))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
