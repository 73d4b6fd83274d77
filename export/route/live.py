"""``distill live``: how each version does on today's traffic, from serve-router's logs.

Per (version, function): requests, student share, escalation rate (escalated / requests the student was asked),
latency percentiles, and from ``live-<date>.jsonl`` the audited quality of the student's answers against the
teacher's (mean and Wilson confidence interval) and the live *routed* quality it implies, ``1 - share * (1 -
audited quality)`` (the teacher's answer scores 1 against itself, as in the route stage's calibration); for a
candidate in shadow, its scored answers, the share it would have answered and its escalation rate. A version is
``routing.version`` (serve-router with a deployment file), else the policy's sha256 prefix.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from export.route.drift import log_files, text_lines
from export.route.ledger import routed_lines
from export.route.wire import STUDENT_FAILED

# A line logged before serve-router said so (2026-12-07): unavailable when the endpoint answered 429 or 503, a load
# balancer 502 (a body that was not JSON), or no connection could be made; other 502s were serve-router's own.
UNAVAILABLE_BEFORE = re.compile(rf"{STUDENT_FAILED}: HTTP (?:(?:429|503)\b|502 (?:cannot reach \S+: "
                                r"(?:ClientConnector\w*Error|ConnectionTimeoutError|serve-router is out of file "
                                r"descriptors)|.*\(HTTP 502\)$))")


def version_of(line: dict[str, Any]) -> str:
    r = line.get("routing") or {}
    return str(r.get("version") or r.get("policy_sha256") or "-")


def live_version(record: dict[str, Any]) -> str:
    return str(record.get("version") or record.get("policy_sha256") or "-")


def function_of(line: dict[str, Any]) -> str:
    return str(((line.get("request") or {}).get("metadata") or {}).get("function") or "default")


def tried(line: dict[str, Any]) -> bool:
    """Whether the student was asked (the ledger's rule)."""
    r = line.get("routing") or {}
    cost = r.get("cost") or {}
    return cost.get("student_basis", "not asked") != "not asked" if cost else r.get("phase") == "after"


def unavailable(line: dict[str, Any]) -> bool:
    """Whether the teacher answered because the student's endpoint was unavailable: no connection could be made
    (down, a wrong URL), or the endpoint (or its load balancer) answered HTTP 429, 502 or 503 (serve-router marks
    these ``routing.student_unavailable``; a line logged before it said so is read by its reason). That says
    nothing about the version's answers, so it is no escalation of them. Any other failure (another HTTP error, a
    timeout, an answer that is not JSON or broke off, a stream that began with an error) counts against the
    version: it would have failed a client too, and is often the version's own doing (a shorter context window,
    a slower model)."""
    routing = line.get("routing") or {}
    if "student_unavailable" in routing:
        return bool(routing["student_unavailable"])
    reasons = routing.get("reasons") or []
    return bool(reasons) and bool(UNAVAILABLE_BEFORE.match(str(reasons[-1])))


def refused(line: dict[str, Any]) -> bool:
    """Whether the student's endpoint refused the request (an HTTP 4xx other than 408 and 429: serve-router marks
    it ``routing.student_refused``; lines logged before 2026-12-07 do not say, and count as escalations). No
    escalation of the version's answers: a client can send what an endpoint does not serve (``n`` > 1 to
    ``distill serve-student``), and 700 such requests rolled a good version back."""
    return bool((line.get("routing") or {}).get("student_refused"))


MISCONFIGURED = (401, 403, 404)  # a refusal that says the endpoint is set up wrong: key, URL path, model name


def misconfigured(line: dict[str, Any]) -> bool:
    """Whether the student's endpoint refused the request as a misconfigured one would (HTTP 401, 403 or 404: a
    wrong key, URL path or model name), not for what the request asked."""
    return refused(line) and (line.get("routing") or {}).get("student_status") in MISCONFIGURED


def no_answer(line: dict[str, Any]) -> bool:
    """Whether the student's endpoint gave no answer to judge: unavailable, or it refused the request."""
    return unavailable(line) or refused(line)


def read_live(logs: str | Path, day: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """The live-loop records (live-*.jsonl and rotated live-*.jsonl.gz under a folder), oldest first, and the
    unreadable lines."""
    p = Path(logs)
    try:
        files = [f for f in log_files(p / "live-*.jsonl*" if p.is_dir() else p, day) if f.name.startswith("live-")]
    except FileNotFoundError:
        return [], 0
    out, bad = [], 0
    for f in files:
        raws, damaged = text_lines(f)
        bad += damaged
        for raw in raws:
            try:
                rec = json.loads(raw)
            except ValueError:
                bad += bool(raw.strip())
                continue
            if isinstance(rec, dict) and isinstance(rec.get("kind"), str):
                out.append(rec)
            else:
                bad += 1
    out.sort(key=lambda r: str(r.get("timestamp", "")))
    return out, bad


def read_routed(logs: str | Path, day: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(routed calls oldest first, audit calls, unreadable lines) from student-*.jsonl and teacher-*.jsonl (with
    ``day``: not the files of earlier days)."""
    lines, bad = routed_lines(logs, day)
    lines.sort(key=lambda x: str(x.get("timestamp", "")))
    calls = [x for x in lines if not x["routing"].get("audit")]
    return calls, [x for x in lines if x["routing"].get("audit")], bad


def mean_ci(xs: list[float], level: float = 0.95) -> dict[str, Any]:
    """n, mean and the Wilson score interval of the mean of scores in [0, 1] (None where there is nothing to
    measure). For 0/1 scores it is the Wilson interval; for bounded scores (chrF, field accuracy) it takes the
    largest variance their mean allows, mean x (1 - mean), so it is wider than it need be, never narrower. The
    bootstrap percentile interval used before covered far less than its level near a quality of 1 with tens of
    audits ([1, 1] when every audit agreed)."""
    n = len(xs)
    if not n:
        return {"n": 0, "mean": None, "ci": None}
    m = math.fsum(xs) / n
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    centre = (m + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(max(0.0, m * (1 - m)) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"n": n, "mean": m, "ci": [max(0.0, centre - half), min(1.0, centre + half)]}


def _latency(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p = np.percentile(np.asarray(values, dtype=np.float64), [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def _row(calls: list[dict[str, Any]], audits: list[float], shadows: list[dict[str, Any]], level: float
         ) -> dict[str, Any]:
    n = len(calls)
    student = sum(x["routing"].get("route") == "student" for x in calls)
    down = [x for x in calls if unavailable(x)]
    asked = [x for x in calls if tried(x) and not no_answer(x)]
    escalated = sum(x["routing"].get("route") != "student" for x in asked)
    share = student / n if n else None
    q = mean_ci(audits, level)
    routed = None
    if q["mean"] is not None and share is not None:
        routed = {"mean": 1 - share * (1 - q["mean"]), "ci": [1 - share * (1 - v) for v in q["ci"]]}
    scored = [s["quality"] for s in shadows if s.get("quality") is not None]
    s_tried = [s for s in shadows if s.get("tried")]
    return {
        "requests": n, "student": student, "student_share": share, "tried": len(asked), "escalated": escalated,
        "unavailable": len(down), "refused": sum(refused(x) for x in calls),
        "escalation_rate": escalated / len(asked) if asked else None,
        "latency_ms": _latency([float(x["latency_ms"]) for x in calls if isinstance(x.get("latency_ms"),
                                                                                    (int, float))]),
        "audited_quality": q, "routed_quality": routed,
        "shadow": None if not shadows else {
            "n": len(shadows), "quality": mean_ci(scored, level),
            "student_share": sum(s.get("route") == "student" for s in shadows) / len(shadows),
            "escalation_rate": sum(bool(s.get("escalated")) for s in s_tried) / len(s_tried) if s_tried else None},
    }


def utc_iso(when: str) -> str:
    """An ISO time (``Z``, an offset, or none: UTC) as the logs write it, in UTC, so it compares as text."""
    try:
        t = datetime.fromisoformat(when)
    except ValueError:
        raise ValueError(f"--since {when!r}: give an ISO time such as 2026-12-06T00:00 (UTC unless it names an "
                         "offset, e.g. 2026-12-06T00:00+01:00)") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()


def report(logs: str | Path, since: str | None = None, level: float = 0.95,
           missing_ok: bool = False) -> dict[str, Any]:
    """{rows: one per (version, function), versions: one per version, counts, unreadable_lines}; ``since``: an
    ISO timestamp, older lines are left out. No logs: FileNotFoundError, or an empty report with ``missing_ok``
    (the first night, before anything was served)."""
    since = utc_iso(since) if since else None
    day = since[:10] if since else None  # the files of earlier days are not read
    try:
        calls, audit_calls, bad = read_routed(logs, day)
    except FileNotFoundError:
        if not (missing_ok or since):  # with since: none in the window is an empty report, not an error
            raise
        calls, audit_calls, bad = [], [], 0
    live, bad_live = read_live(logs, day)
    if since:
        calls = [x for x in calls if str(x.get("timestamp", "")) >= since]
        audit_calls = [x for x in audit_calls if str(x.get("timestamp", "")) >= since]
        live = [r for r in live if str(r.get("timestamp", "")) >= since]
    by_call: dict[tuple[str, str], list] = defaultdict(list)
    by_audit: dict[tuple[str, str], list] = defaultdict(list)
    by_shadow: dict[tuple[str, str], list] = defaultdict(list)
    for x in calls:
        by_call[version_of(x), function_of(x)].append(x)
    for r in live:
        key = (live_version(r), str(r.get("function") or "default"))
        if r["kind"] == "audit" and isinstance(r.get("quality"), (int, float)):
            by_audit[key].append(float(r["quality"]))
        elif r["kind"] == "shadow":
            by_shadow[key].append(r)
    keys = sorted({*by_call, *by_audit, *by_shadow})
    rows = [{"version": v, "function": f, **_row(by_call[v, f], by_audit[v, f], by_shadow[v, f], level)}
            for v, f in keys]
    versions = sorted({v for v, _ in keys})
    totals = [{"version": v, "function": "all", **_row(
        [x for (w, _), xs in by_call.items() if w == v for x in xs],
        [q for (w, _), qs in by_audit.items() if w == v for q in qs],
        [s for (w, _), ss in by_shadow.items() if w == v for s in ss], level)} for v in versions]
    kinds: dict[str, int] = defaultdict(int)
    for r in live:
        kinds[r["kind"]] += 1
    return {"rows": rows, "versions": totals, "since": since, "confidence_level": level,
            "counts": {"calls": len(calls), "audit_calls": len(audit_calls), **kinds},
            "unreadable_lines": bad + bad_live}
