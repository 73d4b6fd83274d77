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


def test_globs_read_each_file_once_and_a_literal_bracket_is_a_name(tmp_path, router_logs):
    """logs/** matches every folder above a file too: each file is read once (was: once per folder, lines and
    not-calls tripled). A '[' in a path is a name, as before (was: 'no files match'). 'logs/*/' means folders."""
    tree = tmp_path / "tree" / "eu[1]" / "host-a"
    tree.mkdir(parents=True)
    for f in router_logs.iterdir():
        (tree / f.name).write_text(f.read_text())
    (tmp_path / "tree" / "notes.txt").write_text("not a log\n")
    # (path, files read, lines): tree/** names notes.txt too (a glob of every file), which is quarantined
    for n, (path, files, lines_read) in enumerate((("tree/**", 6, 14), ("tree/eu[1]/host-a", 5, 13),
                                                  ("tree/*/", 5, 13))):
        recipe = write_recipe(tmp_path, {"sources": [{"format": "openai", "path": path}]}, name=f"g{n}")
        assert cli(["harvest", str(recipe)]) == 0, path
        counts = json.loads((tmp_path / "runs" / f"g{n}" / "harvest" / "manifest.json").read_text())["counts"]
        assert (counts["this_run"]["files_read"], counts["lines"]) == (files, lines_read), path
        assert counts["quarantined"] == lines_read - 13 and counts["records"] == 5, path


def test_a_golden_row_from_the_students_log_is_the_reviewers_answer(tmp_path, router_logs):
    """A reviewed answer copied from serve-router's student log (its routing object kept) reads as a golden row."""
    from curation.harvest.golden import load_golden
    from pipeline.recipe import parse_recipe

    from conftest import BASE_RECIPE, merge

    row = json.loads(next(router_logs.glob("student-*.jsonl")).read_text().splitlines()[0])
    row["response"]["choices"][0]["message"]["content"] = "a1, reviewed"
    (tmp_path / "golden.jsonl").write_text(json.dumps(row) + "\n")
    sources = parse_recipe(merge(BASE_RECIPE, {"evaluate": {"golden": [
        {"path": str(tmp_path / "golden.jsonl"), "format": "openai"}]}})).evaluate.golden
    assert [r["output"]["content"] for r in load_golden(sources)] == ["a1, reviewed"]


def test_tensorzero_inferences_of_distills_config_keep_the_teachers_only(tmp_path):
    """distill's TensorZero config (legacy) has per function a student, a teacher and a router variant: only the
    teacher variant's inferences are the teacher's answers."""
    rows = [{"id": f"0190b2c1-0000-7000-8000-00000000000{n}", "function_name": "faq", "variant_name": variant,
             "input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "q1"}]}]},
             "output": [{"type": "text", "text": f"from the {variant}"}], "timestamp": f"2026-12-07T00:00:0{n}Z"}
            for n, variant in enumerate(("student", "teacher", "router"))]
    (tmp_path / "ChatInference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path, {"sources": [{"format": "tensorzero", "path": "ChatInference.jsonl"}]})
    counts = harvest(recipe)["counts"]
    assert [r["output"]["content"] for r in records(recipe)] == ["from the teacher"]
    assert sum(counts["not_calls"].values()) == 2 and counts["quarantined"] == 0


def test_upstreams_that_reuse_answer_ids_lose_no_call(tmp_path, capsys):
    """Trial: serve-router logged the upstream's answer id as the call's, and harvest keeps one record per id, so
    three escalations answered by a teacher that reuses ids (Ollama's chatcmpl-<0..998>) gave 1 record and "2
    already harvested". Every answer now has serve-router's own id, the same for the client and the log line;
    the upstream's is routing.upstream_id."""
    student = TableServer(QUESTIONS, student=True, fixed_id="chatcmpl-7").start()
    teacher = TableServer({q: f"{a} (teacher)" for q, a in QUESTIONS.items()}, False, fixed_id="chatcmpl-7").start()
    cfg = ProxyConfig(student_url=student.url, teacher_url=teacher.url, log_dir=tmp_path / "logs" / "router",
                      seed=0, audit_share=1.0)
    proxy = ProxyServer(RouterProxy(Router(policy("tiny-student"), None), cfg, "ab" * 32)).start()
    client = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0)
    ids = []
    try:
        for text, fn in ((f"q1 {UNSURE}", "faq"), (f"q2 {UNSURE}", "faq"), ("q3", "other"), ("q1", "faq")):
            ids.append(client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}],
                                                      extra_body={"metadata": {"function": fn}}).id)
        stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q2"}],
                                                extra_body={"metadata": {"function": "other"}}, stream=True)
        ids.append({c.id for c in stream}.pop())
        wait_for(lambda: len(lines(tmp_path / "logs" / "router", "live-*.jsonl")) >= 1, what="the audit")
    finally:
        proxy.stop()
        student.stop()
        teacher.stop()
    logged = lines(tmp_path / "logs" / "router", "*-*.jsonl")
    calls = [x for x in logged if "routing" in x]
    assert len(set(ids)) == 5 and all(i.startswith("chatcmpl-") and i != "chatcmpl-7" for i in ids)
    assert set(ids) <= {x["id"] for x in calls} and len({x["id"] for x in calls}) == len(calls) == 6
    assert {x["routing"].get("upstream_id") for x in calls} == {"chatcmpl-7"}
    recipe = write_recipe(tmp_path, {"sources": [{"format": "openai", "path": "logs/router"}]})
    m = harvest(recipe)
    assert m["counts"]["records"] == 5 and m["counts"].get("duplicates", 0) == 0  # was: 1 record, 4 duplicates
