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


def test_litellm_config_forwards_the_function_and_names_the_teacher():
    """`distill/router` gets the client's x-distill-function header (LiteLLM drops `metadata`) and asks for the
    teacher's own model name; the proxy needs a master key, read from the environment."""
    cfg = yaml.safe_load(litellm_config(POLICY, GatewayConfig(), "tiny-student"))
    forwarded = cfg["litellm_settings"]["model_group_settings"]["forward_client_headers_to_llm_api"]
    assert forwarded == ["distill/router"]
    router = next(m for m in cfg["model_list"] if m["model_name"] == "distill/router")["litellm_params"]
    assert router["model"] == "openai/gpt-4o-2024-08-06" and router["api_base"] == "http://localhost:8080/v1"
    assert cfg["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"
    text = litellm_config(POLICY, GatewayConfig(), "tiny-student")
    assert "export LITELLM_MASTER_KEY=" in text and "x-distill-function" in text


def _words(messages):  # a stand-in student tokenizer: one token per word of the message texts
    return sum(len((m.get("content") or "").split()) for m in messages)


def test_litellm_limits_are_calibrated_into_litellms_count(upstreams):
    """The student's limit counts its own tokens of the message texts; LiteLLM counts cl100k_base tokens plus
    per-message overhead. Compiled as written, LiteLLM sends in-band requests to the teacher; calibrated on the
    held-out inputs, every held-out input within the limit reaches the student."""
    litellm = pytest.importorskip("litellm")
    from export.route.gateways import litellm_counter, litellm_limits

    system = {"role": "system", "content": "You triage support tickets into a JSON object with a priority."}
    heldout = {"ticket_triage": [[system, {"role": "user", "content": t}] for t in (
        "My order has not arrived.", "The speaker is broken after two days of use.", "Refund please.",
        "I was charged twice for the same order and nobody answers my mails. " * 3)]}
    policy = {**POLICY, "functions": {**POLICY["functions"], "ticket_triage": {
        **POLICY["functions"]["ticket_triage"], "before": {"max_input_tokens": 25}}}}
    count = litellm_counter()
    limits = litellm_limits(policy, heldout, _words, count)
    cal = limits["ticket_triage"]
    inside = [m for m in heldout["ticket_triage"] if _words(m) <= 25]
    assert cal["max_input_tokens"] == max(count(m) for m in inside) > 25
    assert cal["heldout_within"] == 3 and cal["heldout_over"] == 1 and cal["heldout_over_admitted"] == 0
    gw = GatewayConfig(student_api_base=upstreams.url("student"), teacher_api_base=upstreams.url("teacher"))
    text = litellm_config(policy, gw, "tiny-student", limits)
    assert f"25 student tokens -> {cal['max_input_tokens']} in LiteLLM's count" in text
    cfg = yaml.safe_load(text)
    for m in cfg["model_list"]:
        m["litellm_params"]["api_key"] = "sk-test"
    rs = cfg["router_settings"]
    router = litellm.Router(model_list=cfg["model_list"], fallbacks=rs["fallbacks"], num_retries=0,
                            context_window_fallbacks=rs["context_window_fallbacks"],
                            enable_pre_call_checks=rs["enable_pre_call_checks"])
    for messages in heldout["ticket_triage"]:
        r = router.completion(model="distill/ticket_triage", messages=messages)
        want = "from the student" if _words(messages) <= 25 else "from the teacher"
        assert r.choices[0].message.content == want, (count(messages), messages[-1]["content"])


DEMO = {  # the demo's policy (docs/route.md): FAQ with p10_logprob and no threshold, triage with mean_logprob
    "teacher": {"models": ["gpt-4o-2024-08-06"]},
    "functions": {
        "product_faq": {"enabled": True, "before": {"max_input_tokens": 47},
                        "after": {"signal": "p10_logprob", "threshold": None}},
        "ticket_triage": {"enabled": True, "before": {"max_input_tokens": 124},
                          "after": {"signal": "mean_logprob", "threshold": -0.049}},
        "legal_advice": {"enabled": False, "why": "too few held-out records", "before": {"max_input_tokens": 30}},
    },
}


def test_vllm_sr_config_expresses_the_demo_policy():
    """vLLM Semantic Router's config (written from its docs; the router itself is not run here): per function a
    metadata signal, a context signal for the length limit and, for mean_logprob, the confidence algorithm at
    the threshold mapped onto its scale ((T + 3) / 3)."""
    from export.route.gateways import vllm_sr_config

    gw = GatewayConfig(student_api_base="http://student:8000/v1", router_api_base="http://router:8080/v1")
    text = vllm_sr_config(DEMO, gw, "demo-student")
    assert "&id" not in text and "*id" not in text  # plain YAML, no anchors
    cfg = yaml.safe_load(text)
    assert cfg["version"] == "v0.3" and cfg["providers"]["defaults"]["default_model"] == "distill/teacher"
    models = {m["name"]: m for m in cfg["providers"]["models"]}
    assert models["distill/student"]["provider_model_id"] == "demo-student"
    assert models["distill/student"]["backend_refs"][0]["base_url"] == "http://student:8000/v1"
    assert models["distill/teacher"]["provider_model_id"] == "gpt-4o-2024-08-06"
    assert models["distill/router"]["backend_refs"][0]["base_url"] == "http://router:8080/v1"
    assert {c["name"] for c in cfg["routing"]["modelCards"]} == set(models)
    signals = cfg["routing"]["signals"]
    assert signals["metadata"] == [
        {"name": "function_product_faq", "key": "function", "predicate": {"equals": "product_faq"}},
        {"name": "function_ticket_triage", "key": "function", "predicate": {"equals": "ticket_triage"}}]
    assert [(c["name"], c["min_tokens"], c["max_tokens"]) for c in signals["context"]] == [
        ("within_length_product_faq", "0", "47"), ("within_length_ticket_triage", "0", "124")]
    decisions = {d["name"]: d for d in cfg["routing"]["decisions"]}
    assert set(decisions) == {"product_faq_student", "product_faq_teacher", "ticket_triage_student",
                              "ticket_triage_teacher"}  # legal_advice: the default model (the teacher)
    faq = decisions["product_faq_student"]
    assert faq["priority"] > decisions["product_faq_teacher"]["priority"]
    assert faq["rules"] == {"operator": "AND", "conditions": [
        {"type": "metadata", "name": "function_product_faq"},
        {"type": "context", "name": "within_length_product_faq"}]}
    assert [r["model"] for r in faq["modelRefs"]] == ["distill/student"] and "algorithm" not in faq
    triage = decisions["ticket_triage_student"]
    assert [r["model"] for r in triage["modelRefs"]] == ["distill/student", "distill/teacher"]
    conf = triage["algorithm"]["confidence"]
    assert triage["algorithm"]["type"] == "confidence" and conf["confidence_method"] == "avg_logprob"
    assert conf["threshold"] == pytest.approx((3 - 0.049) / 3) and conf["escalation_order"] == "declared"
    assert decisions["ticket_triage_teacher"]["rules"]["conditions"] == [
        {"type": "metadata", "name": "function_ticket_triage"}]
    assert [r["model"] for r in decisions["ticket_triage_teacher"]["modelRefs"]] == ["distill/teacher"]
    # A signal vLLM-SR has no counterpart for: in-band requests go to serve-router.
    other = {**DEMO, "functions": {"ticket_triage": {**DEMO["functions"]["ticket_triage"],
                                                     "after": {"signal": "min_logprob", "threshold": -1.5}}}}
    d = {d["name"]: d for d in yaml.safe_load(vllm_sr_config(other, gw, "demo-student"))["routing"]["decisions"]}
    assert [r["model"] for r in d["ticket_triage_student"]["modelRefs"]] == ["distill/router"]


def test_tensorzero_config_is_marked_legacy():
    text = tensorzero_config(POLICY, GatewayConfig(), "tiny-student")
    assert "Legacy target" in text and "archived" in text
