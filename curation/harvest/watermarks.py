"""Nightly increments: what each source has given so far, kept in ``harvest/watermarks.json``.

Per source (keyed by a hash of its config, so a changed mapping starts that source afresh): the batch files it
wrote, the newest record time and the ids at it (the watermark), the high-water mark of a SQL timestamp column,
and per file how far it was read (bytes, lines, a hash of what was read) so that an unchanged file is skipped and
a log file that grew is read from where the last run stopped. Together with the id hashes kept next to every batch
(``<batch>.ids.npy``) this lets a rerun read only what is new and never harvest a record twice.

The file lives inside the harvest stage folder, so it is replaced atomically with the records it describes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.harvest import Source
from pipeline.rundir import digest, write_json_atomic

STATE_FILE = "watermarks.json"
COUNT_KEYS = ("lines", "quarantined", "skipped_old", "duplicates", "extra_choices", "records")


def source_key(src: Source) -> str:
    """What identifies a source's data: everything in its config but its display name."""
    return digest({k: v for k, v in src.model_dump(mode="json").items() if k != "name"})[:10]


@dataclass
class SourceState:
    key: str
    label: str
    batches: list[str] = field(default_factory=list)
    max_ms: int | None = None
    ids_at_max: list[str] = field(default_factory=list)
    sql_max: Any = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))


def load(folder: Path) -> tuple[int, dict[str, SourceState]]:
    """(last batch number, state per source key) of a completed harvest folder; (0, {}) when there is none."""
    p = folder / STATE_FILE
    if not p.is_file():
        return 0, {}
    data = json.loads(p.read_text())
    states = {k: SourceState(**v) for k, v in data.get("sources", {}).items()}
    return int(data.get("batch", 0)), states


def save(folder: Path, batch: int, states: dict[str, SourceState]) -> None:
    write_json_atomic(folder / STATE_FILE, {"version": 1, "batch": batch,
                                            "sources": {k: asdict(s) for k, s in sorted(states.items())}})


def link(src: Path, dst: Path) -> None:
    """Carry a file forward into the new stage folder: a hard link (no copy) where the filesystem allows."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_forward(prev: Path, work: Path, state: SourceState) -> np.ndarray:
    """Link a source's earlier batches into the new folder; returns the sorted id hashes they hold."""
    hashes = []
    for name in state.batches:
        link(prev / "batches" / name, work / "batches" / name)
        ids = Path(name).with_suffix(".ids.npy").name
        link(prev / "batches" / ids, work / "batches" / ids)
        hashes.append(np.load(work / "batches" / ids))
    return np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)


class Seen:
    """Id hashes harvested so far (sorted), to drop records already harvested."""

    def __init__(self, hashes: np.ndarray):
        self.hashes = hashes

    def keep(self, h: np.ndarray) -> np.ndarray:
        """Mask of the hashes that are new (not seen, and first of their kind within h); remembers them."""
        keep = np.zeros(len(h), bool)
        if len(h):
            _, first = np.unique(h, return_index=True)
            keep[first] = True
            if len(self.hashes):
                idx = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
                keep &= self.hashes[idx] != h
            # Two sorted runs: the stable sort (timsort) merges them in linear time.
            self.hashes = np.sort(np.concatenate([self.hashes, np.sort(h[keep])]), kind="stable")
        return keep
