"""Harvesting serve-router's log folder as a user points at it: the folder, or a glob over it. Its student-*.jsonl
lines are the student's own answers (training on them teaches the student its own mistakes, and evaluate would
score it against itself) and its errors-, passthrough- and live- files hold no calls: both are skipped and counted,
not taken as teacher answers or quarantined. The logs come from a real RouterProxy on loopback, called with the
official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from harvest_helpers import harvest, in_tmp, records, write_recipe  # noqa: F401
from live_stubs import UNSURE, ProxyServer, TableServer, lines, policy, wait_for

from export.route.proxy import ProxyConfig, RouterProxy
from export.route.router import Router
from pipeline.cli import main as cli

QUESTIONS = {"q1": "a1", "q2": "a2", "q3": "a3"}


class Teacher(TableServer):
    """Answers like the table, marked as the teacher's, so that a student answer harvested would show."""

    def __init__(self) -> None:
        super().__init__({q: f"{a} (teacher)" for q, a in QUESTIONS.items()}, student=False)


@pytest.fixture
def router_logs(tmp_path):
    """serve-router's log folder after: 3 confident student answers (each audited by the teacher: 3 audit
    lines), 1 unsure one (escalated to the teacher), 1 of an unknown function (the teacher's), 1 bad request, 1
    embeddings call passed through (the stand-in teacher has no such endpoint: a 404 relayed)."""
    student, teacher = TableServer(QUESTIONS, student=True).start(), Teacher().start()
    cfg = ProxyConfig(student_url=student.url, teacher_url=teacher.url, log_dir=tmp_path / "logs" / "router",
                      seed=0, audit_share=1.0, pass_through=("/v1/embeddings",))
    proxy = ProxyServer(RouterProxy(Router(policy("tiny-student"), None), cfg, "ab" * 32)).start()
    client = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        for text, fn in (("q1", "faq"), ("q2", "faq"), ("q3", "triage"), (f"q1 {UNSURE}", "faq"), ("q2", "other")):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}],
                                           extra_body={"metadata": {"function": fn}})
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gpt-4o", messages="not a list")
        assert httpx.post(f"{proxy.url}/embeddings", json={"model": "e", "input": "q1"}).status_code == 404
        wait_for(lambda: len(lines(tmp_path / "logs" / "router", "live-*.jsonl")) >= 3, what="3 audit records")
    finally:
        proxy.stop()
        student.stop()
        teacher.stop()
    return tmp_path / "logs" / "router"


@pytest.mark.parametrize("path", ["logs/router", "logs/router/*.jsonl"])
def test_a_router_log_folder_gives_the_teachers_answers_only(tmp_path, router_logs, path, capsys):
    kinds = sorted(f.name.split("-")[0] for f in router_logs.iterdir())
    assert kinds == ["errors", "live", "passthrough", "student", "teacher"]
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openai", "path": path}]})
    capsys.readouterr()
    manifest = harvest(recipe)
    answers = sorted(r["output"]["content"] for r in records(recipe))
    # The teacher's answers only: 3 audits, the escalated one, the unknown function's (was: + 3 student answers)
    assert answers == ["a1 (teacher)", "a1 (teacher)", "a2 (teacher)", "a2 (teacher)", "a3 (teacher)"]
    counts = manifest["counts"]
    assert counts["not_calls"] == {"student answers logged by serve-router": 3,
                                   "serve-router records that are not calls (errors-, passthrough-, live-)": 5}
    assert counts["this_run"]["not_calls"] == counts["not_calls"]
    assert counts["quarantined"] == 0  # was: 5 (the error, the pass-through and the 3 audit scores: "no 'request'")
    assert counts["lines"] == 5 + 3 + 5  # records + student answers + router records
    shown = capsys.readouterr().out
    assert "of which" in shown and "3 student answers logged by serve-router" in " ".join(shown.split()).replace("│ ", "")


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


def test_replicas_folders_are_read_through_a_glob(tmp_path, router_logs):
    """Several serve-router replicas, each with its own --log-dir under one folder: a glob matching the folders
    (was: 'no files match', the nightly job exited 2) reads them all."""
    for host in ("host-a", "host-b"):
        folder = tmp_path / "replicas" / host
        folder.mkdir(parents=True)
        for f in router_logs.iterdir():
            text = f.read_text().replace('"chatcmpl-', f'"chatcmpl-{host}-')  # each replica's own ids
            (folder / f.name).write_text(text)
    for n, path in enumerate(("replicas/*", "replicas/*/", "replicas/host-?/teacher-*")):
        recipe = write_recipe(tmp_path, {"sources": [{"format": "openai", "path": path}]}, name=f"r{n}")
        assert cli(["harvest", str(recipe)]) == 0, path
        got = records(tmp_path / "runs" / f"r{n}" / "harvest")
        assert len(got) == 10 and len({r["id"] for r in got}) == 10, path


def test_rows_of_other_loggers_are_not_taken_for_serve_routers(tmp_path):
    """Only serve-router's own record shapes are skipped as not calls; a gateway's row that merely has a method and
    a path, or a kind and a request id, stays quarantined with its reason."""
    rows = [{"id": "1", "timestamp": "2026-12-07T00:00:00Z", "method": "POST", "path": "/v1/chat/completions",
             "status_code": 200, "body": "{}", "output": "an answer"},
            {"kind": "error", "request_id": "r1", "message": "x"},
            {"id": "2", "timestamp": "2026-12-07T00:00:00Z", "status_code": 400, "method": "POST",
             "path": "/v1/chat/completions", "error": "bad"},
            {"timestamp": "2026-12-07T00:00:00Z", "kind": "audit", "request_id": "r2", "version": "v1",
             "function": "faq", "policy_sha256": "ab", "metric": "exact_match", "quality": 1.0}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openai", "path": "mixed.jsonl"}]})
    counts = harvest(recipe)["counts"]
    assert counts["quarantined"] == 2
    assert counts["not_calls"] == {"serve-router records that are not calls (errors-, passthrough-, live-)": 2}
