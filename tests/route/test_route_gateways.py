"""The compiled gateway configs, run in the real gateways with a student and a teacher served on loopback.

LiteLLM and TensorZero are not dependencies of distill (a platform team runs them), so these tests run only
where they are installed (checked with litellm 1.110.2 and tensorzero 2026.6.0):

    pip install litellm==1.110.2 tensorzero==2026.6.0 && pytest tests/test_route_gateways.py
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import yaml
from aiohttp import web

from export.route.gateways import litellm_config, tensorzero_config
from pipeline.config.route import GatewayConfig

POLICY = {  # the parts of a routing policy the gateways read: one enabled function, one disabled
    "teacher": {"models": ["gpt-4o-2024-08-06"]},
    "functions": {
        "ticket_triage": {"enabled": True, "before": {"max_input_tokens": 60}, "after": {"threshold": -1.0}},
        "product_faq": {"enabled": False, "why": "too few held-out records", "before": {"max_input_tokens": 40}},
    },
}
SHORT = [{"role": "user", "content": "My order has not arrived."}]
LONG = [{"role": "user", "content": "My order has not arrived and nobody answers my mails. " * 40}]
FAIL = [{"role": "user", "content": "FAIL"}]


class Upstreams:
    """A student and a teacher, OpenAI-compatible, on loopback in a thread; the student answers HTTP 503 to a
    message containing FAIL. Every call is recorded as (who, model)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.ports: list[int] = []
        self.runners: list[web.AppRunner] = []
        self.loop.run_until_complete(self._start())
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        who = "student" if request.url.port == self.ports[0] else "teacher"
        self.calls.append((who, body["model"]))
        if who == "student" and "FAIL" in json.dumps(body["messages"]):
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)
        return web.json_response({
            "id": f"chatcmpl-{len(self.calls)}", "object": "chat.completion", "created": 1764000000,
            "model": body["model"], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"from the {who}"}}]})

    async def _start(self) -> None:
        for _ in range(2):
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            self.ports.append(site._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        async def stop():
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def url(self, who: str) -> str:
        return f"http://127.0.0.1:{self.ports[0 if who == 'student' else 1]}/v1"


@pytest.fixture
def upstreams(monkeypatch):
    monkeypatch.setenv("STUDENT_API_KEY", "sk-student")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-teacher")
    up = Upstreams()
    yield up
    up.close()


def test_litellm_router_runs_the_compiled_config(upstreams):
    litellm = pytest.importorskip("litellm")
    gw = GatewayConfig(student_api_base=upstreams.url("student"))
    cfg = yaml.safe_load(litellm_config(POLICY, gw, "tiny-student"))
    for m in cfg["model_list"]:  # what the LiteLLM proxy does with os.environ/NAME; the teacher on loopback
        p = m["litellm_params"]
        p["api_key"] = {"os.environ/STUDENT_API_KEY": "sk-student", "os.environ/OPENAI_API_KEY": "sk-teacher"}[
            p["api_key"]]
        p.setdefault("api_base", upstreams.url("teacher"))
    rs = cfg["router_settings"]
    router = litellm.Router(model_list=cfg["model_list"], fallbacks=rs["fallbacks"], num_retries=0,
                            context_window_fallbacks=rs["context_window_fallbacks"],
                            enable_pre_call_checks=rs["enable_pre_call_checks"])

    def ask(group, messages):
        r = router.completion(model=group, messages=messages)
        return r.choices[0].message.content

    assert ask("distill/ticket_triage", SHORT) == "from the student"
    assert ask("distill/ticket_triage", LONG) == "from the teacher"  # over max_input_tokens: pre-call check
    assert ask("distill/ticket_triage", FAIL) == "from the teacher"  # the student failed: fallback
    assert ask("distill/product_faq", SHORT) == "from the teacher"  # disabled function
    assert ("student", "tiny-student") in upstreams.calls and ("teacher", "gpt-4o-2024-08-06") in upstreams.calls


def test_tensorzero_gateway_runs_the_compiled_config(upstreams, tmp_path):
    tensorzero = pytest.importorskip("tensorzero")
    gw = GatewayConfig(student_api_base=upstreams.url("student"))
    text = tensorzero_config(POLICY, gw, "tiny-student")
    # The teacher provider has no api_base (api.openai.com): point it at loopback for the test.
    head = '[models.teacher.providers.teacher]\ntype = "openai"\n'
    assert head in text
    text = text.replace(head, head + f'api_base = "{upstreams.url("teacher")}/"\n')
    (tmp_path / "tensorzero.toml").write_text(text)
    with tensorzero.TensorZeroGateway.build_embedded(config_file=str(tmp_path / "tensorzero.toml")) as client:
        def ask(fn, messages):
            r = client.inference(function_name=fn, input={"messages": messages})
            return r.variant_name, r.content[0].text

        assert ask("ticket_triage", SHORT) == ("student", "from the student")
        assert ask("ticket_triage", FAIL) == ("teacher", "from the teacher")  # fallback variant on error
        assert ask("product_faq", SHORT) == ("teacher", "from the teacher")
