"""The run report (pipeline/report): renders from any run directory, complete or not; its numbers are the run's
JSON files' numbers; it never shows text that curation redacted; and it loads in a real browser (headless
Chromium) with no script error and no network request."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main as cli
from pipeline.recipe import load_recipe
from pipeline.report import Outcome, render_run
from pipeline.report.page import fmt

SECTIONS = ["harvest", "curate", "train", "evaluate", "route", "export", "cost", "lineage"]
FIGURES = {"harvest", "curate", "train", "evaluate", "fields", "route", "escalations", "export", "cost", "lineage"}
CANARY = "wendolyn.prax77@quorvelmail.net"


class Page(HTMLParser):
    """The parts of a report the tests read: every cell's data-k -> (data-v, text), sections and figures."""

    def __init__(self, text: str):
        super().__init__()
        self.cells: dict[str, tuple[object, str]] = {}
        self.sections: dict[str, str] = {}
        self.figures: list[str] = []
        self._open: list[tuple[str, str, list[str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections[a["id"]] = a["data-state"]
        if tag == "svg" and "data-figure" in a:
            self.figures.append(a["data-figure"])
        if "data-k" in a:
            self._open.append((tag, a["data-k"], [a["data-v"]]))
        elif self._open:
            self._open.append((tag, "", []))

    def handle_data(self, data):
        for _, key, parts in self._open:
            if key:
                parts.append(data)

    def handle_endtag(self, tag):
        if self._open:
            _, key, parts = self._open.pop()
            if key:
                self.cells[key] = (json.loads(parts[0]), "".join(parts[1:]).strip())

    def v(self, key: str):
        return self.cells[key][0]


def _copy_run(e2e: Path, dest: Path, monkeypatch) -> tuple[Path, object]:
    """A private copy of the e2e run directory and store, with a recipe pointing at them (it keeps reading the
    e2e logs, from the e2e folder as working directory, so that harvest stays unchanged); returns (run directory,
    loaded recipe)."""
    shutil.copytree(e2e / "runs", dest / "runs", ignore=shutil.ignore_patterns(".lock", "report.html"))
    shutil.copytree(e2e / "store", dest / "store")
    data = yaml.safe_load((e2e / "recipe.yaml").read_text())
    data["run_dir"], data["export"]["store"] = str(dest / "runs"), str(dest / "store")
    (dest / "recipe.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(e2e)
    return dest / "runs/t", load_recipe(dest / "recipe.yaml")


def _json(path: Path):
    return json.loads(path.read_text())


# --- unit level -------------------------------------------------------------------------------------------------


def test_an_empty_run_directory_renders_every_section_as_not_run(tmp_path):
    page = Page(render_run(tmp_path / "runs/t"))
    assert page.sections == {**{s: "not run" for s in SECTIONS if s not in ("cost", "lineage")},
                             "cost": "not run", "lineage": "complete"}
    assert page.v("outcome") == "incomplete"


def test_a_run_with_only_some_stages_complete(e2e, tmp_path, monkeypatch):
    run, recipe = _copy_run(e2e, tmp_path, monkeypatch)
    for stage in ("evaluate", "route", "export"):
        shutil.rmtree(run / stage)
    (run / ".partial").mkdir(exist_ok=True)
    (run / ".partial/evaluate.error.txt").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: the judge is unreachable\n")
    text = render_run(run, recipe)
    page = Page(text)
    assert page.sections == {"harvest": "complete", "curate": "complete", "train": "complete", "evaluate": "failed",
                             "route": "not run", "export": "not run", "cost": "failed", "lineage": "complete"}
    assert page.v("outcome") == "failed"
    assert "failed: RuntimeError: the judge is unreachable" in text
    assert str(run / ".partial/evaluate.error.txt") in text  # where the traceback is
    assert "needs evaluate, which is failed" in text
    assert {"harvest", "curate", "train", "lineage"} <= set(page.figures)
    assert not {"evaluate", "route", "export", "cost"} & set(page.figures)
    # Harvest and curate alone.
    shutil.rmtree(run / "train")
    (run / ".partial/evaluate.error.txt").unlink()
    page = Page(render_run(run, recipe))
    assert [s for s, st in page.sections.items() if st == "complete"] == ["harvest", "curate", "lineage"]


def test_a_gate_that_blocked_publishing_and_a_failed_command_are_said(e2e, tmp_path, monkeypatch):
    run, recipe = _copy_run(e2e, tmp_path, monkeypatch)
    shutil.rmtree(run / "export")
    (run / ".partial/export").mkdir(parents=True)
    (run / ".partial/export/gate.json").write_text(json.dumps({
        "passed": False, "metric": "auto", "published_version": None, "checks": [],
        "failures": ["product_faq: 80.0 points below the teacher (20.0 vs 100.0; allowed 5)"]}))
    text = render_run(run, recipe)
    assert Page(text).sections["export"] == "blocked"
    assert "the quality gate blocked publishing: product_faq: 80.0 points below the teacher" in text
    (run / ".partial/export/gate.json").unlink()
    text = render_run(run, recipe, Outcome("export", "RuntimeError: disk full", 1))
    assert Page(text).sections["export"] == "failed" and "failed: RuntimeError: disk full" in text


def test_distill_run_writes_the_report_also_when_a_stage_fails(e2e, tmp_path, monkeypatch, capsys):
    from export.export import stage as export_stage

    run, _ = _copy_run(e2e, tmp_path, monkeypatch)

    def boom(ctx):
        raise RuntimeError("the store is read-only")

    monkeypatch.setattr(export_stage, "run", boom)
    assert cli(["run", str(tmp_path / "recipe.yaml"), "--force", "export"]) == 1
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    text = (run / "report.html").read_text()
    assert Page(text).sections["export"] == "failed"
    assert "Stage <b>export</b> failed: RuntimeError: the store is read-only" in text
    assert str(run / ".partial/export.error.txt") in text
    (run / "report.html").unlink()
    assert cli(["report", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "elsewhere/r.html")]) == 0
    assert Page((tmp_path / "elsewhere/r.html").read_text()).sections["export"] == "failed"


def test_the_numbers_on_the_page_are_the_runs_numbers(e2e):
    run = e2e / "runs/t"
    text = (run / "report.html").read_text()  # written by `distill run` in the e2e fixture
    page = Page(text)
    assert set(page.sections.values()) == {"complete"} and page.v("outcome") == "complete"
    assert set(page.figures) == FIGURES
    h = _json(run / "harvest/manifest.json")["counts"]
    for k in ("lines", "records", "quarantined", "duplicates", "files"):
        assert page.v(f"harvest.{k}") == h[k]
        assert page.cells[f"harvest.{k}"][1] == f"{h[k]:,}"
    for reason, n in h["quarantine_reasons"].items():
        assert page.v(f"harvest.quarantine_reasons.{reason}") == n
    c = _json(run / "curate/report.json")
    for k in ("records_in", "kept", "rejected"):
        assert page.v(f"curate.{k}") == c[k]
    assert {s: page.v(f"curate.splits.{s}") for s in c["splits"]} == c["splits"]
    for op, v in c["operators"].items():
        assert (page.v(f"curate.operators.{op}.in"), page.v(f"curate.operators.{op}.dropped")) == (v["in"], v["dropped"])
    s = _json(run / "train/student.json")
    for k in ("steps", "tokens_per_second", "first_loss", "last_loss", "eval_loss"):
        assert page.v(f"train.{k}") == s[k]
    lrs = [r["learning_rate"] for r in map(json.loads, (run / "train/metrics.jsonl").read_text().splitlines())
           if "learning_rate" in r]
    assert page.v("train.peak_learning_rate") == max(lrs)
    sc = _json(run / "evaluate/scores.json")
    assert page.v("evaluate.overall.quality") == sc["overall"]["quality"]
    assert page.cells["evaluate.overall.quality"][1] == f"{100 * sc['overall']['quality']:.1f}%"
    for fn, v in sc["functions"].items():
        assert page.v(f"evaluate.functions.{fn}.quality") == v["quality"]
        assert page.v(f"evaluate.functions.{fn}.n") == v["n"]
        ci = v["ci"]["quality"]
        assert f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" in text
    assert page.v("gate.passed") == _json(run / "export/gate.json")["passed"]
    cal = _json(run / "route/calibration.json")
    assert page.v("route.student_share") == cal["operating_point"]["student_share"]
    assert page.v("route.routed_quality") == cal["operating_point"]["routed_quality"]
    policy = _json(run / "route/routing_policy.json")
    for fn, p in policy["functions"].items():
        assert page.v(f"route.functions.{fn}.student_share") == p["calibration"]["student_share"]
    ex = _json(run / "export/manifest.json")
    for a in ex["artefacts"]:
        assert page.v(f"export.{a['format']}.bytes") == a["bytes"]
        assert page.v(f"export.{a['format']}.quality") == a["quality"]
    cost = ex["cost_per_1k_requests_usd"]
    for k in ("teacher", "student", "routed"):
        assert page.v(f"cost.{k}") == cost[k]
    lin = ex["lineage"]
    for v in (lin["recipe_sha256"], lin["data_sha256"], *lin["teacher_models"]):
        assert v in text
    for stage in SECTIONS[:6]:
        assert page.v(f"lineage.duration.{stage}") == _json(run / stage / "manifest.json")["duration_s"]


def test_the_published_version_holds_its_report_beside_the_model_card(e2e):
    v1 = e2e / "store/tiny-student/v1"
    manifest = _json(v1 / "manifest.json")
    assert "report.html" in manifest["files"] and (v1 / "README.md").is_file()
    page = Page((v1 / "report.html").read_text())
    assert page.sections["export"] == "complete" and "export" in page.figures
    formats = {a["format"] for a in manifest["artefacts"]}
    assert {k.split(".")[1] for k in page.cells if k.startswith("export.")} == formats
    assert page.v("cost.routed") == manifest["scores"]["cost_per_1k_requests_usd"]["routed"]


def test_a_previous_published_version_is_shown_beside_this_run(e2e, tmp_path, monkeypatch):
    run, recipe = _copy_run(e2e, tmp_path, monkeypatch)
    v1 = tmp_path / "store/tiny-student/v1"
    m = _json(v1 / "manifest.json")
    m["lineage"]["train_fingerprint"] = "an-earlier-student"
    m["scores"]["overall"]["quality"] = 0.5
    m["scores"]["functions"]["product_faq"]["quality"] = 0.75
    (v1 / "manifest.json").write_text(json.dumps(m))
    shutil.copytree(v1, v1.parent / "v2")  # this run's version (published.json names v2)
    (run / "export/published.json").write_text(json.dumps({"store": str(tmp_path / "store"), "name": "tiny-student",
                                                           "version": "v2"}))
    page = Page(render_run(run, recipe))
    assert page.v("previous.quality") == 0.5 and page.cells["previous.quality"][1] == "50.0%"
    assert page.v("previous.quality: product_faq") == 0.75
    assert page.v("headline.quality") == _json(run / "evaluate/scores.json")["overall"]["quality"]


def _log_line(rid: str, user: str, output: str, ts: str) -> str:
    return json.dumps({
        "id": rid, "timestamp": ts, "status_code": 200, "latency_ms": 400,
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": user}],
                    "metadata": {"function": "product_faq"}},
        "response": {"model": "gpt-4o-2024-08-06", "usage": {"prompt_tokens": 20, "completion_tokens": 10},
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": output},
                                  "finish_reason": "stop"}]}})


@pytest.mark.parametrize("pii", ["redact", "keep"])
def test_the_report_never_shows_a_harvested_email(project, pii):
    recipe = project({"2026-11-23": 120}, curate={"pii": pii})
    logs = recipe.parent / "logs"
    with gzip.open(logs / "2026-11-22-canary.jsonl.gz", "wt") as f:  # read first: its refusal is the first shown
        f.write(_log_line("canary_refusal", f"Please forward my invoice to {CANARY} today.",
                          "I'm sorry, but I can't help with that request.", "2026-11-22T08:00:00Z") + "\n")
    assert cli(["curate", str(recipe)]) == 0
    run = recipe.parent / "runs/t"
    rejected = pq.read_table(run / "curate/rejected.parquet").to_pylist()
    assert any(r["id"] == "canary_refusal" for r in rejected)  # the record is among the dropped ones
    assert cli(["report", str(recipe)]) == 0
    text = (run / "report.html").read_text()
    assert CANARY not in text and "quorvelmail" not in text
    if pii == "redact":
        assert "Please forward my invoice to &lt;EMAIL&gt; today." in text  # its redacted text is what is shown
    else:
        assert "examples of dropped records, after PII" not in text  # PII kept: no record text at all
        assert "No examples of dropped records are shown" in text


# --- in a browser ---------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("DISTILL_REQUIRE_BROWSER") == "1":
            pytest.fail("DISTILL_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium); CI installs it and sets DISTILL_REQUIRE_BROWSER=1")
    return found


DOM_PROBE = """JSON.stringify({
  sections: [...document.querySelectorAll('main > section')].map(s => ({id: s.id, state: s.dataset.state,
    text: s.innerText.trim().length, figures: [...s.querySelectorAll('figure svg')].map(g => {
      const r = g.getBoundingClientRect();
      return {name: g.dataset.figure, w: r.width, h: r.height, marks: g.querySelectorAll('path,text').length};
    })})),
  cells: Object.fromEntries([...document.querySelectorAll('[data-k]')].map(e => [e.dataset.k, e.innerText.trim()])),
  scripts: document.scripts.length, height: document.documentElement.scrollHeight})"""


async def _browse(chromium: str, url: str, profile: Path, shot: Path) -> dict:
    """Open ``url`` in headless Chromium over the DevTools protocol; returns the DOM probe, console errors and
    network requests, and saves a full-page screenshot."""
    import base64

    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-port=0", "--no-first-run",
        f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        ws_url = None
        while ws_url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "chromium exited before it listened"
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            ws_url = m and m.group(1)
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
            events, ids = [], iter(range(1, 10**6))

            async def call(method, params=None, session=None):
                i = next(ids)
                await ws.send_json({"id": i, "method": method, "params": params or {},
                                    **({"sessionId": session} if session else {})})
                while True:
                    msg = json.loads((await asyncio.wait_for(ws.receive(), 60)).data)
                    if msg.get("id") == i:
                        assert "error" not in msg, msg
                        return msg["result"]
                    events.append(msg)

            target = (await call("Target.createTarget", {"url": "about:blank"}))["targetId"]
            sid = (await call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                await call(f"{domain}.enable", session=sid)
            await call("Page.navigate", {"url": url}, session=sid)
            while not any(e.get("method") == "Page.loadEventFired" for e in events):
                events.append(json.loads((await asyncio.wait_for(ws.receive(), 60)).data))
            probe = json.loads((await call("Runtime.evaluate", {"expression": DOM_PROBE, "returnByValue": True},
                                           session=sid))["result"]["value"])
            await call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": min(probe["height"], 16000),
                                                               "deviceScaleFactor": 1, "mobile": False}, session=sid)
            png = await call("Page.captureScreenshot", {"format": "png"}, session=sid)
            shot.write_bytes(base64.b64decode(png["data"]))
            await call("Runtime.evaluate", {"expression": "1"}, session=sid)  # flush late events
    finally:
        proc.kill()
        await proc.wait()
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return {"probe": probe, "errors": errors, "requests": requests}


def test_the_report_loads_in_headless_chromium_offline(e2e, tmp_path):
    chromium = _chromium()
    from PIL import Image

    run = e2e / "runs/t"
    page = tmp_path / "report.html"
    shutil.copy(run / "report.html", page)
    text = page.read_text()
    assert not re.search(r"https?://", text), "the page names an http(s) URL"
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    shot = tmp_path / "report.png"
    got = asyncio.run(_browse(chromium, page.as_uri(), tmp_path / "profile", shot))
    assert got["errors"] == []
    assert [u for u in got["requests"] if u != page.as_uri()] == []  # nothing but the page itself
    probe = got["probe"]
    assert probe["scripts"] == 0
    sections = {s["id"]: s for s in probe["sections"]}
    assert list(sections) == SECTIONS
    for s in sections.values():
        assert s["state"] == "complete" and s["text"] > 100, s["id"]
        for f in s["figures"]:
            assert f["w"] > 200 and f["h"] > 80 and f["marks"] > 10, (s["id"], f)
    assert {f["name"] for s in sections.values() for f in s["figures"]} == FIGURES
    # What the browser shows is the run's numbers.
    h = _json(run / "harvest/manifest.json")["counts"]
    sc = _json(run / "evaluate/scores.json")
    cost = _json(run / "export/manifest.json")["cost_per_1k_requests_usd"]
    assert probe["cells"]["harvest.records"] == f"{h['records']:,}"
    assert probe["cells"]["evaluate.overall.quality"] == fmt(sc["overall"]["quality"], "pct")
    assert probe["cells"]["cost.routed"] == fmt(cost["routed"], "usd")
    img = Image.open(shot).convert("RGB")
    assert img.width == 1280 and img.height > 2000
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # not blank
    assert max(colors)[0] < 0.97 * img.width * img.height  # not one colour
    if os.environ.get("DISTILL_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["DISTILL_REPORT_SCREENSHOT"])


def test_chromium_runs_with_its_documented_command_line(e2e, tmp_path):
    """The one-liner docs/report.md gives for a screenshot works on the report."""
    chromium = _chromium()
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'p'}",
                    f"--screenshot={shot}", "--window-size=1280,2000", (e2e / "runs/t/report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000


def test_docs_name_every_section():
    doc = (Path(__file__).resolve().parents[2] / "docs/report.md").read_text()
    assert all(s in doc.lower() for s in SECTIONS)
