"""The compiled LiteLLM config in the real LiteLLM proxy process (`litellm --config ...` on loopback), with the
official `openai` client in front, `distill serve-router` behind its `distill/router` model, and a student and a
teacher served on loopback.

Needs the `gateways` extra (litellm 1.110.2 plus its proxy's dependencies); skipped without it, except where
DISTILL_REQUIRE_GATEWAYS=1 (CI), where a missing proxy fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import web
from route_helpers import FAQ, FAQ_SYSTEM, IN_BAND_FAQ, Upstream, free_port, read_jsonl, with_rule

from export.route.gateways import (
    FUNCTION_HEADER,
    MASTER_KEY_ENV,
    litellm_config,
    litellm_counter,
    litellm_limits,
)
from export.route.proxy import ProxyConfig, RouterProxy
from export.route.router import Router
from pipeline.config.route import GatewayConfig

TEACHER_MODEL = "gpt-4o-2024-08-06"


def _proxy_importable() -> str | None:
    """None when LiteLLM's proxy imports, else why not."""
    code = "import litellm.proxy.proxy_server, litellm.proxy.proxy_cli"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["import failed"])[-1]


@pytest.fixture(scope="module")
def litellm_bin() -> Path:
    exe = Path(sys.executable).with_name("litellm")
    why = None if exe.is_file() else f"no `litellm` console script beside {sys.executable}"
    why = why or _proxy_importable()
    if why:
        msg = f"the LiteLLM proxy cannot run here ({why}); install it with pip install -e '.[gateways]'"
        if os.environ.get("DISTILL_REQUIRE_GATEWAYS") == "1":
            pytest.fail(msg + " (DISTILL_REQUIRE_GATEWAYS=1)")
        pytest.skip(msg)
    return exe


class Backends:
    """Student, teacher and serve-router (in process) on loopback, in a thread with its own event loop."""

    def __init__(self, router: Router, log_dir: Path):
        self.student, self.teacher = Upstream("student"), Upstream("teacher")
        self.loop = asyncio.new_event_loop()
        self.router, self.log_dir = router, log_dir
        self.runner: web.AppRunner | None = None
        self.loop.run_until_complete(self._start())
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _start(self) -> None:
        await self.student.start()
        await self.teacher.start()
        cfg = ProxyConfig(student_url=self.student.url, teacher_url=self.teacher.url, log_dir=self.log_dir,
                          student_model="tiny-student")
        self.runner = web.AppRunner(RouterProxy(self.router, cfg, "cd" * 32).app())
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.router_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"

    def close(self) -> None:
        async def stop():
            await self.runner.cleanup()
            await self.student.stop()
            await self.teacher.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)


FILE_LOGGER = """
import json, os
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy.spend_tracking.spend_tracking_utils import get_logging_payload


class FileLogger(CustomLogger):
    def _write(self, kwargs, response_obj, start_time, end_time):
        with open(os.environ["PAYLOAD_LOG"], "a") as f:
            f.write(json.dumps(kwargs["standard_logging_object"], default=str) + "\\n")
        row = get_logging_payload(kwargs, response_obj, start_time, end_time)
        with open(os.environ["SPEND_LOG"], "a") as f:
            f.write(json.dumps(dict(row), default=str) + "\\n")

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs, response_obj, start_time, end_time)

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs, response_obj, start_time, end_time)


proxy_handler_instance = FileLogger()
"""


def _heldout(e2e: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for split in ("val", "test"):
        for r in pq.read_table(e2e / f"runs/t/curate/{split}.parquet", columns=["function", "messages"]).to_pylist():
            out.setdefault(r["function"], []).append(r["messages"])
    return out


@pytest.fixture(scope="module")
def through_litellm(e2e, litellm_bin, tmp_path_factory):
    """The compiled config served by `litellm --config`; every call made with the `openai` client."""
    from openai import OpenAI

    tmp = tmp_path_factory.mktemp("litellm-proxy")
    route = e2e / "runs/t/route"
    # The policy as fitted, with the FAQ function enabled at a known threshold (as in test_proxy.py).
    router = with_rule(Router.load(route, embeddings=False), FAQ, signal="min_logprob", threshold=-1.0)
    back = Backends(router, tmp / "router-logs")
    gw = GatewayConfig(student_api_base=back.student.url, router_api_base=back.router_url,
                       teacher_api_base=back.teacher.url, teacher_model=f"openai/{TEACHER_MODEL}")
    limits = litellm_limits(router.policy, _heldout(e2e), router.counter.exact, litellm_counter())
    config = yaml.safe_load(litellm_config(router.policy, gw, "tiny-student", limits))
    # What the gateway logs, as a team harvests it: LiteLLM's StandardLoggingPayload per call (what its bucket and
    # custom loggers write) and the LiteLLM_SpendLogs row its database writer would insert (LiteLLM's own builder).
    (tmp / "file_logger.py").write_text(FILE_LOGGER)
    config["litellm_settings"]["callbacks"] = "file_logger.proxy_handler_instance"
    config["general_settings"]["store_prompts_in_spend_logs"] = True  # what harvesting spend logs needs
    (tmp / "litellm.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    key = "sk-" + secrets.token_hex(16)
    port = free_port()
    env = {**os.environ, MASTER_KEY_ENV: key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "STUDENT_API_KEY": "sk-student", "OPENAI_API_KEY": "sk-teacher",
           "PAYLOAD_LOG": str(tmp / "payloads.jsonl"), "SPEND_LOG": str(tmp / "spend_logs.jsonl")}
    log = open(tmp / "litellm.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([str(litellm_bin), "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError("the LiteLLM proxy did not start:\n" + (tmp / "litellm.log").read_text()[-4000:])
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0, timeout=60)
        yield client, back, router, yaml.safe_load((tmp / "litellm.yaml").read_text()), tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        back.close()


def _faq(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": FAQ_SYSTEM}, {"role": "user", "content": text}]


def test_distill_router_gets_the_function_and_the_teacher_its_name(through_litellm):
    client, back, _, _, tmp = through_litellm
    n_student, n_teacher = len(back.student.bodies), len(back.teacher.bodies)
    # In band: serve-router learns the function from the forwarded header, the student answers.
    r = client.chat.completions.create(model="distill/router", messages=_faq(IN_BAND_FAQ),
                                       extra_headers={FUNCTION_HEADER: FAQ})
    assert r.choices[0].message.content == "The Echo Speaker is in stock."
    assert back.student.bodies[-1]["model"] == "tiny-student" and len(back.student.bodies) == n_student + 1
    # Out of band (a function the student was not trained on): the teacher, asked for its own model name.
    r = client.chat.completions.create(model="distill/router", messages=_faq(IN_BAND_FAQ),
                                       extra_headers={FUNCTION_HEADER: "legal_advice"})
    assert json.loads(r.choices[0].message.content) == {"answer": "from the teacher"}
    assert back.teacher.bodies[-1]["model"] == TEACHER_MODEL and len(back.teacher.bodies) == n_teacher + 1
    logged = [line for f in sorted((tmp / "router-logs").glob("*.jsonl")) for line in read_jsonl(f)]
    functions = [line["request"]["metadata"]["function"] for line in logged[-2:]]
    assert functions == [FAQ, "legal_advice"]  # the function reached serve-router, not 'default'
    assert [line["routing"]["route"] for line in logged[-2:]] == ["student", "teacher"]


def test_function_groups_route_in_litellms_own_count(through_litellm, e2e):
    client, back, router, cfg, _ = through_litellm
    group = next(m for m in cfg["model_list"] if m["model_name"] == f"distill/{FAQ}")
    limits = litellm_limits(router.policy, _heldout(e2e), router.counter.exact, litellm_counter())
    assert group["model_info"]["max_input_tokens"] == limits[FAQ]["max_input_tokens"]  # LiteLLM's count
    n_student = len(back.student.bodies)
    r = client.chat.completions.create(model=f"distill/{FAQ}", messages=_faq(IN_BAND_FAQ))
    assert r.choices[0].message.content == "The Echo Speaker is in stock."  # in band in student tokens: student
    assert len(back.student.bodies) == n_student + 1
    long = IN_BAND_FAQ + " Please also tell me about every other speaker you sell and their colours." * 10
    r = client.chat.completions.create(model=f"distill/{FAQ}", messages=_faq(long))
    assert json.loads(r.choices[0].message.content) == {"answer": "from the teacher"}  # over the limit
    assert back.teacher.bodies[-1]["model"] == TEACHER_MODEL and len(back.student.bodies) == n_student + 1


def _count_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_harvesting_litellms_logs_skips_the_students_answers(through_litellm, tmp_path, monkeypatch):
    """A team that harvests the gateway's logs (format: litellm) gets the teacher's answers only: the student's,
    through distill/router (serve-router's x-distill-route header, which LiteLLM logs) or a distill/<function>
    group, are skipped and counted (was: taken as teacher outputs; spend-log rows were all quarantined)."""
    from pipeline.cli import main as cli

    client, back, _, _, tmp = through_litellm
    # LiteLLM logs after answering: the earlier tests' last rows may still be coming (a row written between the
    # unlink below and its pair made the spend log one teacher answer longer): wait until both logs are still
    seen, still, deadline = None, 0, time.time() + 30
    while time.time() < deadline and still < 5:
        now = (_count_lines(tmp / "payloads.jsonl"), _count_lines(tmp / "spend_logs.jsonl"))
        still = still + 1 if now == seen and now[0] == now[1] else 0
        seen = now
        time.sleep(0.2)
    for log in ("payloads.jsonl", "spend_logs.jsonl"):
        (tmp / log).unlink(missing_ok=True)
    asks = [("distill/router", IN_BAND_FAQ, FAQ), ("distill/router", IN_BAND_FAQ, "legal_advice"),
            (f"distill/{FAQ}", IN_BAND_FAQ, None)]
    for model, text, fn in asks:
        client.chat.completions.create(model=model, messages=_faq(text),
                                       extra_headers={FUNCTION_HEADER: fn} if fn else None)
    stream = client.chat.completions.create(model="distill/router", messages=_faq(IN_BAND_FAQ), stream=True,
                                            extra_headers={FUNCTION_HEADER: FAQ})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    deadline = time.time() + 30  # LiteLLM logs after answering
    while time.time() < deadline and min(_count_lines(tmp / f) for f in ("payloads.jsonl", "spend_logs.jsonl")) < 4:
        time.sleep(0.2)
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "gw", "harvest": {"sources": [
        {"name": "payloads", "format": "litellm", "path": str(tmp / "payloads.jsonl")},
        {"name": "spend", "format": "litellm", "path": str(tmp / "spend_logs.jsonl")}]}}))
    assert cli(["harvest", str(recipe)]) == 0
    manifest = json.loads((tmp_path / "runs/gw/harvest/manifest.json").read_text())
    rows = pq.read_table(sorted((tmp_path / "runs/gw/harvest").glob("records-*.parquet"))).to_pylist()
    # One teacher answer (legal_advice: not trained) from each source; the function from the forwarded header
    assert [(r["function"], json.loads(r["output"]["content"])) for r in rows] == \
        [("legal_advice", {"answer": "from the teacher"})] * 2
    student_calls = ("student calls logged by LiteLLM (x-distill-route: student, or a distill/<function>/student "
                     "deployment)")
    assert manifest["counts"]["not_calls"] == {student_calls: 6}  # 3 answers (one streamed) x 2 sources
    # The function group's student is told by its deployment id (model_info.id), which LiteLLM logs as model_id
    payloads = [json.loads(x) for x in (tmp / "payloads.jsonl").read_text().splitlines()]
    assert [p["model_id"] for p in payloads if p["model_group"] == f"distill/{FAQ}"] == [f"distill/{FAQ}/student"]
    assert manifest["counts"]["quarantined"] == 0
