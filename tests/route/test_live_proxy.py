"""serve-router's live loop over real loopback HTTP (issue 16, items 2-4): background audits that never delay the
client, a bounded queue whose drops are counted, a candidate in shadow scored against the teacher, a canary share,
deployment-file reloads under load without a failed request; then `distill live`, `distill promote`, `distill
rollback` and `distill ledger` on the logs. Students and teacher answer from tables (tests/live_stubs.py); clients
are the official `openai` client."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from live_stubs import UNSURE, ProxyServer, TableServer, lines, publish_version, wait_for
from openai import OpenAI

from export.route import deployment
from export.route.lanes import Versions
from export.route.proxy import ProxyConfig, RouterProxy
from pipeline.cli import main as cli

TEACHER = {"q1": "a1", "q2": "a2", "q3": "a3", "q4": "a4"}
V2 = {**TEACHER, "q2": "wrong", "q4": "wrong"}  # the candidate gets half of them wrong


@pytest.fixture
def setup(tmp_path):
    """Store with v1 and v2, their students, a teacher, the deployment (v1 serving), and a proxy factory."""
    st = tmp_path / "store"
    for tag in ("v1", "v2"):
        publish_version(st, "tiny", tag, tmp_path)
    servers = {"v1": TableServer(TEACHER, True).start(), "v2": TableServer(V2, True).start(),
               "teacher": TableServer(TEACHER, False).start()}
    path = deployment.path_for(st, "tiny")
    with deployment.updating(path, "tiny") as dep:
        dep["urls"] = {"v1": servers["v1"].url, "v2": servers["v2"].url}
        deployment.change(dep, "serve", "v1")
    started = []

    def proxy(retry_s=30.0, **kw):
        cfg = ProxyConfig(student_url="", teacher_url=servers["teacher"].url, log_dir=tmp_path / "logs",
                          seed=0, reload_s=0.02, **kw)
        versions = Versions(path, seed=1, embeddings=False, retry_s=retry_s)
        p = ProxyServer(RouterProxy(None, cfg, versions=versions)).start()
        started.append(p)
        return p

    yield {"path": path, "servers": servers, "proxy": proxy, "logs": tmp_path / "logs", "root": tmp_path,
           "store": st}
    for p in started:
        if p.thread.is_alive():
            p.stop()
    for s in servers.values():
        s.stop()


def _ask(client, text, fn="faq"):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}], extra_body={"metadata": {"function": fn}})
    return raw.headers, raw.parse()


def _set(path, action, *args, **kw):
    with deployment.updating(path, "tiny") as dep:
        deployment.change(dep, action, *args, **kw)


def test_audits_run_in_the_background_and_join_the_teacher_log(setup):
    setup["servers"]["teacher"].delay_s = 1.0  # a slow teacher: the client must not wait for the audit
    p = setup["proxy"](audit_share=1.0)
    client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
    took = []
    for text in ("q1", "q2", f"q3 {UNSURE}"):
        t0 = time.perf_counter()
        headers, resp = _ask(client, text)
        took.append(time.perf_counter() - t0)
    assert headers["x-distill-route"] == "teacher" and headers["x-distill-version"] == "v1"
    assert max(took[:2]) < 0.6  # student answers came back before their audits (1 s each) could finish
    p.stop()  # queued audits finish first
    student = lines(setup["logs"], "student-*.jsonl")
    teacher = lines(setup["logs"], "teacher-*.jsonl")
    audits = [x for x in teacher if x["routing"].get("audit")]
    assert len(student) == 2 and len(audits) == 2 and len(teacher) == 3  # the escalated one is not audited
    assert {a["routing"]["audit_of"] for a in audits} == {x["id"] for x in student}
    assert all(a["request"]["messages"] == s["request"]["messages"] for a, s in
               zip(sorted(audits, key=lambda a: a["routing"]["audit_of"]), sorted(student, key=lambda s: s["id"]),
                   strict=True))
    assert all(a["routing"]["cost"]["saved_usd"] < 0 and a["routing"]["cost"]["teacher_only_usd"] == 0 for a in audits)
    scores = [r for r in lines(setup["logs"], "live-*.jsonl") if r["kind"] == "audit"]
    assert sorted(r["quality"] for r in scores) == [1.0, 1.0] and {r["metric"] for r in scores} == {"exact_match"}


def test_a_full_queue_drops_audits_and_counts_them(setup):
    setup["servers"]["teacher"].delay_s = 0.6
    p = setup["proxy"](audit_share=1.0, queue_size=2, workers=1)
    client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
    for i in range(8):
        _ask(client, f"q{i % 4 + 1}")
    health = httpx.get(p.url.removesuffix("/v1") + "/health").json()
    assert health["live"]["dropped"] >= 4 and health["live"]["queued"] + health["live"]["dropped"] == 8
    p.stop()
    live = Counter(r["kind"] for r in lines(setup["logs"], "live-*.jsonl"))
    assert live["dropped"] == p.proxy.live.counts["dropped"] and live["audit"] == p.proxy.live.counts["audits"]
    assert live["audit"] + live["dropped"] == 8  # every sampled audit either ran or is counted as dropped


def test_a_shadow_candidate_is_scored_and_never_seen_by_the_client(setup):
    _set(setup["path"], "shadow", "v2", share=1.0)
    p = setup["proxy"]()  # audit_share 0: the shadow alone asks for audits
    client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
    answers = [_ask(client, t)[1].choices[0].message.content for t in ("q1", "q2", "q3", f"q4 {UNSURE}")]
    assert answers[:3] == ["a1", "a2", "a3"]  # v1's answers; v2's "wrong" never reaches the client
    p.stop()
    shadow = {r["request_id"]: r for r in lines(setup["logs"], "live-*.jsonl") if r["kind"] == "shadow"}
    assert len(shadow) == 4 and {r["version"] for r in shadow.values()} == {"v2"}
    by_text = {x["request"]["messages"][0]["content"]: shadow[x["id"]]
               for x in lines(setup["logs"], "[st]*-*.jsonl") if not x["routing"].get("audit")}
    assert by_text["q1"]["quality"] == 1.0 and by_text["q2"]["quality"] == 0.0
    assert by_text["q1"]["reference"] == "audit"
    assert by_text[f"q4 {UNSURE}"]["reference"] == "escalated" and by_text[f"q4 {UNSURE}"]["escalated"]
    assert by_text[f"q4 {UNSURE}"]["quality"] is None  # the candidate escalated too: nothing of its own to score
    assert len(setup["servers"]["v2"].bodies) == 4


def test_reloads_under_load_drop_no_request_and_the_canary_gets_its_share(setup):
    p = setup["proxy"](canary_audit_share=1.0)
    client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
    results, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                headers, _ = _ask(client, "q1")
                results.append(headers["x-distill-version"])
            except Exception as err:  # noqa: BLE001 - the assertion below lists them
                results.append(repr(err))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    _set(setup["path"], "shadow", "v2", share=0.5)
    _set(setup["path"], "canary", share=0.5)
    health = p.url.removesuffix("/v1") + "/health"
    wait_for(lambda: httpx.get(health).json()["deployment"]["candidate"]["stage"] == "canary", what="reload")
    mark = len(results)
    wait_for(lambda: len(results) > mark + 200, 30, "canary traffic")
    setup["path"].write_text("{broken")  # a bad edit by hand: keep serving what was loaded
    wait_for(lambda: httpx.get(health).json()["deployment"]["error"], what="the bad file to be seen")
    stop.set()
    for t in threads:
        t.join()
    assert all(r in ("v1", "v2") for r in results), [r for r in results if r not in ("v1", "v2")][:3]
    canary = results[mark:]
    assert 0.35 < canary.count("v2") / len(canary) < 0.65
    p.stop()
    routed = [x for x in lines(setup["logs"], "student-*.jsonl") if x["routing"]["version"] == "v2"]
    assert routed and {x["routing"]["lane"] for x in routed} == {"canary"}
    audits = [r for r in lines(setup["logs"], "live-*.jsonl") if r["kind"] == "audit" and r["version"] == "v2"]
    assert len(audits) == len(routed)  # canary_audit_share 1.0: every canary answer audited


def test_live_report_promote_rollback_and_ledger_on_the_logs(setup, capsys):
    root = setup["root"]
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "live", "harvest": {"sources": [{"format": "openai", "path": str(root / "logs/teacher-*.jsonl")}]},
        "export": {"store": str(root / "store"), "model_name": "tiny"},
        "route": {"bootstrap": 200, "live": {"log_dir": str(setup["logs"]), "min_audits": 5}}}))
    p = setup["proxy"](audit_share=1.0)
    client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
    for i in range(12):
        _ask(client, f"q{i % 4 + 1}" + (f" {UNSURE}" if i % 4 == 3 else ""), fn=("faq", "triage")[i % 2])
    p.stop()
    out = root / "live.json"
    assert cli(["live", str(recipe), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())["report"]
    v1 = next(r for r in rep["versions"] if r["version"] == "v1")
    assert v1["requests"] == 12 and v1["student"] == 9 and v1["escalated"] == 3
    assert v1["audited_quality"]["n"] == 9 and v1["audited_quality"]["mean"] == 1.0
    assert 0.6 < v1["audited_quality"]["ci"][0] < 0.75 and v1["audited_quality"]["ci"][1] == 1.0  # Wilson, 9 of 9
    assert v1["routed_quality"]["mean"] == 1.0 and v1["latency_ms"]["p50"] > 0
    assert {(r["version"], r["function"]) for r in rep["rows"]} == {("v1", "faq"), ("v1", "triage")}
    assert cli(["rollback", str(recipe)]) == 2  # nothing to roll back to
    assert "nothing to roll back to" in capsys.readouterr().err
    assert cli(["promote", str(recipe), "v9"]) == 2  # not published: serve-router could not load it
    assert "v9 is not in the store" in capsys.readouterr().err and deployment.load(setup["path"])["serving"] == "v1"
    assert cli(["promote", str(recipe), "v2", "--stage", "canary", "--share", "0.3", "--reason", "try"]) == 0
    dep = deployment.load(setup["path"])
    assert dep["candidate"] == {**dep["candidate"], "version": "v2", "stage": "canary", "share": 0.3}
    assert cli(["rollback", str(recipe), "--reason", "changed my mind"]) == 0
    dep = deployment.load(setup["path"])
    assert dep["candidate"] is None and dep["rejected"] == ["v2"] and dep["history"][-1]["reason"] == "changed my mind"
    assert cli(["promote", str(recipe), "v2"]) == 0 and deployment.load(setup["path"])["serving"] == "v2"
    assert cli(["rollback", str(recipe), "v1"]) == 2 and "neither serving" in capsys.readouterr().err
    ledger = root / "ledger.json"
    capsys.readouterr()
    assert cli(["ledger", "--logs", str(setup["logs"]), "--json", str(ledger)]) == 0
    table = capsys.readouterr().out  # not a terminal, as under cron: 80 columns, figures wrap, never cut
    assert "…" not in table and "0.000" in table
    total = json.loads(ledger.read_text())["total"]
    assert total["requests"] == 12 and total["audits"] == 9 and total["live_audits"] == 9
    assert total["live_quality"] == 1.0
    logged = lines(setup["logs"], "[st]*-*.jsonl")
    assert total["spent_usd"] == pytest.approx(sum(x["routing"]["cost"]["usd"] for x in logged))
    assert total["saved_usd"] == pytest.approx(sum(x["routing"]["cost"]["saved_usd"] for x in logged))


@pytest.mark.parametrize(("args", "message"), [
    (["--teacher-url", "http://127.0.0.1:9/v1"], "needs a policy and --student-url, or --deployment"),
    (["--deployment", "nowhere/deployment.json", "--teacher-url", "http://127.0.0.1:9/v1", "--version-url", "v1"],
     "expected VERSION=http"),
    (["--deployment", "nowhere/deployment.json", "--teacher-url", "http://127.0.0.1:9/v1", "--audit-share", "1.5"],
     "audit_share"),
    (["--deployment", "nowhere/deployment.json", "--teacher-url", "http://127.0.0.1:9/v1"],
     "no deployment file at nowhere/deployment.json"),
], ids=["no-policy", "bad-version-url", "bad-share", "no-file"])
def test_serve_router_refuses_bad_live_arguments(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["serve-router", *args]) == 2
    assert message in capsys.readouterr().err


def _health(p):
    return httpx.get(p.url.removesuffix("/v1") + "/health").json()


def test_a_version_that_fails_to_load_is_retried_and_the_file_is_still_followed(setup, monkeypatch):
    """Any error while loading a version (here a RuntimeError, once) is shown in /health, the previous version
    keeps serving, the same file is tried again later, and later changes are still picked up."""
    from export.route import lanes

    real, failed, broken = lanes.Router.load, [], threading.Event()
    broken.set()

    def flaky(path, **kw):
        if "v2" in str(path) and broken.is_set():
            failed.append(path)
            raise RuntimeError("the embedder is not ready yet")
        return real(path, **kw)

    monkeypatch.setattr(lanes.Router, "load", flaky)
    p = setup["proxy"](retry_s=0.5)
    _set(setup["path"], "promote", "v2")
    wait_for(lambda: "RuntimeError" in str(_health(p)["deployment"]["error"]), what="the failed load in /health")
    assert _health(p)["deployment"]["serving"] == "v1"
    client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
    assert _ask(client, "q1")[0]["x-distill-version"] == "v1"  # still answering
    broken.clear()  # the failure was transient
    wait_for(lambda: _health(p)["deployment"]["serving"] == "v2", what="the retry of the same file")
    assert _health(p)["deployment"]["error"] is None and failed
    _set(setup["path"], "rollback")
    wait_for(lambda: _health(p)["deployment"]["serving"] == "v1", what="the next change")


def test_a_promotion_changes_the_student_name_prices_models_and_health(setup):
    """v3 names another student and has other prices: after it is promoted, /v1/models, /health, the teacher's
    model for a client naming the student and the cost of a teacher answer all follow v3."""
    v3_student = TableServer(TEACHER, True).start()
    try:
        publish_version(setup["store"], "tiny", "v3", setup["root"], student="tiny-big", teacher_price=(5.0, 20.0))
        with deployment.updating(setup["path"], "tiny") as dep:
            dep["urls"]["v3"] = v3_student.url
        p = setup["proxy"]()
        models = httpx.get(p.url + "/models").json()["data"]
        v1_policy = _health(p)["policy"]
        assert [m["id"] for m in models] == ["tiny"]
        _set(setup["path"], "serve", "v3")
        wait_for(lambda: _health(p)["deployment"]["serving"] == "v3", what="v3 serving")
        assert [m["id"] for m in httpx.get(p.url + "/models").json()["data"]] == ["tiny-big"]
        assert _health(p)["policy"] != v1_policy
        client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-big", messages=[{"role": "user", "content": f"q1 {UNSURE}"}],
            extra_body={"metadata": {"function": "faq"}})
        assert raw.headers["x-distill-route"] == "teacher" and raw.headers["x-distill-policy"] == _health(p)["policy"]
        assert v3_student.bodies[-1]["model"] == "tiny-big"
        assert setup["servers"]["teacher"].bodies[-1]["model"] == "gpt-4o"  # the policy's teacher, not the student
        p.stop()
        cost = lines(setup["logs"], "teacher-*.jsonl")[-1]["routing"]["cost"]
        assert cost["teacher_usd"] == pytest.approx((20 * 5.0 + 8 * 20.0) / 1e6)  # v3's prices, not v1's
    finally:
        v3_student.stop()


def test_scoring_never_holds_up_the_clients(setup, monkeypatch):
    """A slow score (1 s each, in place of a long chrF) runs off the event loop: clients keep their latency."""
    from export.route import audit

    real = audit.live_quality

    def slow(*args):
        time.sleep(1.0)
        return real(*args)

    monkeypatch.setattr(audit, "live_quality", slow)
    p = setup["proxy"](audit_share=1.0)
    client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
    took = []
    for _ in range(6):
        t0 = time.perf_counter()
        assert _ask(client, "q1")[0]["x-distill-route"] == "student"
        took.append(time.perf_counter() - t0)
        time.sleep(0.2)  # the previous request's audit is being scored now
    assert max(took[1:]) < 0.6, took  # a score on the event loop would stall the next request for up to 1 s
    p.stop()
    assert len([r for r in lines(setup["logs"], "live-*.jsonl") if r["kind"] == "audit"]) == len(took)


def test_live_records_survive_a_torn_line_and_rotated_files_are_read(setup):
    """log_live appends like the request logs (a torn last line stays one bad line); read_live reads .jsonl.gz."""
    import gzip
    from datetime import datetime, timezone

    from export.route.live import read_live

    logs = setup["logs"]
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"live-{datetime.now(timezone.utc):%Y-%m-%d}.jsonl").write_text('{"kind": "audit", "quali')  # torn
    with gzip.open(logs / "live-2026-12-01.jsonl.gz", "wt") as f:
        f.write(json.dumps({"kind": "audit", "version": "v1", "quality": 1.0, "timestamp": "2026-12-01T00:00"}) + "\n")
    proxy = RouterProxy(None, ProxyConfig(student_url="", teacher_url="http://127.0.0.1:9/v1", log_dir=logs),
                        versions=Versions(setup["path"], embeddings=False))
    proxy.log_live({"kind": "audit", "version": "v1", "quality": 0.5})
    records, bad = read_live(logs)
    assert [(r["version"], r["quality"]) for r in records] == [("v1", 1.0), ("v1", 0.5)] and bad == 1


def _recorded_audit_share(args, monkeypatch, tmp_path) -> float:
    """serve-router's audit share for these arguments (the server itself is not started)."""
    import export.route.serve as serve_module

    seen = []
    monkeypatch.setattr(serve_module, "serve", lambda opts, cfg, *a, **kw: seen.append(cfg) or 0)
    assert cli(["serve-router", *args, "--teacher-url", "http://127.0.0.1:9/v1", "--log-dir",
                str(tmp_path / "logs")]) == 0
    return seen[0].audit_share


def test_a_plain_policy_proxy_audits_nothing_unless_asked(monkeypatch, tmp_path):
    import yaml

    plain = tmp_path / "plain.yaml"
    recipe = yaml.safe_load((Path(__file__).parents[2] / "recipes" / "demo.yaml").read_text())
    plain.write_text(yaml.safe_dump(recipe))
    asked = tmp_path / "asked.yaml"
    recipe.setdefault("route", {}).setdefault("live", {})["audit_share"] = 0.05
    asked.write_text(yaml.safe_dump(recipe))
    student = ["--student-url", "http://127.0.0.1:9/v1"]
    assert _recorded_audit_share([str(plain), *student], monkeypatch, tmp_path) == 0.0
    assert _recorded_audit_share([str(plain), *student, "--audit-share", "0.3"], monkeypatch, tmp_path) == 0.3
    assert _recorded_audit_share([str(asked), *student], monkeypatch, tmp_path) == 0.05
    (tmp_path / "v1").mkdir()  # a deployment file sits beside the versions it names
    (tmp_path / "v1" / "routing_policy.json").write_text("{}")
    assert _recorded_audit_share([str(plain), "--deployment", str(tmp_path / "d.json")], monkeypatch,
                                 tmp_path) == 0.02  # the live loop's default


def test_audits_cut_off_by_a_stop_are_counted_as_dropped(setup):
    """Work still running when the drain time is up is cancelled, counted and logged as dropped, like queued work."""
    setup["servers"]["teacher"].delay_s = 3.0
    p = setup["proxy"](audit_share=1.0)
    p.proxy.live.drain_s = 0.2
    client = OpenAI(base_url=p.url, api_key="unused", max_retries=0)
    _ask(client, "q1")
    wait_for(lambda: setup["servers"]["teacher"].bodies, what="the audit to reach the teacher")
    p.stop()
    dropped = [r for r in lines(setup["logs"], "live-*.jsonl") if r["kind"] == "dropped"]
    assert [(r["why"], r["audit"]) for r in dropped] == [("stopped while it ran", True)]
    assert p.proxy.live.counts["dropped"] == 1
