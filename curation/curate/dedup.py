"""Dedup across records: exact and near-duplicate (MinHash LSH); semantic dedup is in
``curation.curate.semantic``.

These run in the global (reduce) half of the chain, over a compact table with one row per record that survived
the per-record checks (``curation.curate.chain.reduce_columns``: id, function, split, input key, redacted user
turns, feedback score, timestamp), earlier nights' records included (``curation.curate.index``). Each returns, per
row, ``None`` or the reason it is dropped; within a group of duplicates the best-ranked record stays (best feedback, then the
earliest, then the smallest id: ``rank``).

Near-duplicates in two steps, both over byte shingles computed on the Arrow buffers:

- Candidates. The per-record half computes each record's LSH band keys on the executor's cores (``band_keys``)
  from a one-permutation MinHash sketch in numpy (``sketch``): O(shingles) work, a third of the CPU of rensa's
  128-permutation signature plus the Python-list export (``RMinHashDigestMatrix.to_rows``, rensa's only way out)
  that band keys would need. Records sharing a band key within a function are candidates.
- Verification. Only the candidates get rensa's (Rust) MinHash signature; every candidate pair is verified
  (estimated Jaccard >= threshold) and verified pairs are joined into clusters.

LSH parameters are the optimum for the threshold (``optimal_bands``, as datasketch's MinHashLSH chooses them).
Everything derives from the text itself, so the same text gives the same keys on every run, executor and machine.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.curate.columns import codes, pick, prompts_of
from pipeline.config.curate import NearDedup

Reasons = dict[int, str]  # row -> reason, for dropped rows only
PRIME = np.uint64(1099511628211)


def rank(table: pa.Table) -> np.ndarray:
    """Position of each row when ordered best first: feedback score desc, timestamp asc, id asc, uid asc."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    order = pc.sort_indices(table, sort_keys=[("score", "descending"), ("timestamp", "ascending"),
                                              ("id", "ascending"), ("uid", "ascending")]).to_numpy()
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(len(order))
    return out


def exact_dedup(table: pa.Table, alive: np.ndarray, ranks: np.ndarray) -> Reasons:
    """One record per input key (function + the normalised whole prompt): the best-ranked one."""
    idx = np.flatnonzero(alive)
    if len(idx) == 0:
        return {}
    keys = table.column("key").to_numpy()[idx]
    order = np.lexsort((ranks[idx], keys))
    sorted_keys = keys[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    winner = idx[order][np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    dropped = ~first
    ids = pick(table, "id", winner[dropped])
    return {int(i): f"duplicate of {w}" for i, w in zip(idx[order][dropped], ids, strict=True)}


SKETCH_CHUNK = 8_192  # rows per sketch or signature batch: the arrays stay in the CPU caches (2-3x faster than 50k)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def char_shingles(texts: pa.Array | list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint64 shingles of each text, row offsets). Texts are lower-cased and their whitespace dropped (so
    spacing never matters); every k consecutive UTF-8 bytes of a text are one shingle, and a text shorter than k
    is one shingle. Up to k = 8 a shingle is its bytes read as one little-endian integer (exact, no collisions: one
    strided numpy read over the Arrow buffer); longer ones are a polynomial rolling hash mod 2^64. Windows that
    would run into the next text are masked out, so a text's shingles never depend on its neighbours."""
    arr = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
    arr = pc.utf8_lower(pc.fill_null(arr, "")).cast(pa.large_string())
    for ws in (" ", "\n", "\t", "\r"):
        arr = pc.replace_substring(arr, ws, "")
    n = len(arr)
    raw = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    start, end = raw[:-1] - raw[0], raw[1:] - raw[0]
    body = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[raw[0]:raw[-1]]
    data = np.concatenate([body, np.zeros(8, dtype=np.uint8)])
    m = max(len(body) - k + 1, 0)
    if k <= 8:
        h = np.ndarray(shape=(m,), dtype="<u8", buffer=data, strides=(1,)) & np.uint64((1 << (8 * k)) - 1)
    else:
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                h *= PRIME
                h += data[j: j + m]
    lens = end - start
    long_rows = lens >= k
    counts = np.where(long_rows, lens - k + 1, 1)
    offsets = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(counts, out=offsets[1:])
    # A window is a text's when it starts at least k bytes before the text's end: the last k - 1 starts of every
    # text are not (for a text shorter than k that is all its starts; what reaches into the text before lies in
    # that text's own last k - 1 starts).
    inside = np.ones(m, dtype=bool)
    tails = (end[:, None] - np.arange(1, k)[None, :]).ravel()
    inside[tails[(tails >= 0) & (tails < m)]] = False
    windows = h[inside]
    if long_rows.all():
        return windows, offsets
    flat = np.empty(int(offsets[-1]), dtype=np.uint64)
    flat[np.repeat(long_rows, counts)] = windows
    for r in np.flatnonzero(~long_rows):  # texts shorter than k: one shingle of the whole text
        v = 0
        for j, c in enumerate(body[start[r]:end[r]].tolist()):
            v = (v * int(PRIME) + c) % (1 << 64) if k > 8 else v | (c << (8 * j))
        flat[offsets[r]] = v
    return flat, offsets


def lsh_params(cfg: NearDedup) -> tuple[int, int]:
    return _lsh_params(cfg.threshold, cfg.num_perm, cfg.bands)


@lru_cache(maxsize=32)
def _lsh_params(threshold: float, num_perm: int, bands: int | None) -> tuple[int, int]:
    """(bands, rows per band): the recipe's bands, or the optimum for the threshold with false negatives weighted
    0.95 (``optimal_bands``): every candidate pair is verified by its estimated Jaccard afterwards, so extra
    candidates only cost time while missed ones are lost (for 0.8 and 128 permutations: 16 bands of 8, recall 0.95
    at 0.8)."""
    if bands:
        return bands, max(1, num_perm // bands)
    return optimal_bands(threshold, num_perm, 0.05, 0.95)


def optimal_bands(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    """The (bands b, rows r) with b * r <= num_perm that minimise the weighted false positives (the area under
    P(candidate) = 1 - (1 - s^r)^b below the threshold) and false negatives (the area above P(candidate) above it),
    the first in (b, r) order on a tie: datasketch's MinHashLSH optimum. Both integrands are polynomials of degree
    b * r <= num_perm, which Gauss-Legendre quadrature with num_perm // 2 + 1 nodes integrates exactly."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def area(lo: float, hi: float, candidate: bool) -> np.ndarray:
        s = (hi - lo) / 2 * x + (hi + lo) / 2  # the nodes on [lo, hi]
        missed = (1 - s[None, :] ** pairs[:, 1:]) ** pairs[:, :1]  # per (b, r) and node: no band in common
        return ((1 - missed) if candidate else missed) @ w * (hi - lo) / 2

    error = fp_weight * area(0.0, threshold, True) + fn_weight * area(threshold, 1.0, False)
    b, r = pairs[int(np.argmin(error))]
    return int(b), int(r)


def token_hashes(texts: pa.Array | list[str], cfg: NearDedup) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint64 shingles of each text, row offsets): char shingles (``char_shingles``), or word n-grams of the
    normalised text hashed by rensa."""
    if cfg.shingle == "char":
        return char_shingles(texts, cfg.ngram)
    import rensa

    k = cfg.ngram
    sets = []
    for t in texts.to_pylist() if isinstance(texts, pa.Array) else texts:
        words = normalise(t or "").split()
        sets.append([" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))])
    hashed = rensa.RMinHash.hash_token_sets(sets)
    offsets = np.zeros(len(hashed) + 1, dtype=np.uint64)
    np.cumsum([len(h) for h in hashed], out=offsets[1:])
    return np.fromiter(itertools.chain.from_iterable(hashed), dtype=np.uint64, count=int(offsets[-1])), offsets


def signatures(texts: pa.Array | list[str], cfg: NearDedup, num_perm: int):
    """rensa MinHash digest matrix of the texts' shingles (``token_hashes``)."""
    import rensa

    flat, offsets = token_hashes(texts, cfg)
    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, cfg.seed)


def to_numpy(matrix, num_perm: int) -> np.ndarray:
    rows = matrix.to_rows()
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.uint32,
                       count=len(rows) * num_perm).reshape(len(rows), num_perm)


def components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of a graph given by edges: the smallest member of each node's component (vectorised
    hooking and pointer jumping, so millions of edges cost a few numpy passes)."""
    parent = np.arange(n)
    if len(left) == 0:
        return parent
    while True:
        ra, rb = parent[left], parent[right]
        if (ra == rb).all():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if (jumped == parent).all():
                break
            parent = jumped


def _bucket_pairs(inverse: np.ndarray, counts: np.ndarray, small: int = 8):
    """Candidate pairs from bucket ids, as (star, rest): each member with the bucket's first member, and the other
    pairs of buckets of up to `small` members (each member with the next one in bigger buckets)."""
    size = counts[inverse]
    members = np.flatnonzero(size > 1)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(members) == 0:
        return empty, empty
    members = members[np.argsort(inverse[members], kind="stable")]
    starts = np.flatnonzero(np.r_[True, inverse[members][1:] != inverse[members][:-1]])
    group_sizes = size[members][starts]
    head = members[np.repeat(starts, group_sizes)]
    star = (head[head != members], members[head != members])
    if small == 0:
        return star, empty
    rest_l, rest_r = [], []
    for s in np.unique(group_sizes):
        g = starts[group_sizes == s]
        block = members[g[:, None] + np.arange(s)[None, :]]
        if s <= small:
            i, j = np.triu_indices(int(s), 1)
            keep = i > 0  # pairs with the first member are in the star
            rest_l.append(block[:, i[keep]].ravel())
            rest_r.append(block[:, j[keep]].ravel())
        else:
            rest_l.append(block[:, 1:-1].ravel())
            rest_r.append(block[:, 2:].ravel())
    return star, (np.concatenate(rest_l), np.concatenate(rest_r))


def _unique_pairs(left: list[np.ndarray], right: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    if not left:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)
    key = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return key // n, key % n


def _verified(sig: np.ndarray, left: np.ndarray, right: np.ndarray, threshold: float,
              chunk: int = 50_000) -> np.ndarray:
    """Mask of pairs whose estimated Jaccard (share of equal MinHash values) reaches the threshold."""
    out = np.zeros(len(left), dtype=bool)
    for s in range(0, len(left), chunk):
        out[s:s + chunk] = (sig[left[s:s + chunk]] == sig[right[s:s + chunk]]).mean(axis=1) >= threshold
    return out


MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
DENSIFY_TRIES = 64  # with 8, a text of 16 shingles filled a third of its bins from the fallback (less recall)
PROBES = 2  # bins each shingle goes to


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: a bijection of uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= MIX[0]
        x ^= x >> np.uint64(27)
        x *= MIX[1]
        x ^= x >> np.uint64(31)
    return x


@lru_cache(maxsize=8)
def _borrow_table(num_perm: int, seed: int) -> np.ndarray:
    """For densification: the bins each empty bin tries in turn (DENSIFY_TRIES x num_perm), the same for every
    text, so two texts with the same shingles always fill a bin from the same place."""
    x = _mix(np.arange(DENSIFY_TRIES * num_perm, dtype=np.uint64) + _mix(np.array([(seed + 1) % 2**64], np.uint64)))
    return ((x >> np.uint64(32)) * np.uint64(num_perm) >> np.uint64(32)).astype(np.int64).reshape(DENSIFY_TRIES,
                                                                                                 num_perm)


def sketch(flat: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """One-permutation MinHash with densification (rows x num_perm, uint32), in O(shingles) numpy work: each
    shingle is hashed PROBES times, each hash's high bits pick one of num_perm bins and its low 32 bits are its
    value; a bin keeps its smallest value. An empty bin takes the value of the first non-empty bin in a fixed
    sequence of tries (``_borrow_table``) and, failing those, the text's smallest value. Two texts agree on a bin
    with probability about their Jaccard similarity, as with num_perm independent MinHashes, so LSH bands cut from
    this find the same candidates at a fraction of the cost (Shrivastava 2017, optimal densification; the second
    probe keeps short texts' bins from all borrowing the same few values, which would cost them recall)."""
    n = len(offsets) - 1
    base = np.repeat(np.arange(n, dtype=np.int64) * num_perm, np.diff(offsets).astype(np.int64))
    slots, values = [], []
    for probe in range(PROBES):
        h = _mix(flat ^ _mix(np.array([(seed + 7919 * probe) % 2**64], np.uint64))[0])
        slots.append(base + ((h >> np.uint64(32)) * np.uint64(num_perm) >> np.uint64(32)).astype(np.int64))
        values.append(h.astype(np.uint32))  # the low 32 bits
    slot, value = np.concatenate(slots), np.concatenate(values)
    sig = np.full(n * num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    np.minimum.at(sig, slot, value)
    filled = np.zeros(n * num_perm, dtype=bool)
    filled[slot] = True
    todo = np.flatnonzero(~filled)
    row, col = todo // num_perm, todo % num_perm
    for tries in _borrow_table(num_perm, seed):
        if len(todo) == 0:
            break
        src = row * num_perm + tries[col]
        ok = filled[src]
        sig[todo[ok]] = sig[src[ok]]
        todo, row, col = todo[~ok], row[~ok], col[~ok]
    if len(todo):  # texts with very few shingles: the smallest value of the text (a MinHash of its own)
        low = np.full(n, np.iinfo(np.uint32).max, dtype=np.uint32)
        np.minimum.at(low, slot // num_perm, value)
        sig[todo] = low[row]
    return sig.reshape(n, num_perm)


def band_keys(texts: pa.Array, cfg: NearDedup) -> np.ndarray:
    """The LSH band keys of each text (rows x bands, uint64): its one-permutation MinHash sketch (``sketch``) cut
    into bands of rows_per_band values, each band folded into one 64-bit key. The per-record half computes these on
    the executor's cores. They only pick candidates: every candidate pair is then verified with rensa's MinHash."""
    bands, rows_per_band = lsh_params(cfg)
    num_perm = bands * rows_per_band
    powers = np.array([pow(int(PRIME), j, 1 << 64) for j in range(rows_per_band)], dtype=np.uint64)
    out = np.empty((len(texts), bands), dtype=np.uint64)
    for s in range(0, len(texts), SKETCH_CHUNK):
        sig = sketch(*token_hashes(texts.slice(s, SKETCH_CHUNK), cfg), num_perm, cfg.seed)
        with np.errstate(over="ignore"):
            out[s:s + len(sig)] = (sig.reshape(len(sig), bands, rows_per_band).astype(np.uint64) * powers).sum(
                axis=2, dtype=np.uint64)
    return out


def bands_array(keys: np.ndarray) -> pa.Array:
    """Band keys as an Arrow list<uint64> column."""
    offsets = pa.array(np.arange(0, keys.size + 1, max(keys.shape[1], 1), dtype=np.int32)[: len(keys) + 1])
    return pa.ListArray.from_arrays(offsets, pa.array(keys.ravel(), pa.uint64()))


def near_dedup(table: pa.Table, alive: np.ndarray, ranks: np.ndarray, cfg: NearDedup) -> Reasons:
    """Clusters of near-duplicate prompts (the turns after the system prompt) within a function; the best-ranked record of each cluster stays.
    Records sharing an LSH band key (from the per-record half, or computed here when the table has none) are
    candidates; only their rensa MinHash signatures are computed, every candidate pair is verified by estimated
    Jaccard, and verified pairs are joined into clusters."""
    idx = np.flatnonzero(alive)
    if len(idx) < 2:
        return {}
    functions = codes(table, "function")[0][idx]
    text = prompts_of(table)
    keys = _table_band_keys(table, idx, cfg)
    found: list[tuple[int, int, float]] = []
    for f in np.unique(functions):
        sel = np.flatnonzero(functions == f)
        cand = sel[_shared(keys[sel])]
        if len(cand) < 2:
            continue
        rows = idx[cand]
        found += [(int(rows[i]), int(rows[w]), est)
                  for i, w, est in _clusters(text.take(pa.array(rows)), keys[cand], ranks[rows], cfg)]
    ids = pick(table, "id", [w for _, w, _ in found])
    return {i: f"near-duplicate of {wid} (estimated Jaccard {est:.2f})"
            for (i, _, est), wid in zip(found, ids, strict=True)}


def _table_band_keys(table: pa.Table, idx: np.ndarray, cfg: NearDedup) -> np.ndarray:
    """The band keys of rows idx: from the table's ``bands`` column, computed here for rows without them."""
    bands = lsh_params(cfg)[0]
    keys = np.zeros((table.num_rows, bands), dtype=np.uint64)
    have = np.zeros(table.num_rows, dtype=bool)
    if "bands" in table.column_names:
        col = table.column("bands").combine_chunks()
        have = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False) == bands
        if have.all():
            keys = pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(-1, bands)
        elif have.any():
            keys[have] = pc.list_flatten(col.filter(pa.array(have))).to_numpy(zero_copy_only=False).reshape(-1, bands)
    missing = idx[~have[idx]]  # never when every row has its keys (then ``keys`` may be read-only)
    if len(missing):
        keys[missing] = band_keys(prompts_of(table).take(pa.array(missing)), cfg)
    return keys[idx]


def _shared(keys: np.ndarray) -> np.ndarray:
    """Mask of the rows that share at least one band key with another row."""
    shared = np.zeros(len(keys), dtype=bool)
    for b in range(keys.shape[1]):
        _, inverse, counts = np.unique(keys[:, b], return_inverse=True, return_counts=True)
        shared |= counts[inverse] > 1
    return shared


def _clusters(texts: pa.Array, keys: np.ndarray, ranks: np.ndarray, cfg: NearDedup) -> list[tuple[int, int, float]]:
    """(row, the row it duplicates, estimated Jaccard) for every row that is not the best of its cluster, among
    candidates (rows that share a band key with another)."""
    bands, rows_per_band = lsh_params(cfg)
    num_perm = bands * rows_per_band
    sig = np.concatenate([to_numpy(signatures(texts.slice(s, SKETCH_CHUNK), cfg, num_perm), num_perm)
                          for s in range(0, len(texts), SKETCH_CHUNK)])
    n = len(texts)
    buckets = []
    star_l, star_r = [], []
    for b in range(bands):  # pairs within a bucket: first each with the bucket's first member
        _, inverse, counts = np.unique(keys[:, b], return_inverse=True, return_counts=True)
        buckets.append((inverse, counts))
        (sl, sr), _ = _bucket_pairs(inverse, counts, small=0)
        star_l.append(sl)
        star_r.append(sr)
    left, right = _unique_pairs(star_l, star_r, n)
    ok = _verified(sig, left, right, cfg.threshold)
    left, right = left[ok], right[ok]
    roots = components(n, left, right)
    # Then the other pairs of small buckets (neighbours in big ones), where they would join two clusters.
    rest_l, rest_r = [], []
    for inverse, counts in buckets:
        _, (rl, rr) = _bucket_pairs(inverse, counts)
        open_ = roots[rl] != roots[rr]
        rest_l.append(rl[open_])
        rest_r.append(rr[open_])
    left2, right2 = _unique_pairs(rest_l, rest_r, n)
    ok2 = _verified(sig, left2, right2, cfg.threshold)
    if ok2.any():
        roots = components(n, np.concatenate([left, left2[ok2]]), np.concatenate([right, right2[ok2]]))
    # the best-ranked member of each component stays
    order = np.lexsort((ranks, roots))
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = roots[order][1:] != roots[order][:-1]
    best = np.empty(n, dtype=np.int64)
    best[order] = order[np.maximum.accumulate(np.where(is_first, np.arange(len(order)), 0))]
    losers = np.flatnonzero(best != np.arange(n))
    est = (sig[losers] == sig[best[losers]]).mean(axis=1)
    return [(int(i), int(best[i]), float(e)) for i, e in zip(losers, est, strict=True)]
