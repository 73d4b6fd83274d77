"""The `distill` commands that serve and watch a student: serve-router, serve-student, route-check, ledger, live,
promote, rollback (docs/route.md, docs/live.md). `pipeline.cli` adds their parsers and dispatches to them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.recipe import load_recipe
from pipeline.rundir import write_json_atomic

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3
EXIT_DRIFT = 6
EXIT_ROLLED_BACK, EXIT_BROKEN, EXIT_CHANGED = 7, 8, 9  # distill live --decide (docs/live.md)


def _serve_student_parser(sub) -> None:
    ss = sub.add_parser("serve-student", help="OpenAI-compatible server for a published student on CPU (transformers)",
                        description="Serve POST /v1/chat/completions from a pulled store version or the run's export "
                        "folder: greedy answers as evaluate made them (the evaluated max_new_tokens from "
                        "generation_config.json), logprobs and top_logprobs when asked (what serve-router's "
                        "confidence check needs), concurrent requests batched. For production: vLLM (GPU) or "
                        "llama-server (docs/export.md).")
    ss.add_argument("folder", help="a pulled store version or runs/<name>/export/<model_name>")
    ss.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                    "only; 0.0.0.0 for every interface)")
    ss.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    ss.add_argument("--model-name", help="the model name in answers and /v1/models (default: the version's name)")
    ss.add_argument("--max-batch", type=int, default=8, help="most requests answered in one batch (default 8)")
    ss.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="how long the first request of a batch waits for others (default 5 ms)")


def _ledger_parser(sub) -> None:
    lg = sub.add_parser("ledger", help="savings ledger: serve-router's logs by day, function and version",
                        description="Rolls serve-router's logs up by day, function and version (the store's "
                        "version, v1, v2, ...; the routing policy's sha256 prefix for a proxy run without a "
                        "deployment file): requests, student share, dollars spent, what the teacher alone would "
                        "have cost, dollars saved, escalation rate, live quality (audits: in --json).")
    lg.add_argument("--logs", required=True, help="serve-router's --log-dir (or a .jsonl file or a glob)")
    lg.add_argument("--json", dest="json_out", help="also write the ledger as JSON to this file")


def _serve_router_parser(sub) -> None:
    sr = sub.add_parser("serve-router", help="OpenAI-compatible proxy applying a routing policy (student or teacher)",
                        description="Serve POST /v1/chat/completions: each request goes to the student when the "
                        "routing policy allows it (and its answer is confident enough), else to the teacher. The "
                        "decision is in the x-distill-route / x-distill-reasons response headers; every call is "
                        "logged in the format `distill harvest` reads (teacher-*.jsonl: training data for the next "
                        "run; student-*.jsonl: for route-check).")
    sr.add_argument("policy", nargs="?", help="a recipe (its run's route stage; its route.live settings are the "
                    "defaults), a routing_policy.json or a folder holding one (e.g. a pulled store version); "
                    "with --deployment, a recipe or nothing")
    sr.add_argument("--student-url", help="base URL of the student's OpenAI-compatible API (…/v1); with "
                    "--deployment, each version's URL comes from --version-url or the file")
    sr.add_argument("--teacher-url", required=True, help="base URL of the teacher's OpenAI-compatible API (…/v1)")
    sr.add_argument("--student-model", help="model name sent to the student (default: the policy's student name)")
    sr.add_argument("--teacher-model", help="model name sent to the teacher (default: the one the client sent)")
    sr.add_argument("--student-key-env", help="NAME of the env var holding the student's API key (never the key)")
    sr.add_argument("--teacher-key-env", help="NAME of the env var holding the teacher's API key (never the key)")
    sr.add_argument("--client-key-env", metavar="NAME", help="NAME of the env var holding the key clients must "
                    "send (Authorization: Bearer KEY; a 401 otherwise; /health stays open). Default: none, every "
                    "client that reaches the port is served with the teacher's key")
    sr.add_argument("--log-dir", default="logs/router", help="where request logs go (default: logs/router)")
    sr.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                    "only; 0.0.0.0 for every interface, then mind --client-key-env)")
    sr.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; --processes share it)")
    sr.add_argument("--processes", type=int, default=1, metavar="N",
                    help="serve from N processes on the one port (SO_REUSEPORT; one event loop uses one core): "
                    "they share the log folder line by line and each re-reads a deployment file (default: 1)")
    sr.add_argument("--timeout", type=float, default=120.0, help="seconds per upstream call, any wait for a free "
                    "upstream connection or file descriptor included; a streamed answer must start within it and "
                    "then send each next chunk within it (a long answer streamed steadily is not cut) (default: 120)")
    sr.add_argument("--upstream-connections", type=int, metavar="N",
                    help="upstream connections in use at once per process, over the student(s), the teacher and "
                    "the background audits; a call beyond them waits for a free one, the wait counted in "
                    "--timeout; 0: no limit (default: an eighth of the open-file limit, which serve-router "
                    "raises to its hard limit: each request in flight holds a client and an upstream descriptor)")
    sr.add_argument("--pass-through", action="append", default=[], metavar="PATH",
                    help="send calls on this path (and under it) to the teacher unchanged, with the teacher's key: "
                    "e.g. /v1/embeddings, /v1/responses, /v1/moderations (repeatable; default: none, other paths "
                    "get a 404 naming this flag). Logged in passthrough-<date>.jsonl without their bodies")
    sr.add_argument("--no-embeddings", action="store_true", help="skip the distance rule (no torch, no MiniLM)")
    sr.add_argument("--no-language", action="store_true", help="skip the language rule")
    sr.add_argument("--before-only", action="store_true", help="do not check the student's confidence after it "
                    "answers (a streamed answer is then relayed as it comes)")
    _live_serve_args(sr)


def _live_serve_args(sr) -> None:
    sr.add_argument("--deployment", metavar="PATH", help="serve the versions a deployment file names "
                    "(<store>/<name>/deployment.json; re-read when it changes): serving, canary, shadow")
    sr.add_argument("--version-url", action="append", default=[], metavar="VERSION=URL",
                    help="a store version's student endpoint, e.g. v2=http://student-v2:8000/v1 (repeatable)")
    sr.add_argument("--audit-share", type=float, help="share of student answers the teacher audits in the "
                    "background (default: 0; with --deployment, or a recipe that sets route.live.audit_share: "
                    "route.live.audit_share)")
    sr.add_argument("--canary-audit-share", type=float, help="audit share of a canary's answers "
                    "(default: route.live.canary_audit_share)")
    sr.add_argument("--queue-size", type=int, help="background audits waiting at most; more are dropped and "
                    "counted (default: route.live.queue_size)")
    sr.add_argument("--seed", type=int, help="seed of the audit, shadow and canary sampling (default: random)")


def _live_parsers(sub) -> None:
    lv = sub.add_parser("live", help="live quality per version and function; --decide: promote or roll back",
                        description="Reads serve-router's logs: per version and function, the audited quality of "
                        "the student's answers with confidence intervals, the routed quality it implies, student "
                        "share, escalation rate, latency percentiles, and a shadowed candidate's scores. --decide "
                        "then moves the deployment on (docs/live.md): exit 7 rolled back, 8 page someone (a guardrail "
                        "broke with nothing to roll back to, or the serving version's student endpoint does not "
                        "answer; 8 wins over 7), 9 a version moved on, 0 nothing to do. Without --decide: "
                        "exit 8 when a guardrail is broken (nothing changes), else 0.")
    lv.add_argument("recipe", help="the recipe (export.store, export.model_name and route.live)")
    lv.add_argument("--logs", help="serve-router's --log-dir (default: route.live.log_dir)")
    lv.add_argument("--since", help="only lines at or after this ISO time (e.g. 2026-12-06T00:00; UTC unless it "
                    "names an offset; default: all, or with --decide the last route.live.window_days). The report only: "
                    "--decide judges each version since it entered its stage, within route.live.window_days")
    lv.add_argument("--json", dest="json_out", help="also write the report (and decisions) as JSON to this file")
    lv.add_argument("--decide", action="store_true", help="apply the sequential tests and change the deployment")
    lv.add_argument("--deployment", metavar="PATH", help="default: route.live.deployment, else "
                    "<export.store>/<export.model_name>/deployment.json")
    lv.add_argument("--version-url", action="append", default=[], metavar="VERSION=URL",
                    help="record a version's student endpoint in the deployment file (repeatable)")
    for cmd, what in (("promote", "make a version serve (or enter shadow or canary) by hand"),
                      ("rollback", "withdraw the candidate, or put the previous version back, by hand")):
        c = sub.add_parser(cmd, help=what, description=f"{what[0].upper()}{what[1:]}; the change and --reason are "
                           "logged in the deployment file's history. Exit 2 when the change is not possible.")
        c.add_argument("recipe", help="the recipe (export.store, export.model_name)")
        if cmd == "promote":
            c.add_argument("version", nargs="?", help="the version (default: the candidate)")
            c.add_argument("--stage", choices=("serving", "canary", "shadow"), default="serving",
                           help="where the version goes (default: serving)")
            c.add_argument("--share", type=float, help="canary or shadow share (default: route.live's)")
            c.add_argument("--version-url", action="append", default=[], metavar="VERSION=URL",
                           help="record a version's student endpoint in the deployment file (repeatable)")
        else:
            c.add_argument("version", nargs="?", help="the version to withdraw: the candidate, or the serving "
                           "version (which keeps a candidate beside it); default: the candidate if any, else the "
                           "serving version")
        c.add_argument("--reason", default="", help="why, for the history")
        c.add_argument("--deployment", metavar="PATH", help="the deployment file (default: beside the store)")


def _urls(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        version, sep, url = pair.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise ValueError(f"--version-url {pair!r}: expected VERSION=http(s)://HOST:PORT/v1")
        out[version.strip()] = url.strip()
    return out


def _deployment_path(args: argparse.Namespace, recipe) -> Path:
    from export.route.deployment import path_for

    given = args.deployment or recipe.route.live.deployment
    if given is None and recipe.export is None:
        raise ValueError("the recipe has no export section: pass --deployment PATH")
    if given is None:
        return path_for(recipe.export.store, recipe.export.model_name)
    path = Path(given)
    _beside_versions(path, recipe, "--deployment" if args.deployment else "route.live.deployment")
    return path


def _beside_versions(path: Path, recipe, flag: str) -> None:
    """Refuse a deployment file that does not sit beside the versions it names (they are read from its folder):
    its folder must be the store's folder of the model, by any path (a mount of the store on the serving host,
    where the recipe's store path may not exist), or hold published versions itself."""
    from export.route.deployment import path_for

    if recipe is None or recipe.export is None or "://" in recipe.export.store.removeprefix("file://"):
        return
    home = path_for(recipe.export.store, recipe.export.model_name).parent
    folder = path.parent
    same = home.is_dir() and folder.is_dir() and os.path.samefile(home, folder)
    if not same and not any(folder.glob("*/routing_policy.json")):
        raise ValueError(f"{flag}: {path} is not in the store's folder of {recipe.export.model_name} ({home}) and "
                         "no published version is beside it: a deployment file sits beside the versions it names "
                         "(serve-router reads them there)")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ci(q) -> str:
    return "-" if not q or q.get("mean") is None else f"{100 * q['mean']:.1f} [{100 * q['ci'][0]:.1f}-" \
        f"{100 * q['ci'][1]:.1f}]"


def _live_table(report: dict, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    cols = ("version", "function", "requests", "student", "escalated", "audits", "audited quality %",
            "routed quality %", "p50 ms", "p99 ms", "shadow quality %")
    for col in cols:
        table.add_column(col, justify="left" if col in cols[:2] else "right", overflow="fold")  # wrap, never cut
    for r in [*report["rows"], *report["versions"]]:
        lat, sh = r["latency_ms"], r["shadow"]
        table.add_row(r["version"], r["function"], str(r["requests"]), _pct(r["student_share"]),
                      _pct(r["escalation_rate"]), str(r["audited_quality"]["n"]), _ci(r["audited_quality"]),
                      _ci(r["routed_quality"]), "-" if lat["p50"] is None else f"{lat['p50']:.0f}",
                      "-" if lat["p99"] is None else f"{lat['p99']:.0f}",
                      f"{_ci(sh['quality'])} n={sh['quality']['n']}" if sh else "-")
    return table


def _student_failures(report: dict, console: Console) -> None:
    """Requests whose student endpoint was unavailable: the teacher answered them and they are no escalation of
    the version's answers, so the table does not show them; an endpoint down or a wrong URL must not go unseen."""
    for r in report["versions"]:
        if r.get("unavailable"):
            console.print(f"[yellow]warning:[/] {r['version']}: its student endpoint was unavailable (unreachable, "
                          f"HTTP 429, 502 or 503) on {r['unavailable']} of {r['requests']} requests (the teacher "
                          "answered them; not counted as escalations): check its server and URL (serve-router's "
                          "/health shows the last failure)", soft_wrap=True)
        if r.get("refused"):
            console.print(f"[yellow]warning:[/] {r['version']}: its student endpoint refused {r['refused']} of "
                          f"{r['requests']} requests with an HTTP 4xx (a wrong key or model name, or a parameter it "
                          "does not serve, such as n > 1 for distill serve-student; the teacher was asked instead; "
                          "not counted as escalations): serve-router's /health shows the last one", soft_wrap=True)


def _live(args: argparse.Namespace, console: Console) -> int:

    from export.route import canary
    from export.route.live import report as live_report

    recipe = load_recipe(args.recipe)
    cfg = recipe.route.live
    logs = args.logs or cfg.log_dir
    if args.json_out and not os.access(Path(args.json_out).resolve().parent, os.W_OK):
        raise ValueError(f"--json {args.json_out}: its folder does not exist or is not writable (nothing was "
                         "decided: the decision and its record must go together)")
    if not Path(logs).exists() and not any(c in str(logs) for c in "*?["):
        console.print(f"[yellow]warning:[/] no logs at {logs}: nothing to judge (check --logs or "
                      "route.live.log_dir)", soft_wrap=True)
    warnings: list[str] = []
    # an hourly --decide reads a bounded amount of log: the decision's window
    since = args.since or (canary.window_start(cfg) if args.decide else None)
    # no calls yet (before the first traffic) is an empty report, not an error: the warning above names the folder
    out: dict = {"report": live_report(logs, since, recipe.route.confidence_level, missing_ok=True)}
    console.print(_live_table(out["report"], f"live: {out['report']['counts']['calls']} routed requests in {logs}"))
    if out["report"].get("unreadable_lines"):  # as ledger and route-check say it (a torn line, a damaged file)
        console.print(f"[dim]{out['report']['unreadable_lines']} log lines could not be read[/]")
    _student_failures(out["report"], console)
    code = EXIT_OK
    path = _deployment_path(args, recipe) if recipe.export else None
    if not args.decide and path is not None and path.exists():  # report a broken guardrail, change nothing
        would, _ = canary.run(path, recipe.export.store, recipe.export.model_name, logs, cfg, dry_run=True,
                              warnings=warnings)
        out["would_decide"] = would
        broken = [d for d in would if d["action"] in ("rollback", "broken")]
        for d in broken:
            console.print(f"[bold red]guardrail broken:[/] {d['reason']} (--decide would: {d['action']})",
                          soft_wrap=True)
        code = EXIT_BROKEN if broken else EXIT_OK
    if args.decide:
        if recipe.export is None:
            raise ValueError("--decide needs the recipe's export section (store and model_name)")
        notes: dict = {}
        done, dep = canary.run(path, recipe.export.store, recipe.export.model_name, logs, cfg,
                               _urls(args.version_url), warnings=warnings, notes=notes)
        out["candidate_evidence"] = notes.get("candidate")
        _waiting(notes.get("candidate"), done, console)
        stale = ((notes.get("candidate") or {}).get("promotion") or {}).get("stale")
        if stale and (dep.get("candidate") or {}).get("version") == notes["candidate"]["version"]:
            warnings.append(stale)  # only while it is still the candidate (not after this run rolled it back)
        out.update(decisions=done, deployment=_shown_urls(dep))
        for d in done:
            console.print(f"[bold]{d['action']}[/] {d.get('version')}: {d['reason']}", soft_wrap=True)
        actions = {d["action"] for d in done}
        # A broken serving version with nothing to roll back to pages someone, whatever else this run did
        code = EXIT_BROKEN if "broken" in actions else EXIT_ROLLED_BACK if "rollback" in actions else \
            EXIT_CHANGED if actions else EXIT_OK
        cand = dep.get("candidate")
        console.print(f"serving {dep.get('serving')}" + (f"; {cand['version']} in {cand['stage']} at "
                      f"{cand['share']:g}" if cand else "") + f" (exit {code})")
    for w in dict.fromkeys(warnings):
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    out["warnings"] = list(dict.fromkeys(warnings))
    if args.json_out:
        write_json_atomic(Path(args.json_out), out)  # a scheduler reading it never sees half
    return code


def _shown_urls(dep: dict) -> dict:
    """The deployment for --json, its student URLs without a password or query."""
    from export.route.upstream import shown

    return {**dep, "urls": {v: shown(u) for v, u in dep["urls"].items()}} if isinstance(dep.get("urls"), dict) \
        else dep


def _waiting(cand: dict | None, done: list[dict], console: Console) -> None:
    """Say why a candidate did not move on (too few scored answers, functions without evidence yet)."""
    if not cand or any(d.get("version") == cand["version"] for d in done):
        return
    p = cand["promotion"]
    why = [f"{p['n']} of {p['min_audits']} scored answers"] if p["n"] < p["min_audits"] else []
    if p["waiting_for"]:
        why.append("not enough evidence yet in " + ", ".join(_evidence(fn, p["functions"][fn]) for fn in p["waiting_for"]))
    if p.get("stale"):
        why.append("its stage is older than route.live.window_days (see the warning)")
    if p.get("held_back"):
        why.append(p["held_back"])
    console.print(f"{cand['version']} stays in {cand['stage']}: {'; '.join(why) or 'no function scored yet'}",
                  soft_wrap=True)


def _evidence(fn: str, f: dict) -> str:
    """One stratum's evidence so far: its scored answers and, where computed, its test statistic against 1/alpha."""
    stat = f"best log-wealth so far {f['statistic']:.2f} of the {f['threshold']:.2f} needed" if "statistic" in f else ""
    return f"{fn} (n={f['n']}{', ' + stat if stat else ''})"


def _or(value: float | None, default: float) -> float:
    """The flag's value when given (0 included: refused by the deployment, not taken for the default)."""
    return default if value is None else value


def _promote_or_rollback(args: argparse.Namespace, console: Console) -> int:
    from export.route import deployment

    recipe = load_recipe(args.recipe)
    cfg = recipe.route.live
    name = recipe.export.model_name if recipe.export else "student"
    path = _deployment_path(args, recipe)
    if args.command != "rollback" and args.version and not (path.parent / args.version / "routing_policy.json").is_file():
        raise deployment.DeploymentError(f"{args.version} is not in the store: no routing policy at "
                                         f"{path.parent / args.version / 'routing_policy.json'} (distill run publishes "
                                         "versions there)")
    if args.command != "rollback" and args.version and (path.parent / args.version).is_symlink():
        raise deployment.DeploymentError(f"{args.version}: {path.parent / args.version} is a symbolic link, not a "
                                         "published version (distill run publishes versions as folders)")
    with deployment.updating(path, name) as dep:
        if args.command == "rollback":
            entry = deployment.change(dep, "rollback", args.version, reason=args.reason or "by hand")
        else:
            dep["urls"] = {**dep.get("urls", {}), **_urls(args.version_url)}
            action = {"serving": "serve" if args.version else "promote", "canary": "canary",
                      "shadow": "shadow"}[args.stage]
            if args.stage == "canary" and args.version and (dep.get("candidate") or {}).get("version") != args.version:
                deployment.change(dep, "shadow", args.version, share=_or(args.share, cfg.shadow_share),
                                  reason=args.reason or "by hand, on the way to canary")
            if action == "serve" and (dep.get("candidate") or {}).get("version") == args.version:
                action = "promote"
            entry = deployment.change(dep, action, args.version if action in ("serve", "shadow", "promote") else None,
                                      share=_or(args.share, cfg.canary_share if action == "canary" else
                                                cfg.shadow_share),
                                      reason=args.reason or "by hand")
    if entry.get("restarted"):
        console.print(f"{entry['version']} serves on: its serving evidence starts again now (what broke it is taken "
                      "as fixed; the live loop judges it afresh)", soft_wrap=True)
    console.print(f"{entry['action']} {entry.get('version')}: serving {dep.get('serving')}" +
                  (f", candidate {dep['candidate']['version']} ({dep['candidate']['stage']})"
                   if dep.get("candidate") else ""), soft_wrap=True)
    return EXIT_OK


def _ledger(args: argparse.Namespace, console: Console) -> int:

    from export.route.ledger import ledger

    report = ledger(args.logs)
    table = Table(title=f"ledger: {report['total']['requests']} routed requests in {args.logs}", title_justify="left")
    cols = ("day", "function", "version", "requests", "student share", "escalation rate", "spent $",
            "teacher-only $", "saved $", "live quality")
    for col in cols:
        table.add_column(col, justify="left" if col in cols[:3] else "right", overflow="fold")  # cron: 80 columns
    for r in [*report["rows"], {**report["total"], "day": "total", "function": "", "version": ""}]:
        table.add_row(r["day"], r["function"], r["version"], str(r["requests"]), f"{100 * r['student_share']:.1f}%",
                      f"{100 * r['escalation_rate']:.1f}%", f"{r['spent_usd']:.6f}", f"{r['teacher_only_usd']:.6f}",
                      f"{r['saved_usd']:.6f}", "-" if r["live_quality"] is None else
                      f"{100 * r['live_quality']:.1f}% n={r['live_audits']}")
    console.print(table)
    if report["total"]["unpriced"]:
        console.print(f"[yellow]{report['total']['unpriced']} requests have no price[/] (no usage or no prices): "
                      "counted, not in the dollars", soft_wrap=True)
    if report["unreadable_lines"]:
        console.print(f"[dim]{report['unreadable_lines']} log lines could not be read[/]")
    if args.json_out:
        write_json_atomic(Path(args.json_out), report)  # a scheduler reading it never sees half
    return EXIT_OK


def _route_check_parser(sub) -> None:
    rc = sub.add_parser("route-check", help="compare recent logs with the routing policy's calibration (drift)",
                        description="Replays the routing policy's pre-generation rules on logged requests and compares "
                        "per function the escalation rates and the distance and length distributions with "
                        f"calibration. Exit code {EXIT_DRIFT} when they moved (drift), 0 when not.")
    rc.add_argument("recipe", help="a recipe (its run's route stage), a routing_policy.json or its folder")
    rc.add_argument("--logs", required=True, help="a .jsonl(.gz) file, a folder or a glob of OpenAI-format logs")
    rc.add_argument("--max-rate-change", type=float, default=0.1,
                    help="flag an escalation rate that moved more than this from calibration (default 0.1)")
    rc.add_argument("--max-psi", type=float, default=0.2,
                    help="flag a distance or length distribution whose PSI exceeds this (default 0.2)")
    rc.add_argument("--min-requests", type=int, default=30, help="functions with fewer requests are never flagged (default 30)")
    rc.add_argument("--no-embeddings", action="store_true", help="do not compare distances (no torch)")
    rc.add_argument("--json", dest="json_out", help="also write the report as JSON to this file")


def _serve_router(args: argparse.Namespace, console: Console) -> int:
    from export.route.passthrough import normalise
    from export.route.proxy import ProxyConfig
    from export.route.serve import ServeOptions, serve
    from export.route.upstream import shown
    from pipeline.config.route import LiveConfig

    pass_through = normalise(args.pass_through)  # a bad path is refused before anything starts
    if args.client_key_env and not os.environ.get(args.client_key_env):
        raise ValueError(f"--client-key-env {args.client_key_env}: that environment variable is not set (or empty)")
    for name in (args.student_key_env, args.teacher_key_env):
        if name and not os.environ.get(name):
            console.print(f"[yellow]warning:[/] environment variable {name} is not set (or empty); calls go without "
                          "a key")
    if args.teacher_url.startswith("https://") and not args.teacher_key_env:
        console.print(f"[yellow]warning:[/] the teacher at {shown(args.teacher_url)} gets no API key: pass --teacher-key-env "
                      "OPENAI_API_KEY (the variable's name, never the key)", soft_wrap=True)
    recipe = load_recipe(args.policy) if args.policy and args.policy.endswith((".yaml", ".yml")) else None
    live = recipe.route.live if recipe else LiveConfig()
    deployment = args.deployment or (live.deployment if recipe and args.deployment is None and
                                     live.deployment else None)
    if not deployment and not (args.policy and args.student_url):
        raise ValueError("serve-router needs a policy and --student-url, or --deployment PATH")
    if deployment:
        _beside_versions(Path(deployment), recipe, "--deployment" if args.deployment else "route.live.deployment")
    # Audits cost teacher calls: a plain policy proxy audits nothing unless asked (--audit-share, or the recipe
    # sets route.live.audit_share itself); with a deployment file the live loop's default applies.
    audit = args.audit_share if args.audit_share is not None else live.audit_share if (
        deployment or "audit_share" in live.model_fields_set) else 0.0
    live = LiveConfig(**{**live.model_dump(), **{k: v for k, v in (
        ("audit_share", audit), ("canary_audit_share", args.canary_audit_share),
        ("queue_size", args.queue_size)) if v is not None}})  # validated: a share outside [0, 1] is refused
    if args.upstream_connections is not None and args.upstream_connections < 0:
        raise ValueError(f"--upstream-connections must be 0 (no limit) or more, got {args.upstream_connections}")
    cfg = ProxyConfig(student_url=args.student_url or "", teacher_url=args.teacher_url, log_dir=Path(args.log_dir),
                      student_model=args.student_model, teacher_model=args.teacher_model,
                      student_key_env=args.student_key_env, teacher_key_env=args.teacher_key_env,
                      timeout_s=args.timeout, check_after=not args.before_only, audit_share=live.audit_share,
                      canary_audit_share=live.canary_audit_share, queue_size=live.queue_size, workers=live.workers,
                      reload_s=live.reload_s, seed=args.seed, upstream_connections=args.upstream_connections,
                      pass_through=pass_through, client_key_env=args.client_key_env)
    if not 1 <= args.processes <= 256:
        raise ValueError(f"--processes must be between 1 and 256, got {args.processes}")
    if args.processes > (os.cpu_count() or 1):
        console.print(f"[yellow]warning:[/] --processes {args.processes} on {os.cpu_count()} cores: each process "
                      "loads its own policy and models (about 100 MB) and they take turns on the cores; one per "
                      "core is the most that helps", soft_wrap=True)
    opts = ServeOptions(args.policy, args.host, args.port, language=not args.no_language,
                        embeddings=not args.no_embeddings, deployment=deployment,
                        version_urls=_urls(args.version_url))
    try:
        code = serve(opts, cfg, args.processes, print_fn=lambda m: console.print(m, soft_wrap=True))
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if code == 0 else code


def _route_check(args: argparse.Namespace, console: Console) -> int:

    from export.route.drift import check, fmt, read_logs
    from export.route.router import Router
    from export.route.serve import policy_path

    path = policy_path(args.recipe)
    try:
        router = Router.load(path, embeddings=not args.no_embeddings)
    except ImportError as err:  # no MiniLM here: compare what can be compared
        console.print(f"[yellow]warning:[/] {err}; distances are not compared", soft_wrap=True)
        router = Router.load(path, embeddings=False)
    lines, bad = read_logs(args.logs, requests_only=True)
    report = check(router, lines, args.max_rate_change, args.max_psi, args.min_requests)
    report["unreadable_lines"] = bad
    table = Table(title=f"route-check: {report['requests']} logged requests vs the calibration of {path}",
                  title_justify="left")
    for col in ("function", "metric", "calibration", "live", "n", "", "note"):
        table.add_column(col, overflow="fold")  # under cron (80 columns): wrap, never cut
    for r in report["rows"]:
        table.add_row(r["function"], r["metric"], fmt(r["calibration"]), fmt(r["live"]), str(r["n"]),
                      "[bold red]DRIFT[/]" if r["drift"] else "[green]ok[/]", r["note"])
    console.print(table)
    if bad:
        console.print(f"[dim]{bad} log lines could not be read (not JSON or no request.messages)[/]")
    if args.json_out:
        write_json_atomic(Path(args.json_out), report)  # a scheduler reading it never sees half
    if report["drift"]:
        console.print(f"[bold red]drift:[/] recent traffic moved away from what the policy was calibrated on; "
                      f"rerun the pipeline on recent logs (exit code {EXIT_DRIFT})", soft_wrap=True)
        return EXIT_DRIFT
    console.print("[green]no drift[/]: recent traffic matches the calibration")
    return EXIT_OK


def _serve_student(args: argparse.Namespace, console: Console) -> int:
    from export.export.serve import serve as serve_student

    serve_student(args.folder, args.host, args.port, model_name=args.model_name, max_batch=args.max_batch,
                  batch_wait_ms=args.batch_wait_ms, print_fn=lambda m: console.print(m, soft_wrap=True))
    return EXIT_OK


def add_parsers(sub) -> None:
    """The serving commands' parsers, in the order `distill --help` lists them."""
    _serve_router_parser(sub)
    _serve_student_parser(sub)
    _ledger_parser(sub)
    _live_parsers(sub)
    _route_check_parser(sub)


COMMANDS = {"serve-router": _serve_router, "route-check": _route_check, "ledger": _ledger, "live": _live,
            "promote": _promote_or_rollback, "rollback": _promote_or_rollback, "serve-student": _serve_student}
