"""serve-router's added latency: the same requests sent to the student directly and through the proxy.

    python bench/proxy_latency.py                  # about a minute; --append-results adds the table to RESULTS.md
    python bench/proxy_latency.py --quick          # fewer requests (a smoke run)

Everything is real and on loopback: a stand-in student and teacher (aiohttp, in their own process, OpenAI's wire
format, streaming and not; the student answers with top-5 logprobs confident enough to be kept), the proxy as its
own process (``distill serve-router POLICY --no-embeddings``, logging every call to disk as in production), and an
aiohttp client in this process. The policy is the demo-shaped one ``bench/router.py`` fits (length estimate,
fastText language, mean_entropy on top-5), so each proxied request pays both routing phases.

Per case, the direct and proxied runs alternate in rounds (so drift of the shared cores hits both) and the added
latency is the difference of the two latency percentiles. Streaming: time to first token (the first chunk with
content) and to the end of the stream; through the proxy a student answer that a threshold checks is checked before
it is streamed, so the proxied first token comes after the student's whole answer — compared both with the
student's own first token and with the student's own whole (non-streamed) answer. A second proxy serves the same
policy with no thresholds (what the route stage leaves for a function the student answers well everywhere, as in
the demo's own policy): there the student's stream is relayed as it comes, and its first token is compared with the
student's own. A third proxy serves the checked policy from two processes (``--processes 2``) for the
200-concurrent case; its CPU is counted over both. A fourth serves the checked policy as serve-router did before
2026-12-06, with aiohttp's default pool of 100 upstream connections (``--upstream-connections 100``: the
"baseline" rows), so the same run shows what the unlimited pool changes. The
student takes ``--prefill-ms`` before its first token and ``--token-ms`` per further token (18 tokens); added
latency is always against the student called directly in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANSWER = '{"intent": "billing_error", "priority": "medium", "product": "Vortex Blender"}'
N_TOKENS = 18  # the bench policy's mean answer length in student tokens
TOP = [math.log(x) for x in (0.995, 0.002, 0.001, 0.0005, 0.0003)]  # a confident token's top-5


# ---------------------------------------------------------------------------------------------- upstream process
def _completion(model: str, logprobs: bool, top_k: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
    if logprobs:
        choice["logprobs"] = {"content": [
            {"token": f"t{i}", "logprob": TOP[0], "bytes": None,
             "top_logprobs": [{"token": f"a{j}", "logprob": x, "bytes": None} for j, x in enumerate(TOP[:top_k])]}
            for i in range(N_TOKENS)]}
    return {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1764000000, "model": model,
            "choices": [choice], "usage": {"prompt_tokens": 60, "completion_tokens": N_TOKENS, "total_tokens": 78}}


def serve_upstream(port: int, prefill_ms: float, token_ms: float) -> None:
    """Student at /student/v1, teacher at /teacher/v1: generation takes prefill + (tokens - 1) * token time,
    streamed as it goes when asked to stream, returned whole otherwise."""
    from aiohttp import web

    pieces = [ANSWER[i : i + 5] for i in range(0, len(ANSWER), 5)]

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        await asyncio.sleep(prefill_ms / 1000)
        if not body.get("stream"):
            await asyncio.sleep((N_TOKENS - 1) * token_ms / 1000)
            return web.json_response(_completion(body.get("model", "?"), bool(body.get("logprobs")),
                                                 int(body.get("top_logprobs") or 0)))
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764000000, "model": "m"}

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            await out.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        await send({"role": "assistant", "content": ""})
        for k, piece in enumerate(pieces):
            if k:
                await asyncio.sleep((N_TOKENS - 1) * token_ms / 1000 / (len(pieces) - 1))
            await send({"content": piece})
        await send({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 60, "completion_tokens": N_TOKENS, "total_tokens": 78}
            await out.write(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        return out

    app = web.Application()
    app.router.add_post("/student/v1/chat/completions", handle)
    app.router.add_post("/teacher/v1/chat/completions", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, backlog=1024)


# ---------------------------------------------------------------------------------------------- client
async def one(session, url: str, body: dict[str, Any]) -> tuple[float, float]:
    """(seconds to the first content, seconds to the end) of one call; raises on any failure."""
    t0 = time.perf_counter()
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}: {(await resp.text())[:200]}")
        if not body.get("stream"):
            data = await resp.json()
            assert data["choices"][0]["message"]["content"] == ANSWER, data
            t = time.perf_counter() - t0
            return t, t
        first, buf = None, b""
        async for part in resp.content.iter_any():
            buf += part
            if first is None and b'"content": "' in buf.replace(b'"content": ""', b""):
                first = time.perf_counter() - t0
        assert buf.rstrip().endswith(b"data: [DONE]"), buf[-200:]
        return (first if first is not None else math.nan), time.perf_counter() - t0


async def run_case(base: str, body: dict[str, Any], n: int, concurrency: int) -> list[tuple[float, float]]:
    from aiohttp import ClientSession, TCPConnector

    sem = asyncio.Semaphore(concurrency)
    async with ClientSession(connector=TCPConnector(limit=0)) as session:
        async def task() -> tuple[float, float]:
            async with sem:
                return await one(session, base + "/chat/completions", body)

        for _ in range(min(concurrency, 20)):  # warm connections and code paths
            await one(session, base + "/chat/completions", body)
        return await asyncio.gather(*(task() for _ in range(n)))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] * 1000


# ---------------------------------------------------------------------------------------------- processes
def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.args}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_port(port, proc)
    return proc


# ---------------------------------------------------------------------------------------------- main
CASES = [  # (name, stream, concurrency, proxied function: None = the policy's, routed to the student; proxy)
    ("non-streaming, 1 at a time", False, 1, None, "checked"),
    ("non-streaming, 200 concurrent", False, 200, None, "checked"),
    ("streaming, 1 at a time", True, 1, None, "checked"),
    ("streaming, 200 concurrent", True, 200, None, "checked"),
    ("streaming, escalated before generation (teacher relayed), 1 at a time", True, 1, "unknown_function", "checked"),
    ("streaming, no threshold (student relayed as it streams), 1 at a time", True, 1, None, "unchecked"),
    ("streaming, no threshold (student relayed as it streams), 200 concurrent", True, 200, None, "unchecked"),
    ("non-streaming, 200 concurrent, --processes 2", False, 200, None, "two"),
    ("baseline: non-streaming, 1 at a time, --upstream-connections 100 (aiohttp's pool, the default before "
     "2026-12-06; the day's other changes in both arms)", False, 1, None, "before"),
    ("baseline: non-streaming, 200 concurrent, --upstream-connections 100", False, 200, None, "before"),
]
PROXIES = {  # name: (policy folder: checked or unchecked, serve-router options)
    "checked": ("checked", ()), "unchecked": ("unchecked", ()), "two": ("checked", ("--processes", "2")),
    "before": ("checked", ("--upstream-connections", "100")),
}


def bodies(request: dict[str, Any], stream: bool, function: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(direct body, proxied body): the direct call asks the student exactly what the proxy asks it."""
    proxied = {**request, "stream": stream, "metadata": {"function": function or request["metadata"]["function"]}}
    direct = {k: v for k, v in proxied.items() if k != "metadata"}
    if not stream:
        direct.update(logprobs=True, top_logprobs=5)
    return direct, proxied


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its live children (serve-router --processes) have used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(x) for x in children.read_text().split()] if children.exists() else []
    return own + sum(cpu_seconds(k) for k in kids)


async def measure_case(direct_base: str, proxy_base: str, direct: dict, proxied: dict, n: int, concurrency: int,
                       rounds: int, proxy_pid: int) -> dict[str, Any]:
    """Direct and proxied runs, alternating; with the proxy's CPU seconds per proxied request (warm-ups included)."""
    out: dict[str, Any] = {"direct": [], "proxy": [], "cpu": 0.0, "calls": 0}
    for _ in range(rounds):
        out["direct"] += await run_case(direct_base, direct, n // rounds, concurrency)
        cpu = cpu_seconds(proxy_pid)
        out["proxy"] += await run_case(proxy_base, proxied, n // rounds, concurrency)
        out["cpu"] += cpu_seconds(proxy_pid) - cpu
        out["calls"] += n // rounds + min(concurrency, 20)
    return out


def row(name: str, res: dict[str, Any], stream: bool) -> list[str]:
    i = 0 if stream else 1  # streaming: time to first token; otherwise time to the whole answer
    d = [x[i] for x in res["direct"]]
    p = [x[i] for x in res["proxy"]]
    d50, d99, p50, p99 = pct(d, 0.5), pct(d, 0.99), pct(p, 0.5), pct(p, 0.99)
    return [name, "TTFT" if stream else "latency", f"{len(p)}", f"{d50:.2f} / {d99:.2f}", f"{p50:.2f} / {p99:.2f}",
            f"{p50 - d50:+.2f} / {p99 - d99:+.2f}", f"{p50 / d50:.2f}x", f"{1000 * res['cpu'] / res['calls']:.2f}"]


async def check_route(proxy_base: str, body: dict[str, Any], want: str) -> None:
    from aiohttp import ClientSession

    async with ClientSession() as s, s.post(proxy_base + "/chat/completions", json={**body, "stream": False}) as r:
        route = r.headers.get("x-distill-route")
        if r.status != 200 or route != want:
            raise RuntimeError(f"the proxy routed the bench request to {route} (HTTP {r.status}), expected {want}: "
                               f"{r.headers.get('x-distill-reasons')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per case")
    ap.add_argument("--prefill-ms", type=float, default=20.0, help="the stand-in student's time to its first token")
    ap.add_argument("--token-ms", type=float, default=2.0, help="the stand-in student's time per further token")
    ap.add_argument("--rounds", type=int, default=3, help="direct and proxied runs alternate this many times")
    ap.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    from router import build_policy  # bench/router.py

    with tempfile.TemporaryDirectory() as tmp:
        policy, reqs, _ = build_policy(Path(tmp) / "route")
        unchecked = without_thresholds(policy.parent, Path(tmp) / "route-unchecked")
        up_port, px_ports = free_port(), {which: free_port() for which in PROXIES}
        procs = [start([sys.executable, __file__, "--serve-upstream", str(up_port), "--prefill-ms",
                        str(args.prefill_ms), "--token-ms", str(args.token_ms)], up_port)]
        try:
            pids = {}
            folders = {"checked": policy.parent, "unchecked": unchecked}
            for which, (folder, options) in PROXIES.items():
                procs.append(start([sys.executable, "-m", "pipeline.cli", "serve-router", str(folders[folder]),
                                    *options,
                                    "--student-url", f"http://127.0.0.1:{up_port}/student/v1",
                                    "--teacher-url", f"http://127.0.0.1:{up_port}/teacher/v1", "--no-embeddings",
                                    "--log-dir", str(Path(tmp) / "logs"), "--port", str(px_ports[which])],
                                   px_ports[which]))
                pids[which] = procs[-1].pid
            lines = asyncio.run(bench(args, reqs[0][0], up_port, px_ports, Path(tmp) / "logs", pids))
        finally:
            for p in procs:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    report(lines, args)


def without_thresholds(src: Path, dest: Path) -> Path:
    """A copy of the policy with no post-generation threshold (how the route stage leaves a function the student
    answers well everywhere, as in the demo's own policy): serve-router then relays the student's stream."""
    shutil.copytree(src, dest)
    path = dest / "routing_policy.json"
    policy = json.loads(path.read_text())
    for rule in policy["functions"].values():
        rule["after"]["threshold"] = None
    path.write_text(json.dumps(policy, indent=1))
    return dest


async def bench(args, request: dict[str, Any], up_port: int, px_ports: dict[str, int], logs: Path,
                pids: dict[str, int]) -> list[list[str]]:
    bases = {k: f"http://127.0.0.1:{port}/v1" for k, port in px_ports.items()}
    for base in bases.values():
        await check_route(base, {**request}, "student")
    out, whole, calls = [], None, len(bases)  # one check_route call each
    for name, stream, conc, fn, which in CASES:
        n = (60 if conc == 1 else 400) if args.quick else (300 if conc == 1 else 2000)
        direct, proxied = bodies(request, stream, fn)
        base = f"http://127.0.0.1:{up_port}/{'teacher' if fn else 'student'}/v1"
        res = await measure_case(base, bases[which], direct, proxied, n, conc, args.rounds, pids[which])
        out.append(row(name, res, stream))
        calls += res["calls"]
        if not stream and conc == 1 and which == "checked":
            whole = [x[1] for x in res["direct"]]
        if stream and conc == 1 and not fn and whole and which == "checked":  # the student's own whole answer as the baseline
            p = [x[0] for x in res["proxy"]]
            out.append([name + ": vs the student's whole answer (not streamed)", "TTFT", f"{len(p)}",
                        f"{pct(whole, 0.5):.2f} / {pct(whole, 0.99):.2f}", f"{pct(p, 0.5):.2f} / {pct(p, 0.99):.2f}",
                        f"{pct(p, 0.5) - pct(whole, 0.5):+.2f} / {pct(p, 0.99) - pct(whole, 0.99):+.2f}",
                        f"{pct(p, 0.5) / pct(whole, 0.5):.2f}x", ""])
    await asyncio.sleep(0.5)  # a relayed stream is logged just after its last event
    logged = sum(len(f.read_text().splitlines()) for f in logs.glob("*.jsonl")
                 if f.name.startswith(("student-", "teacher-")))
    out.append([f"(proxy log lines: {logged} for {calls} proxied requests)", "", "", "", "", "", "", ""])
    return out


HEAD = ("case", "measured", "n (proxied)", "direct p50 / p99 ms", "proxied p50 / p99 ms", "added p50 / p99 ms",
        "p50 ratio", "proxy CPU ms/request")


def report(lines: list[list[str]], args) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"serve-router added latency (loopback; student: {args.prefill_ms:g} ms to its first token, "
             f"{args.token_ms:g} ms per further token, {N_TOKENS} tokens)")
    table = Table(title=title, title_justify="left")
    for col in HEAD:
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in lines:
        table.add_row(*r)
    Console(width=170).print(table)
    note = (f"cpu: {os.cpu_count()} cores shared with other processes, load average {os.getloadavg()[0]:.1f}; "
            f"{args.rounds} alternating rounds per case; client, proxy and upstream each in their own process")
    print(note)
    if args.append_results:
        md = ["", f"### bench/proxy_latency.py, {time.strftime('%Y-%m-%d %H:%M')}", "", title, "",
              "| " + " | ".join(HEAD) + " |", "| --- |" + " ---: |" * (len(HEAD) - 1),
              *("| " + " | ".join(r) + " |" for r in lines), "", note, ""]
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-upstream":
        ap = argparse.ArgumentParser()
        ap.add_argument("--serve-upstream", type=int)
        ap.add_argument("--prefill-ms", type=float)
        ap.add_argument("--token-ms", type=float)
        a = ap.parse_args()
        serve_upstream(a.serve_upstream, a.prefill_ms, a.token_ms)
    else:
        main()
