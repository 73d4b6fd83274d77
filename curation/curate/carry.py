"""Writing the curate outputs from the decisions of the global half, carrying earlier nights' outputs over.

An incremental run reads only new harvest files: earlier nights' records come back from the previous run's outputs
(``curation.curate.index`` keeps their compact columns for the global half), re-decided with tonight's global
operators: an earlier record can now be dropped (retracted) or come back (restored). Per-record decisions of earlier
nights do not change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.curate import index
from curation.curate.audit import SPLITS, Audit, Writers
from curation.curate.chain import uids


@dataclass
class Decisions:
    """The verdict on every record of the global half's table: where it goes, why, and how often in train."""

    dest: np.ndarray  # train | val | test | rejected
    by: np.ndarray  # operator that dropped it, or None
    why: np.ndarray  # its reason, or None
    copies: np.ndarray  # rows in train.parquet (weights)

    def slice(self, start: int, stop: int) -> Decisions:
        return Decisions(self.dest[start:stop], self.by[start:stop], self.why[start:stop], self.copies[start:stop])


def set_column(table: pa.Table, name: str, values: list | pa.Array, type_: pa.DataType) -> pa.Table:
    """The table with the column set (replaced, or appended when it has none)."""
    arr = values if isinstance(values, pa.Array) else pa.array(values, type_)
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), pa.field(name, type_), arr)
    return table.append_column(pa.field(name, type_), arr)


def write(prev: index.Previous | None, uids_all: np.ndarray, n_old: int, decisions: Decisions, tmp: Path,
          writers: Writers, audit: Audit) -> Counter:
    """Earlier nights' rows (carried, with tonight's decisions), tonight's survivors, tonight's dropped rows."""
    counts: Counter[str] = Counter()
    if prev is not None:
        counts.update(_carry(prev, uids_all[:n_old], decisions.slice(0, n_old), writers, audit))
    offset = n_old
    with pa.OSFile(str(tmp / "alive.arrow")) as src:  # plain reads: resident memory stays flat
        for batch in pa.ipc.open_stream(src):
            t = pa.Table.from_batches([batch])
            _route(t, decisions.slice(offset, offset + t.num_rows), writers, audit)
            offset += t.num_rows
    with pa.OSFile(str(tmp / "map-rejected.arrow")) as src:
        for batch in pa.ipc.open_stream(src):
            t = pa.Table.from_batches([batch])
            t = set_column(t, "split", t.column("_split"), pa.string())
            t = t.rename_columns([{"_rejected_by": "rejected_by", "_reason": "reason"}.get(c, c)
                                  for c in t.column_names])
            writers.rejected(t)
            audit.rejected(t)
    return counts


def _route(t: pa.Table, d: Decisions, writers: Writers, audit: Audit) -> None:
    """Send tonight's surviving rows to their split (repeated per weight) or to rejected with the global reason."""
    t = set_column(t, "split", t.column("_split"), pa.string())
    for s in SPLITS:
        rows = np.flatnonzero(d.dest == s)
        if len(rows):
            writers.split(s, t.take(pa.array(rows)), d.copies[rows] if s == "train" else None)
    rows = np.flatnonzero(d.dest == "rejected")
    if len(rows):
        r = t.take(pa.array(rows))
        r = set_column(r, "rejected_by", list(d.by[rows]), pa.string())
        r = set_column(r, "reason", list(d.why[rows]), pa.string())
        writers.rejected(r)
        audit.rejected(r)


def _carry(prev: index.Previous, old_uids: np.ndarray, d: Decisions, writers: Writers, audit: Audit) -> Counter:
    """Stream the previous run's outputs into this run's, applying tonight's decisions to earlier records."""
    counts: Counter[str] = Counter()
    order = np.argsort(old_uids, kind="stable")
    sorted_uids = old_uids[order]
    seen: set[int] = set()

    def lookup(u: np.ndarray) -> np.ndarray:
        if len(sorted_uids) == 0:
            return np.full(len(u), -1)
        pos = np.minimum(np.searchsorted(sorted_uids, u), len(sorted_uids) - 1)
        return np.where(sorted_uids[pos] == u, order[pos], -1)

    for name in (*SPLITS, "rejected"):
        for batch in pq.ParquetFile(prev.folder / f"{name}.parquet").iter_batches(batch_size=4096):
            t = pa.Table.from_batches([batch])
            if name == "rejected":
                fixed = np.array([b not in audit.global_ops for b in t.column("rejected_by").to_pylist()], dtype=bool)
                if fixed.any():  # per-record decisions do not change
                    kept_rej = t.filter(pa.array(fixed))
                    writers.rejected(kept_rej)
                    audit.rejected(kept_rej)
                t = t.filter(pa.array(~fixed)).drop_columns(["rejected_by", "reason"])
                if t.num_rows == 0:
                    continue
            u = uids(t)
            first = np.array([x not in seen for x in u.tolist()], dtype=bool)  # weights repeat train rows
            seen.update(u.tolist())
            t, u = t.filter(pa.array(first)), u[first]
            j = lookup(u)
            if (j < 0).any():
                raise RuntimeError("the earlier curated data and its index disagree; rerun with --force after "
                                   "deleting the curate folder for a full rebuild")
            dest = d.dest[j]
            for s in SPLITS:
                rows = np.flatnonzero(dest == s)
                if len(rows):
                    writers.split(s, t.take(pa.array(rows)), d.copies[j[rows]] if s == "train" else None)
                    if name == "rejected":
                        counts["restored"] += len(rows)
            rows = np.flatnonzero(dest == "rejected")
            if len(rows):
                r = t.take(pa.array(rows))
                r = set_column(r, "rejected_by", list(d.by[j[rows]]), pa.string())
                r = set_column(r, "reason", list(d.why[j[rows]]), pa.string())
                writers.rejected(r)
                audit.rejected(r)
                if name != "rejected":
                    counts["retracted"] += len(rows)
    return counts
