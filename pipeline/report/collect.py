"""What the report shows, read from a run directory: each stage's state and the numbers its files hold.

Everything here reads files the stages wrote (manifests, ``report.json``, ``metrics.jsonl``, ``scores.json``,
``gate.json``, ``calibration.json``, a few parquet columns) and never fails on a missing or unreadable one: a
stage that did not run, failed or was interrupted becomes a :class:`Stage` saying so. Text from records is only
ever taken from curate's ``rejected.parquet`` rows dropped *after* the PII operator (PII and secrets already
redacted there), and only when the recipe did not keep PII.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

from pipeline.rundir import digest
from pipeline.stages import STAGES

PACKAGES = ("distill", "torch", "transformers", "peft", "trl", "datasets", "tokenizers", "safetensors", "numpy",
            "pyarrow", "matplotlib")
EXAMPLES = 6  # redacted examples of dropped records shown
EXCERPT = 160  # characters of a redacted text shown


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Stage:
    """One stage as the report sees it. ``state``: complete, failed, blocked (the gate refused to publish),
    interrupted or not run."""

    name: str
    state: str
    folder: Path
    manifest: dict[str, Any] | None = None
    message: str = ""
    where: str = ""  # the file that says more (a traceback, the gate's verdict)

    @property
    def done(self) -> bool:
        return self.state == "complete"


@dataclass
class Outcome:
    """How the command that ran the pipeline ended: None (done), or the stage that failed and why."""

    stage: str | None = None
    message: str = ""
    exit_code: int = 0


def _last_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def stage_states(run: Path, outcome: Outcome | None = None) -> dict[str, Stage]:
    """The state of each of the six stages, from their manifests, the partial folders and error files. A failure
    newer than a stage's manifest (or the command's own outcome) wins over that earlier complete result."""
    out: dict[str, Stage] = {}
    for name in STAGES:
        folder, partial = run / name, run / ".partial"
        m = read_json(folder / "manifest.json")
        m = m if isinstance(m, dict) and m.get("status") == "complete" else None
        done_at = _mtime(folder / "manifest.json") if m else -1.0
        err, gate_path = partial / f"{name}.error.txt", partial / name / "gate.json"
        gate = read_json(gate_path)
        mine = outcome is not None and outcome.stage == name
        if (name == "export" and isinstance(gate, dict) and gate.get("passed") is False
                and (mine or _mtime(gate_path) > done_at)):
            why = "; ".join(gate.get("failures") or []) or "the gate failed"
            out[name] = Stage(name, "blocked", folder, None, f"the quality gate blocked publishing: {why}",
                              str(gate_path))
        elif mine:
            message = " ".join(outcome.message.split())
            out[name] = Stage(name, "failed", folder, None, message[:400], str(err) if err.is_file() else "")
        elif _mtime(err) > done_at:
            out[name] = Stage(name, "failed", folder, None, _last_line(err.read_text(errors="replace")), str(err))
        elif m:
            out[name] = Stage(name, "complete", folder, m)
        elif (partial / name / ".started.json").is_file():
            out[name] = Stage(name, "interrupted", folder, None, "started and not finished: still running, or stopped (the same command resumes it)",
                              str(partial / name))
        else:
            out[name] = Stage(name, "not run", folder)
    return out


def train_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Series from metrics.jsonl: {name: [(step, value)]} for the losses, KD terms and learning rate."""
    series: dict[str, list[tuple[float, float]]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return series
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step")
        if not isinstance(step, int | float):
            continue
        for k, v in row.items():
            if k in ("step", "epoch", "time", "train_loss") or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if k in ("loss", "eval_loss", "learning_rate") or "kl" in k or "kd" in k or k.endswith("_loss"):
                series.setdefault(k, []).append((float(step), float(v)))
    return series


def batches(harvest: Path) -> list[tuple[str, int]]:
    """Records per harvest batch (one batch per run of an incremental harvest), from parquet metadata."""
    import pyarrow.parquet as pq

    per: Counter[str] = Counter()
    for p in sorted(harvest.glob("records-*.parquet")):
        m = re.match(r"records-b(\d+)-", p.name)
        try:
            rows = pq.ParquetFile(p).metadata.num_rows
        except Exception:  # noqa: BLE001 - an unreadable file is left out of the picture
            continue
        per[f"run {int(m.group(1))}" if m else p.stem] += rows
    return sorted(per.items(), key=lambda kv: int(kv[0].split()[-1]) if kv[0].split()[-1].isdigit() else 0)


def _excerpt(text: Any) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= EXCERPT else s[: EXCERPT - 1] + "…"


def redacted_examples(curate: Path, report: dict[str, Any], pii_action: str | None) -> list[dict[str, str]]:
    """A few dropped records (operator, reason, last user turn, output) from rejected.parquet, only from the
    operators after ``pii`` in the chain (whose text was redacted before they saw it) and only when the recipe
    redacts, masks or drops PII. Empty when that cannot be known (no recipe, no pii operator)."""
    import pyarrow.parquet as pq

    ops = list((report or {}).get("operators") or {})
    if pii_action in (None, "keep") or "pii" not in ops:
        return []
    after = ops[ops.index("pii") + 1:]
    try:
        rows = pq.read_table(curate / "rejected.parquet", columns=["rejected_by", "reason", "messages", "output"])
    except Exception:  # noqa: BLE001 - no examples rather than no report
        return []
    picked: list[dict[str, str]] = []
    seen: Counter[str] = Counter()
    for r in rows.to_pylist():
        op = r.get("rejected_by")
        if op not in after or seen[op] >= 1 or len(picked) >= EXAMPLES:
            continue
        users = [m.get("content") for m in (r.get("messages") or []) if m and m.get("role") == "user"]
        seen[op] += 1
        picked.append({"operator": op, "reason": _excerpt(r.get("reason")),
                       "input": _excerpt(users[-1] if users else ""),
                       "output": _excerpt((r.get("output") or {}).get("content"))})
    return picked


def field_accuracy(predictions: Path) -> dict[str, dict[str, tuple[float, int]]]:
    """For JSON answers: {function: {field: (share of answers with the teacher's value, n)}}, computed from
    evaluate's predictions.parquet (the reference is the teacher's answer)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(predictions, columns=["function", "reference", "prediction"]).to_pylist()
    except Exception:  # noqa: BLE001
        return {}
    hits: dict[str, Counter[str]] = {}
    totals: dict[str, Counter[str]] = {}
    for r in rows:
        try:
            ref = json.loads(r["reference"] or "")
        except ValueError:
            continue
        if not isinstance(ref, dict):
            continue
        try:
            pred = json.loads(r["prediction"] or "")
        except ValueError:
            pred = None
        fn = r["function"] or "?"
        for k, v in ref.items():
            totals.setdefault(fn, Counter())[k] += 1
            hits.setdefault(fn, Counter())[k] += int(isinstance(pred, dict) and pred.get(k) == v)
    return {fn: {k: (hits[fn][k] / n, n) for k, n in sorted(t.items())} for fn, t in sorted(totals.items())}


def escalation_reason(reason: str) -> str:
    """The kind of a reason the router gave for sending a request to the teacher (numbers left out)."""
    r = reason.lower()
    for key, kind in (("student confidence", "student not confident enough (after answering)"),
                      ("tokens, over", "input longer than in training"), ("language uncertain", "language uncertain"),
                      ("not in training", "language not in training"), ("over the limit", "far from the training inputs"),
                      ("function", "function not routed to the student")):
        if key in r:
            return kind
    return re.sub(r"-?\d+(\.\d+)?", "#", reason)


def escalations(heldout: Path) -> tuple[Counter[str], int]:
    """(reasons the held-out requests that went to the teacher were escalated for, held-out requests)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(heldout, columns=["route", "reasons"]).to_pylist()
    except Exception:  # noqa: BLE001
        return Counter(), 0
    c: Counter[str] = Counter()
    for r in rows:
        if r["route"] == "teacher":
            c[escalation_reason((r["reasons"] or ["?"])[-1])] += 1
    return c, len(rows)


def packages() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = pkg_version(p)
        except PackageNotFoundError:
            continue
    return out


def teacher_models(curate: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        col = pq.read_table(curate / "train.parquet", columns=["teacher"]).column("teacher").to_pylist()
    except Exception:  # noqa: BLE001
        return []
    return sorted({t["model"] for t in col if t and t.get("model")})


@dataclass
class Store:
    """Where this run publishes, what it published, and the version before it (its manifest), if any."""

    path: str | None = None
    name: str | None = None
    version: str | None = None  # this run's
    manifest: dict[str, Any] | None = None  # this run's version's
    previous: dict[str, Any] | None = None


def store_versions(store: str | None, name: str | None, train_fingerprint: str | None,
                   published: str | None) -> Store:
    """This run's published version and the newest earlier one, skipping versions of this very student (the
    same training fingerprint), so that a republished run never compares with itself."""
    from pipeline import store as st

    s = Store(store, name, published)
    if not store or not name:
        return s
    try:
        names = st.versions(store, name)
        if published in names:
            s.manifest = st.manifest(store, name, published)
            names = names[: names.index(published)]
        for v in reversed(names):
            m = st.manifest(store, name, v)
            if train_fingerprint is None or (m.get("lineage") or {}).get("train_fingerprint") != train_fingerprint:
                s.previous = m
                break
    except Exception:  # noqa: BLE001 - an unreadable store means nothing to compare with
        pass
    return s


@dataclass
class RunData:
    """Everything the page shows."""

    run: Path
    name: str
    stages: dict[str, Stage]
    recipe: dict[str, Any] | None = None  # the recipe as JSON, when known
    outcome: Outcome | None = None
    pending_export: dict[str, Any] | None = None  # the version manifest export is publishing (store copy)
    files: dict[str, Any] = field(default_factory=dict)
    store: Store = field(default_factory=Store)

    def recipe_sha256(self) -> str | None:
        return digest(self.recipe) if self.recipe is not None else None


def collect(run: Path, recipe: Any = None, outcome: Outcome | None = None,
            pending_export: dict[str, Any] | None = None) -> RunData:
    """Read the run directory. ``recipe``: the loaded Recipe (for its hash, the store and the PII setting);
    ``pending_export``: the manifest of the version export is about to publish (the copy in the store)."""
    stages = stage_states(run, outcome)
    if pending_export is not None:
        stages["export"] = Stage("export", "published", run / "export", None, "with this report")
    cfg = recipe.model_dump(mode="json") if recipe is not None else None
    data = RunData(run, getattr(recipe, "name", None) or run.name, stages, cfg, outcome, pending_export)
    f = data.files
    f["harvest"] = read_json(run / "harvest/manifest.json") if stages["harvest"].done else None
    if stages["harvest"].done:
        f["batches"] = batches(run / "harvest")
    if stages["curate"].done:
        f["curate"] = read_json(run / "curate/report.json")
        pii = (cfg or {}).get("curate", {}).get("pii", {}).get("action") if cfg else None
        f["examples"] = redacted_examples(run / "curate", f["curate"] or {}, pii)
        f["teachers"] = teacher_models(run / "curate")
    if stages["train"].done:
        f["student"] = read_json(run / "train/student.json")
        f["metrics"] = train_metrics(run / "train/metrics.jsonl")
    if stages["evaluate"].done:
        f["scores"] = read_json(run / "evaluate/scores.json")
        f["gate"] = read_json(run / "evaluate/gate.json")
        f["fields"] = field_accuracy(run / "evaluate/predictions.parquet")
    if stages["route"].done:
        f["calibration"] = read_json(run / "route/calibration.json")
        f["policy"] = read_json(run / "route/routing_policy.json")
        f["escalations"], f["heldout"] = escalations(run / "route/heldout.parquet")
    if stages["export"].done:
        f["export_gate"] = read_json(run / "export/gate.json")

    published = read_json(run / "export/published.json") if stages["export"].done else None
    exp = (cfg or {}).get("export") or {}
    store = (published or {}).get("store") or exp.get("store")
    name = (published or {}).get("name") or exp.get("model_name")
    train_fp = (stages["train"].manifest or {}).get("fingerprint")
    data.store = store_versions(store, name, train_fp, (published or {}).get("version"))
    return data
