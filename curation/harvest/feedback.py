"""Feedback kept apart from the logs (files or tables), joined onto records by inference id or episode id.

Metrics (booleans become 1.0 / 0.0) land in ``record["feedback"]``, where curation reads them: the latest value of
a metric wins; inference-level feedback beats episode-level feedback of the same metric, which reaches every
inference of the episode. A TensorZero demonstration (a corrected answer) replaces the output, and the scores that
judged the replaced answer are set aside (tag ``replaced_output_feedback``) so none judges the correction; rows
whose target matches no record are counted (``matched_rows``). Comments are dropped
unless the recipe keeps them as a tag. Feedback is read whole on every run (it is small next to the logs and
arrives late: yesterday's answers get today's thumbs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from curation.harvest.importers.common import (
    BadRecord,
    Lenient,
    decode_json_text,
    dotted,
    loads_row,
    timestamp,
)
from curation.harvest.importers.formats import _tz_output, uuid7_time
from curation.harvest.sources import line_blocks, list_files, row_batches
from pipeline.config.harvest import FeedbackSource
from pipeline.record import dumps, message

# A value with its order: (time or None, read position); the largest wins.
Stamped = tuple[tuple[float, int], Any]


@dataclass
class FeedbackIndex:
    inference: dict[str, dict[str, Stamped]] = field(default_factory=dict)
    episode: dict[str, dict[str, Stamped]] = field(default_factory=dict)
    demonstrations: dict[str, Stamped] = field(default_factory=dict)
    comments: dict[str, list[str]] = field(default_factory=dict)
    rows: int = 0
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    dropped_comments: int = 0
    by_metric: Counter[str] = field(default_factory=Counter)
    lenient: int = 0  # rows read leniently (raw control characters inside JSON strings)
    # Rows kept in the index, by (level, target id): to count the rows that match no record (level "auto" matches
    # a record id or an episode id).
    row_targets: Counter[tuple[str, str]] = field(default_factory=Counter)
    _targets: tuple[pa.Array, pa.Array] | None = field(default=None, repr=False)
    episode_of: dict[str, str] = field(default_factory=dict)  # an episode id as records keep it (``rekey``)

    def rekey(self, episodes: Callable[[list[str]], dict[str, str]]) -> None:
        """Name episodes as harvest's redaction keeps them in records (an id holding an e-mail becomes a hash of
        it: ``pipeline.pii.episode_key``), so that feedback on such an episode still joins. ``episodes``: the
        changed names, given the names."""
        self.episode_of = episodes(sorted(set(self.episode) | set(self.comments)))
        for old, new in self.episode_of.items():
            if old in self.episode:  # merged with feedback that named the hashed id already
                self.episode[new] = {**self.episode.get(new, {}), **self.episode.pop(old)}
            if old in self.comments:  # a record id's comments stay under it too
                self.comments[new] = [*self.comments.get(new, []), *self.comments[old]]
        self._targets = None

    def __bool__(self) -> bool:
        return bool(self.inference or self.episode or self.demonstrations or self.comments)

    def targets(self) -> tuple[pa.Array, pa.Array]:
        """Record ids and episode ids that have something to join (for a quick test of a whole batch)."""
        if self._targets is None:
            inf = set(self.inference) | set(self.demonstrations) | set(self.comments)
            self._targets = (pa.array(sorted(inf), pa.string()),
                             pa.array(sorted(set(self.episode) | set(self.comments)), pa.string()))
        return self._targets

    def matched_rows(self, ids: set[str], episodes: set[str]) -> tuple[int, int]:
        """(rows that match a record, rows that match none), given the record ids and episode ids harvested."""
        hit = sum(n for (level, t), n in self.row_targets.items()
                  if (level != "episode" and t in ids)
                  or (level != "inference" and self.episode_of.get(t, t) in episodes))
        return hit, sum(self.row_targets.values()) - hit

    def touches(self, table: pa.Table) -> pa.ChunkedArray:
        """Rows of a records table that some feedback targets."""
        inf, epi = self.targets()
        return pc.or_kleene(pc.is_in(table["id"], value_set=inf),
                            pc.fill_null(pc.is_in(table["episode_id"], value_set=epi), False))

    def apply(self, rec: dict[str, Any], counts: Counter[str] | None = None) -> bool:
        """Join feedback onto one record (in place); True when something changed. ``counts`` (when given) gets
        ``demonstrations_applied`` and ``scores_set_aside``.

        A demonstration replaces the output; every score the record had then judged the replaced answer (logged
        and inference-level feedback, and episode-level feedback of an episode that held it), so none is left to
        judge the correction: they move to the tag ``replaced_output_feedback`` (JSON)."""
        before = (dict(rec.get("feedback") or {}), rec.get("output"), dict(rec.get("tags") or {}))
        fb = dict(rec.get("feedback") or {})
        if rec.get("episode_id") is not None:
            fb.update({k: v for k, (_, v) in self.episode.get(rec["episode_id"], {}).items()})
        fb.update({k: v for k, (_, v) in self.inference.get(rec["id"], {}).items()})
        rec["feedback"] = fb
        demo = self.demonstrations.get(rec["id"])
        if demo is not None:
            rec["output"] = demo[1]
            rec["finish_reason"], rec["status_code"], rec["error"] = "stop", rec.get("status_code") or 200, None
            rec["tags"] = {**(rec.get("tags") or {}), "output_source": "demonstration"}
            if fb:
                rec["tags"]["replaced_output_feedback"] = dumps(fb)
                rec["feedback"] = {}
            if counts is not None:
                counts["demonstrations_applied"] += 1
                counts["scores_set_aside"] += len(fb)
        notes = self.comments.get(rec["id"], []) + self.comments.get(rec.get("episode_id") or "", [])
        if notes:
            rec["tags"] = {**(rec.get("tags") or {}), "comment": "\n".join(notes)}
        return (rec["feedback"], rec.get("output"), rec.get("tags") or {}) != before


def _value(v: Any) -> float:
    v = decode_json_text(v)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "false"):
            return float(s == "true")
        try:
            return float(s)
        except ValueError:
            pass
    raise BadRecord("value is not a number or a boolean")


def _order(row: dict[str, Any], src: FeedbackSource, pos: int) -> tuple[float, int]:
    t: datetime | None = None
    raw = dotted(row, src.timestamp_field) if src.timestamp_field else None
    if raw is not None:
        t = timestamp(raw, "feedback timestamp")
    elif src.format == "tensorzero":
        t = uuid7_time(row.get("id"))
    return (t.timestamp() if t else float("-inf"), pos)


def _demonstration(v: Any) -> dict[str, Any]:
    v = decode_json_text(v)
    if isinstance(v, list):
        out = _tz_output(v, "chat")
        assert out is not None
        return out
    if isinstance(v, dict):
        return message("assistant", v["raw"] if isinstance(v.get("raw"), str) else dumps(v))
    if isinstance(v, str):
        return message("assistant", v)
    raise BadRecord("demonstration value must be text, content blocks or a JSON object")


def add_row(index: FeedbackIndex, row: Any, src: FeedbackSource, pos: int) -> None:
    """One feedback row into the index; raises BadRecord with the reason."""
    if not isinstance(row, dict):
        raise BadRecord(f"row is a JSON {type(row).__name__}, not an object")
    order = _order(row, src, pos)
    if src.format == "tensorzero":
        # Metric rows: target_id, metric_name, value. Comments: target_id, target_type, value. Demonstrations:
        # inference_id, value. /feedback request bodies: metric_name, inference_id or episode_id, value.
        target = row.get("target_id") or row.get("inference_id") or row.get("episode_id")
        name = row.get("metric_name")
        if name is None:
            name = "comment" if "target_type" in row else "demonstration" if "inference_id" in row else None
        if row.get("target_type") in ("inference", "episode"):
            level = row["target_type"]
        elif row.get("target_id"):
            level = src.level
        else:
            level = "inference" if row.get("inference_id") else "episode"
        items = [(name, row.get("value"))]
    else:
        target = dotted(row, src.target_field)
        level = src.level
        if src.metric_field:
            items = [(dotted(row, src.metric_field), dotted(row, src.value_field))]
        else:
            items = [(c, row.get(c)) for c in src.metric_columns if row.get(c) is not None]
    if not isinstance(target, (str, int)) or isinstance(target, bool) or target == "":
        raise BadRecord("no target id (inference or episode id)")
    target = str(target)
    kept: set[str] = set()  # the levels at which this row's values were kept
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise BadRecord("no metric name")
        if name == "demonstration":
            if src.demonstrations == "output":
                old = index.demonstrations.get(target)
                if old is None or order >= old[0]:
                    index.demonstrations[target] = (order, _demonstration(value))
                kept.add("inference")
            continue
        if name == "comment":
            if src.comments == "tag" and isinstance(value, str):
                index.comments.setdefault(target, []).append(value)
                kept.add("auto")
            else:
                index.dropped_comments += 1
            continue
        if src.metrics is not None and name not in src.metrics:
            continue
        v = _value(value)
        index.by_metric[name] += 1
        kept.add(level)
        for lvl, table in (("inference", index.inference), ("episode", index.episode)):
            if level in (lvl, "auto"):
                slot = table.setdefault(target, {})
                if name not in slot or order >= slot[name][0]:
                    slot[name] = (order, v)
    if kept:
        index.row_targets[kept.pop() if len(kept) == 1 else "auto", target] += 1


def load(sources: list[FeedbackSource]) -> FeedbackIndex:
    """Read every feedback source into one index; unreadable rows are quarantined."""
    from curation.harvest.sql_source import label as sql_label
    from curation.harvest.sql_source import read_rows

    index = FeedbackIndex()
    pos = 0
    for which, src in enumerate(sources):
        streams: list[tuple[str, Any]] = []
        if src.sql is not None:
            streams.append((f"sql:{sql_label(src.sql)}", ((n, r) for n, r, _ in read_rows(src.sql))))
        else:
            for f in list_files(src, "harvest.feedback"):
                kind = f.kind(src.file_format)
                if kind == "jsonl":
                    def lines(f=f):
                        for b in line_blocks(f):
                            for i, raw in enumerate(b.data.split(b"\n")):
                                if raw.strip():
                                    yield [b.first_line + i], [raw]
                    streams.append((f.url, lines()))
                else:
                    streams.append((f.url, row_batches(f, kind)))
        for origin, batches in streams:
            for numbers, rows in batches:
                for n, row in zip(numbers, rows, strict=True):
                    pos += 1
                    index.rows += 1
                    try:
                        if isinstance(row, bytes):
                            try:
                                row = orjson.loads(row)
                            except orjson.JSONDecodeError as err:
                                row = loads_row(row, err)  # a byte order mark, raw control characters
                        if isinstance(row, BadRecord):  # a line of a .json file that is not JSON
                            raise row
                        if type(row) is Lenient:
                            index.lenient += 1
                        add_row(index, row, src, pos)
                    except BadRecord as err:
                        index.quarantine.append({"source": f"feedback[{which}]", "file": origin, "line": n,
                                                 "reason": str(err)})
    return index
