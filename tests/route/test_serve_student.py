"""`distill serve-student` (issue 15, "Serving the student"): the e2e run's published student served on loopback by
the real command, serve-router in front with a loopback teacher, and the official `openai` client: an in-band
request gets exactly the answer evaluate scored for it, with logprobs in OpenAI's shape."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from openai import OpenAI
from route_helpers import FAQ, Upstream, free_port, full_router, with_rule

from export.route.proxy import ProxyConfig, RouterProxy


def _version(e2e):
    store = e2e / "store" / "tiny-student"
    return store / (store / "latest").read_text().strip()


@pytest.fixture(scope="module")
def student_url(e2e):
    """`distill serve-student` on the published version, as a user runs it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve-student", str(_version(e2e)), "--port",
                             str(port), "--batch-wait-ms", "50"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(proc.stdout.read()) from None
            time.sleep(0.3)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def records(e2e):
    """Held-out records with evaluate's answers and logprobs."""
    preds = {r["id"]: r for r in pq.read_table(e2e / "runs/t/evaluate/predictions.parquet").to_pylist()}
    return [(rec, preds[rec["id"]]) for rec in pq.read_table(e2e / "runs/t/curate/test.parquet").to_pylist()
            if rec["id"] in preds]


def _messages(rec):
    return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]


def test_serve_student_answers_as_evaluate_did_with_openai_logprobs(student_url, records):
    client = OpenAI(base_url=student_url, api_key="unused")
    rec, pred = records[0]
    r = client.chat.completions.create(model="tiny-student", messages=_messages(rec), logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert choice.message.content == pred["prediction"]
    got = [t.logprob for t in choice.logprobs.content]
    assert got == pytest.approx(pred["logprobs"], abs=1e-3)  # the same tokens route calibrated on
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
               for t in choice.logprobs.content)
    assert r.usage.completion_tokens == pred["output_tokens"]
    plain = client.chat.completions.create(model="tiny-student", messages=_messages(rec))
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == pred["prediction"]


def test_stop_ends_the_answer_before_the_first_stop_sequence(student_url, records):
    """Clients trial: `stop` was ignored (the whole answer came back, finish_reason stop), so a client parsing up
    to its stop sequence misread."""
    client = OpenAI(base_url=student_url, api_key="unused", max_retries=0)
    rec, pred = next((r, p) for r, p in records if len(p["prediction"]) > 12)
    text = pred["prediction"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    r = client.chat.completions.create(model="tiny-student", messages=_messages(rec), stop=[stop, "\u0000zz"],
                                       logprobs=True)
    assert r.choices[0].message.content == text[:text.index(stop)].strip()  # was: the whole answer
    assert r.choices[0].finish_reason == "stop"
    assert 0 < r.usage.completion_tokens < pred["output_tokens"] == len(pred["logprobs"])
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    for bad in (["a", "b", "c", "d", "e"], 5, True, {"x": 1}, [""]):  # 5 and True were a 500, {"x": 1} taken
        with pytest.raises(Exception, match="stop must be"):
            client.chat.completions.create(model="tiny-student", messages=_messages(rec), stop=bad)


def test_concurrent_requests_are_batched_and_keep_their_answers(student_url, records):
    client = OpenAI(base_url=student_url, api_key="unused")
    some = records[:8]

    def ask(item):
        return client.chat.completions.create(model="s", messages=_messages(item[0])).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, some))
    assert answers == [p["prediction"] for _, p in some]
    health = httpx.get(student_url.removesuffix("/v1") + "/health").json()
    assert health["max_batch"] > 1 and health["batches"] < health["requests"]


def _start_router(router, student_url, log_dir):
    """The teacher stand-in and serve-router on one event loop in a thread; returns (proxy URL, teacher, stop)."""
    loop = asyncio.new_event_loop()
    teacher = Upstream("teacher")
    ready: dict = {}

    async def start():
        cfg = ProxyConfig(student_url=student_url, teacher_url=await teacher.start(), log_dir=log_dir,
                          student_model="tiny-student")
        runner = web.AppRunner(RouterProxy(router, cfg, "cd" * 32).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        ready["runner"] = runner

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(30)

    def stop():
        asyncio.run_coroutine_threadsafe(ready["runner"].cleanup(), loop).result(30)
        asyncio.run_coroutine_threadsafe(teacher.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return ready["url"], teacher, stop


def test_serve_router_in_front_of_serve_student_with_the_openai_client(e2e, student_url, records, tmp_path):
    # The FAQ rule pinned as in test_proxy.py (the tiny run may disable it): any confident-enough answer is kept.
    router = with_rule(full_router(str(e2e / "runs/t/route")), FAQ, signal="min_logprob", threshold=-50.0)
    rec, pred = next((rec, pred) for rec, pred in records
                     if rec["function"] == FAQ and router.before({"messages": _messages(rec)}, FAQ).to_student)
    url, teacher, stop = _start_router(router, student_url, tmp_path / "logs")
    try:
        client = OpenAI(base_url=url, api_key="unused")
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=_messages(rec), extra_headers={"x-distill-function": FAQ})
        answer = raw.parse()
        assert raw.headers["x-distill-route"] == "student", raw.headers.get("x-distill-reasons")
        assert answer.choices[0].message.content == pred["prediction"]
        assert answer.choices[0].logprobs is None  # asked by the router, not by the client
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=_messages(rec), extra_headers={"x-distill-function": "legal_advice"})
        assert raw.headers["x-distill-route"] == "teacher" and "from the teacher" in raw.parse().choices[0].message.content
    finally:
        stop()
    assert len(teacher.bodies) == 1


def test_streaming_through_serve_router_in_front_of_serve_student(e2e, student_url, records, tmp_path):
    """stream: true with the openai client (issue 16): the real student's checked answer comes as chunks with the
    same text as the plain call, usage in the last chunk when asked; an escalated call streams from the teacher."""
    router = with_rule(full_router(str(e2e / "runs/t/route")), FAQ, signal="min_logprob", threshold=-50.0)
    rec, pred = next((rec, pred) for rec, pred in records
                     if rec["function"] == FAQ and router.before({"messages": _messages(rec)}, FAQ).to_student)
    url, teacher, stop = _start_router(router, student_url, tmp_path / "logs")
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        plain = client.chat.completions.create(model="gpt-4o", messages=_messages(rec),
                                               extra_headers={"x-distill-function": FAQ})
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=_messages(rec), stream=True, stream_options={"include_usage": True},
            extra_headers={"x-distill-function": FAQ})
        assert raw.headers["x-distill-route"] == "student"
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content == pred["prediction"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=_messages(rec), stream=True, extra_headers={"x-distill-function": "legal_advice"})
        assert raw.headers["x-distill-route"] == "teacher"
        assert "from the teacher" in "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    finally:
        stop()
    assert teacher.bodies[-1]["stream"] is True


def test_a_function_with_no_threshold_streams_from_serve_student(e2e, student_url, records, tmp_path):
    """The demo policy's case (no threshold: nothing to check): serve-router asks serve-student to stream. It was
    refused (HTTP 400 "stream=true is not supported"), so every streamed call of such a function went to the
    teacher and saved nothing; serve-student now answers a stream with the whole answer as chunk events."""
    router = with_rule(full_router(str(e2e / "runs/t/route")), FAQ, signal="min_logprob", threshold=None)
    rec, pred = next((rec, pred) for rec, pred in records
                     if rec["function"] == FAQ and router.before({"messages": _messages(rec)}, FAQ).to_student)
    direct = OpenAI(base_url=student_url, api_key="unused", max_retries=0)
    chunks = list(direct.chat.completions.create(model="s", messages=_messages(rec), stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == pred["prediction"]
    assert chunks[-1].usage.completion_tokens == pred["output_tokens"]
    url, teacher, stop = _start_router(router, student_url, tmp_path / "logs")
    try:
        raw = OpenAI(base_url=url, api_key="unused", max_retries=0).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=_messages(rec), stream=True, extra_headers={"x-distill-function": FAQ})
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    finally:
        stop()
    assert raw.headers["x-distill-route"] == "student", raw.headers.get("x-distill-reasons")
    assert text == pred["prediction"] and not teacher.bodies


def test_serve_student_loads_safetensors_only(e2e, tmp_path):
    """Security review: a version folder holding only a pickled pytorch_model.bin was loaded and served (torch's
    weights_only default stopped a payload, but "safetensors only" is the rule)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from export.export.serve import StudentServer

    folder = tmp_path / "v"
    shutil.copytree(_version(e2e), folder)
    for f in folder.glob("*.safetensors"):
        torch.save(load_file(f), folder / "pytorch_model.bin")
        f.unlink()
    with pytest.raises(FileNotFoundError, match="holds no safetensors weights: serve-student loads safetensors only"):
        StudentServer(folder)
