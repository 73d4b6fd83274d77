"""``distill ledger``: serve-router's logs rolled up by day, function and version into a savings ledger.

Every line serve-router logs carries ``routing.cost`` (see ``RouterProxy.costs``): what the call cost (``usd``: the
student's part plus the teacher's), what the teacher alone would have cost (``teacher_only_usd``) and the difference
(``saved_usd``). Per (day, function, version) -- day the UTC date of the line's timestamp, function the request's
``metadata.function``, version the routing policy's sha256 prefix (``routing.policy_sha256``) -- the ledger sums them
and counts requests, student answers (``student_share``) and escalations: requests the student answered whose
answer failed the check or whose endpoint failed, so the teacher answered (``escalation_rate`` = escalated / the
requests the student answered). Lines without a price (a teacher that returned no usage, a policy without prices)
count as ``unpriced`` and add no dollars.

With the live loop (docs/live.md): the version is ``routing.version`` (a store version) where the line has one. A
teacher call that audited a student answer (``routing.audit``) is not a request: it is counted in ``audits`` and
its cost is money spent (``spent_usd``, and less ``saved_usd``). ``live_quality`` is the mean audited quality of
the student's answers (``live-<date>.jsonl``), ``live_audits`` how many were scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.route.drift import read_logs

SUMS = ("requests", "student", "tried", "escalated", "spent_usd", "teacher_only_usd", "saved_usd", "unpriced",
        "audits", "live_audits")


def _audit_cost(row: dict[str, Any], cost: dict[str, Any]) -> None:
    row["audits"] += 1
    if cost.get("usd") is None:
        row["unpriced"] += 1
        return
    row["spent_usd"] += cost["usd"]
    row["saved_usd"] -= cost["usd"]


def _row(lines: list[dict[str, Any]], scores: list[float] = ()) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SUMS, 0)
    for x in lines:
        routing = x.get("routing") or {}
        cost = routing.get("cost") or {}
        if routing.get("audit"):
            _audit_cost(row, cost)
            continue
        student = routing.get("route") == "student"
        tried = cost.get("student_basis", "not asked") != "not asked" if cost else routing.get("phase") == "after"
        row["requests"] += 1
        row["student"] += student
        row["tried"] += tried
        row["escalated"] += tried and not student
        if any(cost.get(k) is None for k in ("usd", "teacher_only_usd", "saved_usd")):
            row["unpriced"] += 1
            continue
        row["spent_usd"] += cost["usd"]
        row["teacher_only_usd"] += cost["teacher_only_usd"]
        row["saved_usd"] += cost["saved_usd"]
    n = row["requests"]
    row["student_share"] = row["student"] / n if n else 0.0
    row["escalation_rate"] = row["escalated"] / row["tried"] if row["tried"] else 0.0
    row["saved_share"] = row["saved_usd"] / row["teacher_only_usd"] if row["teacher_only_usd"] else 0.0
    row["live_audits"] = len(scores)
    row["live_quality"] = sum(scores) / len(scores) if scores else None
    return row


ROUTING = ("route", "phase", "version", "policy_sha256", "lane", "audit", "cost", "student_unavailable",
           "student_refused", "student_status")
COST = ("usd", "teacher_only_usd", "saved_usd", "student_basis")


def slim(line: dict[str, Any]) -> dict[str, Any]:
    """What the ledger and the live loop read of a logged call (and the last reason only): no request, answer or
    signals, so an hourly decision over 14 days of logs holds a fraction of each call, not the call."""
    routing = line.get("routing")
    fn = ((line.get("request") or {}).get("metadata") or {}).get("function")
    if isinstance(routing, dict):
        reasons, cost = routing.get("reasons"), routing.get("cost")
        routing = {k: routing[k] for k in ROUTING if k in routing} | (
            {"reasons": reasons[-1:]} if isinstance(reasons, list) else {})
        if isinstance(cost, dict):
            routing["cost"] = {k: cost[k] for k in COST if k in cost}
    return {"timestamp": line.get("timestamp"), "latency_ms": line.get("latency_ms"),
            "status_code": line.get("status_code"), "request": {"metadata": {"function": fn}}, "routing": routing}


def routed_lines(logs: str | Path, day: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """The routed calls under logs (a folder's student-*.jsonl and teacher-*.jsonl, or a file or glob), ``slim``,
    and the number of lines that could not be read (a torn last line, say)."""
    p = Path(logs)
    sources = [p / "student-*.jsonl*", p / "teacher-*.jsonl*"] if p.is_dir() else [p]
    lines, bad = [], 0
    for src in sources:
        try:
            got, n = read_logs(src, day=day, keep=slim)
        except FileNotFoundError:
            continue
        lines += [x for x in got if isinstance(x.get("routing"), dict)]
        bad += n
    if not lines and not bad:
        raise FileNotFoundError(f"--logs {logs}: no serve-router logs (student-*.jsonl, teacher-*.jsonl) there")
    return lines, bad


def _scores(logs: str | Path) -> dict[tuple[str, str, str], list[float]]:
    """Audited qualities per (day, function, version), from live-*.jsonl."""
    from export.route.live import live_version, read_live

    out: dict[tuple[str, str, str], list[float]] = {}
    for r in read_live(logs)[0]:
        if r.get("kind") == "audit" and isinstance(r.get("quality"), (int, float)):
            key = (str(r.get("timestamp") or "")[:10] or "-", str(r.get("function") or "default"), live_version(r))
            out.setdefault(key, []).append(float(r["quality"]))
    return out


def ledger(logs: str | Path) -> dict[str, Any]:
    """{rows: one per (day, function, version), total, unreadable_lines}."""
    lines, bad = routed_lines(logs)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for x in lines:
        fn = ((x.get("request") or {}).get("metadata") or {}).get("function") or "default"  # as live and harvest say
        version = x["routing"].get("version") or x["routing"].get("policy_sha256") or "-"
        key = (str(x.get("timestamp") or "")[:10] or "-", str(fn), str(version))
        groups.setdefault(key, []).append(x)
    scores = _scores(logs)
    rows = [{"day": d, "function": f, "version": v, **_row(groups.get((d, f, v), []), scores.get((d, f, v), []))}
            for d, f, v in sorted({*groups, *scores})]
    return {"rows": rows, "total": _row(lines, [q for qs in scores.values() for q in qs]), "unreadable_lines": bad}
