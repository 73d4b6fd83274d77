"""The quality gate: may this student be published?

Two checks per function, on the recipe's quality metric (points are percentage points, 0-100):

- against the teacher: the student may be at most ``max_points_below_teacher`` below it. With agreement
  metrics the teacher's own answers are the reference, so the teacher scores 100; with the LLM judge the
  teacher's answers are graded like the student's;
- against the student currently published in the store: at most ``max_regression_points`` lost;
- on the golden set (``evaluate.golden``, scored against its reviewed answers): at least ``golden_min_quality``
  points (per-function overrides in ``golden_functions``).

Both stages compute it in one place, :func:`against_store`: evaluate reports it in ``gate.json`` (a store it
cannot read counts as nothing published); export computes it again against the store as it is when publishing
(a store it cannot read is an error) and alone decides: it refuses to publish a student that fails (exit code 5).
"""

from __future__ import annotations

from typing import Any

from pipeline.config.evaluate import GateConfig

EXIT_GATE_FAILED = 5


def teacher_score(summary: dict[str, Any], metric: str) -> float:
    """The teacher's quality on a function, 0-1."""
    if metric == "judge":
        v = summary.get("judge_teacher")
        return 1.0 if v is None else float(v)
    return 1.0


def teacher_checks(functions: dict[str, dict[str, Any]], cfg: GateConfig, metric: str) -> list[dict[str, Any]]:
    out = []
    for fn, s in functions.items():
        allowed = cfg.functions.get(fn, cfg.max_points_below_teacher)
        if allowed is None:
            continue
        check: dict[str, Any] = {"function": fn, "kind": "teacher", "n": s["n"], "allowed_points": allowed}
        if s["n"] < cfg.min_records or s.get("quality") is None:
            out.append({**check, "passed": True, "skipped": f"only {s['n']} held-out records"
                        if s["n"] < cfg.min_records else "no quality score"})
            continue
        student, teacher = 100 * s["quality"], 100 * teacher_score(s, metric)
        below = teacher - student
        out.append({**check, "student": round(student, 4), "teacher": round(teacher, 4),
                    "points_below": round(below, 4), "passed": below <= allowed + 1e-9})
    return out


def regression_checks(functions: dict[str, dict[str, Any]], cfg: GateConfig, metric: str,
                      published: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Checks against a published version's manifest (None: nothing published yet, nothing to check)."""
    if cfg.max_regression_points is None or not published:
        return []
    scores = published.get("scores") or {}
    version = published.get("version")
    if scores.get("quality_metric") != metric:
        return [{"function": "*", "kind": "regression", "published_version": version, "passed": True,
                 "skipped": f"the published version was scored with {scores.get('quality_metric') or 'another metric'}"
                            f", not {metric}"}]
    out = []
    for fn, s in functions.items():
        old = (scores.get("functions") or {}).get(fn, {}).get("quality")
        if old is None or s.get("quality") is None or s["n"] < cfg.min_records:
            continue
        lost = 100 * (old - s["quality"])
        out.append({"function": fn, "kind": "regression", "published_version": version,
                    "published": round(100 * old, 4), "student": round(100 * s["quality"], 4),
                    "points_lost": round(lost, 4), "allowed_points": cfg.max_regression_points,
                    "passed": lost <= cfg.max_regression_points + 1e-9})
    return out


def golden_checks(golden: dict[str, dict[str, Any]] | None, cfg: GateConfig) -> list[dict[str, Any]]:
    """Each function's quality on the golden set against its floor (nothing when no floor is set)."""
    out = []
    for fn, s in (golden or {}).items():
        floor = cfg.golden_functions.get(fn, cfg.golden_min_quality)
        if floor is None:
            continue
        check: dict[str, Any] = {"function": fn, "kind": "golden", "n": s["n"], "min_points": floor}
        if s.get("quality") is None:  # a floor nothing was measured against is not cleared
            out.append({**check, "passed": False, "unscored": True})
            continue
        student = 100 * s["quality"]
        out.append({**check, "student": round(student, 4), "passed": student >= floor - 1e-9})
    for fn in sorted(set(cfg.golden_functions) - set(golden or {})):
        out.append({"function": fn, "kind": "golden", "n": 0, "min_points": cfg.golden_functions[fn],
                    "passed": False, "missing": True})
    return out


def failures(checks: list[dict[str, Any]]) -> list[str]:
    """One line per failed check: which function failed by how much."""
    lines = []
    for c in checks:
        if c["passed"]:
            continue
        if c["kind"] == "golden":
            lines.append(f"{c['function']}: not in the golden set, which gate.golden_functions names" if c.get("missing")
                         else f"{c['function']}: no quality score on the golden set, which has a floor of "
                              f"{c['min_points']:g} (n={c['n']})" if c.get("unscored")
                         else f"{c['function']}: {c['student']:.1f} on the golden set, below its floor of "
                              f"{c['min_points']:g} (n={c['n']})")
        elif c["kind"] == "teacher":
            lines.append(f"{c['function']}: {c['points_below']:.1f} points below the teacher "
                         f"({c['student']:.1f} vs {c['teacher']:.1f}; allowed {c['allowed_points']:g})")
        else:
            lines.append(f"{c['function']}: {c['points_lost']:.1f} points below the published "
                         f"{c['published_version']} ({c['student']:.1f} vs {c['published']:.1f}; "
                         f"allowed {c['allowed_points']:g})")
    return lines


def result(checks: list[dict[str, Any]], metric: str, published_version: str | None) -> dict[str, Any]:
    fails = failures(checks)
    return {"passed": not fails, "metric": metric, "published_version": published_version,
            "checks": checks, "failures": fails}


def check(functions: dict[str, dict[str, Any]], cfg: GateConfig, metric: str,
          published: dict[str, Any] | None, golden: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole gate on per-function summaries (with ``quality`` in 0-1); ``golden``: the golden set's."""
    checks = (teacher_checks(functions, cfg, metric) + regression_checks(functions, cfg, metric, published)
              + golden_checks(golden, cfg))
    return result(checks, metric, (published or {}).get("version"))


class StoreUnreadable(RuntimeError):
    """The store the published student is read from cannot be read (an I/O error, a bad URL, or fsspec lacking
    the URL's backend); the message names the store."""


def published_manifest(store: str, name: str, strict: bool = False) -> dict[str, Any] | None:
    """The manifest of the version ``latest`` points at, or None when nothing is published. A store that cannot
    be read raises :class:`StoreUnreadable` when ``strict``, else counts as nothing published (None)."""
    from pipeline.store import latest_manifest

    try:
        return latest_manifest(store, name)
    except (OSError, ValueError, ImportError) as err:  # ImportError: fsspec lacks the URL's backend (extra cloud)
        if strict:
            raise StoreUnreadable(f"cannot read the store {store}: {err}") from err
        return None


def against_store(functions: dict[str, dict[str, Any]], cfg: GateConfig, metric: str, store: str, name: str,
                  strict: bool, golden: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole gate (:func:`check`), the regression part against the version of ``name`` published in ``store``
    now. ``strict``: a store that cannot be read raises :class:`StoreUnreadable` (export, which publishes);
    otherwise it counts as nothing published (evaluate, which only reports)."""
    return check(functions, cfg, metric, published_manifest(store, name, strict), golden)
