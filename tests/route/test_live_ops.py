"""The live loop run unattended, as an operator trial found it (issue 16): a candidate with no student URL must not
hold back a rollback; a typo in a hand-edited deployment file must not put an untested version live; a broken new
version in the store must not hide a broken guardrail; a typo in the store path, an unwritable --json and a zero
share are refused before anything changes; a shadow whose endpoint is down is not judged on its answers."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from live_stubs import TableServer, lines, publish_version, wait_for

from export.route import canary, deployment
from export.route.lanes import Versions
from export.route.proxy import ProxyConfig, RouterProxy
from pipeline.cli import main as cli
from pipeline.config.route import LiveConfig

CFG = LiveConfig(min_audits=20, max_quality_drop=0.1, alpha=0.05)


def _store(tmp_path, *tags):
    st = tmp_path / "store"
    for tag in tags:
        publish_version(st, "tiny", tag, tmp_path)
    return st, deployment.path_for(st, "tiny")


def _ago(hours: float, seconds: int = 0) -> str:
    """An ISO time that many hours ago (the decision reads a window of recent days: dates must be recent)."""
    return (datetime.now(timezone.utc) - timedelta(hours=hours) + timedelta(seconds=seconds)).isoformat()


def _bad_audits(version: str, n: int = 40) -> list[dict]:
    return [{"kind": "audit", "version": version, "function": "faq", "quality": 0.0, "timestamp": _ago(1, i)}
            for i in range(n)]


def _live(logs, records: list[dict]) -> None:
    """Write live-loop records as serve-router does, into today's live-<date>.jsonl under ``logs`` (made here)."""
    logs.mkdir(exist_ok=True)
    (logs / f"live-{_ago(1)[:10]}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _proxy(path, teacher_url: str, logs, versions_seed: int | None = None, **cfg):
    """serve-router following the deployment file at ``path`` on loopback (a ProxyServer; stop it)."""
    from live_stubs import ProxyServer

    config = ProxyConfig(student_url="", teacher_url=teacher_url, log_dir=logs, **cfg)
    return ProxyServer(RouterProxy(None, config, versions=Versions(path, embeddings=False,
                                                                   seed=versions_seed))).start()


def _ask(proxy, n: int, text: str = "q1") -> list[str]:
    """``n`` requests for function faq with the official openai client, one at a time; their answers."""
    import openai

    client = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0)
    return [client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}],
                                           extra_body={"metadata": {"function": "faq"}}).choices[0].message.content
            for _ in range(n)]


def _v1_serving_v2_shadowed(tmp_path):
    """A store with v1 serving (since 3 h) and v2 in shadow at 0.5 (since 2 h); returns (store, deployment path)."""
    st, path = _store(tmp_path, "v1", "v2")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(3))
        deployment.change(dep, "shadow", "v2", share=0.5, at=_ago(2))
    return st, path


def test_a_candidate_with_no_url_does_not_hold_back_the_serving_version(tmp_path):
    st, path = _store(tmp_path, "v1", "v2", "v3")
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": "http://127.0.0.1:9/v1", "v2": "http://127.0.0.1:8/v1"}
        deployment.change(dep, "serve", "v1")
        deployment.change(dep, "promote", "v2")
        deployment.change(dep, "shadow", "v3")  # the nightly job shadows the new version: no URL for it
    versions = Versions(path, embeddings=False, retry_s=0.0)  # was: DeploymentError, serve-router could not start
    assert versions.serving.version == "v2" and versions.candidate is None and "v3 has no student URL" in versions.error
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "rollback", "v2", reason="guardrail")  # what decide does on a broken guardrail
    assert versions.reload()  # was: the whole file refused, v2 kept answering
    assert versions.serving.version == "v1" and versions.status()["candidate"] is None
    assert "v3" in versions.status()["error"]
    with deployment.updating(path, "tiny") as dep:
        dep["urls"]["v3"] = "http://127.0.0.1:7/v1"
    assert versions.reload() and versions.candidate.lane.version == "v3" and versions.error is None


def test_an_unknown_field_in_a_hand_edited_file_is_refused(tmp_path):
    _, path = _store(tmp_path, "v1")
    path.write_text(json.dumps({**deployment.new("tiny"), "Serving": "v1"}))
    with pytest.raises(deployment.DeploymentError, match="unknown field 'Serving'"):
        deployment.load(path)  # was read as "nothing serves": decide put the latest version live at once
    path.write_text(json.dumps({**deployment.new("tiny"), "serving": "v1", "candidate": {
        "version": "v2", "stage": "shadow", "share": 0.1, "sinse": "x"}}))
    with pytest.raises(deployment.DeploymentError, match="candidate: unknown field 'sinse'"):
        deployment.load(path)


def test_shares_and_the_version_lists_stay_sound():
    dep = deployment.new("tiny")
    deployment.change(dep, "serve", "v1")
    with pytest.raises(deployment.DeploymentError, match="--share"):
        deployment.change(dep, "shadow", "v2", share=0)  # was silently the default 0.1
    deployment.change(dep, "serve", "v2")
    deployment.change(dep, "serve", "v1")  # back by hand
    assert dep["previous"] == ["v2"]  # was [v1, v2]: the serving version in its own rollback list
    deployment.change(dep, "shadow", "v3")
    deployment.change(dep, "rollback", "v3")
    deployment.change(dep, "shadow", "v3")
    deployment.change(dep, "rollback", "v3")
    assert dep["rejected"] == ["v3"]
    with pytest.raises(ValueError):
        LiveConfig(shadow_share=0)


def test_a_broken_latest_version_does_not_hide_a_broken_guardrail(tmp_path):
    st, path = _store(tmp_path, "v1", "v2")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(3))
        deployment.change(dep, "promote", "v2", at=_ago(2))
    (st / "tiny" / "v3").mkdir()  # published without a policy, and made latest
    (st / "tiny" / "latest").write_text("v3\n")
    logs = tmp_path / "logs"
    _live(logs, _bad_audits("v2"))
    warnings: list[str] = []
    done, dep = canary.run(path, str(st), "tiny", logs, CFG, warnings=warnings)  # was: exit 2, nothing judged
    assert [d["action"] for d in done] == ["rollback"] and dep["serving"] == "v1"
    assert any("latest version is not considered" in w for w in warnings)


def _recipe(tmp_path, st, **live):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "harvest": {"sources": [{"format": "openai", "path": "x/*.jsonl"}]},
                                      "export": {"store": str(st), "model_name": "tiny"},
                                      "route": {"live": {"log_dir": str(tmp_path / "logs"), **live}}}))
    return recipe


def test_a_store_typo_or_an_unwritable_json_changes_nothing(tmp_path, capsys):
    st, path = _store(tmp_path, "v1")
    (tmp_path / "logs").mkdir()
    recipe = _recipe(tmp_path, tmp_path / "stroe")
    assert cli(["live", str(recipe), "--decide"]) == 2  # was 0, hourly, forever
    assert "no store folder" in capsys.readouterr().err and not (tmp_path / "stroe").exists()
    recipe = _recipe(tmp_path, st)
    assert cli(["live", str(recipe), "--decide", "--json", str(tmp_path / "missing" / "d.json")]) == 2
    assert not path.exists()  # was: v1 served, then exit 2 for the --json: a scheduler saw a broken config
    assert cli(["live", str(recipe), "--decide", "--json", str(tmp_path / "d.json")]) == 9
    out = json.loads((tmp_path / "d.json").read_text())
    assert out["decisions"][0]["action"] == "serve" and any("no student URL" in w for w in out["warnings"])


def test_a_shadow_whose_endpoint_is_down_is_not_judged_on_its_answers(tmp_path):

    st, path = _store(tmp_path, "v1", "v2")
    v1, teacher = TableServer({"q1": "a1"}, True).start(), TableServer({"q1": "a1"}, False).start()
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": v1.url, "v2": "http://127.0.0.1:9/v1"}  # nothing listens there
        deployment.change(dep, "serve", "v1")
        deployment.change(dep, "shadow", "v2", share=1.0)
    proxy = _proxy(path, teacher.url, tmp_path / "logs", seed=0, audit_share=1.0)
    try:
        _ask(proxy, 3)
        wait_for(lambda: len(lines(tmp_path / "logs", "live-*.jsonl")) >= 6, what="audit and shadow records")
    finally:
        proxy.stop()
        v1.stop()
        teacher.stop()
    records = lines(tmp_path / "logs", "live-*.jsonl")
    assert not [r for r in records if r["kind"] == "shadow"]  # was: 'escalated', and v2 rejected for good
    assert sum(r["kind"] == "error" and r["what"] == "shadow" for r in records) == 3
    ev = canary.gather("v2", "shadow", None, [], records)
    assert ev.scores == [] and ev.escalations == []


def _call(ts: str, route: str = "student") -> dict:
    return {"id": f"c-{ts}", "timestamp": ts, "status_code": 200, "latency_ms": 5.0,
            "request": {"messages": [{"role": "user", "content": "q1"}], "metadata": {"function": "faq"}},
            "response": {"choices": [{"message": {"content": "a1"}}]},
            "routing": {"route": route, "phase": "after", "version": "v1", "cost": {"usd": 0.001}}}


def test_logs_are_read_once_damage_is_counted_and_since_is_a_time(tmp_path, capsys):
    import gzip

    from export.route.ledger import ledger
    from export.route.live import read_routed, report

    logs = tmp_path / "logs"
    logs.mkdir()
    today, old = _ago(0)[:10], _ago(24 * 30)[:10]
    day = logs / f"teacher-{today}.jsonl"
    day.write_text("".join(json.dumps(_call(f"{today}T0{h}:00:00+00:00", "teacher")) + "\n" for h in range(4)))
    (logs / f"teacher-{today}.jsonl.gz").write_bytes(gzip.compress(day.read_bytes()))  # `gzip -k` left both
    (logs / f"student-{today}.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps(_call(f"{today}T05:00:0{i}+00:00")) + "\n" for i in range(5)).encode())[:-30])
    (logs / f"student-{old}.jsonl").write_text(json.dumps(_call(f"{old}T01:00:00+00:00")) + "\n")
    (logs / f"live-{today}.jsonl").write_text(json.dumps({"kind": "audit", "version": "v1", "quality": 1.0,
                                                          "timestamp": f"{today}T01:00:00+00:00"}) + "\n")
    calls, _, bad = read_routed(logs)  # was: EOFError from the cut .gz, and the twin's 4 calls counted twice
    assert sum(c["routing"]["route"] == "teacher" for c in calls) == 4 and bad == 1
    assert 4 < len(calls) < 4 + 5 + 1 and "is damaged" in capsys.readouterr().err
    assert all(c["timestamp"][:10] == today for c in read_routed(logs, today)[0])  # the window skips old days
    assert ledger(str(logs / f"*-{today}.jsonl"))["unreadable_lines"] == 0  # was 1: the live line counted
    assert report(logs, f"{today}T02:00Z")["counts"]["calls"] == report(logs, f"{today}T02:00:00+00:00")[
        "counts"]["calls"] == len([c for c in calls if c["timestamp"] >= f"{today}T02"])  # was compared as text
    assert report(logs, f"{today}T03:00+01:00")["counts"]["calls"] == len(
        [c for c in calls if c["timestamp"] >= f"{today}T02"])
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        report(logs, "yesterday")  # was accepted, and matched nothing


def test_lines_with_unicode_line_separators_and_replicas_logs_are_all_read(tmp_path):
    """orjson writes U+2028/U+2029/U+0085 raw: splitting on them tore such a call in two (review of this change);
    two replicas' files of the same name in two folders are two logs, not a file and its gzipped copy."""
    import gzip

    from export.route.calllog import CallLog
    from export.route.live import read_routed

    today = _ago(0)[:10]
    log = CallLog(tmp_path / "a")
    for text in ("line\u2028separator", "para\u2029graph", "next\u0085line"):
        call = _call(_ago(0))
        call["request"]["messages"][0]["content"] = text
        log.call(call["request"], 200, call["response"], 5.0, call["routing"])
    calls, _, bad = read_routed(tmp_path / "a")
    assert len(calls) == 3 and bad == 0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / f"student-{today}.jsonl.gz").write_bytes(
        gzip.compress((tmp_path / "a" / f"student-{today}.jsonl").read_bytes()))
    assert len(read_routed(str(tmp_path / "*" / "student-*.jsonl*"))[0]) == 6


def test_a_quiet_window_is_no_evidence_not_an_error(tmp_path):
    st, path = _store(tmp_path, "v1")
    logs = tmp_path / "logs"
    logs.mkdir()
    old = _ago(24 * 60)
    (logs / f"student-{old[:10]}.jsonl").write_text(json.dumps(_call(old)) + "\n")  # only 60 days old
    done, dep = canary.run(path, str(st), "tiny", logs, CFG)  # was FileNotFoundError: exit 2 every hour
    assert [d["action"] for d in done] == ["serve"] and dep["serving"] == "v1"


def test_decide_says_what_a_candidate_is_waiting_for(tmp_path, capsys):
    st, _ = _v1_serving_v2_shadowed(tmp_path)
    scores = [{"kind": "shadow", "version": "v2", "function": "faq", "quality": 1.0, "tried": True,
               "escalated": False, "timestamp": _ago(1, i)} for i in range(60)]
    scores.append({**scores[0], "function": "triage", "timestamp": _ago(1, 61)})
    _live(tmp_path / "logs", scores)
    recipe = _recipe(tmp_path, st, min_audits=20)
    assert cli(["live", str(recipe), "--decide", "--json", str(tmp_path / "d.json")]) == 0
    shown = capsys.readouterr().out
    assert "v2 stays in shadow: not enough evidence yet in triage (n=1, best log-wealth so far 0.05 of the 3.00 needed)" in shown
    out = json.loads((tmp_path / "d.json").read_text())
    assert out["candidate_evidence"]["promotion"]["waiting_for"] == ["triage"]  # was not in --json at all


def test_a_stage_older_than_the_window_is_a_warning(tmp_path):
    """A candidate in its stage for longer than window_days cannot be promoted (its early evidence is not read)
    and blocks newer versions: said in --json's warnings, not only in a console line (third review)."""
    st, path = _store(tmp_path, "v1", "v2", "v3")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(24 * 30))
        deployment.change(dep, "shadow", "v2", at=_ago(24 * 20))
    (tmp_path / "logs").mkdir()
    recipe = _recipe(tmp_path, st)
    assert cli(["live", str(recipe), "--decide", "--json", str(tmp_path / "d.json")]) == 0
    out = json.loads((tmp_path / "d.json").read_text())
    assert any("longer than route.live.window_days" in w and "--stage shadow" in w for w in out["warnings"])


def test_no_stale_warning_for_a_candidate_this_run_rolled_back(tmp_path):
    st, path = _store(tmp_path, "v1", "v2", "v3")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(24 * 30))
        deployment.change(dep, "shadow", "v2", at=_ago(24 * 20))
    logs = tmp_path / "logs"
    _live(logs, [{**r, "kind": "shadow", "tried": True, "escalated": False} for r in _bad_audits("v2")])
    recipe = _recipe(tmp_path, st)
    assert cli(["live", str(recipe), "--decide", "--json", str(tmp_path / "d.json")]) == 7
    out = json.loads((tmp_path / "d.json").read_text())
    assert [d["action"] for d in out["decisions"]] == ["rollback", "shadow"]
    assert not any("window_days" in w for w in out["warnings"])  # v2 is gone: the advice would be wrong


def test_a_broken_serving_version_pages_even_when_a_candidate_was_rolled_back(tmp_path):
    """The serving version broke its guardrail with nothing to roll back to, and the candidate broke its own in the
    same run: exit 8 (page someone), not 7 (was 7: the page came a day late, docs trial)."""
    st, _ = _v1_serving_v2_shadowed(tmp_path)
    _live(tmp_path / "logs", _bad_audits("v1") + [{**r, "kind": "shadow", "tried": True, "escalated": False}
                                                  for r in _bad_audits("v2")])
    recipe = _recipe(tmp_path, st)
    assert cli(["live", str(recipe), "--decide", "--json", str(tmp_path / "d.json")]) == 8
    out = json.loads((tmp_path / "d.json").read_text())
    assert {"broken", "rollback"} <= {d["action"] for d in out["decisions"]}
    # v1 rejected: the history says by whom, when and why (docs trial: rejected with no history entry), once
    assert cli(["live", str(recipe), "--decide"]) == 8  # the next hour: still broken, still paging
    dep = deployment.load(st / "tiny" / "deployment.json")
    broken = [h for h in dep["history"] if h["action"] == "broken"]
    assert "v1" in dep["rejected"] and len(broken) == 1 and broken[0]["version"] == "v1"
    assert broken[0]["by"] == "decide" and "no earlier version can serve" in broken[0]["reason"]
    assert broken[0]["evidence"]["broken"]


def test_serve_router_warns_when_the_teacher_gets_no_key(tmp_path, capsys):
    """The README's command had no --teacher-key-env: every escalation reached OpenAI without a key, silently."""
    args = ["serve-router", str(tmp_path), "--student-url", "http://127.0.0.1:9/v1",
            "--teacher-url", "https://api.openai.com/v1", "--processes", "0"]  # refused before it starts
    assert cli(args) == 2
    assert "gets no API key: pass --teacher-key-env" in " ".join(capsys.readouterr().out.split())
    assert cli([*args, "--teacher-key-env", "OPENAI_API_KEY"]) == 2
    assert "gets no API key" not in capsys.readouterr().out


def test_a_deployment_file_away_from_its_versions_is_refused_with_the_reason(tmp_path, capsys):
    """A deployment file elsewhere made every command fail on 'no routing policy at <file's folder>/v2/...'
    (docs trial): now refused up front, saying where it must be; another path to the same folder works."""
    st, path = _store(tmp_path, "v1")
    (tmp_path / "logs").mkdir()
    elsewhere = tmp_path / "shared" / "deployment.json"
    elsewhere.parent.mkdir()
    recipe = _recipe(tmp_path, st)
    assert cli(["live", str(recipe), "--decide", "--deployment", str(elsewhere)]) == 2
    assert "sits beside the versions it names" in " ".join(capsys.readouterr().err.split())
    serve = ["serve-router", str(recipe), "--deployment", str(elsewhere), "--teacher-url", "http://127.0.0.1:9/v1"]
    assert cli(serve) == 2 and "sits beside the versions it names" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "mount").symlink_to(st)  # the store's folder by another path (a shared disk's mount)
    assert cli(["live", str(recipe), "--decide", "--deployment", str(tmp_path / "mount/tiny/deployment.json")]) == 9
    assert deployment.load(path)["serving"] == "v1"
    # The serving host: the recipe's store path is the training host's, the store is mounted elsewhere (review)
    away = _recipe(tmp_path, tmp_path / "not-here")
    publish_version(st, "tiny", "v2", tmp_path)
    assert cli(["promote", str(away), "v2", "--deployment", str(path)]) == 0  # the versions are beside the file
    assert deployment.load(path)["serving"] == "v2"


def test_a_rejected_version_never_serves_again_by_a_rollback():
    """promote v1, promote v2, canary v1, rollback (v1 rejected), rollback v2: v1 served again, rejected
    (docs trial); now there is nothing to roll back to."""
    dep = deployment.new("tiny")
    deployment.change(dep, "promote", "v1")
    deployment.change(dep, "promote", "v2")
    deployment.change(dep, "shadow", "v1")
    deployment.change(dep, "canary", None)
    deployment.change(dep, "rollback", None)
    assert dep["rejected"] == ["v1"] and dep["previous"] == []
    with pytest.raises(deployment.DeploymentError, match="nothing to roll back to"):
        deployment.change(dep, "rollback", "v2")
    assert dep["serving"] == "v2"


def test_a_call_without_a_function_is_default_in_the_ledger_too(tmp_path):
    """The ledger showed '-' where live, route-check and harvest say 'default' (docs trial)."""
    from export.route.ledger import ledger

    logs = tmp_path / "logs"
    logs.mkdir()
    call = _call(_ago(1))
    call["request"]["metadata"] = {}
    (logs / f"student-{_ago(1)[:10]}.jsonl").write_text(json.dumps(call) + "\n")
    assert [r["function"] for r in ledger(logs)["rows"]] == ["default"]


def test_a_file_listing_a_rejected_version_in_previous_still_pages(tmp_path):
    """A file written before rejected versions left `previous` (serving v2, previous [v1], v1 rejected): a broken
    v2 has nothing to roll back to, so exit 8, not 2 from 'nothing to roll back to' (review)."""
    st, path = _store(tmp_path, "v1", "v2")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(4))
        deployment.change(dep, "serve", "v2", at=_ago(3))
        dep["rejected"] = ["v1"]  # as 3d3c05e left it after promote v1, promote v2, shadow v1, rollback
    logs = tmp_path / "logs"
    _live(logs, _bad_audits("v2"))
    assert cli(["live", str(_recipe(tmp_path, st)), "--decide"]) == 8
    assert deployment.load(path)["serving"] == "v2"


def test_an_empty_key_variable_is_warned_about(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")
    args = ["serve-router", str(tmp_path), "--student-url", "http://127.0.0.1:9/v1", "--teacher-url",
            "https://api.openai.com/v1", "--teacher-key-env", "OPENAI_API_KEY", "--processes", "0"]
    assert cli(args) == 2
    assert "OPENAI_API_KEY is not set (or empty)" in " ".join(capsys.readouterr().out.split())


def test_the_report_before_any_traffic_is_empty_not_an_error(tmp_path, capsys):
    """Right after the demo, before serve-router logged a call: 'distill live RECIPE' was a warning then exit 2
    (docs trial), the code for a bad recipe or argument."""
    st, _ = _store(tmp_path, "v1")
    assert cli(["live", str(_recipe(tmp_path, st))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "nothing to judge" in out and "0 routed requests" in out


def test_a_student_endpoint_down_is_no_escalation_of_its_version(tmp_path, capsys):
    """Fault trial: nothing listened on the canary's URL, the teacher answered its requests, and --decide rejected
    v2 for good for 'escalation'; a serving version's endpoint down for a while was rejected too. An endpoint that
    cannot be reached says nothing about a version's answers (the rule shadows had): it is counted in /health,
    warned about by `distill live`, left out of the escalation guardrail; a serving endpoint down on half of its
    recent requests pages (exit 8: every request pays the teacher) without rejecting the version."""
    import httpx

    st, path = _store(tmp_path, "v1", "v2")
    teacher = TableServer({"q1": "a1"}, False).start()
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": "http://127.0.0.1:9/v1", "v2": "http://127.0.0.1:9/v1"}  # nothing listens there
        deployment.change(dep, "serve", "v1", at=_ago(3))
        deployment.change(dep, "shadow", "v2", share=0.1, at=_ago(3))
        deployment.change(dep, "canary", "v2", share=0.5, at=_ago(2))
    proxy = _proxy(path, teacher.url, tmp_path / "logs", seed=0)
    try:
        assert _ask(proxy, 80) == ["a1"] * 80
        health = httpx.get(proxy.url.removesuffix("/v1") + "/health").json()
    finally:
        proxy.stop()
        teacher.stop()
    assert health["student_failed"]["n"] == 80 and "cannot reach" in health["student_failed"]["last"]
    assert health["status"].startswith("degraded: a student endpoint is unavailable")  # was: ok
    calls = lines(tmp_path / "logs", "teacher-*.jsonl")
    assert {c["routing"]["version"] for c in calls} == {"v1", "v2"} and len(calls) == 80
    assert canary.gather("v2", "canary", None, calls, []).escalations == []
    capsys.readouterr()
    recipe = _recipe(tmp_path, st, escalation_block=2)
    assert cli(["live", str(recipe), "--decide"]) == 8  # the page: v1's endpoint is down
    err = capsys.readouterr()
    assert "was unavailable" in err.out + err.err and "v1's student endpoint did not answer" in err.out
    assert "unavailable (unreachable, HTTP 429, 502 or 503) on" in " ".join(err.out.split())
    dep = deployment.load(path)
    assert dep["serving"] == "v1" and dep["candidate"]["version"] == "v2" and not dep["rejected"]  # was: both


def _refusing(tmp_path, student, requests: int, **create) -> tuple:
    """v1 then v2 serving (v1 its rollback target), its student ``student`` (a TableServer, stopped here),
    ``requests`` requests sent with the openai client; returns (store, deployment path, the teacher log's lines)."""
    import openai

    st, path = _store(tmp_path, "v1", "v2")
    teacher = TableServer({"q1": "a1"}, False).start()
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": student.url, "v2": student.url}
        deployment.change(dep, "serve", "v1", at=_ago(4))
        deployment.change(dep, "promote", "v2", at=_ago(3))
    proxy = _proxy(path, teacher.url, tmp_path / "logs", seed=0)
    try:
        client = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0)
        for _ in range(requests):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q1"}],
                                           extra_body={"metadata": {"function": "faq"}}, **create)
    finally:
        proxy.stop()
        student.stop()
        teacher.stop()
    return st, path, lines(tmp_path / "logs", "teacher-*.jsonl")


def test_requests_a_student_endpoint_refuses_do_not_roll_its_version_back(tmp_path, capsys):
    """Security review: a client sent n=2, which distill serve-student refuses with HTTP 400; the teacher answered,
    each refusal counted as an escalation, and --decide rolled the serving version back and rejected it for good
    (700 requests). Then (verify pass) 20 such requests paged. A refusal of what a request asked (400, 413, 422)
    is no escalation and no page: it is warned about."""
    st, path, calls = _refusing(tmp_path, TableServer({"q1": "a1"}, True, max_n=1).start(), 60, n=2)
    assert len(calls) == 60 and all(c["routing"]["student_refused"] for c in calls)
    assert {c["routing"]["student_status"] for c in calls} == {400}
    assert canary.gather("v2", "serving", None, calls, []).escalations == []
    capsys.readouterr()
    assert cli(["live", str(_recipe(tmp_path, st, escalation_block=2)), "--decide"]) == 0  # was 7: rolled back
    out = " ".join(capsys.readouterr().out.split())
    assert "refused 60 of 60 requests with an HTTP 4xx" in out
    dep = deployment.load(path)
    assert dep["serving"] == "v2" and not dep["rejected"]  # was: v1 serving, v2 rejected for good


def test_a_serving_endpoint_refusing_as_if_misconfigured_pages(tmp_path, capsys):
    """A wrong key (401), URL path or model name (404) on the serving version's endpoint: every request pays the
    teacher, no guardrail sees it (no escalations): the run pages (exit 8), naming the refusals."""
    st, path, calls = _refusing(tmp_path, TableServer({"q1": "a1"}, True, status=401).start(), 30)
    assert {c["routing"]["student_status"] for c in calls} == {401}
    capsys.readouterr()
    assert cli(["live", str(_recipe(tmp_path, st)), "--decide"]) == 8
    out = " ".join(capsys.readouterr().out.split())
    assert "v2's student endpoint did not answer 30 of its last 30 requests" in out
    assert "refused the request as a misconfigured endpoint does (HTTP 401, 403 or 404" in out
    assert deployment.load(path)["serving"] == "v2"


def test_refusals_hold_a_candidate_back_when_the_serving_version_answers_them(tmp_path):
    """A canary that refuses more than 10 % of its requests while the serving version answers them (a shorter
    context window) is not promoted; refusals both versions make alike (n > 1 to serve-student), or a request the
    teacher refused as well (the client's mistake), hold nothing back."""
    def call(version: str, i: int, refused: bool, status: int = 200) -> dict:
        return {"timestamp": _ago(1, i), "status_code": status,
                "routing": {"version": version, "route": "teacher" if refused else "student", "phase": "after",
                            "student_refused": refused, "student_unavailable": False, "student_status": 400}}

    good = [call("v2", i, False) for i in range(40)]
    refused = [call("v2", 40 + i, True) for i in range(10)]
    served = [call("v1", i, False) for i in range(50)]
    assert "did not answer 10 of its 50 requests in canary" in canary.held_back("v2", "canary", None,
                                                                                  good + refused + served, [], "v1")
    both = served[:40] + [call("v1", 40 + i, True) for i in range(10)]
    assert canary.held_back("v2", "canary", None, good + refused + both, [], "v1") is None
    client_errors = [call("v2", 40 + i, True, 400) for i in range(10)]
    assert canary.held_back("v2", "canary", None, good + client_errors + served, [], "v1") is None
    assert canary.gather("v2", "canary", None, good + client_errors, []).escalations == [("default", 0.0)] * 40


def test_a_log_that_cannot_be_written_fails_no_client_and_kills_no_audit_worker(tmp_path):
    """Fault trial and review: with the log disk full every client got a 500 ('OSError') although its answer
    existed, /health said ok; and one failed write of a live record ended an audit worker for good (after 4, the
    live loop stopped in silence). Now the answer is served, /health says degraded with the count, and audits go
    on once the log can be written again."""
    import shutil
    from datetime import datetime, timezone

    import httpx

    st, path = _store(tmp_path, "v1")
    v1, teacher = TableServer({"q1": "a1"}, True).start(), TableServer({"q1": "a1"}, False).start()
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": v1.url}
        deployment.change(dep, "serve", "v1")
    logs, day = tmp_path / "logs", f"{datetime.now(timezone.utc):%Y-%m-%d}"
    blocked = [logs / f"student-{day}.jsonl", logs / f"live-{day}.jsonl"]
    for b in blocked:
        b.mkdir(parents=True)  # a folder where the file goes: every write fails, as on a full disk
    proxy = _proxy(path, teacher.url, logs, seed=0, audit_share=1.0, workers=2)
    health_url = proxy.url.removesuffix("/v1") + "/health"
    try:
        assert _ask(proxy, 6) == ["a1"] * 6  # was: 500 'internal error ...: OSError'

        wait_for(lambda: httpx.get(health_url).json()["live"]["audits"] >= 6, what="audits while failing")
        health = httpx.get(health_url).json()
        assert health["status"].startswith("degraded") and health["log_failed"]["n"] >= 12
        for b in blocked:
            shutil.rmtree(b)
        assert _ask(proxy, 4) == ["a1"] * 4
        wait_for(lambda: len(lines(logs, "live-*.jsonl")) >= 4, what="audits after the fault")  # was: none
    finally:
        proxy.stop()
        v1.stop()
        teacher.stop()
    assert len(lines(logs, "student-*.jsonl")) == 4


def test_with_a_seed_the_canary_and_the_audit_draws_are_apart(tmp_path):
    """Review: serve-router --seed gave the canary's and the audits' generators the same seed, so each request's
    audit draw equalled its canary draw: every canary answer was audited (5x the teacher calls) and no serving
    one (its quality guardrail saw nothing)."""
    import asyncio

    import httpx

    st, path = _store(tmp_path, "v1", "v2")
    v1, v2 = TableServer({"q1": "a1"}, True).start(), TableServer({"q1": "a1"}, True).start()
    teacher = TableServer({"q1": "a1"}, False).start()
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": v1.url, "v2": v2.url}
        deployment.change(dep, "serve", "v1")
        deployment.change(dep, "shadow", "v2", share=0.1)
        deployment.change(dep, "canary", "v2", share=0.1)
    proxy = _proxy(path, teacher.url, tmp_path / "logs", versions_seed=0, seed=0, audit_share=0.05,
                   canary_audit_share=0.2)  # serve-router gives both the same --seed

    async def send(n: int) -> None:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "q1"}], "metadata": {"function": "faq"}}
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(n):
                assert (await http.post(proxy.url + "/chat/completions", json=body)).status_code == 200

    try:
        asyncio.run(send(400))
        wait_for(lambda: proxy.proxy.live.counts["audits"] >= proxy.proxy.live.counts["queued"], what="audits")
    finally:
        proxy.stop()
        for s in (v1, v2, teacher):
            s.stop()
    served = {v: sum(c["routing"]["version"] == v for c in lines(tmp_path / "logs", "student-*.jsonl"))
              for v in ("v1", "v2")}
    audited = {v: sum(r["kind"] == "audit" and r["version"] == v for r in lines(tmp_path / "logs", "live-*.jsonl"))
               for v in ("v1", "v2")}
    assert served["v1"] > 300 and 15 < served["v2"] < 70, served
    assert audited["v1"] > 5, audited  # was 0
    assert audited["v2"] < 0.5 * served["v2"], (audited, served)  # was all of them


def test_the_same_tool_call_from_student_and_teacher_scores_as_the_same_answer():
    """Review: audits compared tool calls with their server-made ids, so an identical call scored 0 under exact
    match and a tool-calling function's guardrail saw only zeros (rolled back within ~20 audits)."""
    from export.route.audit import answer_text, live_quality

    def resp(call_id: str, arguments: str) -> dict:
        return {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": arguments}}]}}]}

    student = answer_text(resp("call_abc", '{"sku": "E-1", "qty": 2}'))
    blank = resp("call_abc", '{"sku": "E-1", "qty": 2}')
    blank["choices"][0]["message"]["content"] = ""  # what some servers send beside tool calls, and a stream gives
    assert answer_text(blank) == student  # was "": the teacher's tool call an 'empty answer', the student's 0.0
    teacher = answer_text(resp("call_xyz", '{"qty":2,"sku":"E-1"}'))
    other = answer_text(resp("call_xyz", '{"qty": 3, "sku": "E-1"}'))
    request = {"messages": [{"role": "user", "content": "order two"}]}
    for metric in ("exact_match", "auto"):
        assert live_quality(student, teacher, request, metric) == 1.0  # was 0.0
        assert live_quality(student, other, request, metric) == 0.0
    assert "call_" not in student


def test_an_empty_teacher_answer_is_no_reference_for_an_audit(tmp_path):
    """Fault trial: a teacher answering HTTP 200 with empty content (a degraded provider, a content filter) made
    each audit score the student's right answer 0.0; 4 s of it rolled a good canary back for good."""

    st, path = _store(tmp_path, "v1")
    v1, teacher = TableServer({"q1": "a1"}, True).start(), TableServer({"q1": ""}, False).start()
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": v1.url}
        deployment.change(dep, "serve", "v1")
    proxy = _proxy(path, teacher.url, tmp_path / "logs", seed=0, audit_share=1.0)
    try:
        _ask(proxy, 5)
        wait_for(lambda: len(lines(tmp_path / "logs", "live-*.jsonl")) >= 5, what="live records")
    finally:
        proxy.stop()
        v1.stop()
        teacher.stop()
    records = lines(tmp_path / "logs", "live-*.jsonl")
    assert not [r for r in records if r["kind"] == "audit"]  # was: 5 audits of quality 0.0
    assert sum(r["kind"] == "error" and "empty" in r["error"] for r in records) == 5


def test_the_live_loop_keeps_no_request_or_answer_of_the_calls_it_reads(tmp_path):
    """Review: the hourly --decide parsed 14 days of whole call lines into memory (about 8.5 kB per call: 111 GiB
    at a million calls a day) to use a few routing fields of each (bench/live_memory.py)."""
    from export.route.ledger import routed_lines

    logs = tmp_path / "logs"
    logs.mkdir()
    call = {**_call(_ago(1)), "routing": {**_call(_ago(1))["routing"], "signals": {"min_logprob": -0.1},
                                          "student_answer": "x" * 5000, "reasons": ["a", "b"]}}
    (logs / f"student-{_ago(1)[:10]}.jsonl").write_text(json.dumps(call) + "\n")
    (line,), bad = routed_lines(logs)
    assert bad == 0 and "response" not in line and line["request"] == {"metadata": {"function": "faq"}}
    assert line["routing"] == {"route": "student", "phase": "after", "version": "v1", "cost": {"usd": 0.001},
                               "reasons": ["b"]}


def test_serve_router_keeps_the_routers_of_the_versions_it_may_serve_only(tmp_path):
    """Review: every store version serve-router ever loaded kept its Router (and a MiniLM, ~55 MB) for as long as
    it ran: memory grew with each nightly version, in every process."""
    st, path = _store(tmp_path, "v1", "v2", "v3", "v4", "v5")
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {f"v{i}": "http://127.0.0.1:9/v1" for i in range(1, 6)}
        deployment.change(dep, "serve", "v1")
    versions = Versions(path, embeddings=False)
    for v in ("v2", "v3", "v4", "v5"):
        with deployment.updating(path, "tiny") as dep:
            deployment.change(dep, "promote", v)
        versions._stamp = None  # as if the file's mtime moved on (several writes within one mtime tick)
        versions.reload()
        assert versions.serving.version == v
    assert set(versions._routers) == {"v5", "v4", "v3"}  # serving and the last two it could roll back to


def test_a_serving_version_that_broke_is_never_rolled_back_to_once_replaced(tmp_path, capsys):
    """Review: a serving version that broke its guardrail with nothing to roll back to (exit 8) stayed unrejected;
    when a candidate was promoted, it went to `previous`, so the next rollback brought the broken version back."""
    st, path = _store(tmp_path, "v1", "v2")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(3))
        deployment.change(dep, "shadow", "v2", share=0.5, at=_ago(2.5))
        deployment.change(dep, "canary", "v2", share=0.5, at=_ago(2))
    good = [{"kind": "audit", "version": "v2", "function": fn, "quality": 1.0, "timestamp": _ago(1, i)}
            for fn in ("faq", "triage") for i in range(300)]
    _live(tmp_path / "logs", _bad_audits("v1") + good)
    recipe = _recipe(tmp_path, st)
    assert cli(["live", str(recipe), "--decide", "--json", str(tmp_path / "d.json")]) == 8
    assert [d["action"] for d in json.loads((tmp_path / "d.json").read_text())["decisions"]] == ["broken", "promote"]
    dep = deployment.load(path)
    assert dep["serving"] == "v2" and "v1" not in dep["previous"] and "v1" in dep["rejected"]  # was: previous [v1]
    assert cli(["rollback", str(recipe)]) == 2  # nothing to roll back to (was: back to the broken v1)


def test_a_hand_edited_version_that_is_not_in_the_store_is_named_so(tmp_path, capsys):
    """Fault trial: a hand-edited "serving": "v9" showed in /health as 'v9 has no student URL: pass
    --version-url', pointing the operator at the wrong fix."""
    st, path = _store(tmp_path, "v1")
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": "http://127.0.0.1:9/v1"}
        deployment.change(dep, "serve", "v1")
    versions = Versions(path, embeddings=False)
    data = json.loads(path.read_text())
    data["serving"] = "v9"
    path.write_text(json.dumps(data))
    versions._stamp = None
    assert not versions.reload() and versions.serving.version == "v1"
    assert "v9 is not in the store" in versions.error


def test_health_says_how_much_background_work_is_waiting(tmp_path):
    """Fault trial: /health's `queued` is a total since start (1,899 while `audits` was 1,131), so with a slow
    teacher nothing showed how far the audits lagged behind."""
    import httpx

    st, path = _store(tmp_path, "v1")
    v1, teacher = TableServer({"q1": "a1"}, True).start(), TableServer({"q1": "a1"}, False, delay_s=0.5).start()
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": v1.url}
        deployment.change(dep, "serve", "v1")
    proxy = _proxy(path, teacher.url, tmp_path / "logs", audit_share=1.0, workers=1)
    try:
        _ask(proxy, 5)
        live = httpx.get(proxy.url.removesuffix("/v1") + "/health").json()["live"]
        assert live["queued"] == 5 and 2 <= live["waiting"] <= 4, live
    finally:
        proxy.stop()
        v1.stop()
        teacher.stop()


def test_an_endpoint_that_answers_errors_counts_against_its_version():
    """Review: leaving every student endpoint failure out of the guardrail promoted a canary that answered
    HTTP 400 'maximum context length' on 60 % of its requests (a shorter context window in the new export). Only an
    endpoint that cannot be reached is left out; an HTTP error, a timeout or an unusable answer would have failed a
    client too."""
    def call(reason: str, **marked) -> dict:
        return {**_call(_ago(1)), "routing": {"route": "teacher", "phase": "after", "version": "v2",
                                              "reasons": ["function faq enabled", reason], **marked}}

    calls = [call("student endpoint failed: HTTP 400 maximum context length is 2048 tokens"),
             call("student endpoint failed: HTTP 504 no answer from http://s/v1 within 5 s"),
             call("student endpoint failed: HTTP 500 CUDA out of memory"),
             call("student endpoint failed: HTTP 502 non-JSON answer from http://s/v1 (HTTP 200)"),
             call("student endpoint failed: HTTP 503 no healthy upstream", student_unavailable=True),
             call("student endpoint failed: HTTP 429 too many requests", student_unavailable=True),
             call("student endpoint failed: HTTP 502 cannot reach http://127.0.0.1:9/v1: ClientConnectorError")]
    assert canary.gather("v2", "canary", None, calls, []).escalations == [("faq", 1.0)] * 4


def test_a_full_disk_under_stderr_too_fails_no_request(tmp_path, monkeypatch):
    """Review: the once-a-minute warning about lost log lines went to stderr, which under nohup or systemd's
    append: is a file on the same full disk: its OSError reached the request handler, a 500 again."""
    import io
    import sys

    from export.route.calllog import CallLog

    class Full(io.TextIOBase):
        def write(self, _s):
            raise OSError(28, "No space left on device")

    log = CallLog(tmp_path / "logs")
    (tmp_path / "logs" / f"student-{datetime.now(timezone.utc):%Y-%m-%d}.jsonl").mkdir()
    monkeypatch.setattr(sys, "stderr", Full())
    rid = log.call({"messages": []}, 200, {"id": "c1"}, 1.0, {"route": "student"})
    assert rid == "c1" and log.failures["n"] == 1


def test_serving_the_serving_version_by_hand_restarts_its_evidence(tmp_path, capsys):
    """Fault trial: after a serving version broke its guardrail with nothing to roll back to, the hourly job paged
    (exit 8) for as long as the alarm stayed in the window (14 days), even once what broke it was fixed, and no
    command could say so (`promote` of the serving version was refused). `distill promote RECIPE V` of the serving
    version now restarts its evidence: the page stops; it is judged afresh."""
    st, path = _store(tmp_path, "v1")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(3))
    _live(tmp_path / "logs", _bad_audits("v1"))
    recipe = _recipe(tmp_path, st)
    assert cli(["live", str(recipe), "--decide"]) == 8
    assert cli(["live", str(recipe), "--decide"]) == 8  # every hour
    capsys.readouterr()
    assert cli(["promote", str(recipe), "v1"]) == 0  # was exit 2: 'v1 is already serving'
    assert "starts again" in capsys.readouterr().out
    assert cli(["live", str(recipe), "--decide"]) == 0
    dep = deployment.load(path)
    assert dep["serving"] == "v1" and "v1" not in dep["rejected"] and dep["history"][-1]["restarted"]
    with deployment.updating(path, "tiny") as dep, pytest.raises(deployment.DeploymentError, match="already serving"):
        deployment.change(dep, "serve", "v1", by="decide")


def test_a_serving_endpoint_that_was_down_pages_only_while_it_is(tmp_path):
    """Verify pass and review: the page for a serving endpoint that was unavailable counted its last 100 requests,
    not time, so a service kept paging for hours after it recovered; the first fix (the last hour only) made a
    quiet service (12 requests an hour) that was down for good never page; a load balancer's 503 (pods down)
    counted against the version."""
    st, path = _store(tmp_path, "v1")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(8))
    recipe, logs = _recipe(tmp_path, st), tmp_path / "logs"
    logs.mkdir()

    def calls(hours: list[float], down: bool) -> None:
        routing = {"route": "teacher", "phase": "after", "version": "v1", "student_unavailable": True, "reasons": [
            "function faq enabled", "student endpoint failed: HTTP 503 no healthy upstream"]} if down else \
            {"route": "student", "phase": "after", "version": "v1"}
        for h in hours:
            with (logs / f"{routing['route']}-{_ago(h)[:10]}.jsonl").open("a") as f:
                f.write(json.dumps({**_call(_ago(h)), "routing": routing}) + "\n")

    calls([6 - i / 12 for i in range(72)], down=True)  # 12 an hour for 6 hours, all unavailable, the last 5 min ago
    assert cli(["live", str(recipe), "--decide"]) == 8  # was 0: fewer than 20 in the last hour
    calls([0.02, 0.01], down=False)  # it answers again
    assert cli(["live", str(recipe), "--decide"]) == 0  # the page stops (was: until 50 new requests)
    assert "v1" not in deployment.load(path)["rejected"]


def test_a_candidate_whose_endpoint_is_often_unavailable_is_not_promoted(tmp_path, capsys):
    """Review: unavailable requests are no evidence about a version's answers, so a canary whose pods answered 503
    on 60 % of its requests was promoted on the 40 % it answered well, and then served everyone."""
    st, path = _store(tmp_path, "v1", "v2")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(4))
        deployment.change(dep, "shadow", "v2", share=0.5, at=_ago(3.5))
        deployment.change(dep, "canary", "v2", share=0.5, at=_ago(3))
    good = [{"kind": "audit", "version": "v2", "function": fn, "quality": 1.0, "timestamp": _ago(1, i)}
            for fn in ("faq", "triage") for i in range(300)]
    _live(tmp_path / "logs", good)
    down = {"route": "teacher", "phase": "after", "version": "v2", "student_unavailable": True,
            "reasons": ["function faq enabled", "student endpoint failed: HTTP 503 no healthy upstream"]}
    with (tmp_path / "logs" / f"teacher-{_ago(2)[:10]}.jsonl").open("w") as f:
        for i in range(60):
            f.write(json.dumps({**_call(_ago(2, i)), "routing": down}) + "\n")
    with (tmp_path / "logs" / f"student-{_ago(2)[:10]}.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({**_call(_ago(2, 100 + i)), "routing": {
                "route": "student", "phase": "after", "version": "v2",
                "cost": {"usd": 0.0001, "student_basis": "per request (evaluate)"}}}) + "\n")
    recipe = _recipe(tmp_path, st)
    capsys.readouterr()
    assert cli(["live", str(recipe), "--decide"]) == 0  # was 9: promoted
    out = " ".join(capsys.readouterr().out.split())
    assert "v2 stays in canary" in out and "did not answer 60 of its 100 requests in canary: unavailable" in out
    assert deployment.load(path)["serving"] == "v1"


def test_audits_of_answers_from_before_a_restart_do_not_count_after_it(tmp_path):
    """Review: audits are scored late (a queue, a teacher call each); after a hand restart of the serving
    version, the queued audits of its broken answers landed after the restart and paged again at once. Evidence is
    taken by when the audited call was answered."""
    st, path = _store(tmp_path, "v1")
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(3))
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, "serve", "v1", at=_ago(5 / 60))  # restarted 5 minutes ago, by hand
    late = [{**r, "timestamp": _ago(4 / 60, i), "call_timestamp": _ago(15 / 60, i)} for i, r in
            enumerate(_bad_audits("v1"))]
    _live(tmp_path / "logs", late)
    assert cli(["live", str(_recipe(tmp_path, st)), "--decide"]) == 0  # was 8


def test_lines_logged_before_serve_router_said_unavailable_are_read_as_before(tmp_path):
    """Review: lines logged before serve-router marked student_unavailable were read by a narrower rule, so an
    upgrade turned two weeks of a load balancer's 503s into escalations and rolled the serving version back; and
    the rule overrode serve-router's own 'not unavailable' on new lines (a dropped connection's reason also reads
    'cannot reach')."""
    from export.route.live import unavailable

    def line(reason: str, **marked) -> dict:
        return {"routing": {"route": "teacher", "reasons": ["function faq enabled",
                                                            f"student endpoint failed: {reason}"], **marked}}

    old = {"HTTP 503 no healthy upstream": True, "HTTP 429 slow down": True,
           "HTTP 502 cannot reach http://s/v1/chat/completions: ClientConnectorError": True,
           "HTTP 502 non-JSON answer from http://s/v1/chat/completions (HTTP 502)": True,  # a load balancer's page
           "HTTP 502 non-JSON answer from http://s/v1/chat/completions (HTTP 200)": False,  # serve-router's own 502
           "HTTP 502 cannot reach http://s/v1/chat/completions: ServerDisconnectedError": False,
           "HTTP 400 maximum context length is 2048 tokens": False, "HTTP 500 oom": False}
    assert {r: unavailable(line(r)) for r in old} == old
    said = "HTTP 502 cannot reach http://s/v1/chat/completions: ServerDisconnectedError"
    assert unavailable(line(said, student_unavailable=False)) is False
    assert unavailable(line("HTTP 503 x", student_unavailable=False)) is False  # serve-router's word wins


def test_a_shadows_unavailable_share_is_of_the_requests_it_was_asked():
    """Review: in shadow the promotion hold counted every shadow record, untried ones too (the candidate sent them
    to the teacher before asking its student), so 5 unavailable of 40 asked (12.5 %) was not held back."""
    recs = ([{"kind": "shadow", "version": "v2", "tried": False, "timestamp": _ago(1)}] * 30
            + [{"kind": "shadow", "version": "v2", "tried": True, "timestamp": _ago(1)}] * 35
            + [{"kind": "error", "what": "shadow", "version": "v2", "unavailable": True, "timestamp": _ago(1)}] * 5)
    assert "5 of its 40 requests" in canary.held_back("v2", "shadow", None, [], recs)
    assert canary.held_back("v2", "shadow", None, [], recs[:65] + recs[-3:]) is None  # 3 of 38: under 10 %


def test_a_symlinked_version_folder_is_neither_promoted_nor_served(tmp_path, capsys):
    """Security review: `distill pull` refuses links, but promote and serve-router followed a store version that
    was a symbolic link to a folder elsewhere."""
    import shutil

    st, path = _store(tmp_path, "v1")
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": "http://127.0.0.1:9/v1", "v7": "http://127.0.0.1:9/v1"}
        deployment.change(dep, "serve", "v1")
    shutil.copytree(st / "tiny" / "v1", tmp_path / "elsewhere")
    (st / "tiny" / "v7").symlink_to(tmp_path / "elsewhere")
    capsys.readouterr()
    assert cli(["promote", str(_recipe(tmp_path, st)), "v7"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "v7:" in err and "is a symbolic link, not a published version" in err
    assert deployment.load(path)["serving"] == "v1"
    with deployment.updating(path, "tiny") as dep:  # by hand
        deployment.change(dep, "serve", "v7")
    with pytest.raises(deployment.DeploymentError, match="is a symbolic link"):
        Versions(path, embeddings=False)


def test_a_missing_or_broken_deployment_file_is_said_plainly_and_once(tmp_path, capsys):
    """Docs and multiproc trials: a missing file was reported as 'deployment not reloaded, still serving
    nothing', naming only promote as the way to make one; a broken file was reported again every 30 s."""
    with pytest.raises(deployment.DeploymentError, match=r"no deployment file at .*distill promote RECIPE VERSION, "
                                                         r"or distill live RECIPE --decide, makes one"):
        Versions(tmp_path / "store" / "tiny" / "deployment.json", embeddings=False)
    err = capsys.readouterr().err
    assert "deployment not loaded: no deployment file" in err and "still serving" not in err
    st, path = _store(tmp_path, "v1")
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": "http://127.0.0.1:9/v1"}
        deployment.change(dep, "serve", "v1")
    versions = Versions(path, embeddings=False, retry_s=0.0)
    path.write_text('{"broken": ')
    for _ in range(3):  # tried again (every retry_s): read, and failed, three times
        assert versions.due()
        versions.reload()
    err = capsys.readouterr().err
    assert err.count("deployment not reloaded, still serving v1") == 1, err  # was 3
    assert "not valid JSON" in versions.error


def test_live_says_how_many_log_lines_it_could_not_read(tmp_path, capsys):
    """Multiproc trial: on logs with torn lines `distill ledger` and route-check said so, `distill live` did not."""
    st, _ = _store(tmp_path, "v1")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / f"student-{_ago(1)[:10]}.jsonl").write_text('{"id": "torn", "routing": {"rou\n')
    capsys.readouterr()
    assert cli(["live", str(_recipe(tmp_path, st))]) == 0
    assert "1 log lines could not be read" in capsys.readouterr().out


def test_more_processes_than_cores_are_warned_about(tmp_path, capsys):
    import os

    n = (os.cpu_count() or 1) + 1
    assert cli(["serve-router", str(tmp_path / "no-policy"), "--student-url", "http://127.0.0.1:9/v1",
                "--teacher-url", "http://127.0.0.1:8/v1", "--processes", str(n)]) == 2  # no policy: refused
    assert f"--processes {n} on {n - 1} cores" in " ".join(capsys.readouterr().out.split())
