"""Live audits and shadow answers: background work serve-router does after a client has its answer.

- **Audit**: a sampled share of the student-answered requests is sent to the teacher too. The teacher's answer is
  logged in ``teacher-<date>.jsonl`` like any teacher call (tomorrow's training data), marked ``routing.audit:
  true`` with ``routing.audit_of`` (the id of the student's logged call) and its cost (money spent, nothing saved);
  the pair is scored and the score logged in ``live-<date>.jsonl`` as ``{"kind": "audit", ...}``.
- **Shadow**: while the deployment has a candidate in shadow, a sampled share of requests also goes through the
  candidate's own routing policy and student; when it would answer, its answer is scored against the teacher's
  (the live one of an escalated request, or the audit's: a sampled request the serving student answered is
  audited for that), logged as ``{"kind": "shadow", ...}``. The client never sees it.

Scores use evaluate's metrics (``training.evaluate.metrics``) under the metric the version's routing policy was
calibrated with (``quality.metric``: exact_match, field_accuracy or chrf), so a live score and the policy's
held-out numbers are the same quantity. Work waits in a bounded queue served by a few tasks on the proxy's event
loop: enqueueing never waits, and a full queue drops the work, counts it (``/health``) and logs
``{"kind": "dropped"}``. Stopping the proxy lets queued work finish for up to ``drain_s`` seconds, then drops the
rest the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from export.route.lanes import Lane
from export.route.wire import answer_problem, refused, unavailable
from training.evaluate.metrics import quality, response_schema, score

METRICS = ("exact_match", "field_accuracy", "chrf", "auto")


EMPTY_REFERENCE = ("the teacher's answer is empty (a degraded provider, a content filter): not scored, as curate "
                   "keeps empty answers out of training")


def answer_text(resp: dict[str, Any]) -> str:
    """The first choice's content; when it has none, its tool calls as JSON without what differs between two
    identical calls (each call's server-made ``id``, the arguments' spacing and key order), so that the same call
    from the student and the teacher scores as the same answer."""
    msg = ((resp.get("choices") or [{}])[0] or {}).get("message") or {}
    calls = msg.get("tool_calls")
    if isinstance(msg.get("content"), str) and (msg["content"].strip() or not calls):
        return msg["content"]  # some servers (and a reassembled stream) send "" beside tool calls
    if not calls or not isinstance(calls, list):
        return ""
    return json.dumps([_tool_call(c) for c in calls], sort_keys=True, ensure_ascii=False)


def _tool_call(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return call
    args = fn.get("arguments")
    with contextlib.suppress(ValueError):  # not JSON: compared as the text it is
        args = json.loads(args) if isinstance(args, str) else args
    return {"name": fn.get("name"), "arguments": args}


def live_quality(prediction: str, reference: str, request: dict[str, Any], metric: str) -> float:
    """One answer's quality against the teacher's in [0, 1]: evaluate's metric; field accuracy falls back to exact
    match where the teacher's answer is not a JSON object (as the route stage's calibration does)."""
    row = score(prediction, reference, response_schema(request.get("response_format")))
    q = quality(row, metric if metric in METRICS else "auto")
    return float(row["exact_match"]) if q is None else float(q)


async def scored(prediction: str, reference: str, request: dict[str, Any], metric: str) -> float:
    """``live_quality`` in a worker thread: chrF or a JSON comparison of long answers must not hold up the event
    loop that answers the clients."""
    return await asyncio.get_running_loop().run_in_executor(None, live_quality, prediction, reference, request,
                                                            metric)


def policy_metric(lane: Lane) -> str:
    return str(((lane.router.policy.get("quality") or {}).get("metric")) or "auto")


@dataclass
class Job:
    """What the background work needs of one finished request."""

    log_id: str
    body: dict[str, Any]  # as the client sent it
    upstream: dict[str, Any]  # as sent upstream
    logged: dict[str, Any]  # as logged
    fn: str | None
    lane: Lane  # the version that answered
    student_answer: str | None  # set: audit this answer
    teacher_answer: str | None  # the teacher answered the request itself (escalated)
    shadow: Lane | None  # the candidate in shadow, when sampled
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())  # when the call was answered


class LiveWork:
    """Sampling, the bounded queue and its workers; ``proxy`` is the RouterProxy (its upstream calls and logs)."""

    def __init__(self, proxy: Any, audit_share: float = 0.0, canary_audit_share: float = 0.0,
                 queue_size: int = 1000, workers: int = 4, seed: int | None = None, drain_s: float = 10.0):
        self.proxy = proxy
        self.audit_share, self.canary_audit_share = audit_share, canary_audit_share
        self.rng = random.Random(None if seed is None else f"audit/{seed}")  # apart from the canary's draws
        self.queue: asyncio.Queue[Job] | None = None
        self.size, self.n_workers, self.drain_s = queue_size, workers, drain_s
        self.tasks: list[asyncio.Task] = []
        self.counts = {"queued": 0, "audits": 0, "shadows": 0, "dropped": 0, "failed": 0}

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.size)
        self.tasks = [asyncio.create_task(self._worker()) for _ in range(self.n_workers)]

    async def stop(self) -> None:
        if self.queue is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.queue.join(), self.drain_s)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        while self.queue is not None and not self.queue.empty():
            self._dropped(self.queue.get_nowait(), "stopped before it ran")

    def offer(self, job: Job, stage: str) -> None:
        """Sample this finished request for an audit (student answers) and keep it for the shadow; never waits."""
        share = self.canary_audit_share if stage == "canary" else self.audit_share
        audit = job.student_answer is not None and (job.shadow is not None or self.rng.random() < share)
        if not audit:
            job.student_answer = None
        if not audit and (job.shadow is None or job.teacher_answer is None):
            return
        if self.queue is None:  # the app was not started (no workers): nothing would ever run it
            self._dropped(job, "not started")
            return
        try:
            self.queue.put_nowait(job)
            self.counts["queued"] += 1
        except asyncio.QueueFull:
            self._dropped(job, "queue full")

    def _dropped(self, job: Job, why: str) -> None:
        self.counts["dropped"] += 1
        self.proxy.log_live({"kind": "dropped", "why": why, "request_id": job.log_id, "version": job.lane.version,
                             "function": job.fn, "audit": job.student_answer is not None,
                             "shadow": job.shadow.version if job.shadow else None})

    async def _worker(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                await self.run(job)
            except asyncio.CancelledError:  # stopped while it ran (after the drain time): counted like the rest
                self._dropped(job, "stopped while it ran")
                raise
            except Exception as err:  # noqa: BLE001 - one bad job must not stop the audits
                self.counts["failed"] += 1
                self.proxy.log_live({"kind": "error", "request_id": job.log_id, "version": job.lane.version,
                                     "function": job.fn, "error": f"{type(err).__name__}: {err}"[:500]})
            finally:
                self.queue.task_done()

    async def run(self, job: Job) -> None:
        reference, source = job.teacher_answer, "escalated"
        if job.student_answer is not None:
            reference, source = await self._audit(job), "audit"
        if job.shadow is not None and reference is not None:
            if not reference.strip():
                self._unscored(job, "shadow", job.shadow.version, EMPTY_REFERENCE)
                return
            await self._shadow(job, job.shadow, reference, source)

    def _unscored(self, job: Job, what: str, version: str | None, why: str, **more: Any) -> None:
        self.counts["failed"] += 1
        self.proxy.log_live({"kind": "error", "what": what, "request_id": job.log_id, "call_timestamp": job.at,
                             "version": version, "function": job.fn, "error": why, **more})

    async def _audit(self, job: Job) -> str | None:
        """Ask the teacher, log its answer as an audit and the pair's score; the teacher's answer (None: failed)."""
        t0 = time.perf_counter()
        tbody = {k: v for k, v in self.proxy.teacher_body(job.upstream, job.lane).items() if k not in ("stream", "stream_options")}
        status, resp = await self.proxy.forward_teacher(tbody)
        problem = answer_problem(status, resp)
        cost = self.proxy.costs(False, None, resp.get("usage"), "teacher", job.lane)
        cost.update(teacher_only_usd=0.0, saved_usd=None if cost["usd"] is None else -cost["usd"],
                    teacher_only_basis="audit: counted on the student's call")
        routing = {"route": "teacher", "phase": "audit", "audit": True, "audit_of": job.log_id,
                   "reasons": ["live audit of a student answer"], "version": job.lane.version,
                   "policy_sha256": job.lane.policy_sha, "cost": cost}
        if isinstance(resp.get("id"), str):  # its own id, as every logged call: upstreams may reuse theirs
            routing["upstream_id"], resp = resp["id"], {**resp, "id": f"chatcmpl-{uuid.uuid4().hex}"}
        self.proxy.log_call(job.logged, status, resp, 1000 * (time.perf_counter() - t0), routing)
        reference = answer_text(resp)
        if problem or not reference.strip():
            self._unscored(job, "audit", job.lane.version, problem or EMPTY_REFERENCE)
            return None
        metric = policy_metric(job.lane)
        q = await scored(job.student_answer, reference, job.body, metric)
        self.counts["audits"] += 1
        self.proxy.log_live({"kind": "audit", "request_id": job.log_id, "call_timestamp": job.at,
                             "version": job.lane.version,
                             "policy_sha256": job.lane.policy_sha, "function": job.fn, "metric": metric,
                             "quality": q})
        return reference

    async def _shadow(self, job: Job, lane: Lane, reference: str, source: str) -> None:
        """The candidate answers as it would if it served; scored against the teacher's answer."""
        t0 = time.perf_counter()
        decision = await self.proxy.decide_before(lane, job.body, job.fn)
        tried = decision.to_student
        status, resp = 0, {}
        if tried:
            decision, status, resp = await self.proxy.ask_student(lane, job.body, job.upstream, decision, job.fn, {})
            problem = answer_problem(status, resp)
            if problem and (unavailable(status, resp) or refused(status, resp)):  # no evidence about its answers
                self._unscored(job, "shadow", lane.version, problem, unavailable=unavailable(status, resp),
                               refused=refused(status, resp))
                return
        metric = policy_metric(lane)
        q = await scored(answer_text(resp), reference, job.body, metric) if decision.to_student else None
        self.counts["shadows"] += 1
        self.proxy.log_live({"kind": "shadow", "request_id": job.log_id, "call_timestamp": job.at,
                             "version": lane.version,
                             "policy_sha256": lane.policy_sha,
                             "serving": job.lane.version, "function": job.fn, "metric": metric,
                             "reference": source, "route": decision.route, "phase": decision.phase, "tried": tried,
                             "escalated": tried and not decision.to_student, "quality": q,
                             "latency_ms": round(1000 * (time.perf_counter() - t0), 1)})


def live_line(record: dict[str, Any]) -> str:
    return json.dumps({"timestamp": datetime.now(timezone.utc).isoformat(), **record}, ensure_ascii=False,
                      default=str) + "\n"
