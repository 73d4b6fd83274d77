"""Teacher re-generation: records chosen by a recipe rule (no output, an old teacher model, negative feedback) are
sent to an OpenAI-compatible endpoint and get its answer as their output.

Requests run concurrently (aiohttp, a limit on requests in flight), with retries and exponential backoff on 429,
5xx, timeouts and lost connections (Retry-After honoured). Every answer goes to an on-disk cache keyed by the
request body (``<run>/cache/teacher/responses.sqlite3``), committed as it arrives: a rerun -- after a failure, a
crash or a changed recipe -- sends only what is not cached yet. The API key is read from the environment variable
the recipe names and is never written anywhere.
"""

from __future__ import annotations

import asyncio
import email.utils
import fnmatch
import hashlib
import os
import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from curation.harvest.importers.common import SAMPLING_KEYS, BadRecord, chat_message
from curation.harvest.importers.openai import logprobs
from pipeline.config.harvest import RegenerateConfig
from pipeline.pii import TAG as PII_TAG
from pipeline.record import dumps

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
FATAL_STATUS = {401, 403, 404}
KEEP_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")


class RegenerateError(RuntimeError):
    """Re-generation cannot go on (bad key, wrong endpoint) or left calls unanswered."""


SPARSE_KD_TOP_LOGPROBS = 20  # OpenAI's most: what sparse_kd asks for when the recipe names no number


def for_recipe(recipe) -> RegenerateConfig:
    """The recipe's re-generation settings, asking the teacher for ``logprobs`` and ``top_logprobs`` when the
    training objective learns from them (train.objective 'sparse_kd') and harvest.regenerate.top_logprobs is 0."""
    cfg = recipe.harvest.regenerate
    train = getattr(recipe, "train", None)
    if cfg is not None and not cfg.top_logprobs and train is not None and train.objective == "sparse_kd":
        return cfg.model_copy(update={"top_logprobs": SPARSE_KD_TOP_LOGPROBS})
    return cfg


# --- which records -------------------------------------------------------------------------------------------------

def reason(rec: dict[str, Any], cfg: RegenerateConfig) -> str | None:
    """Why a record should be answered afresh, or None."""
    when = cfg.when
    if when.functions is not None and rec.get("function") not in when.functions:
        return None
    out = rec.get("output") or {}
    if when.no_output and ((rec.get("status_code") or 200) >= 400 or rec.get("error") or not rec.get("output")
                           or (not (out.get("content") or "").strip() and not out.get("tool_calls"))):
        return "no output"
    model = (rec.get("teacher") or {}).get("model") or ""
    if any(fnmatch.fnmatchcase(model, p) for p in when.teacher_models):
        return f"old teacher {model}"
    fb = when.feedback
    if fb is not None:
        v = (rec.get("feedback") or {}).get(fb.metric)
        if v is not None and (v < fb.min_value if fb.higher_is_better else v > fb.min_value):
            return f"negative feedback ({fb.metric})"
    return None


def candidates(table: pa.Table, cfg: RegenerateConfig, feedback_rows: pa.ChunkedArray | None) -> pa.ChunkedArray:
    """Rows of a records table that may match the rule (a quick, vectorised superset; ``reason`` decides)."""
    when = cfg.when
    n = table.num_rows
    mask = pa.chunked_array([pa.array([False] * n, pa.bool_())])
    if when.no_output:
        out = table["output"]
        empty = pc.or_kleene(pc.is_null(out), pc.and_kleene(
            pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(pc.struct_field(out, "content"), "")), ""),
                         True),
            pc.is_null(pc.struct_field(out, "tool_calls"))))
        failed = pc.or_kleene(pc.fill_null(pc.greater_equal(table["status_code"], 400), False),
                              pc.is_valid(table["error"]))
        mask = pc.or_kleene(mask, pc.fill_null(pc.or_kleene(empty, failed), True))
    if when.teacher_models:
        models = pc.fill_null(pc.struct_field(table["teacher"], "model"), "")
        pattern = "|".join(f"(?:^{fnmatch.translate(p).removesuffix(chr(92) + 'Z')}$)" for p in when.teacher_models)
        mask = pc.or_kleene(mask, pc.match_substring_regex(models, pattern))
    if when.feedback is not None:
        has = pc.is_valid(pc.map_lookup(table["feedback"], when.feedback.metric, "first"))
        mask = pc.or_kleene(mask, has)
        if feedback_rows is not None:
            mask = pc.or_kleene(mask, feedback_rows)
    if when.functions is not None:
        mask = pc.and_kleene(mask, pc.is_in(table["function"], value_set=pa.array(when.functions, pa.string())))
    return pc.fill_null(mask, False)


# --- requests and the cache ----------------------------------------------------------------------------------------

def request_body(rec: dict[str, Any], cfg: RegenerateConfig) -> dict[str, Any]:
    """The chat-completions request for a record: its input turns, tools and response format, the logged sampling
    parameters overridden by the recipe's."""
    messages = []
    for m in rec["messages"]:
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
        if m.get("name"):
            msg["name"] = m["name"]
        if m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        if m.get("tool_calls"):
            msg["tool_calls"] = orjson.loads(m["tool_calls"])
        messages.append(msg)
    logged = orjson.loads((rec.get("teacher") or {}).get("params") or "{}")
    body: dict[str, Any] = {k: logged[k] for k in KEEP_PARAMS if k in logged}
    body.update(cfg.params)
    body.update({"model": cfg.model, "messages": messages})
    if rec.get("tools"):
        body["tools"] = orjson.loads(rec["tools"])
    if rec.get("response_format"):
        body["response_format"] = orjson.loads(rec["response_format"])
    if cfg.top_logprobs:
        body.update({"logprobs": True, "top_logprobs": cfg.top_logprobs})
    return body


def request_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


PII_KEY = "distill_pii_redacted"  # in a cached answer: the kinds redacted out of it (short_kind names, sorted)


def redact_answer(answer: dict[str, Any], redaction: Any) -> dict[str, Any]:
    """A teacher's answer as it is cached: every string redacted as harvest redacts records
    (``pipeline.pii.Redaction``), a choice with findings losing its logprobs (their tokens would spell the
    findings out), and the kinds found kept under PII_KEY for the records' pii_redacted tag."""
    kinds: set[str] = set()
    out: dict[str, Any] = {}
    for k, v in answer.items():
        if k == "choices" and isinstance(v, list):
            choices = []
            for ch in v:
                rest, found = redaction.redact_json({x: y for x, y in ch.items() if x != "logprobs"}
                                                    if isinstance(ch, dict) else ch)
                if isinstance(ch, dict) and "logprobs" in ch and not found:
                    rest["logprobs"] = ch["logprobs"]
                kinds |= found
                choices.append(rest)
            out[k] = choices
        elif k != PII_KEY:
            out[k], found = redaction.redact_json(v)
            kinds |= found
    out[PII_KEY] = sorted(kinds | set(answer.get(PII_KEY) or []))
    return out


class Cache:
    """Answers on disk, keyed by the request body's hash; each answer is committed as it arrives. ``redact``
    (``redact_answer`` with the recipe's redaction), when given, is applied to every answer before it is written,
    and once to every answer already there when the cache was written under another ``stamp`` (or before answers
    were redacted): the file never holds what redaction would remove. Deleted and overwritten rows are zeroed
    (SQLite secure_delete) and the file compacted, so no raw copy lingers in free pages or the WAL."""

    def __init__(self, folder: Path, redact: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 stamp: Any = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "responses.sqlite3"
        self.redact = redact
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body BLOB NOT NULL, "
                        "latency_ms REAL, created REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        self.db.commit()
        self._redact_all(orjson.dumps(stamp, option=orjson.OPT_SORT_KEYS).decode())

    def _redact_all(self, stamp: str) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE name = 'redaction'").fetchone()
        if row is not None and row[0] == stamp:
            return
        if self.redact is not None:
            for key, body in self.db.execute("SELECT key, body FROM responses").fetchall():
                self.db.execute("UPDATE responses SET body = ? WHERE key = ?",
                                (orjson.dumps(self.redact(orjson.loads(body))), key))
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('redaction', ?)", (stamp,))
        self.db.commit()
        self._compact()

    def _compact(self) -> None:
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def get(self, keys: list[str]) -> dict[str, tuple[dict[str, Any], float | None]]:
        out = {}
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            rows = self.db.execute(f"SELECT key, body, latency_ms FROM responses WHERE key IN "
                                   f"({','.join('?' * len(part))})", part).fetchall()
            out.update({k: (orjson.loads(b), lat) for k, b, lat in rows})
        return out

    def put(self, key: str, body: dict[str, Any], latency_ms: float) -> None:
        if self.redact is not None:
            body = self.redact(body)
        self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                        (key, orjson.dumps(body), latency_ms, time.time()))
        self.db.commit()

    def prune(self, keep: set[str]) -> int:
        """Delete every answer whose key is not in ``keep`` (the requests today's batches make); returns how many."""
        old = [k for (k,) in self.db.execute("SELECT key FROM responses").fetchall() if k not in keep]
        for i in range(0, len(old), 500):
            part = old[i:i + 500]
            self.db.execute(f"DELETE FROM responses WHERE key IN ({','.join('?' * len(part))})", part)
        self.db.commit()
        if old:
            self._compact()
        return len(old)

    def close(self) -> None:
        self.db.close()


# --- calling the endpoint ------------------------------------------------------------------------------------------

@dataclass
class CallStats:
    calls: int = 0  # HTTP requests sent, retries included
    answered: int = 0
    retries: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # key -> reason
    statuses: Counter[str] = field(default_factory=Counter)


def _retry_after(headers: Any) -> float | None:
    v = headers.get("Retry-After")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        when = email.utils.parsedate_to_datetime(v) if re.search(r"[A-Za-z]", v) else None
        return max(0.0, when.timestamp() - time.time()) if when else None


def _error_kind(body: bytes) -> str:
    """The error type or code from an error body (never its message, which may quote the input)."""
    try:
        err = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    if isinstance(err, dict):
        kind = err.get("code") or err.get("type")
        return f" ({kind})" if isinstance(kind, str) and len(kind) < 60 else ""
    return ""


def api_key(cfg: RegenerateConfig) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise RegenerateError(f"harvest.regenerate.api_key_env names {cfg.api_key_env}, which is not set: export "
                              f"{cfg.api_key_env}=<your API key> (it is read from the environment only)")
    return key


async def _call_all(bodies: dict[str, dict[str, Any]], cfg: RegenerateConfig, cache: Cache,
                    on_done: Callable[[], None]) -> CallStats:
    import aiohttp

    stats = CallStats()
    headers = {"Content-Type": "application/json"}
    key = api_key(cfg)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = f"{cfg.endpoint}/chat/completions"
    limit = asyncio.Semaphore(cfg.concurrency)
    fatal: list[str] = []
    rng = random.Random(0)

    async def one(session: aiohttp.ClientSession, k: str, body: dict[str, Any]) -> None:
        async with limit:
            last = ""
            for attempt in range(cfg.max_retries + 1):
                if fatal:
                    stats.failures[k] = "not sent: " + fatal[0]
                    return
                delay = None
                t0 = time.perf_counter()
                try:
                    stats.calls += 1
                    async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
                        raw = await resp.read()
                        stats.statuses[str(resp.status)] += 1
                        if resp.status == 200:
                            try:
                                data = orjson.loads(raw)
                                if not isinstance(data, dict) or not data.get("choices"):
                                    raise ValueError
                            except ValueError:
                                last = "HTTP 200 without choices"
                            else:
                                cache.put(k, data, (time.perf_counter() - t0) * 1000)
                                stats.answered += 1
                                return
                        elif resp.status in FATAL_STATUS:
                            fatal.append(f"HTTP {resp.status}{_error_kind(raw)} from {url}: check "
                                         "harvest.regenerate.endpoint, model and api_key_env")
                            stats.failures[k] = fatal[0]
                            return
                        elif resp.status in RETRY_STATUS:
                            last = f"HTTP {resp.status}{_error_kind(raw)}"
                            delay = _retry_after(resp.headers)
                        else:
                            stats.failures[k] = f"HTTP {resp.status}{_error_kind(raw)}"
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as err:
                    last = "timed out" if isinstance(err, asyncio.TimeoutError) else f"{type(err).__name__}"
                if attempt < cfg.max_retries:
                    stats.retries += 1
                    backoff = cfg.backoff_s * (2 ** attempt) * (0.5 + rng.random() / 2)
                    await asyncio.sleep(min(cfg.max_backoff_s, delay if delay is not None else backoff))
            stats.failures[k] = f"{last} after {cfg.max_retries} retries"

    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def tracked(k: str, body: dict[str, Any]) -> None:
            try:
                await one(session, k, body)
            finally:
                on_done()

        await asyncio.gather(*(tracked(k, b) for k, b in bodies.items()))
    if fatal:
        raise RegenerateError(fatal[0])
    return stats


def call_all(bodies: dict[str, dict[str, Any]], cfg: RegenerateConfig, cache: Cache,
             on_done: Callable[[], None] = lambda: None) -> CallStats:
    """Send every request (not yet cached) and cache the answers; failures are returned, not raised."""
    if not bodies:
        return CallStats()
    return asyncio.run(_call_all(bodies, cfg, cache, on_done))


# --- applying an answer --------------------------------------------------------------------------------------------

def apply(rec: dict[str, Any], answer: dict[str, Any], latency_ms: float | None, cfg: RegenerateConfig,
          why: str) -> None:
    """Put a teacher's answer on the record (in place): output, finish reason, teacher, usage, cost, logprobs."""
    choice = answer["choices"][0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise BadRecord("the teacher's answer has no message")
    msg = choice["message"]
    rec["output"] = chat_message({"role": "assistant", **msg}, "answer.message")
    rec["finish_reason"] = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
    rec["status_code"], rec["error"] = 200, None
    old_model = (rec.get("teacher") or {}).get("model")
    params = {k: v for k, v in request_body(rec, cfg).items() if k in SAMPLING_KEYS}
    rec["teacher"] = {"model": answer.get("model") or cfg.model, "provider": "regenerated",
                      "params": dumps(params) if params else "{}", "logprobs": logprobs(choice)}
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    tin, tout = usage.get("prompt_tokens"), usage.get("completion_tokens")
    rec["usage"] = {"input_tokens": tin if isinstance(tin, int) else None,
                    "output_tokens": tout if isinstance(tout, int) else None}
    rec["latency_ms"] = latency_ms
    rec["cost_usd"] = cost(cfg, tin, tout)
    tags = dict(rec.get("tags") or {})
    tags["regenerated"] = why
    found = answer.get(PII_KEY)
    if found:  # kinds redacted out of the answer before it was cached (redact_answer)
        tags[PII_TAG] = ",".join(sorted(set(found) | set(filter(None, (tags.get(PII_TAG) or "").split(",")))))
    if old_model:
        tags["original_teacher"] = str(old_model)
    rec["tags"] = tags


def cost(cfg: RegenerateConfig, tin: Any, tout: Any) -> float | None:
    if cfg.price is None or not isinstance(tin, int) or not isinstance(tout, int):
        return None
    return (tin * cfg.price.input_per_mtok + tout * cfg.price.output_per_mtok) / 1e6
