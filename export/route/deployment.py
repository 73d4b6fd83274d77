"""The deployment file: which store version serves, which candidate is in shadow or canary and with what share,
each version's student URL, and the history of every change with its evidence.

    <store>/<name>/deployment.json
    {"schema": "distill-deployment/v1", "name": "tiny-student",
     "serving": "v2", "previous": ["v1"], "rejected": [],
     "candidate": {"version": "v3", "stage": "shadow" | "canary", "share": 0.1, "since": "2026-12-06T02:00:00+00:00"},
     "urls": {"v1": "http://student-v1:8000/v1", "v2": "...", "v3": "..."},
     "history": [{"at": ..., "action": "serve" | "shadow" | "canary" | "promote" | "rollback" | "broken" (the serving
                  version broke its guardrail with nothing to roll back to: rejected, still serving), "version": ...,
                  "from": ..., "by": "hand" | "decide", "reason": ..., "evidence": {...}}]}

Changes are pure functions of the file's content (``change``) plus an atomic write (``save``: a temporary sibling
renamed over the file, so serve-router, which re-reads the file when its mtime or size changes, never sees half a
file). ``updating`` holds an exclusive lock on a sibling ``.lock`` file around read-change-write, so `distill
promote` by hand and the nightly `distill live --decide` cannot lose each other's change.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.store import VERSION_RE

SCHEMA = "distill-deployment/v1"
FILE = "deployment.json"
STAGES = ("shadow", "canary")
ACTIONS = ("serve", "shadow", "canary", "promote", "rollback")
FIELDS = ("schema", "name", "serving", "previous", "rejected", "candidate", "urls", "history")
CANDIDATE_FIELDS = ("version", "stage", "share", "since")


class DeploymentError(ValueError):
    """A deployment file that cannot be used, or a change that is not allowed from the current state."""


def path_for(store: str | Path, name: str) -> Path:
    """Where a student's deployment file lives: beside its versions in a local store."""
    if "://" in str(store) and not str(store).startswith("file://"):
        raise DeploymentError(f"store {store}: the deployment file needs a local store folder (serve-router "
                              "re-reads it); pass --deployment PATH for a store at a URL")
    return Path(str(store).removeprefix("file://")) / name / FILE


def new(name: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "name": name, "serving": None, "previous": [], "rejected": [], "candidate": None,
            "urls": {}, "history": []}


def _version(v: Any, where: str) -> str:
    if not isinstance(v, str) or not VERSION_RE.match(v):
        raise DeploymentError(f"{where}: expected a version name like 'v3', got {json.dumps(v)[:60]}")
    return v


def check(dep: Any, where: str = FILE) -> dict[str, Any]:
    """The deployment as read, or DeploymentError naming the file and the field that is wrong."""
    if not isinstance(dep, dict) or dep.get("schema") != SCHEMA:
        raise DeploymentError(f"{where}: not a deployment file (schema must be {SCHEMA!r})")
    _known(dep, FIELDS, where)  # a typo ("Serving") would read as "nothing serves" and put the latest version live
    if dep.get("serving") is not None:
        _version(dep["serving"], f"{where}: serving")
    for key in ("previous", "rejected", "history"):
        if not isinstance(dep.get(key, []), list):
            raise DeploymentError(f"{where}: {key} must be a list")
    for key in ("previous", "rejected"):
        for i, v in enumerate(dep.get(key, [])):
            _version(v, f"{where}: {key}[{i}]")
    for i, h in enumerate(dep.get("history", [])):
        if not isinstance(h, dict) or not isinstance(h.get("at"), str) or not isinstance(h.get("action"), str):
            raise DeploymentError(f"{where}: history[{i}] must be an object with string 'at' and 'action'")
    urls = dep.get("urls", {})
    if not isinstance(urls, dict) or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                             for u in urls.values()):
        raise DeploymentError(f"{where}: urls must map versions to http(s) base URLs")
    for v in urls:
        _version(v, f"{where}: urls key")
    cand = dep.get("candidate")
    if cand is not None:
        if not isinstance(cand, dict):
            raise DeploymentError(f"{where}: candidate must be an object or null")
        _known(cand, CANDIDATE_FIELDS, f"{where}: candidate")
        _version(cand.get("version"), f"{where}: candidate.version")
        if cand.get("stage") not in STAGES:
            raise DeploymentError(f"{where}: candidate.stage must be one of {', '.join(STAGES)}")
        share = cand.get("share")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise DeploymentError(f"{where}: candidate.share must be a number in (0, 1]")
        if cand["version"] == dep.get("serving"):
            raise DeploymentError(f"{where}: candidate {cand['version']} is the serving version")
    return {**new(str(dep.get("name") or "")), **dep}


def _known(obj: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise DeploymentError(f"{where}: unknown field {unknown[0]!r} (the fields are {', '.join(fields)})")


def _share(share: float | None, default: float) -> float:
    """A candidate's share: as given (0 is refused, not taken for 'the default'), else the default."""
    share = default if share is None else share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise DeploymentError(f"--share must be a number in (0, 1], got {share!r}")
    return float(share)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no deployment file at {path} (distill promote RECIPE VERSION, or distill live RECIPE "
                                f"--decide, makes one)") \
            from None
    except ValueError as err:
        raise DeploymentError(f"{path}: not valid JSON ({err})") from None
    return check(data, str(path))


def save(path: str | Path, dep: dict[str, Any]) -> None:
    """Write atomically and durably: a reader sees the old file or the new one, never a mix, and a crash (of the
    machine too) right after leaves one of them (the data and the rename are fsynced)."""
    path = Path(path)
    check(dep, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(dep, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextmanager
def updating(path: str | Path, name: str) -> Iterator[dict[str, Any]]:
    """Read (or start) the deployment under an exclusive lock, yield it for changing in place, write it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        dep = load(path) if path.exists() else new(name)
        before = copy.deepcopy(dep)
        yield dep
        if dep != before:
            save(path, dep)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def change(dep: dict[str, Any], action: str, version: str | None = None, *, share: float | None = None,
           by: str = "hand", reason: str = "", evidence: dict[str, Any] | None = None,
           at: str | None = None) -> dict[str, Any]:
    """Apply one change to the deployment in place and log it in its history; returns the history entry.

    - serve V: V serves now (the first deployment, or by hand); the version it replaces goes to ``previous``.
    - shadow V [share]: V becomes the candidate, answering ``share`` of requests in the background.
    - canary [share]: the candidate (in shadow) answers ``share`` of the traffic for real.
    - promote [V]: the candidate (or V, by hand) serves; the one it replaces goes to ``previous``.
    - rollback [V]: V (default: the candidate if there is one, else the serving version) is withdrawn and listed
      in ``rejected`` (never shadowed again by itself, never rolled back to: a rejected candidate also leaves
      ``previous``). The candidate is simply dropped; the serving version is replaced by the last previous one
      not rejected, and a candidate in shadow or canary stays where it is: its evidence is its
      own (scored against the teacher), not relative to the version that served beside it.
    """
    if action not in ACTIONS:
        raise DeploymentError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    cand, serving = dep.get("candidate"), dep.get("serving")
    at = at or now()
    entry: dict[str, Any] = {"at": at, "action": action, "by": by, "reason": reason, "evidence": evidence or {}}
    if action in ("serve", "promote"):
        version = version or (cand or {}).get("version")
        if version is None:
            raise DeploymentError("nothing to promote: there is no candidate (name a version)")
        _version(version, "version")
        if version == serving:
            if by != "hand" or action != "serve":
                raise DeploymentError(f"{version} is already serving")
            # by hand: its serving evidence starts again from now (what was wrong was fixed; a page stops)
            dep["rejected"] = [v for v in dep.get("rejected", []) if v != version]
            entry.update(version=version, restarted=True)
            dep.setdefault("history", []).append(entry)
            return entry
        # the version that serves now leaves ``previous`` (promoting v2 then v1 by hand left v1 there, and two
        # rollbacks then brought back the version just rejected)
        dep["previous"] = [v for v in dep.get("previous", []) if v not in (version, serving)] + (
            [serving] if serving and serving not in dep.get("rejected", []) else [])  # not one that broke
        dep["serving"] = version
        if cand and cand["version"] == version:
            entry["stage"] = cand["stage"]
            dep["candidate"] = None
        dep["rejected"] = [v for v in dep.get("rejected", []) if v != version]
        entry.update(version=version, **{"from": serving})
    elif action == "shadow":
        _version(version, "version")
        if version == serving:
            raise DeploymentError(f"{version} is the serving version; shadow a different one")
        if cand and cand["version"] != version:
            raise DeploymentError(f"{cand['version']} is already the candidate ({cand['stage']}); promote or roll it "
                                  "back first")
        dep["candidate"] = {"version": version, "stage": "shadow", "share": _share(share, 0.1), "since": at}
        entry.update(version=version, share=dep["candidate"]["share"])
    elif action == "canary":
        if not cand:
            raise DeploymentError("no candidate to canary: shadow a version first")
        again = cand["stage"] == "canary"  # a new share for a canary: its evidence so far still counts
        dep["candidate"] = {**cand, "stage": "canary", "share": _share(share, cand["share"]),
                            "since": cand["since"] if again else at}
        entry.update(version=cand["version"], share=dep["candidate"]["share"])
        if again:
            entry["share_from"] = cand["share"]
    else:
        entry.update(_rollback(dep, cand, serving, version))
    dep.setdefault("history", []).append(entry)
    return entry


def _rollback(dep: dict[str, Any], cand: dict[str, Any] | None, serving: str | None,
              version: str | None) -> dict[str, Any]:
    if version is not None and version not in (serving, (cand or {}).get("version")):
        raise DeploymentError(f"{version} is neither serving ({serving or 'nothing'}) nor the candidate "
                              f"({(cand or {}).get('version') or 'none'}): nothing to roll back")
    if cand and version in (None, cand["version"]):
        dep["candidate"] = None
        dep["rejected"] = _added(dep.get("rejected", []), cand["version"])
        # an earlier version shadowed again and rejected is no version to roll back to any more
        dep["previous"] = [v for v in dep.get("previous", []) if v != cand["version"]]
        return {"version": cand["version"], "stage": cand["stage"], "to": serving}
    previous = rollback_targets(dep)
    if not previous:
        raise DeploymentError(f"nothing to roll back to: {serving or 'no version'} is serving and no earlier "
                              "version served before it")
    back = previous.pop()
    dep.update(serving=back, previous=previous, rejected=_added(dep.get("rejected", []), serving))
    if cand and cand["version"] == back:  # the version rolled back to serves again: it is no candidate any more
        dep["candidate"] = None
    return {"version": serving, "stage": "serving", "to": back}


def rollback_targets(dep: dict[str, Any]) -> list[str]:
    """The versions a rollback of the serving one may go back to, the last first to go: ``previous`` without the
    rejected ones (a file written before a rejected version left ``previous`` may still list one)."""
    return [v for v in dep.get("previous", []) if v not in dep.get("rejected", [])]


def _added(versions: list[str], version: str) -> list[str]:
    """The list with ``version`` at its end, once."""
    return [*(v for v in versions if v != version), version]


def since(dep: dict[str, Any], version: str, stage: str) -> str | None:
    """When ``version`` entered ``stage`` (serving | canary | shadow) most recently, from the history."""
    for h in reversed(dep.get("history", [])):
        if stage == "serving":
            if (h["action"] in ("serve", "promote") and h.get("version") == version) or (
                    h["action"] == "rollback" and h.get("stage") == "serving" and h.get("to") == version):
                return h["at"]
        elif h["action"] == stage and h.get("version") == version and "share_from" not in h:
            return h["at"]
    return None
