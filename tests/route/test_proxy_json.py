"""serve-router reads and writes JSON with orjson, and the standard library where only it can: what JSON allows
but is not text or a finite number (a lone surrogate, 1e400) is refused naming the field; a non-finite logprob
from a student does not make a log line that harvest cannot read; integers over 64 bits, a declared charset and
deep nesting are read as before; a teacher's answer that is not JSON is a 502, streamed or not."""

from __future__ import annotations

import asyncio
import json

import orjson
import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import ClientSession, web
from route_helpers import (
    FAQ,
    IN_BAND_FAQ,
    Upstream,
    completion,
    content_logprobs,
    full_router,
    proxy_site,
    request,
    with_rule,
)

from export.route.jsonio import _loads
from export.route.proxy import ProxyConfig, RouterProxy
from pipeline.cli import main as cli

BIG = 123456789012345678901234567890  # over 64 bits: orjson cannot read or write it


class InfStudent(Upstream):
    """The loopback student; a user turn holding INF gets an answer with a -Infinity logprob (as Python's
    json.dumps writes it), which the standard library reads and orjson does not."""

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        user = " ".join(m.get("content") or "" for m in body["messages"] if m["role"] == "user")
        if "INF" not in user:
            return await super().answer(request)
        self.bodies.append(body)
        lp = content_logprobs([-0.01, float("-inf"), -0.02], body.get("top_logprobs") or 3)
        return web.Response(text=json.dumps(completion("The Echo Speaker is in stock.", "s", lp)),
                            content_type="application/json")


class OddTeacher(Upstream):
    """The loopback teacher; a user turn holding NONJSON gets an HTTP 200 whose body is not JSON, NONJSON429 a
    plain-text 429."""

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        text = " ".join(m.get("content") or "" for m in body["messages"])
        if "NONJSON429" in text:
            return web.Response(text="Too Many Requests", status=429)
        if "NONJSON" in text:
            return web.Response(text="<html>upstream proxy error</html>", content_type="text/html")
        return await super().answer(request)


def _deep(n: int) -> str:
    return json.dumps(request(IN_BAND_FAQ))[:-1] + ', "x": ' + "[" * n + "]" * n + "}"


async def _session(router, log_dir, raws: list[str | bytes]):
    student, teacher = InfStudent("student"), OddTeacher("teacher")
    cfg = ProxyConfig(student_url=await student.start(), teacher_url=await teacher.start(), log_dir=log_dir,
                      student_model="tiny-student")
    out = []
    try:
        async with proxy_site(RouterProxy(router, cfg, "ef" * 32)) as base, ClientSession() as http:
            for raw in raws:
                latin1 = isinstance(raw, bytes)
                async with http.post(f"{base}/v1/chat/completions", data=raw, headers={
                        "Content-Type": "application/json" + ("; charset=iso-8859-1" if latin1 else "")}) as r:
                    out.append((r.status, r.headers.get("x-distill-route"), await r.text()))
    finally:
        await student.stop()
        await teacher.stop()
    return out, student


@pytest.fixture(scope="module")
def answers(e2e, tmp_path_factory):
    router = with_rule(full_router(str(e2e / "runs/t/route")), FAQ, signal="min_logprob", threshold=-1.0)
    log_dir = tmp_path_factory.mktemp("router-logs")
    cut = request("Is the Echo Speaker in stock? \ud83d")  # an emoji cut in half, as JSON.stringify escapes it
    raws = [json.dumps(cut), json.dumps(request(IN_BAND_FAQ + " INF")),
            json.dumps({**request(IN_BAND_FAQ), "seed": BIG}),
            json.dumps({**request(IN_BAND_FAQ), "temperature": 1e400}).replace("Infinity", "1e400"),
            json.dumps(request("Is the Echo Speaker in stock? \u00e9"), ensure_ascii=False).encode("latin-1"),
            _deep(1010), _deep(499),
            json.dumps(request("Is it in stock? NONJSON", function="legal_advice")),
            json.dumps({**request("Is it in stock? NONJSON", function="legal_advice"), "stream": True}),
            _deep(500), json.dumps({**request("Is it in stock? NONJSON429", function="legal_advice"), "stream": True})]
    assert "\\ud83d" in raws[0]
    out, student = asyncio.run(_session(router, log_dir, raws))
    return out, student, log_dir


def _lines(log_dir):
    return [line for p in sorted(log_dir.glob("*.jsonl")) if not p.name.startswith("errors-")
            for line in p.read_bytes().splitlines()]


def test_a_lone_surrogate_is_refused_naming_the_field(answers):
    out, _, log_dir = answers
    status, _, text = out[0]
    assert status == 400, text  # was HTTP 500 "TypeError" (the tokenizer cannot read it)
    assert "messages[1].content" in json.loads(text)["error"]["message"]
    assert any(json.loads(x)["status_code"] == 400 for p in log_dir.glob("errors-*.jsonl")
               for x in p.read_text().splitlines())


def test_a_non_finite_logprob_leaves_a_log_line_harvest_reads(answers, project):
    out, _, log_dir = answers
    status, route, _ = out[1]
    assert status == 200 and route == "teacher"  # a non-finite signal is never kept
    lines = [x for x in _lines(log_dir) if b"INF" in x]
    assert len(lines) == 1
    row = orjson.loads(lines[0])  # strict JSON: was -Infinity, which harvest quarantined as invalid JSON
    assert row["routing"]["route"] == "teacher" and row["routing"]["signals"]["confidence"] is None
    one = log_dir.parent / "inf-only"
    one.mkdir()
    (one / "teacher-inf.jsonl").write_bytes(lines[0] + b"\n")
    recipe = project(harvest={"sources": [{"format": "openai", "path": f"{one}/teacher-*.jsonl"}]})
    assert cli(["harvest", str(recipe)]) == 0
    run = yaml.safe_load(recipe.read_text())["name"]
    records = pq.read_table(sorted((recipe.parent / "runs" / run / "harvest").glob("records-*.parquet"))).to_pylist()
    assert [r["function"] for r in records] == [FAQ]  # the teacher's answer joins tomorrow's training data


def test_integers_over_64_bits_pass_through(answers):
    out, student, log_dir = answers
    status, route, _ = out[2]
    assert status == 200 and route == "student"
    assert [b["seed"] for b in student.bodies if "seed" in b] == [BIG]
    logged = [json.loads(x) for x in _lines(log_dir) if b"123456789012345678901234567890" in x]
    assert len(logged) == 1 and logged[0]["request"]["seed"] == BIG


def test_a_number_beyond_a_double_is_refused_naming_the_field(answers):
    status, _, text = answers[0][3]
    assert status == 400 and "temperature" in json.loads(text)["error"]["message"], text  # was forwarded (Infinity)


def test_a_declared_charset_and_deep_nesting_are_read_as_before(answers):
    out = answers[0]
    assert out[4][0] == 200, out[4]  # latin-1 with its charset declared, read as aiohttp read it
    assert out[5][0] == 400 and "nests 1011 levels deep: at most 500" in out[5][2]  # was HTTP 500 (1,000-1,023)
    assert out[6][:2] == (200, "student"), out[6]  # 500 levels: past orjson's writer, within the standard library's
    assert out[9][0] == 400 and "nests 501 levels" in out[9][2]


def test_a_teacher_answer_that_is_not_json_is_a_502(answers):
    for status, route, text in answers[0][7:9]:  # not streamed, streamed
        assert status == 502 and route == "teacher", (status, text)  # was HTTP 200 (streamed: only [DONE])
        assert "non-JSON answer from http://127.0.0.1" in json.loads(text)["error"]["message"]
    status, _, text = answers[0][10]  # an error status without JSON keeps its status: a 429 stays a rate limit
    assert status == 429 and "non-JSON answer" in json.loads(text)["error"]["message"], text


def test_small_logprobs_stay_on_the_fast_path_and_long_integers_do_not():
    """orjson reads a completion whose logprobs have 19+ digits after the point (-0.0003353635978884995, as
    vLLM's repr writes a confident token's); an integer beyond 64 bits goes to the standard library, exactly."""
    lp = content_logprobs([-0.0003353635978884995, -0.00012345678901234567, -1.5e-05])
    fast = json.dumps(completion("The Echo Speaker is in stock.", "s", lp)).encode()
    assert "0003353635978884995" in fast.decode()
    assert _loads(fast) == (json.loads(fast), False)  # was the slow path (any 19 digits in a row)
    for raw in (b'{"seed": 123456789012345678901234567890}', b"[1, -9223372036854775809]", b"18446744073709551616",
                b'{"id": "order 1234567890123456789"}', b'{"f": 1234567890123456789.5}'):
        value, slow = _loads(raw)
        assert slow and value == json.loads(raw), raw
