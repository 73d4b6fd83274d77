"""serve-router's added latency: the same requests sent to the student directly and through the proxy.

    python bench/proxy_latency.py                  # about a minute; --append-results adds the table to RESULTS.md
    python bench/proxy_latency.py --quick          # fewer requests (a smoke run)
    python bench/proxy_latency.py --sweep 2,5,10,20,40 --baseline-tree /tmp/old   # one process's capacity (~5 min)
    python bench/proxy_latency.py --sweep 10,20,40 --pin-proxy   # the proxy alone on a core (Linux), as deployed

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

200 concurrent requests are sent two ways. "Started at once": all 200 go out together, and since the stand-in
always takes the same time they come back, and go out again, in waves of 200 (a burst: the last of a wave waits
for the proxy's CPU time of the 199 before it). "Arrivals spread": 200 clients, each calling again as soon as it
is answered, started one answer's time / 200 apart, so requests arrive evenly as in live traffic; calls begun
during that ramp, or after the last counted one (so that 200 stay in flight to the end), are not counted. How
many requests per second 200 concurrent clients make depends on how fast the student answers (Little's law:
200 / its latency), so ``--sweep`` measures one proxy process at several student paces with arrivals spread:
requests/s, the proxy's CPU, and what it adds. ``--baseline-tree DIR`` runs
the serve-router of another source tree (``git worktree add DIR COMMIT``) beside this one's, alternating, as the
baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
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
SENT = [0]  # calls sent by this process, counted as they start
FIRST_CONTENT = re.compile(rb'"content": ?"[^"]')  # a chunk with content (with or without a space: json, orjson)


async def one(session, url: str, body: dict[str, Any]) -> tuple[float, float]:
    """(seconds to the first content, seconds to the end) of one call; raises on any failure."""
    SENT[0] += 1
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
            if first is None and FIRST_CONTENT.search(buf):
                first = time.perf_counter() - t0
        assert buf.rstrip().endswith(b"data: [DONE]"), buf[-200:]
        return (first if first is not None else math.nan), time.perf_counter() - t0


async def run_case(base: str, body: dict[str, Any], n: int, concurrency: int,
                   spread: bool = False) -> list[tuple[float, float]]:
    """``n`` calls, ``concurrency`` in flight. Not ``spread``: all started at once, so with a student that always
    takes the same time they come back, and go out again, in waves of ``concurrency`` (a burst test). ``spread``:
    ``concurrency`` clients started one answer's time apart / ``concurrency`` (a closed loop at steady state, the
    arrivals spread as in live traffic); calls started during that ramp or after the ``n`` counted ones (sent so
    that ``concurrency`` stay in flight until the last counted one ends) are not counted."""
    from aiohttp import ClientSession, TCPConnector

    url = base + "/chat/completions"
    async with ClientSession(connector=TCPConnector(limit=0)) as session:
        warm = [await one(session, url, body) for _ in range(min(concurrency, 5 if spread else 20))]  # code paths
        if not spread:
            sem = asyncio.Semaphore(concurrency)

            async def task() -> tuple[float, float]:
                async with sem:
                    return await one(session, url, body)

            return await asyncio.gather(*(task() for _ in range(n)))
        gap = sorted(t for _, t in warm)[len(warm) // 2] / concurrency
        ramp_end = time.perf_counter() + concurrency * gap
        started, out = 0, []

        async def client(i: int) -> None:  # calls on, uncounted, until the last counted call is answered
            nonlocal started
            await asyncio.sleep(i * gap)
            while len(out) < n:
                counted = started < n and time.perf_counter() >= ramp_end
                started += counted
                res = await one(session, url, body)
                if counted:
                    out.append(res)

        await asyncio.gather(*(client(i) for i in range(concurrency)))
        return out


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


def start(args: list[str], port: int, env: dict[str, str] | None = None, cwd: Path | str = ROOT) -> subprocess.Popen:
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_port(port, proc)
    return proc


# ---------------------------------------------------------------------------------------------- main
CASES = [  # (name, stream, concurrency, proxied function: None = the policy's, routed to the student; proxy;
    #         arrivals spread: a steady closed loop, not all started at once)
    ("non-streaming, 1 at a time", False, 1, None, "checked", False),
    ("non-streaming, 200 concurrent, started at once", False, 200, None, "checked", False),
    ("non-streaming, 200 concurrent, arrivals spread", False, 200, None, "checked", True),
    ("streaming, 1 at a time", True, 1, None, "checked", False),
    ("streaming, 200 concurrent, started at once", True, 200, None, "checked", False),
    ("streaming, 200 concurrent, arrivals spread", True, 200, None, "checked", True),
    ("streaming, escalated before generation (teacher relayed), 1 at a time", True, 1, "unknown_function", "checked",
     False),
    ("streaming, no threshold (student relayed as it streams), 1 at a time", True, 1, None, "unchecked", False),
    ("streaming, no threshold (student relayed as it streams), 200 concurrent, arrivals spread", True, 200, None,
     "unchecked", True),
    ("non-streaming, 200 concurrent, started at once, --processes 2", False, 200, None, "two", False),
    ("baseline: non-streaming, 1 at a time, --upstream-connections 100 (aiohttp's pool, the default before "
     "2026-12-06; the day's other changes in both arms)", False, 1, None, "before", False),
    ("baseline: non-streaming, 200 concurrent, started at once, --upstream-connections 100", False, 200, None,
     "before", False),
]
SWEEP_CASE = ("non-streaming, 200 concurrent, arrivals spread", False, 200, None, "checked", True)
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
                       rounds: int, proxy_pid: int, spread: bool = False) -> dict[str, Any]:
    """Direct and proxied runs, alternating; with the proxy's CPU seconds over the proxied runs and how many calls
    it served in them (warm-ups and ramps included)."""
    out: dict[str, Any] = {"direct": [], "proxy": [], "cpu": 0.0, "calls": 0}
    for _ in range(rounds):
        out["direct"] += await run_case(direct_base, direct, n // rounds, concurrency, spread)
        cpu, sent = cpu_seconds(proxy_pid), SENT[0]
        out["proxy"] += await run_case(proxy_base, proxied, n // rounds, concurrency, spread)
        out["cpu"] += cpu_seconds(proxy_pid) - cpu
        out["calls"] += SENT[0] - sent
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
    ap.add_argument("--sweep", metavar="MS,MS,...",
                    help="instead of the cases: one proxy's capacity, 200 concurrent with arrivals spread, the "
                         "student at each of these times per token (so at as many requests per second)")
    ap.add_argument("--baseline-tree", metavar="DIR",
                    help="with --sweep: also measure the serve-router of this source tree (a git worktree of another "
                         "commit), alternating with this tree's, as the baseline")
    ap.add_argument("--pin-proxy", action="store_true",
                    help="with --sweep: the proxy on the last core alone, the load generator and the stand-in student "
                         "on the others (Linux; the proxy's own core, as a deployment gives it)")
    ap.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    if args.pin_proxy:  # this process and what it starts (the upstream, the proxies) off the proxy's core
        os.sched_setaffinity(0, set(range((os.cpu_count() or 2) - 1)))
    from router import build_policy  # bench/router.py

    with tempfile.TemporaryDirectory() as tmp:
        policy, reqs, _ = build_policy(Path(tmp) / "route")
        folders = {"checked": policy.parent, "unchecked": without_thresholds(policy.parent, Path(tmp) / "unchecked")}
        if args.sweep:
            lines = [row for ms in args.sweep.split(",")
                     for row in sweep_pace(args, float(ms), folders, reqs[0][0], Path(tmp) / f"logs-{ms}")]
            return report(lines, args, SWEEP_HEAD)
        with servers(args.prefill_ms, args.token_ms, folders, PROXIES, Path(tmp) / "logs") as (up_port, ports, pids):
            lines = asyncio.run(bench(args, reqs[0][0], up_port, ports, Path(tmp) / "logs", pids))
    report(lines, args, HEAD)


@contextlib.contextmanager
def servers(prefill_ms: float, token_ms: float, folders: dict[str, Path], proxies: dict[str, tuple], logs: Path):
    """The stand-in upstream and one serve-router process per entry of ``proxies`` ({name: (policy folder,
    options[, source tree to run it from])}), each on a free port; yields (upstream port, {proxy: port},
    {proxy: pid}) and stops them all afterwards."""
    up_port, ports = free_port(), {which: free_port() for which in proxies}
    procs = [start([sys.executable, __file__, "--serve-upstream", str(up_port), "--prefill-ms", str(prefill_ms),
                    "--token-ms", str(token_ms)], up_port)]
    try:
        for which, (folder, options, *tree) in proxies.items():
            procs.append(start([sys.executable, "-m", "pipeline.cli", "serve-router", str(folders[folder]), *options,
                                "--student-url", f"http://127.0.0.1:{up_port}/student/v1",
                                "--teacher-url", f"http://127.0.0.1:{up_port}/teacher/v1", "--no-embeddings",
                                "--log-dir", str(logs), "--port", str(ports[which])], ports[which],
                               cwd=tree[0] if tree else ROOT))
        yield up_port, ports, {which: proc.pid for which, proc in zip(proxies, procs[1:], strict=True)}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


SWEEP_HEAD = ("student ms per token", "proxy", "student answer p50 ms", "n (proxied)", "requests/s through the proxy",
              "proxy CPU (cores busy)", "added p50 / p99 ms", "proxy CPU ms/request")


def sweep_pace(args, token_ms: float, folders: dict[str, Path], request: dict[str, Any], logs: Path) -> list[list[str]]:
    """The capacity sweep's rows for one pace: SWEEP_CASE with the student at ``token_ms`` per token, through this
    tree's serve-router and, with ``--baseline-tree``, that tree's, alternating with the direct calls."""
    _, stream, conc, fn, which, spread = SWEEP_CASE
    n = 400 if args.quick else 2000
    proxies = {"this tree": PROXIES[which]}
    if args.baseline_tree:
        proxies["baseline tree"] = (*PROXIES[which], str(Path(args.baseline_tree).resolve()))
    with servers(args.prefill_ms, token_ms, folders, proxies, logs) as (up_port, ports, pids):
        if args.pin_proxy:
            for pid in pids.values():
                pin(pid, {(os.cpu_count() or 2) - 1})
        direct, proxied = bodies(request, stream, fn)
        bases = {k: f"http://127.0.0.1:{port}/v1" for k, port in ports.items()}

        async def go() -> dict[str, Any]:
            res: dict[str, Any] = {"direct": [], **{k: {"lat": [], "cpu": 0.0, "calls": 0} for k in proxies}}
            for base in bases.values():
                await check_route(base, {**request}, "student")
            for _ in range(args.rounds):
                res["direct"] += await run_case(f"http://127.0.0.1:{up_port}/student/v1", direct, n // args.rounds,
                                                conc, spread)
                for k in proxies:
                    cpu, sent = cpu_seconds(pids[k]), SENT[0]
                    res[k]["lat"] += await run_case(bases[k], proxied, n // args.rounds, conc, spread)
                    res[k]["cpu"] += cpu_seconds(pids[k]) - cpu
                    res[k]["calls"] += SENT[0] - sent
            return res

        res = asyncio.run(go())
    d = [x[1] for x in res["direct"]]
    rows = []
    for k in proxies:
        p = [x[1] for x in res[k]["lat"]]
        rate = conc / (sum(p) / len(p))  # Little's law: a closed loop at steady state
        cpu = res[k]["cpu"] / res[k]["calls"]
        rows.append([f"{token_ms:g}", k, f"{pct(d, 0.5):.1f}", f"{len(p)}", f"{rate:.0f}", f"{rate * cpu:.2f}",
                     f"{pct(p, 0.5) - pct(d, 0.5):+.2f} / {pct(p, 0.99) - pct(d, 0.99):+.2f}", f"{1000 * cpu:.2f}"])
    return rows


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` (threads started later inherit their creator's affinity) onto ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


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
    for name, stream, conc, fn, which, spread in CASES:
        n = (60 if conc == 1 else 400) if args.quick else (300 if conc == 1 else 2000)
        direct, proxied = bodies(request, stream, fn)
        base = f"http://127.0.0.1:{up_port}/{'teacher' if fn else 'student'}/v1"
        res = await measure_case(base, bases[which], direct, proxied, n, conc, args.rounds, pids[which], spread)
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


def report(lines: list[list[str]], args, head: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    if args.sweep:
        title = (f"serve-router's capacity: 200 concurrent, arrivals spread, not streamed (loopback; student: "
                 f"{args.prefill_ms:g} ms to its first token, then the given time per further token, {N_TOKENS} tokens)")
    else:
        title = (f"serve-router added latency (loopback; student: {args.prefill_ms:g} ms to its first token, "
                 f"{args.token_ms:g} ms per further token, {N_TOKENS} tokens)")
    table = Table(title=title, title_justify="left")
    for col in head:
        table.add_column(col, justify="left" if col == head[0] else "right")
    for r in lines:
        table.add_row(*r)
    Console(width=170).print(table)
    note = (f"cpu: {os.cpu_count()} cores shared with other processes, load average {os.getloadavg()[0]:.1f}; "
            f"{args.rounds} alternating rounds per case; client, proxy and upstream each in their own process"
            + ("; --pin-proxy: the proxy alone on the last core, the client and the upstream on the others"
               if getattr(args, "pin_proxy", False) else ""))
    print(note)
    if args.append_results:
        md = ["", f"### bench/proxy_latency.py, {time.strftime('%Y-%m-%d %H:%M')}", "", title, "",
              "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1),
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
