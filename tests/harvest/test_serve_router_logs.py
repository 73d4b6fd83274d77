"""Harvesting serve-router's log folder as a user points at it: the folder, or a glob over it. Its student-*.jsonl
lines are the student's own answers (training on them teaches the student its own mistakes, and evaluate would
score it against itself) and its errors-, passthrough- and live- files hold no calls: both are skipped and counted,
not taken as teacher answers or quarantined. The logs come from a real RouterProxy on loopback, called with the
official `openai` client."""

from __future__ import annotations

import json

import openai
import pytest
from harvest_helpers import harvest, in_tmp, records, write_recipe  # noqa: F401
from live_stubs import UNSURE, ProxyServer, TableServer, lines, policy, wait_for

from export.route.proxy import ProxyConfig, RouterProxy
from export.route.router import Router

QUESTIONS = {"q1": "a1", "q2": "a2", "q3": "a3"}


class Teacher(TableServer):
    """Answers like the table, marked as the teacher's, so that a student answer harvested would show."""

    def __init__(self) -> None:
        super().__init__({q: f"{a} (teacher)" for q, a in QUESTIONS.items()}, student=False)


@pytest.fixture
def router_logs(tmp_path):
    """serve-router's log folder after: 3 confident student answers (each audited by the teacher: 3 audit
    lines), 1 unsure one (escalated to the teacher), 1 of an unknown function (the teacher's), 1 bad request."""
    student, teacher = TableServer(QUESTIONS, student=True).start(), Teacher().start()
    cfg = ProxyConfig(student_url=student.url, teacher_url=teacher.url, log_dir=tmp_path / "logs" / "router",
                      seed=0, audit_share=1.0)
    proxy = ProxyServer(RouterProxy(Router(policy("tiny-student"), None), cfg, "ab" * 32)).start()
    client = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        for text, fn in (("q1", "faq"), ("q2", "faq"), ("q3", "triage"), (f"q1 {UNSURE}", "faq"), ("q2", "other")):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}],
                                           extra_body={"metadata": {"function": fn}})
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gpt-4o", messages="not a list")
        wait_for(lambda: len(lines(tmp_path / "logs" / "router", "live-*.jsonl")) >= 3, what="3 audit records")
    finally:
        proxy.stop()
        student.stop()
        teacher.stop()
    return tmp_path / "logs" / "router"


@pytest.mark.parametrize("path", ["logs/router", "logs/router/*.jsonl"])
def test_a_router_log_folder_gives_the_teachers_answers_only(tmp_path, router_logs, path, capsys):
    kinds = sorted(f.name.split("-")[0] for f in router_logs.iterdir())
    assert kinds == ["errors", "live", "student", "teacher"]
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openai", "path": path}]})
    capsys.readouterr()
    manifest = harvest(recipe)
    answers = sorted(r["output"]["content"] for r in records(recipe))
    # The teacher's answers only: 3 audits, the escalated one, the unknown function's (was: + 3 student answers)
    assert answers == ["a1 (teacher)", "a1 (teacher)", "a2 (teacher)", "a2 (teacher)", "a3 (teacher)"]
    counts = manifest["counts"]
    assert counts["not_calls"] == {"student answers logged by serve-router": 3,
                                   "serve-router records that are not calls (errors-, passthrough-, live-)": 4}
    assert counts["quarantined"] == 0  # was: 4 (the error and the 3 audit scores, "no 'request' object")
    shown = capsys.readouterr().out
    assert "not calls" in shown and "3 student answers logged by" in " ".join(shown.split())


def test_a_student_answer_is_skipped_when_its_file_is_named_too(tmp_path, router_logs):
    """One file holding both routes (a user's merge of the day's logs); the fast path and the full importer
    (an answer with logprobs, a stream) agree."""
    rows = [json.loads(x) for f in sorted(router_logs.glob("*-*.jsonl")) if f.name[:7] in ("student", "teacher")
            for x in f.read_text().splitlines()]
    student = [r for r in rows if r["routing"]["route"] == "student"]
    student[0]["response"]["choices"][0]["logprobs"] = {"content": [{"token": "a1", "logprob": -0.01}]}
    student[1]["response"] = [{"id": "c", "choices": [{"index": 0, "delta": {"content": "a2"}, "finish_reason": "stop"}]}]
    (tmp_path / "merged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openai", "path": "merged.jsonl"}]})
    manifest = harvest(recipe)
    assert all(r["output"]["content"].endswith("(teacher)") for r in records(recipe))
    assert len(records(recipe)) == 5
    assert manifest["counts"]["not_calls"] == {"student answers logged by serve-router": 3}
