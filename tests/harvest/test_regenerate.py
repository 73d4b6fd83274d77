"""Teacher re-generation against a real OpenAI-compatible HTTP server on loopback: rate limits with Retry-After,
5xx, a server that dies mid-run (the rerun resumes from the cache), top-k logprobs, token and cost accounting,
and an API key that never reaches the disk."""

import asyncio
import contextlib

import pytest
from aiohttp import web
from harvest_helpers import by_id, harvest, in_tmp, jsonl, openai_row, write_recipe  # noqa: F401
from loopback import LoopbackServer

from pipeline.cli import main as cli

KEY = "sk-test-8c1f0e7d5b3a"


class Teacher(LoopbackServer):
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1, run in a thread. ``script`` lists what the next
    calls get (an HTTP status, or 'ok'); ``die_after`` stops the server for good after that many answers."""

    def __init__(self, script=(), die_after=None, delay=0.0):
        self.script = list(script)
        self.die_after = die_after
        self.delay = delay
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.answers = 0
        self.inflight = self.max_inflight = 0
        self.dying = None
        self.start()

    async def handle(self, request):
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._answer(request)
        finally:
            self.inflight -= 1

    async def _answer(self, request):
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("Authorization"))
        step = self.script.pop(0) if self.script else "ok"
        if step == "slow":  # longer than the client's timeout
            await asyncio.sleep(2)
            step = "ok"
        if step == 429:
            return web.json_response({"error": {"type": "rate_limit", "message": "slow down"}}, status=429,
                                     headers={"Retry-After": "0.05"})
        if step != "ok":
            return web.json_response({"error": {"type": "server_error", "message": "boom"}}, status=step)
        if self.die_after is not None and self.answers >= self.die_after:
            if self.dying is None:
                self.dying = asyncio.ensure_future(self.runner.cleanup())
            await asyncio.sleep(0.5)  # the connection drops while the client waits
            raise web.HTTPServiceUnavailable()
        self.answers += 1
        await asyncio.sleep(self.delay)
        question = body["messages"][-1]["content"]
        words = ["Fresh", "answer", "to", question]
        out = {"id": f"chatcmpl-{self.answers}", "object": "chat.completion", "model": body["model"] + "-2026",
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": " ".join(words)}}],
               "usage": {"prompt_tokens": 10 * len(body["messages"]), "completion_tokens": len(words)}}
        if body.get("logprobs"):
            k = body["top_logprobs"]
            out["choices"][0]["logprobs"] = {"content": [
                {"token": w, "logprob": -0.1, "bytes": list(w.encode()),
                 "top_logprobs": [{"token": w if j == 0 else f"{w}~{j}", "logprob": -0.1 - j} for j in range(k)]}
                for w in words]}
        return web.json_response(out)

    async def shutdown(self):
        await (self.dying if self.dying is not None else self.runner.cleanup())


@pytest.fixture
def teachers():
    started = []

    def start(**kw):
        t = Teacher(**kw)
        started.append(t)
        return t

    yield start
    for t in started:
        with contextlib.suppress(Exception):  # a server that died in the test is already down
            t.stop()


def logs(tmp_path, n=12):
    """n calls: every third failed (HTTP 500, no output), every third other by an old teacher, the rest fine;
    thumbs-down feedback on req_2."""
    rows = []
    for i in range(n):
        r = openai_row(i)
        if i % 3 == 0:
            r = {**r, "status_code": 500, "response": {"error": {"message": "upstream failed"}}}
        elif i % 3 == 1:
            r["response"] = {**r["response"], "model": "gpt-3.5-turbo-0125"}
        rows.append(r)
    rows[2]["feedback"] = {"thumbs_up": 0}
    jsonl(tmp_path / "logs" / "day.jsonl", rows)


def recipe_for(tmp_path, url, **regen):
    return write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}], "regenerate": {
        "endpoint": url, "model": "teacher-70b", "api_key_env": "DISTILL_TEST_KEY", "backoff_s": 0.01,
        "max_backoff_s": 0.2, "timeout_s": 10, "concurrency": 3,
        "when": {"no_output": True, "teacher_models": ["gpt-3.5*"],
                 "feedback": {"metric": "thumbs_up", "min_value": 0.5}},
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}, **regen}})


def test_regeneration_with_rate_limits_retries_logprobs_and_costs(tmp_path, teachers, monkeypatch, capsys):
    logs(tmp_path)
    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)
    t = teachers(script=[429, 429, 503, "slow"], delay=0.05)
    recipe = recipe_for(tmp_path, t.url, top_logprobs=3, params={"temperature": 0.0, "max_tokens": 64},
                        timeout_s=0.5)
    m = harvest(recipe)
    s = m["counts"]["regenerate"]
    # 4 failed calls + 4 by the old teacher + req_2 with a thumbs down = 9 records, one request each.
    assert s["records"] == s["requests"] == s["new_answers"] == 9 and s["cached"] == 0 and s["failed"] == 0
    assert s["reasons"] == {"no output": 4, "old teacher": 4, "negative feedback": 1}
    # Two 429s (Retry-After honoured), a 503 and a timeout: four retries; never more than 3 requests in flight.
    assert s["retries"] == 4 and s["http_calls"] == 13 and len(t.requests) == 13 and s["statuses"]["429"] == 2
    assert t.max_inflight <= 3
    assert s["input_tokens"] == 9 * 20 and s["output_tokens"] == 9 * 4
    assert s["cost_usd"] == pytest.approx((180 * 1.0 + 36 * 2.0) / 1e6)
    r = by_id(recipe)
    failed, old, thumbs, fine = r["req_0"], r["req_1"], r["req_2"], r["req_5"]
    assert failed["output"]["content"] == "Fresh answer to Question number 0?" and failed["status_code"] == 200
    assert failed["error"] is None and failed["tags"]["regenerated"] == "no output"
    assert old["teacher"]["model"] == "teacher-70b-2026" and old["teacher"]["provider"] == "regenerated"
    assert old["tags"]["original_teacher"] == "gpt-3.5-turbo-0125" and old["usage"] == {"input_tokens": 20,
                                                                                         "output_tokens": 4}
    assert thumbs["tags"]["regenerated"] == "negative feedback (thumbs_up)"
    assert fine["output"]["content"] == "Answer 5." and "regenerated" not in fine["tags"]
    lp = old["teacher"]["logprobs"]
    assert [x["token"] for x in lp] == ["Fresh", "answer", "to", "Question number 1?"]
    assert len(lp[0]["top"]) == 3 and lp[0]["top"][1] == {"token": "Fresh~1", "logprob": pytest.approx(-1.1, abs=1e-3),
                                                          "bytes": None}  # float16; bytes only if not the text
    assert old["cost_usd"] == pytest.approx((20 * 1.0 + 4 * 2.0) / 1e6)
    sent = t.requests[-1]
    assert sent["model"] == "teacher-70b" and sent["temperature"] == 0.0 and sent["max_tokens"] == 64
    assert sent["logprobs"] is True and sent["top_logprobs"] == 3
    assert set(t.auth) == {f"Bearer {KEY}"}
    # The key is read from the environment and written nowhere: not in the run directory, not in the output.
    for p in (tmp_path / "runs").rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in capsys.readouterr().out


def test_a_teacher_that_dies_mid_run_and_the_rerun_resumes_from_the_cache(tmp_path, teachers, monkeypatch, capsys):
    logs(tmp_path, n=30)
    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)
    t1 = teachers(die_after=5)
    recipe = recipe_for(tmp_path, t1.url, max_retries=2)
    assert cli(["harvest", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert "teacher calls failed" in out and "rerun the same command" in out
    assert t1.answers == 5
    assert not (tmp_path / "runs" / "t" / "harvest").exists()  # nothing looks complete
    cache = tmp_path / "runs" / "t" / "cache" / "teacher" / "responses.sqlite3"
    assert cache.is_file()

    t2 = teachers()  # the teacher is back, on another port: the endpoint in the recipe changes
    recipe = recipe_for(tmp_path, t2.url, max_retries=2)
    m = harvest(recipe)
    s = m["counts"]["regenerate"]
    assert s["records"] == 21 and s["cached"] == 5 and s["new_answers"] == 16 and len(t2.requests) == 16
    assert all("Fresh answer" in by_id(recipe)[f"req_{i}"]["output"]["content"] for i in (0, 1, 2, 3, 4, 6))
    # Once more, forced: every answer comes from the cache; not one call.
    m = harvest(recipe, "--force")
    assert m["counts"]["regenerate"]["cached"] == 21 and len(t2.requests) == 16


def test_keep_on_failure_bad_key_and_call_budget(tmp_path, teachers, monkeypatch, capsys):
    logs(tmp_path, n=6)
    t = teachers(script=[500] * 100)
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    recipe = recipe_for(tmp_path, t.url, max_retries=1)
    assert cli(["harvest", str(recipe)]) == 1
    assert "DISTILL_TEST_KEY, which is not set" in capsys.readouterr().out and not t.requests

    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)
    recipe = recipe_for(tmp_path, t.url, max_calls=2)
    assert cli(["harvest", str(recipe)]) == 1
    assert "needs 5 new calls, more than harvest.regenerate.max_calls (2)" in capsys.readouterr().out

    recipe = recipe_for(tmp_path, t.url, max_retries=1, on_failure="keep")
    m = harvest(recipe)
    assert m["counts"]["regenerate"]["failed"] == 5 and len(t.requests) == 10
    r = by_id(recipe)
    assert r["req_1"]["tags"]["regenerate_failed"] == "HTTP 500 (server_error) after 1 retries"
    assert r["req_1"]["teacher"]["model"] == "gpt-3.5-turbo-0125"  # the logged output stays

    t.script = [401]
    recipe = recipe_for(tmp_path, t.url, on_failure="keep", concurrency=1)
    assert cli(["harvest", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert "HTTP 401" in out and "api_key_env" in out
