"""The incremental dedup index: what the global half of the chain needs about every record that passed the
per-record checks on earlier nights, kept in ``curate/index/`` so that a nightly run reads only the new harvest
files and dedups, decontaminates and balances them against earlier nights' records without re-reading those.

``index/state.json`` says which harvest files (name and sha256) the index covers and under which config;
``index/part-NNNNN.parquet`` hold one compact row per record (id, source, function, split, input key, redacted
user turns and turns after the system prompt, feedback score, timestamp, LSH band keys, embedding when semantic dedup is on). Each run carries the earlier parts
forward (hard links) and adds one. The index lives in the stage folder, so it is replaced atomically with the
curated data it describes: a killed run leaves the previous index and data untouched.

A run falls back to a full rebuild, and says why in report.json, when the curate config or distill's version
changed, a harvest file the index covers changed or disappeared, or the previous stage folder is incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

INDEX_VERSION = 5  # 3: band keys from the one-permutation sketch; 4 (one day), 5: keys of the whole prompt, its texts
REDUCE_SCHEMA = pa.schema([
    ("uid", pa.uint64()),
    ("id", pa.string()),
    ("source", pa.string()),
    ("function", pa.string()),
    ("split", pa.string()),
    ("key", pa.uint64()),
    ("text", pa.string()),
    ("prompt", pa.string()),  # the turns after the system prompt, where they are not just the user turns
    ("score", pa.float64()),
    ("timestamp", pa.timestamp("ms", tz="UTC")),
    ("bands", pa.list_(pa.uint64())),
    ("emb", pa.binary()),
])


@dataclass
class Previous:
    """A previous curate run this one can build on."""

    folder: Path
    state: dict
    parts: list[Path] = field(default_factory=list)

    @property
    def files(self) -> dict[str, str]:
        return self.state["harvest_files"]


def previous(folder: Path, config: str, harvest_files: dict[str, str]) -> tuple[Previous | None, str]:
    """The previous run to continue from, or None and the reason for a full rebuild."""
    manifest = folder / "manifest.json"
    state_path = folder / "index" / "state.json"
    if not manifest.is_file() or not state_path.is_file():
        return None, "no earlier curated data with an index"
    try:
        m = json.loads(manifest.read_text())
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError:
        return None, "the earlier index is unreadable"
    if m.get("status") != "complete":
        return None, "the earlier curate run is incomplete"
    if state.get("version") != INDEX_VERSION or state.get("config") != config:
        return None, "the curate config (or distill's version) changed since the index was built"
    for name, sha in state.get("harvest_files", {}).items():
        if harvest_files.get(name) != sha:
            return None, f"harvest file {name} changed or disappeared since the index was built"
    parts = [folder / "index" / p for p in state.get("parts", [])]
    missing = [p for p in parts if not p.is_file()]
    needed = ["train.parquet", "val.parquet", "test.parquet", "rejected.parquet"]
    if missing or not all((folder / n).is_file() for n in needed):
        return None, "files of the earlier curated data are missing"
    return Previous(folder, state, parts), "earlier nights' records come from the index"


def read(prev: Previous | None) -> pa.Table:
    """Every indexed record (empty table when there is no previous run)."""
    if prev is None or not prev.parts:
        return REDUCE_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=REDUCE_SCHEMA) for p in prev.parts])


def write(work: Path, prev: Previous | None, new_rows: pa.Table, state: dict) -> None:
    """Carry the earlier parts forward (hard links), add one part with the new rows, write state.json."""
    folder = work / "index"
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for p in prev.parts if prev else []:
        dest = folder / p.name
        try:
            os.link(p, dest)
        except OSError:
            shutil.copy2(p, dest)
        parts.append(p.name)
    if new_rows.num_rows or not parts:
        name = f"part-{len(parts):05d}.parquet"
        pq.write_table(new_rows.cast(REDUCE_SCHEMA), folder / name, compression="zstd")
        parts.append(name)
    tmp = folder / ".state.json.tmp"
    tmp.write_text(json.dumps({**state, "version": INDEX_VERSION, "parts": parts}, indent=1, sort_keys=True))
    os.replace(tmp, folder / "state.json")
