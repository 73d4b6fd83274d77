"""Streaming a student answer as it comes (issue 16, "Measured": time to first token within 10 % of the student's
own): for a function whose rule has no threshold there is nothing to check, so the student is asked to stream and
its events reach the client as they arrive, like an escalated teacher's. Loopback student and teacher, the proxy on
its own event loop, the official `openai` client; the log then goes through `distill ledger`."""

from __future__ import annotations

import json
import time

import pytest
from openai import APIError, OpenAI
from route_helpers import (
    FAQ,
    IN_BAND_FAQ,
    STREAM_DELAY_S,
    STUDENT_PIECES,
    STUDENT_USAGE,
    TEACHER_PIECES,
    full_router,
    read_jsonl,
    request,
    with_rule,
)
from test_proxy_stream import _start

from export.route.proxy import PASSED_ON
from pipeline.cli import main as cli

STUDENT_TEXT = "".join(STUDENT_PIECES)


def _ask(client, text, stream=True, usage=False, logprobs=False):
    """(headers, [(arrival time, chunk)] | completion, time sent)."""
    body = request(text, function=FAQ)
    kw = {"stream": True, **({"stream_options": {"include_usage": True}} if usage else {})} if stream else {}
    if logprobs:
        kw["logprobs"] = True
    sent = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(model=body["model"], messages=body["messages"],
                                                           extra_body={"metadata": body["metadata"]}, **kw)
    if not stream:
        return dict(raw.headers), raw.parse(), sent
    return dict(raw.headers), [(time.perf_counter(), c) for c in raw.parse()], sent


@pytest.fixture(scope="module")
def passthrough(e2e, tmp_path_factory):
    router = with_rule(full_router(str(e2e / "runs/t/route")), FAQ, signal="min_logprob", threshold=None)
    log_dir = tmp_path_factory.mktemp("passthrough-logs")
    url, student, teacher, proxy, stop = _start(router, log_dir)
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        out = {"stream": _ask(client, IN_BAND_FAQ), "usage": _ask(client, IN_BAND_FAQ, usage=True),
               "failed": _ask(client, IN_BAND_FAQ + " FAIL"), "plain": _ask(client, IN_BAND_FAQ, stream=False),
               "error_event": _ask(client, IN_BAND_FAQ + " ERREVENT"),
               "no_event": _ask(client, IN_BAND_FAQ + " NOEVENT")}
        try:
            _ask(client, IN_BAND_FAQ + " BREAK")
            out["broken"] = None
        except APIError as err:  # what the SDK raises on an error event: the cut answer is not taken for whole
            out["broken"] = err
    finally:
        stop()
    return out, student, teacher, log_dir


def _content(chunks):
    return [(t, c) for t, c in chunks if c.choices and c.choices[0].delta.content]


def test_the_student_streams_through_as_it_comes(passthrough):
    out, student = passthrough[:2]
    for key in ("stream", "usage"):
        headers, chunks, sent = out[key]
        assert (headers["x-distill-route"], headers["x-distill-phase"]) == ("student", "before")
        assert json.loads(headers["x-distill-reasons"])[-1] == PASSED_ON
        content = _content(chunks)
        assert [c.choices[0].delta.content for _, c in content] == STUDENT_PIECES  # the student's own chunks
        # Relayed as they came: pieces STREAM_DELAY_S apart, and the first one long before the whole answer.
        gaps = [b[0] - a[0] for a, b in zip(content, content[1:], strict=False)]
        assert min(gaps) > STREAM_DELAY_S / 2, gaps
        whole = (len(STUDENT_PIECES) + 1) * STREAM_DELAY_S  # what the student takes for its whole answer
        assert content[0][0] - sent < whole / 2, (content[0][0] - sent, whole)
    assert all(c.usage is None for _, c in out["stream"][1])  # not asked: the usage chunk is held back
    last = out["usage"][1][-1][1]
    assert last.choices == [] and last.usage.model_dump(exclude_none=True) == STUDENT_USAGE
    streamed = [b for b in student.bodies if b.get("stream")]
    assert len(streamed) == 6  # stream, usage, failed, error_event, no_event, broken
    # Usage always asked (the ledger needs it); no logprobs: nothing reads them and the client did not ask.
    assert all(b["stream_options"] == {"include_usage": True} and "logprobs" not in b for b in streamed)
    assert all(b["model"] == "tiny-student" for b in streamed)


@pytest.mark.parametrize("case", ["failed", "error_event", "no_event"])
def test_a_student_failing_before_its_first_chunk_falls_back_to_the_teacher(passthrough, case):
    """An HTTP error, an error event first (vLLM's way after the stream opened), a stream closed before any event:
    nothing was sent yet, so the teacher answers."""
    headers, chunks, _ = passthrough[0][case]
    assert (headers["x-distill-route"], headers["x-distill-phase"]) == ("teacher", "after")
    assert "student endpoint failed" in json.loads(headers["x-distill-reasons"])[-1]
    assert [c.choices[0].delta.content for _, c in _content(chunks)] == TEACHER_PIECES


def test_a_stream_broken_midway_ends_with_an_error_the_client_sees(passthrough):
    err = passthrough[0]["broken"]
    assert err is not None and "stream broken after" in str(err)
    lines = [x for f in passthrough[3].glob("student-*.jsonl") for x in read_jsonl(f)]
    broken = [x for x in lines if "BREAK" in json.dumps(x["request"])]
    assert len(broken) == 1 and "stream broken after" in broken[0]["response"]["error"]["message"]


def test_a_plain_request_is_still_answered_whole_and_checked(passthrough):
    headers, completion, _ = passthrough[0]["plain"]
    assert (headers["x-distill-route"], headers["x-distill-phase"]) == ("student", "after")
    assert completion.choices[0].message.content == "The Echo Speaker is in stock."
    whole = [b for b in passthrough[1].bodies if not b.get("stream")]
    assert len(whole) == 1 and whole[0]["logprobs"] is True


def test_passed_on_streams_are_logged_whole_and_priced(passthrough, tmp_path):
    log_dir = passthrough[3]
    lines = read_jsonl(next(log_dir.glob("student-*.jsonl")))
    streamed = [x for x in lines if x["routing"].get("stream") and not x["response"].get("error")]
    assert len(streamed) == 2 and len(lines) == 4  # + the broken stream, logged with its error
    for x in streamed:
        assert x["response"]["choices"][0]["message"]["content"] == STUDENT_TEXT
        assert x["response"]["usage"] == STUDENT_USAGE and x["routing"]["reasons"][-1] == PASSED_ON
        assert x["routing"]["cost"]["student_basis"] != "not asked"  # the student was asked: priced as tried
    out = tmp_path / "ledger.json"
    assert cli(["ledger", "--logs", str(log_dir), "--json", str(out)]) == 0
    total = json.loads(out.read_text())["total"]
    assert (total["requests"], total["student"], total["escalated"]) == (7, 4, 3)
