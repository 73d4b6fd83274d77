"""``distill ledger``: serve-router's logs rolled up by day, function and version into a savings ledger.

Every line serve-router logs carries ``routing.cost`` (see ``RouterProxy.costs``): what the call cost (``usd``: the
student's part plus the teacher's), what the teacher alone would have cost (``teacher_only_usd``) and the difference
(``saved_usd``). Per (day, function, version) -- day the UTC date of the line's timestamp, function the request's
``metadata.function``, version the routing policy's sha256 prefix (``routing.policy_sha256``) -- the ledger sums them
and counts requests, student answers (``student_share``) and escalations: requests the student answered whose
answer failed the check or whose endpoint failed, so the teacher answered (``escalation_rate`` = escalated / the
requests the student answered). Lines without a price (a teacher that returned no usage, a policy without prices)
count as ``unpriced`` and add no dollars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.route.drift import read_logs

SUMS = ("requests", "student", "tried", "escalated", "spent_usd", "teacher_only_usd", "saved_usd", "unpriced")


def _row(lines: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SUMS, 0)
    for x in lines:
        routing = x.get("routing") or {}
        cost = routing.get("cost") or {}
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
    return row


def routed_lines(logs: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The routed calls under logs (a folder's student-*.jsonl and teacher-*.jsonl, or a file or glob) and the
    number of lines that could not be read (a torn last line, say)."""
    p = Path(logs)
    sources = [p / "student-*.jsonl*", p / "teacher-*.jsonl*"] if p.is_dir() else [p]
    lines, bad = [], 0
    for src in sources:
        try:
            got, n = read_logs(src)
        except FileNotFoundError:
            continue
        lines += [x for x in got if isinstance(x.get("routing"), dict)]
        bad += n
    if not lines and not bad:
        raise FileNotFoundError(f"--logs {logs}: no serve-router logs (student-*.jsonl, teacher-*.jsonl) there")
    return lines, bad


def ledger(logs: str | Path) -> dict[str, Any]:
    """{rows: one per (day, function, version), total, unreadable_lines}."""
    lines, bad = routed_lines(logs)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for x in lines:
        fn = ((x.get("request") or {}).get("metadata") or {}).get("function") or "-"
        key = (str(x.get("timestamp") or "")[:10] or "-", str(fn), str(x["routing"].get("policy_sha256") or "-"))
        groups.setdefault(key, []).append(x)
    rows = [{"day": d, "function": f, "version": v, **_row(group)} for (d, f, v), group in sorted(groups.items())]
    return {"rows": rows, "total": _row(lines), "unreadable_lines": bad}
