"""Secrets serve-router holds never reach a client, /health, stdout or a log (security review): a password in an
upstream URL (``http://user:pass@host/v1``, which aiohttp sends as Basic auth: vLLM behind nginx), a key in a
passed-through query, and the keys serve-router sends, when an upstream repeats them in its error."""

from __future__ import annotations

import asyncio
import json

import httpx
from aiohttp import web
from live_stubs import policy
from route_helpers import free_port, proxy_site

from export.route.proxy import ProxyConfig, RouterProxy
from export.route.router import Router

STUDENT_KEY, TEACHER_KEY = "sk-STUDENTSECRET0123456789abcdef", "sk-TEACHERSECRET0123456789abcdef"
BASIC = "dmxsbTpzM2NyZXRwdw=="  # base64 of vllm:s3cretpw, what aiohttp sends as Basic auth
SECRETS = ("s3cretpw", "hunter2pw", "QUERYSECRET", STUDENT_KEY, TEACHER_KEY, BASIC)


async def _echo_401(request: web.Request) -> web.Response:
    """An upstream that repeats the key it was sent in its 401, as some gateways do."""
    await request.read()
    return web.json_response({"error": {"message": f"Incorrect API key provided: "
                                                   f"{request.headers.get('Authorization')}",
                                        "type": "invalid_request_error", "code": "invalid_api_key"}}, status=401)


async def _serve(handler) -> tuple[web.AppRunner, int]:
    """A stand-in upstream answering every path with ``handler`` on a free loopback port: (its runner, port)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def _proxy(tmp_path, up: str, **cfg) -> RouterProxy:
    """serve-router over the policy in ``tmp_path``/policy, student and teacher both at ``up``."""
    config = ProxyConfig(student_url=up, teacher_url=up, log_dir=tmp_path / "logs", **cfg)
    return RouterProxy(Router.load(tmp_path / "policy", embeddings=False), config, "ab" * 32)


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_upstream_passwords_and_echoed_keys_reach_no_client_health_or_log(tmp_path, monkeypatch):
    """Before: the student's URL with its password in every client's x-distill-reasons and in anonymous /health;
    the teacher's password in the 502 body; a key the teacher repeated in its 401 in the client's body and the
    log; the pass-through query (api_key=...) in passthrough-*.jsonl; then (verify pass) the Basic auth header
    an upstream repeated."""
    monkeypatch.setenv("T_STUDENT_KEY", STUDENT_KEY)
    monkeypatch.setenv("T_TEACHER_KEY", TEACHER_KEY)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "routing_policy.json").write_text(json.dumps(policy("tiny")))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "q1"}], "metadata": {"function": "faq"}}

    async def go() -> list[str]:
        echo, port = await _serve(_echo_401)
        seen = []
        dead, echoing = f"127.0.0.1:{free_port()}/v1", f"127.0.0.1:{port}/v1"
        for student, teacher, keys in (  # a password in the student's URL (down), the teacher repeats its key; and
                (f"http://vllm:s3cretpw@{dead}", f"http://{echoing}", (None, "T_TEACHER_KEY")),  # the other way
                (f"http://{echoing}", f"http://svc:hunter2pw@{dead}", ("T_STUDENT_KEY", None)),
                (f"http://vllm:s3cretpw@{echoing}", f"http://{echoing}", (None, None))):  # it repeats Basic auth
            cfg = ProxyConfig(student_url=student, teacher_url=teacher, log_dir=tmp_path / "logs",
                              student_key_env=keys[0], teacher_key_env=keys[1], pass_through=("/v1/files",))
            proxy = RouterProxy(Router.load(tmp_path / "policy", embeddings=False), cfg, "ab" * 32)
            async with proxy_site(proxy) as base, httpx.AsyncClient(timeout=30) as http:
                r = await http.post(f"{base}/v1/chat/completions", json=body)
                assert r.status_code in (401, 502), r.text
                seen += [r.text, json.dumps(dict(r.headers))]
                r = await http.get(f"{base}/v1/files?purpose=batch&api_key=QUERYSECRET123")
                seen += [r.text, (await http.get(f"{base}/health")).text]
        await echo.cleanup()
        return seen

    seen = asyncio.run(go())
    assert any("127.0.0.1" in s for s in seen)  # the failures name the upstream, without its secrets
    for text in seen:
        assert not _leaks(text), (_leaks(text), text)
    for f in (tmp_path / "logs").iterdir():
        assert not _leaks(f.read_text()), (f.name, _leaks(f.read_text()))
    assert any(f.name.startswith("passthrough-") for f in (tmp_path / "logs").iterdir())


def test_a_password_in_the_url_and_a_key_env_together_are_refused_naming_both(tmp_path):
    """aiohttp refuses both at once on every call (a 500 per request): refused at start, naming the flags."""
    import pytest

    with pytest.raises(ValueError, match="--teacher-url http://127.0.0.1:9/v1 holds a user and password .*"
                                         "--teacher-key-env OPENAI_API_KEY"):
        ProxyConfig(student_url="http://127.0.0.1:8/v1", teacher_url="http://u:pw@127.0.0.1:9/v1?k=1",
                    log_dir=tmp_path, teacher_key_env="OPENAI_API_KEY")


def test_a_key_an_upstream_repeats_in_a_stream_error_event_is_masked(tmp_path, monkeypatch):
    """Review: an upstream that reports a failure as an error event inside a 200 stream (some gateways do)
    repeated the key: unmasked in the client's 502, /health and the log (first event), or relayed as it came."""
    monkeypatch.setenv("T_TEACHER_KEY", TEACHER_KEY)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "routing_policy.json").write_text(json.dumps(policy("tiny")))

    async def streams(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        pad = "x" * 152 if "long" in json.dumps(body) else ""  # the key across the 200th character of the message
        err = json.dumps({"error": {"message": f"{pad}rejected credentials {request.headers.get('Authorization')}"}})
        if "late" in json.dumps(body):
            chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
            await out.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await out.write(f"data: {err}\n\ndata: [DONE]\n\n".encode())
        return out

    async def go() -> list[str]:
        runner, port = await _serve(streams)
        proxy = _proxy(tmp_path, f"http://127.0.0.1:{port}/v1", teacher_key_env="T_TEACHER_KEY")
        seen = []
        async with proxy_site(proxy) as base, httpx.AsyncClient(timeout=30) as http:
            for text in ("first", "late", "long"):
                body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": text}],
                        "metadata": {"function": "unknown"}}
                r = await http.post(f"{base}/v1/chat/completions", json=body)
                seen.append(r.text)
            seen.append((await http.get(f"{base}/health")).text)
        await runner.cleanup()
        return seen

    seen = asyncio.run(go())
    assert "rejected credentials Bearer ***" in seen[0] + seen[1]
    for text in seen:
        assert not _leaks(text) and TEACHER_KEY[:12] not in text, (_leaks(text), text)  # not half of it either
    for f in (tmp_path / "logs").iterdir():
        assert not _leaks(f.read_text()) and TEACHER_KEY[:12] not in f.read_text(), f.name


def test_a_short_url_password_masks_values_not_the_json_around_them(tmp_path):
    """Review: masking the raw bytes of a relayed error event replaced a password such as 'null' or 'error' in the
    JSON itself: the event no longer parsed (the client got a connection error, the call went unlogged)."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "routing_policy.json").write_text(json.dumps(policy("tiny")))

    async def streams(request: web.Request) -> web.StreamResponse:
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
        err = {"error": {"message": f"null: rejected {request.headers.get('Authorization')}", "code": None}}
        await out.write(f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode())
        return out

    async def go() -> tuple[str, int]:
        runner, port = await _serve(streams)
        proxy = _proxy(tmp_path, f"http://u:null@127.0.0.1:{port}/v1")
        async with proxy_site(proxy) as base, httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{base}/v1/chat/completions", json={
                "model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "q"}],
                "metadata": {"function": "unknown"}})
        await runner.cleanup()
        return r.text, r.status_code

    text, status = asyncio.run(go())
    events = [json.loads(x[6:]) for x in text.split("\n\n") if x.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    assert status == 200 and errors and "dTpudWxs" not in text  # base64 of u:null
    assert errors[0]["message"].startswith("***: rejected Basic ***") and errors[0]["code"] is None
    logged = [json.loads(x) for f in (tmp_path / "logs").glob("teacher-*.jsonl") for x in f.read_text().splitlines()]
    assert len(logged) == 1  # the call was logged
