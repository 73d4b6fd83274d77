"""An LLM judge behind an OpenAI-compatible chat-completions endpoint: it grades an answer to a request from
1 to 10, pointwise, so that student and teacher answers are graded on the same scale.

Requests run concurrently (``max_concurrency``), failed ones (HTTP 429/5xx, timeouts, unreadable replies) are
retried with backoff; an answer that still gets no grade is left ungraded (None) and counted, never guessed.
The API key is read from the environment variable the recipe names and is never logged.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config.evaluate import JudgeConfig

JUDGE_SYSTEM = "You are a strict grader of AI assistant answers. Reply with JSON only."
JUDGE_PROMPT = """Grade the assistant's answer to the conversation below.

<conversation>
{conversation}
</conversation>

<answer>
{answer}
</answer>

Rate how correct, complete and well-formatted the answer is for the last request, from 1 (wrong or useless)
to 10 (perfect). Reply with JSON only: {{"score": <integer 1-10>, "reason": "<one short sentence>"}}"""

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def judge_messages(messages: Sequence[dict[str, Any]], answer: str) -> list[dict[str, str]]:
    conversation = "\n".join(f"[{m['role']}] {m.get('content') or ''}" for m in messages)
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(conversation=conversation, answer=answer)}]


def parse_grade(text: str) -> float | None:
    """A 1-10 grade from the judge's reply (JSON {"score": n}, or a lone number) scaled to 0-1."""
    text = (text or "").strip()
    m = re.search(r"\{.*\}", text, re.S)
    value: Any = None
    if m:
        try:
            value = json.loads(m.group(0)).get("score")
        except (json.JSONDecodeError, AttributeError):
            value = None
    if value is None:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", text)
        value = m.group(1) if m else None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    if not 1 <= score <= 10:
        return None
    return (score - 1) / 9


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used at all (bad URL, authentication refused)."""


async def _grade_all(cfg: JudgeConfig, items: list[list[dict[str, str]]],
                     advance: Callable[[], None] | None) -> list[dict[str, Any]]:
    import httpx

    headers = {"Content-Type": "application/json"}
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise JudgeError(f"evaluate.judge.api_key_env names {cfg.api_key_env}, which is not set")
        headers["Authorization"] = f"Bearer {key}"
    sem = asyncio.Semaphore(cfg.max_concurrency)
    url = f"{cfg.base_url}/chat/completions"

    async def one(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> dict[str, Any]:
        body = {"model": cfg.model, "messages": messages, "temperature": 0, "max_tokens": 200}
        error = "no attempt"
        for attempt in range(cfg.retries + 1):
            if attempt:
                await asyncio.sleep(min(8.0, 0.25 * 2 ** attempt))
            async with sem:
                try:
                    resp = await client.post(url, json=body)
                except httpx.HTTPError as err:
                    error = f"{type(err).__name__}"
                    continue
            if resp.status_code in (401, 403):
                raise JudgeError(f"the judge endpoint {url} refused the request (HTTP {resp.status_code}): "
                                 "check evaluate.judge.api_key_env")
            if resp.status_code in RETRY_STATUS:
                error = f"HTTP {resp.status_code}"
                continue
            if resp.status_code != 200:
                return {"score": None, "error": f"HTTP {resp.status_code}", "usage": None}
            try:
                data = resp.json()
                text = data["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                error = "unreadable reply"
                continue
            score = parse_grade(text)
            if score is None:
                error = "no 1-10 grade in the reply"
                continue
            return {"score": score, "error": None, "usage": data.get("usage")}
        return {"score": None, "error": error, "usage": None}

    async def tracked(client, messages):
        result = await one(client, messages)
        if advance:
            advance()
        return result

    async with httpx.AsyncClient(headers=headers, timeout=cfg.timeout_s) as client:
        return await asyncio.gather(*(tracked(client, m) for m in items))


def grade(cfg: JudgeConfig, requests: Sequence[Sequence[dict[str, Any]]], answers: Sequence[str],
          advance: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Grades (0-1 or None) of each answer to its request: ``{"score", "error", "usage"}`` per answer."""
    items = [judge_messages(m, a) for m, a in zip(requests, answers, strict=True)]
    return asyncio.run(_grade_all(cfg, items, advance))
