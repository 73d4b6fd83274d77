"""What the curate stage writes: the per-operator audit for report.json (``Audit``) and the four Parquet outputs
(``Writers``: train, val, test and rejected, in fixed row groups).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.curate.columns import conform, map_value
from curation.curate.pii import scrub
from pipeline.config.curate import PIIConfig

SPLITS = ("train", "val", "test")
EXAMPLES = 5


class Audit:
    """Per-operator counts, timings and a few examples (id, source, scrubbed reason) for report.json."""

    def __init__(self, pii_cfg: PIIConfig, order: tuple[str, ...] = (), global_ops: tuple[str, ...] = ()):
        self.pii_cfg = pii_cfg
        self.order = order  # the operators in the order they run (report.json lists them so)
        self.global_ops = global_ops  # the operators of the global half
        self.ops: dict[str, dict[str, Any]] = {}
        self.dropped: Counter[str] = Counter()
        self.extra: Counter[str] = Counter()
        self.phases: dict[str, float] = {}

    def op(self, name: str, phase: str) -> dict[str, Any]:
        return self.ops.setdefault(name, {"phase": phase, "in": 0, "dropped_this_run": 0, "seconds": 0.0,
                                          "cpu_seconds": 0.0, "examples": []})

    def add_map_stats(self, blob: str) -> None:
        stats = json.loads(blob)
        for name, (n_in, dropped, seconds, cpu) in stats["ops"].items():
            if name == "band_keys":  # near dedup's per-record part: the LSH keys, on the executor's cores
                o = self.op("near_dedup", "global")
                o["band_keys_seconds"] = o.get("band_keys_seconds", 0.0) + float(seconds)
                o["band_keys_cpu_seconds"] = o.get("band_keys_cpu_seconds", 0.0) + float(cpu)
                continue
            o = self.op(name, "per-record")
            o["in"] += int(n_in)
            o["dropped_this_run"] += int(dropped)
            o["seconds"] += float(seconds)
            o["cpu_seconds"] += float(cpu)
        self.extra.update(stats.get("extra", {}))

    def rejected(self, table: pa.Table) -> None:
        """Count rejected rows by operator and keep the first examples."""
        by = table.column("rejected_by").to_pylist()
        self.dropped.update(by)
        need = [i for i, b in enumerate(by) if len(self.op(b, "global" if b in self.global_ops else "per-record")
                                                   ["examples"]) < EXAMPLES]
        if not need:
            return
        rows = table.select(["id", "source", "rejected_by", "reason"]).take(pa.array(need)).to_pylist()
        for r in rows:
            ex = self.ops[r["rejected_by"]]["examples"]
            if len(ex) < EXAMPLES:
                ex.append({"id": r["id"], "source": r["source"], "reason": scrub(r["reason"] or "", self.pii_cfg)})

    def report(self) -> dict[str, Any]:
        out = {}
        for name, o in self.ops.items():
            if name in ("keys", "setup"):
                continue
            cpu = o["cpu_seconds"] + o.get("band_keys_cpu_seconds", 0.0)
            rate = o["in"] / o["seconds"] if o["seconds"] > 0 else None
            cpu_rate = o["in"] / cpu if cpu > 0 else None
            out[name] = {"phase": o["phase"], "in": o["in"], "dropped": self.dropped.get(name, 0),
                         "dropped_this_run": o["dropped_this_run"], "seconds": round(o["seconds"], 4),
                         "cpu_seconds": round(cpu, 4), "records_per_s": round(rate) if rate else None,
                         "records_per_cpu_s": round(cpu_rate) if cpu_rate else None, "examples": o["examples"]}
            if "band_keys_cpu_seconds" in o:
                out[name]["of_which_band_keys_cpu_seconds"] = round(o["band_keys_cpu_seconds"], 4)
        for name, n in self.dropped.items():  # operators of earlier nights not run tonight
            out.setdefault(name, {"phase": "global" if name in self.global_ops else "per-record", "in": 0,
                                  "dropped": n, "dropped_this_run": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                  "records_per_s": None, "records_per_cpu_s": None, "examples": []})
        order = {name: i for i, name in enumerate(self.order)}  # the order they run in
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


class Writers:
    """Streaming Parquet writers for the four outputs. Rows are written in row groups of a fixed size, so the
    files are byte-identical however the executor cut the data into batches."""

    ROW_GROUP = 16_384

    def __init__(self, work: Path, schema: pa.Schema):
        self.schema = schema
        self.rej_schema = schema.append(pa.field("rejected_by", pa.string())).append(pa.field("reason", pa.string()))
        self.w = {s: pq.ParquetWriter(work / f"{s}.parquet", schema, compression="zstd") for s in SPLITS}
        self.w["rejected"] = pq.ParquetWriter(work / "rejected.parquet", self.rej_schema, compression="zstd")
        self.buf: dict[str, list[pa.Table]] = {k: [] for k in self.w}
        self.rows: Counter[str] = Counter()
        self.pii_kept = 0  # kept records (not rows: weights repeat some) whose text had PII or secrets redacted

    def _add(self, name: str, table: pa.Table, schema: pa.Schema) -> None:
        if not table.num_rows:
            return
        self.buf[name].append(conform(table, schema))
        self.rows[name] += table.num_rows
        if sum(t.num_rows for t in self.buf[name]) >= self.ROW_GROUP:
            self._flush(name, final=False)

    def _flush(self, name: str, final: bool) -> None:
        if not self.buf[name]:
            return
        t = pa.concat_tables(self.buf[name])
        full = t.num_rows - (0 if final else t.num_rows % self.ROW_GROUP)
        for start in range(0, full, self.ROW_GROUP):
            self.w[name].write_table(t.slice(start, min(self.ROW_GROUP, full - start)))
        self.buf[name] = [t.slice(full)] if full < t.num_rows else []

    def split(self, name: str, table: pa.Table, copies: np.ndarray | None = None) -> None:
        """Kept records to a split; `copies` repeats each row (weights)."""
        if table.num_rows and "tags" in table.column_names:
            self.pii_kept += int(map_value(table, "tags", "pii_redacted").is_valid().to_numpy(
                zero_copy_only=False).sum())
        if copies is not None and not (copies == 1).all():
            table = table.take(pa.array(np.repeat(np.arange(table.num_rows), copies)))
        self._add(name, table, self.schema)

    def rejected(self, table: pa.Table) -> None:
        self._add("rejected", table, self.rej_schema)

    def close(self) -> None:
        for name, w in self.w.items():
            self._flush(name, final=True)
            w.close()
