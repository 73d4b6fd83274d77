"""Starting ``distill serve-router``: the policy (or deployment file) loaded, then one proxy process, or with
``--processes N`` N of them on one port (``SO_REUSEPORT``: on Linux the kernel spreads new connections over them).

One process is one event loop on one core; N processes use N cores. They share nothing but the log folder, where
each line is one ``O_APPEND`` write (export.route.calllog), and the deployment file, which each re-reads. The
parent only watches: Ctrl-C or SIGTERM stops them all (each finishes its requests and queued audits first); a
process that dies stops the others and ``serve`` returns its exit code, so a supervisor (systemd, Kubernetes)
restarts the whole. A process whose parent is gone stops by itself.

Each request in flight holds two file descriptors (the client's connection and the upstream one): ``serve`` raises
the soft open-file limit to the hard one, and the proxy uses upstream connections up to an eighth of it unless
told otherwise (``ProxyConfig.upstream_connections``). Each process listens with a backlog of ``BACKLOG``
connections (aiohttp's default is 128) and keeps no access log (serve-router's logs are its own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from export.route.lanes import Versions
from export.route.proxy import ProxyConfig, RouterProxy
from export.route.router import Router
from export.route.upstream import shown, upstream_limit
from pipeline.rundir import sha256_file

BACKLOG = 2048  # pending connections per listening socket (the kernel caps it at net.core.somaxconn)


def policy_path(source: str | Path) -> Path:
    """A routing_policy.json from a recipe (its run's route stage), a policy file or a folder holding one."""
    p = Path(source)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        from pipeline.recipe import load_recipe

        p = load_recipe(p).run_path / "route" / "routing_policy.json"
        if not p.is_file():
            raise FileNotFoundError(f"no routing policy at {p}: run `distill route {source}` first")
    elif p.is_dir():
        p = p / "routing_policy.json"
    if not p.is_file():
        raise FileNotFoundError(f"no routing policy at {p} (pass a recipe, a routing_policy.json or its folder)")
    return p


@dataclasses.dataclass
class ServeOptions:
    """What serve-router serves, beside its ProxyConfig (picklable: each process builds its own proxy)."""

    source: str | Path | None
    host: str = "127.0.0.1"
    port: int = 8080
    language: bool = True
    embeddings: bool = True
    deployment: str | Path | None = None
    version_urls: dict[str, str] | None = None


def build_proxy(opts: ServeOptions, cfg: ProxyConfig) -> tuple[RouterProxy, str]:
    """The proxy over the policy or the deployment file's versions, and a line saying what it serves."""
    # bitsandbytes (pulled in by transformers with the MiniLM embedder) warns at import that its optional CPU
    # "kernels" package is missing; serve-router never runs 4-bit layers.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if opts.deployment is not None:
        versions = Versions(opts.deployment, opts.version_urls, model=cfg.student_model, language=opts.language,
                            embeddings=opts.embeddings, seed=cfg.seed)
        what = f"deployment {opts.deployment} ({versions.status()['serving']} serving"
        cand = versions.candidate
        what += f", {cand.lane.version} in {cand.stage} at {cand.share:g})" if cand else ")"
        return RouterProxy(None, cfg, versions=versions), what
    path = policy_path(opts.source)
    router = Router.load(path, language=opts.language, embeddings=opts.embeddings)
    skipped = f" (not checked: {', '.join(router.skipped)})" if router.skipped else ""
    return RouterProxy(router, cfg, sha256_file(path)), f"policy {path}{skipped}; student {shown(cfg.student_url)}"


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files as far as the hard limit allows (the processes started after inherit
    it); returns (soft, hard) as they are now. An unlimited hard limit (macOS) is tried at 2**20, then 10,240."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, hard
    for target in ([hard] if hard != resource.RLIM_INFINITY else [1 << 20, 10240]):
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target, hard
        except (ValueError, OSError):
            continue
    return soft, hard


def low_limit_warning(files: int, hard: int, upstream: int) -> str:
    """What a low open-file limit means: each client connection holds a descriptor, each upstream call one more."""
    hard_too = " (its hard limit too)" if files == hard else ""
    clients = max(0, files - 3 * upstream - 64) if upstream else max(0, files // 2 - 64)
    fits = (f"at most {upstream} upstream connections in use, and about {clients} client connections at once before "
            "calls wait for a free descriptor (a 502 or 504 after --timeout)" if upstream else
            f"no limit on upstream connections, so about {clients} requests in flight at once")
    return f"warning: the open-file limit is {files}{hard_too}: {fits}; raise it (ulimit -n, systemd LimitNOFILE=)"


def serve(opts: ServeOptions, cfg: ProxyConfig, processes: int = 1, print_fn=print) -> int:
    """Serve until interrupted; returns the exit code (0 after Ctrl-C or SIGTERM)."""
    files, hard = raise_open_file_limit()
    if files < 4096:
        print_fn(low_limit_warning(files, hard, upstream_limit(cfg.upstream_connections)))
    proxy, what = build_proxy(opts, cfg)  # loaded here first, so a bad policy fails before any process starts
    if processes > 1 and opts.port == 0:
        raise ValueError("--port 0 with --processes: each process would listen on a port of its own; give the "
                         "port they share")
    check_port_free(opts.host, opts.port)
    audits = f"; audits {cfg.audit_share:g} of student answers" if cfg.audit_share else ""
    many = f" ({processes} processes)" if processes > 1 else ""
    print_fn(f"distill serve-router: {what}, teacher {shown(cfg.teacher_url)}; logs in {cfg.log_dir}{audits}; "
             f"listening on http://{opts.host}:{opts.port}/v1{many}")
    if processes == 1:
        return 1 if asyncio.run(_serve_until_stopped(proxy, opts.host, opts.port, reuse_port=False)) else 0
    del proxy  # each process loads its own; the parent only watches
    return _supervise(opts, cfg, processes)


def drain_s(cfg: ProxyConfig) -> float:
    """How long a stop waits for the requests in flight: a student call and then the teacher's, each up to
    ``--timeout``, and the audit queue's 10 s."""
    return 2 * cfg.timeout_s + 15.0


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on. The processes bind with SO_REUSEPORT, which would let them share
    the port with another serve-router --processes (same user) without a word: this bind, without it, fails."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as err:
            hint = ("another server is there: stop it or choose another --port" if err.errno == errno.EADDRINUSE
                    else "check --host and --port")
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror} ({hint})") from None


def _worker(opts: ServeOptions, cfg: ProxyConfig, parent: int) -> None:
    """One of several processes: its own proxy on the shared port; stops when the parent is gone."""
    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, daemon=True).start()
    try:
        proxy, _ = build_proxy(opts, cfg)
        cut = asyncio.run(_serve_until_stopped(proxy, opts.host, opts.port))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole group: one still starting (no request yet) just ends
        return
    if cut:
        sys.exit(1)  # requests were cut: the supervisor exits 1 too


async def _serve_until_stopped(proxy: RouterProxy, host: str, port: int, reuse_port: bool = True) -> int:
    """Serve until SIGINT or SIGTERM, then stop gracefully: stop listening, let every request in flight finish
    (one whose body is still arriving too: aiohttp's own shutdown drops the bytes that come after it begins),
    at most ``drain_s`` (returns how many were still running then), then the queued audits. Any further signal is ignored: Ctrl-C reaches every process of
    the group and the parent then sends SIGTERM too, which under web.run_app would cancel the requests still
    running."""
    runner = web.AppRunner(proxy.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=BACKLOG)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await site.stop()  # no new connections; the open ones go on
    proxy.stopping = True  # every answer from now on closes its connection (keep-alive clients go elsewhere)
    print(f"distill serve-router (pid {os.getpid()}): stopping: {proxy.in_flight} requests in flight, waiting for "
          f"them (at most {drain_s(proxy.cfg):g} s), then for queued audits (10 s)", file=sys.stderr, flush=True)
    end = loop.time() + drain_s(proxy.cfg)
    quiet_since = None  # a request can still come on an open connection: done once none was in flight for 0.5 s
    while loop.time() < end:
        if proxy.in_flight:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= 0.5:
            break
        await asyncio.sleep(0.05)
    left = proxy.in_flight
    if left:
        print(f"distill serve-router (pid {os.getpid()}): {left} requests still in flight after "
              f"{drain_s(proxy.cfg):g} s: cut", file=sys.stderr, flush=True)
    await runner.cleanup()
    return left


RESTARTS, RESTARTS_S = 5, 60.0  # more deaths than this within this many seconds: a crash loop, stop


def _supervise(opts: ServeOptions, cfg: ProxyConfig, processes: int) -> int:
    """Start the processes (each its own sampling seed) and keep them running: one that dies is named and started
    again (the others go on serving the port meanwhile), unless they die too often (a crash loop: all stop, exit
    non-zero, so systemd or Kubernetes restarts the whole). A stop signal stops them all."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no event loop or threads inherited

    def start(i: int) -> Any:
        seed = None if cfg.seed is None else cfg.seed + i
        p = ctx.Process(target=_worker, args=(opts, dataclasses.replace(cfg, seed=seed), os.getpid()),
                        name=f"serve-router-{i}", daemon=False)
        p.start()
        return p

    procs = [start(i) for i in range(processes)]
    stop, deaths, looping = threading.Event(), [], False
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set() and not looping:
            for i, p in enumerate(procs):
                if p.is_alive() or stop.is_set():
                    continue
                now = time.monotonic()
                deaths = [t for t in deaths if now - t < RESTARTS_S] + [now]
                looping = len(deaths) > RESTARTS
                print(f"serve-router: process {i} (pid {p.pid}) ended ({_how(p.exitcode)}): "
                      + ("it keeps dying, stopping the others" if looping else "starting it again"),
                      file=sys.stderr, flush=True)
                if looping:
                    break
                procs[i] = start(i)
            stop.wait(0.2)
        codes, killed = _stop_all(procs, drain_s(cfg) + 15.0)  # a second Ctrl-C meanwhile only sets the event again
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for i in killed:
        print(f"serve-router: process {i} did not stop within {drain_s(cfg) + 15.0:g} s: killed (its requests "
              "in flight were lost)", file=sys.stderr, flush=True)
    if killed or any(c not in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes):
        return 1  # killed, or a process cut requests at the end of its drain
    return 0 if stop.is_set() and not looping else 1


def _how(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _stop_all(procs: list[Any], grace_s: float) -> tuple[list[int | None], list[int]]:
    """SIGTERM every live process, then wait (SIGKILL after ``grace_s``, longer than a process's own graceful
    stop: ``drain_s`` and the audit queue's drain); their exit codes, and the indexes of those killed."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    killed = []
    for i, p in enumerate(procs):
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
            killed.append(i)
    return [p.exitcode for p in procs], killed
