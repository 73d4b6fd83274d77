"""The `distill` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline import __version__
from pipeline import cli_serve as serving
from pipeline.cli_serve import (  # noqa: F401  (the exit codes are this module's API too)
    EXIT_BROKEN,
    EXIT_CHANGED,
    EXIT_DRIFT,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_ROLLED_BACK,
    EXIT_USAGE,
)
from pipeline.recipe import Recipe, RecipeError, load_recipe
from pipeline.rundir import RunDir, RunLockedError
from pipeline.stages import STAGES

EPILOG = """\
stages (each reads the run directory <run_dir>/<name>/ and writes its own folder there):
  harvest   logs (OpenAI, TensorZero, OpenPipe, mapped JSONL/Parquet/CSV, SQL) -> canonical records; feedback joined;
            only what is new since the last run; optional teacher re-generation (harvest/records-*.parquet)
  curate    PII/secret redaction, error/refusal/schema/length/language filters, exact + near dedup,
            decontamination, balance, stable train/val/test split (curate/*.parquet, rejected.parquet, report.json)
  train     SFT or logit distillation (dense, sparse top-k, on-policy) of a full, LoRA or QLoRA student;
            also `accelerate launch -m training.train RECIPE` for DDP / DeepSpeed (train/, metrics.jsonl)
  evaluate  student vs teacher on the test split: exact match, JSON field accuracy, chrF, confidence intervals,
            tables, cost per 1,000 requests, quality gate (evaluate/scores.json, gate.json)
  route     routing_policy.json: which requests the student may answer, fitted on the held-out results
  export    merged master + quantized formats (each re-evaluated) + routing policy + manifest, published to
            the store as an immutable version (not when the gate failed)

A stage whose config and inputs did not change is skipped; running one stage runs what it needs first.

exit codes: 0 done, 1 a stage failed, 2 bad recipe or arguments, 3 run directory in use,
            4 a checksum did not match (pull), 5 the student failed the quality gate (export: not published),
            6 route-check found drift (recent traffic no longer looks like the calibration)
            live --decide: 7 rolled back (a guardrail broke), 8 page someone: a guardrail broke with nothing to
            roll back to (also `distill live` without --decide), or the serving version's student endpoint does
            not answer (8 wins over 7 in one run), 9 a version moved on (served, shadowed, canaried, promoted)

examples:
  distill run recipes/demo.yaml
  distill train recipes/demo.yaml --force
  distill status recipes/demo.yaml
  distill report recipes/demo.yaml      # <run>/report.html: one page with every stage's pictures and numbers
  distill pull store demo-student@v1 ./student
  distill serve-router recipes/demo.yaml --student-url http://localhost:8000/v1 --teacher-url URL --log-dir logs/router
  distill route-check recipes/demo.yaml --logs logs/router
  distill ledger --logs logs/router --json ledger.json
  distill live recipes/demo.yaml --decide   # nightly: shadow -> canary -> promote, or roll back (docs/live.md)
  distill promote recipes/demo.yaml v3 --stage canary --share 0.05
  distill rollback recipes/demo.yaml
  distill serve-student ./student --port 8000   # the student on CPU, OpenAI API with logprobs
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill",
        description="Turn a production LLM's logged traffic into a cheaper student model that you own.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run every stage (skipping unchanged ones)")
    r.add_argument("recipe", help="path of the YAML recipe")
    r.add_argument("--force", nargs="+", choices=STAGES, default=[], metavar="STAGE",
                   help="rerun these stages even if unchanged")
    for stage in STAGES:
        s = sub.add_parser(stage, help=f"run the {stage} stage (and the stages it needs)")
        s.add_argument("recipe", help="path of the YAML recipe")
        s.add_argument("--force", action="store_true", help="rerun this stage even if unchanged")
    rp = sub.add_parser("report", help="write the run's HTML report (<run>/report.html)",
                        description="Write one self-contained HTML page (no script, no network) showing every "
                        "stage's results as pictures with their numbers; stages not run or failed say so. "
                        "`distill run` writes it too, at its end.")
    rp.add_argument("recipe", help="path of the YAML recipe")
    rp.add_argument("--out", help="where to write it (default: <run>/report.html)")
    st = sub.add_parser("status", help="show the state of each stage of a recipe's run directory")
    st.add_argument("recipe")
    st.add_argument("--verify", action="store_true", help="also check every output's sha256 against its manifest "
                    "(without it: presence and size)")
    v = sub.add_parser("validate", help="validate a recipe and exit")
    v.add_argument("recipe")
    pl = sub.add_parser("pull", help="copy a published student from a store and verify every checksum")
    pl.add_argument("store", help="store folder")
    pl.add_argument("name", help="NAME or NAME@VERSION (default: the version 'latest' points at)")
    pl.add_argument("dest", help="destination folder (must not exist or be empty)")
    pl.add_argument("--public-key", metavar="PEM", help="the publisher's ed25519 public key: the version's "
                    "manifest.sig must be a valid signature by it (exit 4 otherwise)")
    pl.add_argument("--require-signature", action="store_true",
                    help="refuse a version that is not signed by --public-key's key (which it then needs)")
    ls = sub.add_parser("list", help="list the students and versions in a store")
    ls.add_argument("store")
    serving.add_parsers(sub)
    dd = sub.add_parser("demo-data", help="write the deterministic demo traffic (two days of logs)")
    dd.add_argument("out", nargs="?", default="recipes/data/demo-traffic")
    return p


def _short(value: object) -> str:
    """A count as the status table shows it: thousands separated, fractions to three significant digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def _status(recipe_path: str, console: Console, verify: bool = False) -> int:
    from pipeline.stages import stage_state

    recipe = load_recipe(recipe_path)
    run = RunDir(recipe.run_path)
    table = Table(title=f"run directory {run.path}", title_justify="left")
    for col in ("stage", "state", "finished", "took"):
        table.add_column(col, no_wrap=True)
    table.add_column("counts", ratio=1)  # the one column that wraps, so the table fits an 80-column terminal
    colors = {"complete": "green", "stale": "yellow", "running": "cyan", "partial": "red", "missing": "dim",
              "waiting": "dim"}
    for stage in STAGES:
        state, m = stage_state(recipe, run, stage, verify)
        counts = ", ".join(f"{k}={_short(v)}" for k, v in (m or {}).get("counts", {}).items()
                           if not isinstance(v, dict | list))
        if m and m.get("why"):
            counts = f"[yellow]{m['why']}[/]"
        finished = (m or {}).get("finished_at", "")
        table.add_row(stage, f"[{colors[state]}]{state}[/]", finished[5:16].replace("T", " "),
                      f"{m['duration_s']:.1f}s" if m else "", counts)
    console.print(table)
    console.print("[dim]complete: up to date; stale: config or inputs changed since (or outputs damaged); running: "
                  "in progress now; partial: interrupted (rerun to finish); missing: not run; waiting: needs an "
                  "earlier stage[/]")
    return EXIT_OK


def _write_report(recipe, console: Console, failed=None, out: str | None = None) -> Path | None:
    """Write the run's report; a report that cannot be written is a warning, never the command's failure."""
    from pipeline.report import Outcome, write_report

    outcome = None
    if failed is not None:
        message = str(failed)
        prefix = f"stage '{failed.stage}' failed: "
        outcome = Outcome(failed.stage, message[len(prefix):] if message.startswith(prefix) else message,
                          failed.exit_code)
    try:
        path = write_report(recipe, out, outcome)
    except Exception as err:  # noqa: BLE001 - the run's result stands whatever happens to its report
        console.print(f"[yellow]warning:[/] the report could not be written: {type(err).__name__}: {err}",
                      soft_wrap=True)
        return None
    console.print(f"report: {path}", soft_wrap=True)
    return path


def _done_line(args: argparse.Namespace, recipe: Recipe, targets: list[str], skipped: list[str]) -> str:
    """What the command did: the stages it ran, and those it skipped because nothing they read had changed."""
    from pipeline.stages import plan

    ran = [s for s in plan(targets) if s not in skipped]
    where = f"for recipe '{recipe.name}' in {recipe.run_path}"
    if not ran:
        again = "--force STAGE reruns one" if args.command == "run" else "--force reruns it"
        return (f"[bold green]done[/]: nothing to do {where}: {', '.join(skipped)} unchanged since their last run "
                f"({again})")
    unchanged = f" ({', '.join(skipped)} unchanged, skipped)" if skipped else ""
    return f"[bold green]done[/]: {', '.join(ran)}{unchanged} {where}"


def _run(args: argparse.Namespace, console: Console) -> int:
    """`distill run` and the one-stage commands; `run` ends by writing the run's report, whatever happened."""
    from pipeline.stages import StageFailed, run_pipeline

    recipe = load_recipe(args.recipe)
    targets = [args.command]
    if args.command == "run":
        from pipeline.stages import configured_stages

        targets = configured_stages(recipe)
        left = [s for s in STAGES if s not in targets]
        if left:
            console.print(f"[dim]not run: {', '.join(left)} (the recipe has no section for them)[/]")
    force = args.force if args.command == "run" else ([args.command] if args.force else [])
    try:
        skipped = run_pipeline(recipe, targets, console, force=force)
    except StageFailed as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        tb = RunDir(recipe.run_path).path / ".partial" / f"{err.stage}.error.txt"
        if tb.exists():
            console.print(f"[dim]traceback: {tb}; rerun the same command once fixed: finished stages "
                          "are kept[/]", soft_wrap=True)
        if args.command == "run":
            _write_report(recipe, console, err)
        return err.exit_code
    if int(os.environ.get("RANK", "0")) == 0:  # once under a launcher, not once per process
        console.print(_done_line(args, recipe, targets, skipped), soft_wrap=True)
    if args.command == "run":
        _write_report(recipe, console)
    return EXIT_OK


def _exit_on_sigterm(signum: int, _frame) -> None:
    """SIGTERM (a scheduler's timeout, a container stop) ends the command like Ctrl-C: finally blocks and exit
    handlers run (the lock is released; the temp folders wandb makes at import, via trl, are removed). One-shot:
    a second SIGTERM (clean-up that hangs) kills the process the default way."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = _parser().parse_args(argv)
    console = Console(stderr=False, highlight=False)
    try:
        if args.command in ("run", *STAGES):
            return _run(args, console)
        if args.command == "report":
            recipe = load_recipe(args.recipe)
            return EXIT_OK if _write_report(recipe, console, out=args.out) else EXIT_FAILED
        if args.command == "status":
            return _status(args.recipe, console, args.verify)
        if args.command == "validate":
            recipe = load_recipe(args.recipe)
            console.print(f"recipe '{recipe.name}' is valid; run directory {recipe.run_path}")
            return EXIT_OK
        if args.command == "pull":
            from pipeline.store import ChecksumError, pull

            if args.require_signature and not args.public_key:
                console.print("[bold red]error:[/] --require-signature needs --public-key PEM (the publisher's "
                              "ed25519 public key: openssl pkey -in KEY -pubout)", soft_wrap=True)
                return EXIT_USAGE
            key = Path(args.public_key).read_bytes() if args.public_key else None
            try:
                dest = pull(args.store, args.name, args.dest, public_key=key, require_signature=args.require_signature)
            except ChecksumError as err:
                console.print(f"[bold red]checksum mismatch:[/] {err}", soft_wrap=True)
                return 4
            from pipeline.store import describe

            signed = "; manifest signature verified" if key else ""
            console.print(f"pulled {args.name} to {dest}; manifest and every checksum verified{signed}", soft_wrap=True)
            for line in describe(dest):
                console.print(f"  {line}", soft_wrap=True)
            return EXIT_OK
        if args.command == "list":
            from pipeline.store import describe, list_store, manifest

            for name, versions, latest in list_store(args.store):
                console.print(f"{name}: {', '.join(versions)}  (latest: {latest})", soft_wrap=True)
                if latest:
                    for line in describe(manifest(args.store, name, latest)):
                        console.print(f"  {latest}: {line}", soft_wrap=True)
            return EXIT_OK
        if args.command in serving.COMMANDS:
            return serving.COMMANDS[args.command](args, console)
        if args.command == "demo-data":
            from curation.harvest.demo_traffic import write_demo

            for path in write_demo(Path(args.out)):
                console.print(str(path))
            return EXIT_OK
    except RecipeError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except RunLockedError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LOCKED
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
