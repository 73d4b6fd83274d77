"""Helpers for the evaluate/export/store tests: a private copy of the session's end-to-end run with recipe
overrides, and a real OpenAI-compatible judge server (aiohttp) on loopback."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from loopback import LoopbackServer

from conftest import merge


def copy_project(e2e: Path, dest: Path, monkeypatch, **overrides: Any) -> Path:
    """A private copy of the e2e run directory and store under ``dest`` with recipe overrides; returns the
    recipe path (``dest/recipe.yaml``) and makes ``e2e`` the working directory.

    The copied recipe keeps reading the e2e logs (relative paths resolve against the working directory, so
    harvest sees the very same files and is not rerun) while its run directory and store are the copies."""
    shutil.copytree(e2e / "runs", dest / "runs", ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(e2e / "store", dest / "store")
    data = yaml.safe_load((e2e / "recipe.yaml").read_text())
    data["run_dir"] = str(dest / "runs")
    data["export"]["store"] = str(dest / "store")
    recipe = dest / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(merge(data, overrides)))
    monkeypatch.chdir(e2e)
    return recipe


def judge_rule(answer: str) -> int:
    """The loopback judge's grade: 10 for a JSON object with the three triage fields, 8 for a sentence that
    names a product and ends with a full stop, 2 otherwise."""
    try:
        v = json.loads(answer)
        if isinstance(v, dict) and {"intent", "priority", "product"} <= set(v):
            return 10
    except json.JSONDecodeError:
        pass
    return 8 if answer.strip().endswith(".") and re.search(r"\bthe\b", answer, re.I) else 2


class JudgeServer(LoopbackServer):
    """An OpenAI-compatible /v1/chat/completions endpoint on 127.0.0.1 that grades with :func:`judge_rule`.

    Answers containing FLAKY fail with HTTP 503 on their first request; answers containing GARBAGE always get
    an unreadable reply. Every request's headers and body are recorded."""

    def __init__(self, api_key: str | None = None):
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.seen: set[str] = set()

    async def handle(self, request):
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "bad key"}, status=401)
        prompt = body["messages"][-1]["content"]
        answer = re.search(r"<answer>\n(.*)\n</answer>", prompt, re.S).group(1)
        if "FLAKY" in answer and answer not in self.seen:
            self.seen.add(answer)
            return web.json_response({"error": "overloaded"}, status=503)
        content = "no idea" if "GARBAGE" in answer else json.dumps({"score": judge_rule(answer), "reason": "rule"})
        return web.json_response({
            "id": "cmpl-1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 9},
        })
