"""The versions serve-router sends requests to: one ``Lane`` per store version (its routing policy, its student
URL), chosen per request from the deployment file, which ``Versions`` re-reads when it changes.

A version's policy is ``<store>/<name>/<version>/routing_policy.json`` (the deployment file lives in
``<store>/<name>/``); its student URL comes from ``--version-url VERSION=URL`` or the file's ``urls``. Routers are
loaded once per version (versions are immutable) in a worker thread, and the new set replaces the old in one
assignment: a request already routed keeps the lane it picked, so a reload drops nothing. A file that cannot be
used (bad JSON, a serving version without a URL or policy, any error while loading its router) leaves the
previous set serving and is reported in ``/health`` and on stderr; a candidate that cannot be served is left out
while the serving version changes as the file says (a guardrail rollback is never held back by a candidate with no
URL). A file is only taken as read once all of it loaded; a failed one is tried again every ``retry_s`` seconds (a
transient failure heals without touching the file). An unexpected
error in the watch loop itself is reported the same way and the loop goes on.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.route import deployment
from export.route.router import Router
from pipeline.rundir import sha256_file


@dataclass(frozen=True)
class Lane:
    """One student version as the proxy calls it."""

    version: str | None
    router: Router
    url: str
    policy_sha: str
    model: str
    top_k: int
    per_request_usd: float | None  # evaluate's cost per request, from the policy
    teacher: str | None = None  # the policy's teacher model, when it names exactly one
    teacher_price: tuple[float, float] | None = None  # the policy's USD per million input, output teacher tokens

    @property
    def blocking(self) -> bool:
        return self.router.embed is not None  # MiniLM runs in a thread, off the event loop


def make_lane(router: Router, url: str, policy_sha256: str = "", version: str | None = None,
              model: str | None = None) -> Lane:
    policy = router.policy
    op = policy.get("operating_point") or {}
    per_1k, tp = op.get("cost_per_1k_student_usd"), op.get("teacher_price_per_mtok") or {}
    teachers = (policy.get("teacher") or {}).get("models") or []
    return Lane(version, router, url, policy_sha256[:12],
                model or (policy.get("student") or {}).get("name") or "student",
                int((policy.get("confidence") or {}).get("top_logprobs", 0)),
                float(per_1k) / 1000 if isinstance(per_1k, (int, float)) else None,
                teachers[0] if len(teachers) == 1 else None,
                (float(tp["input"]), float(tp["output"])) if isinstance(tp.get("input"), (int, float))
                and isinstance(tp.get("output"), (int, float)) else None)


@dataclass(frozen=True)
class Candidate:
    lane: Lane
    stage: str  # shadow | canary
    share: float


class Versions:
    """The serving lane and the candidate, from a deployment file; ``reload`` picks up changes."""

    def __init__(self, path: str | Path, urls: dict[str, str] | None = None, *, model: str | None = None,
                 language: bool = True, embeddings: bool = True, seed: int | None = None, retry_s: float = 30.0):
        self.path = Path(path)
        self.folder = self.path.parent  # <store>/<name>: the versions are its vN subfolders
        self.urls = dict(urls or {})
        self.model, self.kw = model, {"language": language, "embeddings": embeddings}
        self._routers: dict[str, tuple[Router, str]] = {}
        self._stamp: tuple[int, int] | None = (-1, -1)  # the file as last loaded (never a real stamp at first)
        self._failed: tuple[tuple[int, int] | None, float] | None = None  # (stamp, monotonic time) of a failed load
        self.retry_s = retry_s
        self.current: tuple[Lane | None, Candidate | None] = (None, None)  # (serving, candidate): swapped as one
        self.error: str | None = None
        self.reloads = 0
        self.rng = random.Random(None if seed is None else f"lanes/{seed}")  # apart from the audits' draws
        self.reload()
        if self.serving is None:
            raise deployment.DeploymentError(self.error or f"{self.path}: no version is serving")

    def _router(self, version: str) -> tuple[Router, str]:
        if version not in self._routers:
            policy = self.folder / version / "routing_policy.json"
            if not policy.is_file():
                raise FileNotFoundError(f"{version}: no routing policy at {policy}")
            self._routers[version] = (Router.load(policy, **self.kw), sha256_file(policy))
        return self._routers[version]

    def _lane(self, version: str, dep: dict[str, Any]) -> Lane:
        if not (self.folder / version).is_dir():
            raise deployment.DeploymentError(f"{version} is not in the store (no folder {self.folder / version}): "
                                             "check the deployment file's version names")
        if (self.folder / version).is_symlink():  # as distill pull: a store version is a folder of its own
            raise deployment.DeploymentError(f"{version}: {self.folder / version} is a symbolic link, not a "
                                             "published version (distill run publishes versions as folders)")
        url = self.urls.get(version) or dep.get("urls", {}).get(version)
        if not url:
            raise deployment.DeploymentError(f"{version} has no student URL: pass --version-url {version}=URL or "
                                             f"add it to urls in {self.path}")
        router, sha = self._router(version)
        return make_lane(router, url, sha, version, self.model)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def due(self) -> bool:
        """Whether the file changed since it last loaded (a failed load of the same file: after ``retry_s``)."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        return self._failed is None or self._failed[0] != stamp or time.monotonic() - self._failed[1] >= self.retry_s

    def reload(self) -> bool:
        """Re-read the file if its mtime or size changed; True when the lanes changed. A candidate that cannot be
        served (no URL, no policy) does not hold back the serving version: it serves as the file says, the
        candidate is left out, reported, and tried again every ``retry_s`` seconds."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        try:
            dep = deployment.load(self.path)
            if not dep.get("serving"):
                raise deployment.DeploymentError(f"{self.path}: no version is serving")
            serving = self._lane(dep["serving"], dep)
        except Exception as err:  # noqa: BLE001 - whatever fails, the previous versions keep serving
            self._failed = (stamp, time.monotonic())
            said = self.error  # retried every retry_s: the same problem is said once, not every 30 s
            self._report(err, "deployment not reloaded" if self.serving else "deployment not loaded",
                         quiet=said is not None and said == _said(err))
            return False
        cand, candidate, problem = dep.get("candidate"), None, None
        if cand:
            try:
                candidate = Candidate(self._lane(cand["version"], dep), cand["stage"], float(cand["share"]))
            except Exception as err:  # noqa: BLE001 - a rollback of the serving version must not wait for it
                problem = err
        changed = (serving, candidate) != self.current
        self.current = (serving, candidate)  # one swap: a request sees the old set or the new
        keep = {dep["serving"], *(dep.get("previous") or [])[-2:], *([cand["version"]] if cand else [])}
        self._routers = {v: r for v, r in self._routers.items() if v in keep}  # not one per version served, for ever
        self.reloads += changed
        if problem is None:
            self.error, self._stamp, self._failed = None, stamp, None
        else:
            self._failed = (stamp, time.monotonic())
            said = self.error  # retried every retry_s: the same problem is said once, not every 30 s
            self._report(problem, f"candidate {cand['version']} left out", quiet=said is not None and said in str(problem))
        return changed

    def _report(self, err: BaseException, what: str, quiet: bool = False) -> None:
        self.error = _said(err)
        if not quiet:
            still = f", still serving {self.serving.version}" if self.serving else ""
            print(f"distill serve-router: {what}{still}: {self.error}", file=sys.stderr)

    @property
    def serving(self) -> Lane | None:
        return self.current[0]

    @property
    def candidate(self) -> Candidate | None:
        return self.current[1]

    def pick(self) -> tuple[Lane, str]:
        """The lane for one request: the canary for its share of traffic, else the serving version."""
        serving, cand = self.current
        if cand is not None and cand.stage == "canary" and self.rng.random() < cand.share:
            return cand.lane, "canary"
        return serving, "serving"

    def shadow(self) -> Lane | None:
        """The candidate in shadow when this request is sampled for it."""
        cand = self.candidate
        if cand is not None and cand.stage == "shadow" and self.rng.random() < cand.share:
            return cand.lane
        return None

    async def watch(self, every_s: float) -> None:
        """Check the file every ``every_s`` seconds; load new routers off the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            try:
                if self.due():
                    await loop.run_in_executor(None, self.reload)
            except Exception as err:  # noqa: BLE001 - one bad check must not stop following the file
                self._report(err, "deployment check failed")

    def status(self) -> dict[str, Any]:
        serving, cand = self.current
        return {"serving": serving.version if serving else None,
                "candidate": {"version": cand.lane.version, "stage": cand.stage, "share": cand.share} if cand else None,
                "reloads": self.reloads, "error": self.error}


def _said(err: BaseException) -> str:
    return str(err) if isinstance(err, (OSError, ValueError)) else f"{type(err).__name__}: {err}"
