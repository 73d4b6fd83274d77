"""Nightly increments: what each source has given so far, kept in ``harvest/watermarks.json``.

What was read is tracked by position and by record id, never by time. Per source (keyed by a hash of its config,
so a changed mapping starts that source afresh): the batch files it wrote (with the id hashes kept next to every
batch, ``<batch>.ids.npy``, so no record is harvested twice), and per file how far it was read:

- ``size`` and ``sample``: the file's size and a hash of its first and last MiB when it was read (unchanged:
  skipped);
- ``offset``, ``lines`` and ``read_sample``: the byte just past the last whole line read, the lines before it, a
  hash of the first and last MiB before it (a plain JSON-lines file whose read part is unchanged is read on from
  there; any other change re-reads the file whole, its rows deduplicated by id);
- ``held_back``: bytes of an unfinished last line (no newline yet) left for the next run;
- ``version``: ETag or modification time of a remote file.

The newest record time and the ids at it (``max_ms``, ``ids_at_max``) are reported, and filter only SQL sources,
together with the high-water mark of their timestamp column (``sql_max``): there a query by time is all there is.

Format version 2; a version 1 file (the same positions, without ``read_sample`` and ``held_back``) is upgraded as
it is read. The file lives inside the harvest stage folder, so it is replaced atomically with the records it
describes.
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
VERSION = 2
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
    version = int(data.get("version", 1))
    if version > VERSION:
        raise ValueError(f"{p} is of format version {version}, newer than this distill reads ({VERSION}); "
                         "upgrade distill, or harvest into a new run directory")
    states = {k: SourceState(**v) for k, v in data.get("sources", {}).items()}
    for st in states.values():
        st.files = {url: upgrade_file(e) for url, e in st.files.items()}
    return int(data.get("batch", 0)), states


def upgrade_file(e: dict[str, Any]) -> dict[str, Any]:
    """A file's entry in the current format. Version 1 kept only what was read: ``size`` = ``offset`` (of a plain
    JSON-lines file, up to its last whole line; else the whole file) and a hash of that part, so a file with an
    unfinished last line then is resumed from there now, and any other file is skipped while unchanged."""
    if "read_sample" in e:
        return e
    return {"size": e["size"], "sample": e["sample"], "offset": e["offset"], "lines": e["lines"],
            "read_sample": e["sample"], "held_back": 0, "version": e.get("version", "")}


def save(folder: Path, batch: int, states: dict[str, SourceState]) -> None:
    write_json_atomic(folder / STATE_FILE, {"version": VERSION, "batch": batch,
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
