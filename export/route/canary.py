"""The nightly decision (``distill live RECIPE --decide``): shadow -> canary -> promoted, or rolled back.

Per version, the evidence is read from serve-router's logs since the version entered its current stage:

- **guardrail** (rollback), per function: the ``detector`` (CUSUM e-detector, ``export.route.sequential``) on
  its scored answers in time order against the floor ``held-out quality - max_quality_drop`` (held-out quality:
  the policy's calibration, ``student_quality_kept``), and on its escalation rate per block of
  ``escalation_block`` requests the student was asked (``blocks``) against the ceiling ``calibrated escalation
  rate + max_escalation_rise``. ``guardrail_alpha`` is split evenly over the tests, so a version that holds its floors raises a false alarm at most about once per
  1/guardrail_alpha observations; a function whose floor is unknown is reported, not tested.
- **promotion evidence**: the ``evidence`` test (betting martingale) per stratum of functions (``strata``: each
  function with 5 % of the held-out traffic, the rarer ones together) against each answer's function's floor,
  every stratum reaching 1/alpha (``alpha``; ``promotion``), with at least ``min_audits`` scored answers in all,
  no guardrail alarm, and a stage younger than ``window_days`` (older evidence is not read).

Scored answers are, in shadow, the shadow scores (the candidate against the teacher on audited or escalated
requests) and, in canary or serving, the audits of the answers it gave. Steps, in order, one decision each:

1. the serving version breaks its guardrail: roll back to the version before it (``rollback`` of the serving
   version by name; a candidate in shadow or canary is kept, and judged on its own evidence next);
2. a candidate breaks its guardrail: withdraw it (``rollback``); in shadow with evidence: ``canary`` at
   ``canary_share``; in canary with evidence: ``promote``;
3. nothing serves yet: the store's latest version ``serve``s; no candidate and the store's latest version is new
   (neither serving, served before, nor rejected): ``shadow`` it at ``shadow_share``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from export.route import deployment, sequential
from export.route.live import (
    function_of,
    misconfigured,
    no_answer,
    read_live,
    read_routed,
    refused,
    tried,
    unavailable,
    version_of,
)


@dataclass
class Evidence:
    """What the logs say about one version in one stage."""

    scores: list[tuple[str, float]] = field(default_factory=list)  # (function, quality) in time order
    escalations: list[tuple[str, float]] = field(default_factory=list)  # (function, 1.0 escalated | 0.0 kept)


def gather(version: str, stage: str, start: str | None, calls: list[dict[str, Any]],
           live: list[dict[str, Any]]) -> Evidence:
    """The version's scored answers and escalations since ``start`` (ISO time; None: all)."""
    ev = Evidence()
    # by when the audited call was answered (an audit is scored later: queued audits of answers from before a
    # restart must not count after it); records from before 12-07 have only their own time
    recent = [r for r in live if start is None or str(r.get("call_timestamp") or r.get("timestamp", "")) >= start]
    if stage == "shadow":
        for r in recent:
            if r.get("kind") == "shadow" and r.get("version") == version:
                fn = str(r.get("function") or "default")
                if r.get("quality") is not None:
                    ev.scores.append((fn, float(r["quality"])))
                if r.get("tried"):
                    ev.escalations.append((fn, float(bool(r.get("escalated")))))
        return ev
    for r in recent:
        if r.get("kind") == "audit" and r.get("version") == version and r.get("quality") is not None:
            ev.scores.append((str(r.get("function") or "default"), float(r["quality"])))
    for x in calls:
        if version_of(x) == version and (start is None or str(x.get("timestamp", "")) >= start) and tried(x) \
                and not no_answer(x):
            ev.escalations.append((function_of(x), float(x["routing"].get("route") != "student")))
    return ev


RECENT, RECENT_S, DOWN_SHARE = 100, 3600, 0.5  # unanswered: half of its last 100 requests, still in the last hour
HOLD_SHARE = 0.1  # a candidate that did not answer more of its requests than this is not promoted


def answered_by_teacher(line: dict[str, Any]) -> bool:
    """The teacher answered the request (one it refused too was the client's mistake: it says nothing about the
    student's endpoint)."""
    return line.get("status_code") == 200


def unanswered(line: dict[str, Any]) -> bool:
    """The student's endpoint was down, or set up wrong (``live.misconfigured``), for a request the teacher then
    answered: someone must look at it. A refusal of what a request asked (``n`` > 1, a prompt over its context
    window: HTTP 400, 413, 422) is not: any client can send those, and every version refuses them alike."""
    return unavailable(line) or (misconfigured(line) and answered_by_teacher(line))


def _why(down: int, off: int, refusing: str = "as a misconfigured endpoint does (HTTP 401, 403 or 404: a wrong "
         "key, URL path or model name)") -> str:
    """What ``down`` unavailable and ``off`` refused requests were, for a message."""
    parts = ([f"unavailable (unreachable, HTTP 429, 502 or 503) on {down}"] if down else []) + (
        [f"refused the request {refusing} on {off}"] if off else [])
    return " and ".join(parts)


def _asked(version: str, start: str | None, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The version's calls since ``start`` on which its student was asked, oldest first."""
    return [x for x in calls if version_of(x) == version and (start is None or str(x.get("timestamp", "")) >= start)
            and tried(x)]


def endpoint_down(version: str, start: str | None, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """{unavailable, refused, of} when the version's student endpoint did not answer (``unanswered``) at least
    half of the last ``RECENT`` requests it was asked since ``start`` (20 at least), the newest of them too,
    within the hour: every request then goes to the teacher, which no guardrail sees (these are no escalations),
    so someone must look at its server, URL or key. A recovered endpoint's newest request succeeds, which ends the
    page; a quiet one that is still down keeps paging, however few requests it gets an hour."""
    mine = _asked(version, start, calls)[-RECENT:]
    down = sum(unanswered(x) for x in mine)
    hour = (datetime.now(timezone.utc) - timedelta(seconds=RECENT_S)).isoformat()
    if len(mine) >= 20 and down >= DOWN_SHARE * len(mine) and unanswered(mine[-1]) \
            and str(mine[-1].get("timestamp", "")) >= hour:
        off = sum(unanswered(x) and not unavailable(x) for x in mine)
        return {"unavailable": down - off, "refused": off, "of": len(mine)}
    return None


def _refused_share(recs: list[dict[str, Any]]) -> float:
    return sum(refused(x) and answered_by_teacher(x) for x in recs) / len(recs) if recs else 0.0


def held_back(version: str, stage: str, start: str | None, calls: list[dict[str, Any]],
              live: list[dict[str, Any]], serving: str | None = None) -> str | None:
    """Why a candidate with promotion evidence is not promoted: its endpoint was unavailable on more than
    ``HOLD_SHARE`` of its requests in this stage (its evidence is only the answers it gave; a version whose pods
    crash or fill up would otherwise serve everyone), or refused more of them than the serving version refused
    of its own by more than that (a shorter context window, a wrong key: what both refuse alike is the clients'
    doing, n > 1 to distill serve-student, and holds nothing back). None when it may move on."""
    base = _refused_share(_asked(serving, start, calls)) if serving else 0.0
    if stage == "shadow":  # the requests it was asked: tried shadow answers, and those its endpoint failed
        recs = [r for r in live if r.get("version") == version
                and (start is None or str(r.get("call_timestamp") or r.get("timestamp", "")) >= start)
                and ((r.get("kind") == "shadow" and r.get("tried")) or (r.get("kind") == "error"
                                                                        and r.get("what") == "shadow"
                                                                        and (r.get("unavailable")
                                                                             or r.get("refused"))))]
        down = sum(r.get("kind") == "error" and bool(r.get("unavailable")) for r in recs)
        n, off = len(recs), sum(r.get("kind") == "error" and not r.get("unavailable") for r in recs)
    else:
        mine = _asked(version, start, calls)
        down, off, n = sum(unavailable(x) for x in mine), sum(refused(x) and answered_by_teacher(x) for x in mine), \
            len(mine)
    if n < 20:
        return None
    over = off / n - base > HOLD_SHARE
    if down > HOLD_SHARE * n or over:
        refusing = f"(the serving version refused {base:.0%} of its own)" if serving else "(no version serves)"
        return (f"its student endpoint did not answer {down + (off if over else 0)} of its {n} requests in "
                f"{stage}: {_why(down, off if over else 0, refusing)}: fix its server (or see what it "
                "refused: serve-router's /health shows the last failure), then it moves on")
    return None


def blocks(pairs: list[tuple[str, float]], size: int) -> list[tuple[str, float]]:
    """Per function, the means of consecutive blocks of ``size`` observations (a last, partial block waits).
    Requests escalate together (a client's batch, retries): tested one by one, a version at its calibrated rate
    was rolled back 99 % of the time by batches of 3; block means are independent when batches are shorter than
    a block, which is what the detector's guarantee needs."""
    out: list[tuple[str, float]] = []
    by_fn: dict[str, list[float]] = {}
    for fn, x in pairs:
        xs = by_fn.setdefault(fn, [])
        xs.append(x)
        if len(xs) == size:
            out.append((fn, sum(xs) / size))
            xs.clear()
    return out


def limits(policy: dict[str, Any], cfg: Any) -> dict[str, dict[str, float | None]]:
    """Per function: the quality floor and the escalation ceiling, from the policy's calibration."""
    out = {}
    for fn, rule in (policy.get("functions") or {}).items():
        c = rule.get("calibration") or {}
        kept = c.get("student_quality_kept")
        before, after = c.get("escalated_before"), c.get("escalated_after")
        esc = after / (1 - before) if isinstance(after, (int, float)) and isinstance(before, (int, float)) \
            and before < 1 else None
        out[fn] = {"floor": max(0.0, kept - cfg.max_quality_drop) if isinstance(kept, (int, float)) else None,
                   "ceiling": min(1.0, esc + cfg.max_escalation_rise) if esc is not None else None}
    return out


def guardrail(ev: Evidence, lims: dict[str, dict[str, float | None]], cfg: Any) -> dict[str, Any]:
    """{broken, tests: [{function, what, bound, outcome}]} for the version's quality and escalation streams."""
    streams = []
    for what, pairs, key, side, delta in (("quality", ev.scores, "floor", "below", cfg.max_quality_drop),
                                          ("escalation", blocks(ev.escalations, cfg.escalation_block), "ceiling",
                                           "above", cfg.max_escalation_rise)):
        for fn in sorted({f for f, _ in pairs}):
            bound = (lims.get(fn) or {}).get(key)
            xs = [x for f, x in pairs if f == fn]
            streams.append((fn, what, bound, side, delta, xs))
    n_tests = max(1, sum(s[2] is not None for s in streams))
    tests = []
    for fn, what, bound, side, delta, xs in streams:
        row = {"function": fn, "what": what, "bound": bound, "n": len(xs), "mean": sum(xs) / len(xs)}
        if bound is not None:
            row["outcome"] = sequential.detector(xs, bound, side, cfg.guardrail_alpha / n_tests, delta).as_dict()
        tests.append(row)
    return {"broken": any((t.get("outcome") or {}).get("decided") for t in tests), "tests": tests,
            "alpha_per_test": cfg.guardrail_alpha / n_tests}


RARE = 0.05  # functions under this share of held-out traffic are tested together (one stratum)


def strata(lims: dict[str, dict[str, float | None]], mix: dict[str, float] | None) -> tuple[dict[str, list[str]],
                                                                                           list[str]]:
    """(stratum -> its functions, exempt functions) for promotion. Shares are of the held-out traffic (the
    policy's ``drift.function_mix``) among the functions with a floor. Each function with at least RARE of it is a
    stratum of its own; the rarer ones are one stratum together, or exempt when together they are under RARE too
    (the guardrail still watches them). No usable mix: each function is a stratum."""
    floored = sorted(fn for fn, lim in lims.items() if lim.get("floor") is not None)
    seen = {fn: mix.get(fn) or 0.0 for fn in floored} if isinstance(mix, dict) else {}
    usable = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in seen.values())
    total = sum(seen.values()) if usable else 0.0
    if not total > 0:  # no mix, an unusable one, or none of it for these functions: each is a stratum
        return {fn: [fn] for fn in floored}, []
    share = {fn: v / total for fn, v in seen.items()}  # among the functions promotion can test
    rare = [fn for fn in floored if share[fn] < RARE]
    out = {fn: [fn] for fn in floored if fn not in rare}
    if rare and (sum(share[fn] for fn in rare) >= RARE or not out):
        return {**out, "rare functions": rare}, []
    return out, rare


def promotion(ev: Evidence, lims: dict[str, dict[str, float | None]], cfg: Any,
              mix: dict[str, float] | None = None) -> dict[str, Any]:
    """Evidence, at level alpha, that the version is above its floors in every stratum of functions
    (``strata``): each reaches 1/alpha on its own (an intersection-union test: level alpha without splitting it),
    a stratum with no scored answer yet included. One test on all scores pooled showed only that their
    traffic-weighted mean was above the floors (a candidate below its floor in a function with a large share of
    the traffic could be promoted), and a function with no scored answer was not tested at all."""
    groups, exempt = strata(lims, mix)
    of = {fn: name for name, fns in groups.items() for fn in fns}
    by: dict[str, list[tuple[float, float]]] = {name: [] for name in groups}
    for fn, x in ev.scores:
        if fn in of:
            by[of[fn]].append((x, lims[fn]["floor"]))
    tests = {name: sequential.evidence([x for x, _ in xs], [f for _, f in xs], "above", cfg.alpha,
                                       cfg.max_quality_drop) for name, xs in by.items()}
    n = sum(map(len, by.values()))
    waiting = [name for name, t in tests.items() if not t.decided]
    return {"ready": bool(tests) and not waiting and n >= cfg.min_audits, "n": n, "min_audits": cfg.min_audits,
            "mean": sum(x for xs in by.values() for x, _ in xs) / n if n else None, "waiting_for": waiting,
            "exempt": exempt, "functions": {name: {"functions": groups[name], "n": len(by[name]),
                                                   "mean": sum(x for x, _ in by[name]) / len(by[name]) if by[name]
                                                   else None, **tests[name].as_dict()} for name in tests}}


def _newer(dep: dict[str, Any], latest: str | None) -> bool:
    return bool(latest) and latest != dep.get("serving") and latest not in dep.get("previous", []) \
        and latest not in dep.get("rejected", []) and not dep.get("candidate")


def decide(dep: dict[str, Any], policies: dict[str, dict[str, Any]], latest: str | None,
           calls: list[dict[str, Any]], live: list[dict[str, Any]], cfg: Any,
           floor: str | None = None, notes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Apply this run's decisions to ``dep`` in place; returns the history entries written (plus, where the
    serving version broke its guardrail with nothing to roll back to, an entry with action 'broken').
    ``floor``: evidence older than this ISO time is not used (``window_days``). ``notes`` gets the candidate's
    evidence whether or not it moved (what it is still waiting for)."""
    notes = {} if notes is None else notes
    done = []
    serving = dep.get("serving")

    def start(version: str, stage: str) -> str | None:
        began = deployment.since(dep, version, stage)
        return max(x for x in (began, floor) if x) if began or floor else None

    if serving:
        ev = gather(serving, "serving", start(serving, "serving"), calls, live)
        g = guardrail(ev, limits(policies[serving], cfg), cfg)
        if g["broken"]:
            if deployment.rollback_targets(dep):
                done.append(deployment.change(dep, "rollback", serving, by="decide", evidence=g,
                                              reason=f"{serving} broke its guardrail on live traffic"))
            else:  # it keeps serving (nothing else can); rejected, so that once replaced it is never rolled back to
                why = f"{serving} broke its guardrail and no earlier version can serve"
                if serving not in dep.get("rejected", []):  # the history says who rejected it, when and why, once
                    dep.setdefault("history", []).append({"at": deployment.now(), "action": "broken", "by": "decide",
                                                          "version": serving, "reason": why, "evidence": g})
                dep["rejected"] = [*(v for v in dep.get("rejected", []) if v != serving), serving]
                done.append({"action": "broken", "version": serving, "evidence": g, "reason": why})
        elif down := endpoint_down(serving, start(serving, "serving"), calls):
            done.append({"action": "broken", "version": serving, "evidence": down,
                         "reason": f"{serving}'s student endpoint did not answer "
                                   f"{down['unavailable'] + down['refused']} of its last {down['of']} requests (the "
                                   f"teacher answered them): {_why(down['unavailable'], down['refused'])}: check "
                                   "its server, URL, key and model name (serve-router's /health shows the last "
                                   "failure)"})
    cand = dep.get("candidate")
    if cand:
        v, stage = cand["version"], cand["stage"]
        ev = gather(v, stage, start(v, stage), calls, live)
        lims = limits(policies[v], cfg)
        drift = policies[v].get("drift")
        g, p = guardrail(ev, lims, cfg), promotion(ev, lims, cfg, drift.get("function_mix") if isinstance(
            drift, dict) else None)
        began = deployment.since(dep, v, stage)
        if floor and began and began < floor:  # evidence from before the window is not read: not whole any more
            p.update(ready=False, stale=f"{v} has been in {stage} since {began[:10]}, longer than route.live."
                     f"window_days: it cannot be promoted, and no newer version is shadowed while it is the "
                     f"candidate; restart its stage (distill promote RECIPE {v} --stage shadow) or roll it back")
        notes["candidate"] = {"version": v, "stage": stage, "promotion": p, "guardrail_broken": g["broken"]}
        if g["broken"]:
            done.append(deployment.change(dep, "rollback", v, by="decide", evidence={"guardrail": g, "promotion": p},
                                          reason=f"candidate {v} broke its guardrail in {stage}"))
        elif p["ready"] and (hold := held_back(v, stage, start(v, stage), calls, live, serving)):
            p.update(ready=False, held_back=hold)
        elif p["ready"]:
            action = "canary" if stage == "shadow" else "promote"
            done.append(deployment.change(dep, action, share=cfg.canary_share if action == "canary" else None,
                                          by="decide", evidence={"guardrail": g, "promotion": p},
                                          reason=f"{v} is above its quality floors with evidence in {stage}"))
    if not dep.get("serving") and latest:
        done.append(deployment.change(dep, "serve", latest, by="decide", reason="the first published version"))
    elif _newer(dep, latest):
        done.append(deployment.change(dep, "shadow", latest, share=cfg.shadow_share, by="decide",
                                      reason=f"{latest} is newer than {dep['serving']} in the store"))
    return done


def policies_for(folder: Path, dep: dict[str, Any], latest: str | None,
                 warnings: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The routing policy of every version the decision may look at (<store>/<name>/<version>/). The serving
    version's and the candidate's must load; the store's latest, when it cannot, is left out with a warning (a
    bad new version must not stop the serving one being judged and rolled back)."""
    out = {}
    for v in {dep.get("serving"), (dep.get("candidate") or {}).get("version")} - {None}:
        out[v] = _policy(folder, v)
    if latest and latest not in out:
        try:
            out[latest] = _policy(folder, latest)
        except (OSError, ValueError) as err:
            if warnings is None:
                raise
            warnings.append(f"the store's latest version is not considered: {err}")
    return out


def _policy(folder: Path, version: str) -> dict[str, Any]:
    path = folder / version / "routing_policy.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{version}: no routing policy at {path}") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _latest(store: str, name: str, warnings: list[str]) -> str | None:
    """The store's latest version of ``name``; None (and a warning) when its ``latest`` pointer is unusable."""
    from pipeline.store import latest as store_latest

    try:
        return store_latest(store, name)
    except Exception as err:  # noqa: BLE001 - a broken pointer must not stop the serving version being judged
        warnings.append(f"the store's latest version is not considered: {type(err).__name__}: {err}")
        return None


def run(path: Path, store: str, name: str, logs: str | Path, cfg: Any, urls: dict[str, str] | None = None,
        dry_run: bool = False, warnings: list[str] | None = None,
        notes: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Decide under the deployment file's lock, from the logs and the store; returns (entries, deployment).
    ``dry_run``: what would be decided, on a copy; the file is not touched (nor created). ``warnings`` gets
    what was left out and why (a bad latest version, versions with no student URL)."""
    warnings = [] if warnings is None else warnings
    folder = Path(str(store).removeprefix("file://")) / name
    if "://" not in str(store).removeprefix("file://") and not folder.is_dir():
        raise FileNotFoundError(f"no store folder {folder}: check export.store and export.model_name (nothing "
                                "was decided or created)")
    floor = window_start(cfg)
    try:  # none in the window (a quiet deployment) is no evidence, not an error
        calls, _, _ = read_routed(logs, floor[:10]) if _has_logs(logs) else ([], [], 0)
    except FileNotFoundError:
        calls = []
    live, _ = read_live(logs, floor[:10])

    def decide_on(dep: dict[str, Any]) -> list[dict[str, Any]]:
        newest = _latest(store, name, warnings)
        policies = policies_for(path.parent, dep, newest, warnings)
        return decide(dep, policies, newest if newest in policies else None, calls, live, cfg, floor, notes)

    if dry_run:
        dep = deployment.load(path) if path.exists() else deployment.new(name)
        return decide_on(dep), dep
    with deployment.updating(path, name) as dep:
        dep["urls"] = {**dep.get("urls", {}), **(urls or {})}
        done = decide_on(dep)
    for v in {d.get("version") for d in done if d["action"] in ("serve", "shadow", "promote", "canary")} - {None}:
        if v not in dep.get("urls", {}):
            warnings.append(f"{v} has no student URL in {path}: serve-router serves it only if started with "
                            f"--version-url {v}=URL (or pass --version-url {v}=URL here)")
    return done, dep


def window_start(cfg: Any) -> str:
    """The ISO time ``route.live.window_days`` ago: the decision reads no older evidence."""
    return (datetime.now(timezone.utc) - timedelta(days=cfg.window_days)).isoformat()


def _has_logs(logs: str | Path) -> bool:
    p = Path(logs)
    return any(p.glob("student-*.jsonl*")) or any(p.glob("teacher-*.jsonl*")) if p.is_dir() else p.exists()
