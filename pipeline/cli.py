"""The `distill` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline import __version__
from pipeline.recipe import RecipeError, load_recipe
from pipeline.rundir import STAGES, RunDir, RunLockedError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3

EPILOG = """\
stages (each reads the run directory <run_dir>/<name>/ and writes its own folder there):
  harvest   logged teacher traffic -> canonical records (harvest/records-*.parquet, quarantine.jsonl)
  curate    filters, dedup, PII redaction, stable train/val/test split (curate/*.parquet, report.json)
  train     SFT of a LoRA or full student on teacher outputs (train/model or train/adapter, metrics.jsonl)
  evaluate  student vs teacher on the test split: exact match, JSON field accuracy, cost (evaluate/scores.json)
  route     routing_policy.json: which requests the student may answer, fitted on the held-out results
  export    merged student + routing policy + manifest published to the store as an immutable version

A stage whose config and inputs did not change is skipped; running one stage runs what it needs first.

exit codes: 0 done, 1 a stage failed, 2 bad recipe or arguments, 3 run directory in use,
            4 a checksum did not match (pull)

examples:
  distill run recipes/demo.yaml
  distill train recipes/demo.yaml --force
  distill status recipes/demo.yaml
  distill pull store demo-student@v1 ./student
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
    st = sub.add_parser("status", help="show the state of each stage of a recipe's run directory")
    st.add_argument("recipe")
    v = sub.add_parser("validate", help="validate a recipe and exit")
    v.add_argument("recipe")
    pl = sub.add_parser("pull", help="copy a published student from a store and verify every checksum")
    pl.add_argument("store", help="store folder")
    pl.add_argument("name", help="NAME or NAME@VERSION (default: the version 'latest' points at)")
    pl.add_argument("dest", help="destination folder (must not exist or be empty)")
    ls = sub.add_parser("list", help="list the students and versions in a store")
    ls.add_argument("store")
    dd = sub.add_parser("demo-data", help="write the deterministic demo traffic (two days of logs)")
    dd.add_argument("out", nargs="?", default="recipes/data/demo-traffic")
    return p


def _status(recipe_path: str, console: Console) -> int:
    from pipeline.stages import stage_state

    recipe = load_recipe(recipe_path)
    run = RunDir(recipe.run_path)
    table = Table(title=f"run directory {run.path}", title_justify="left")
    for col in ("stage", "state", "finished", "took", "counts"):
        table.add_column(col)
    colors = {"complete": "green", "stale": "yellow", "partial": "red", "missing": "dim", "waiting": "dim"}
    for stage in STAGES:
        state, m = stage_state(recipe, run, stage)
        counts = ", ".join(f"{k}={v}" for k, v in (m or {}).get("counts", {}).items() if not isinstance(v, dict))
        table.add_row(stage, f"[{colors[state]}]{state}[/]", (m or {}).get("finished_at", ""),
                      f"{m['duration_s']:.1f}s" if m else "", counts)
    console.print(table)
    console.print("[dim]complete: up to date; stale: config or inputs changed since; partial: interrupted "
                  "(rerun to finish); missing: not run; waiting: needs an earlier stage[/]")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    console = Console(stderr=False, highlight=False)
    try:
        if args.command in ("run", *STAGES):
            from pipeline.stages import StageFailed, run_pipeline

            recipe = load_recipe(args.recipe)
            targets = list(STAGES) if args.command == "run" else [args.command]
            force = args.force if args.command == "run" else ([args.command] if args.force else [])
            try:
                run_pipeline(recipe, targets, console, force=force)
            except StageFailed as err:
                console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
                tb = RunDir(recipe.run_path).path / ".partial" / f"{err.stage}.error.txt"
                if tb.exists():
                    console.print(f"[dim]traceback: {tb}; rerun the same command once fixed: finished stages "
                                  "are kept[/]", soft_wrap=True)
                return err.exit_code
            console.print(f"[bold green]done[/]: {', '.join(targets)} for recipe '{recipe.name}' in {recipe.run_path}")
            return EXIT_OK
        if args.command == "status":
            return _status(args.recipe, console)
        if args.command == "validate":
            recipe = load_recipe(args.recipe)
            console.print(f"recipe '{recipe.name}' is valid; run directory {recipe.run_path}")
            return EXIT_OK
        if args.command == "pull":
            from export.store import ChecksumError, pull

            try:
                dest = pull(args.store, args.name, args.dest)
            except ChecksumError as err:
                console.print(f"[bold red]checksum mismatch:[/] {err}")
                return 4
            console.print(f"pulled {args.name} to {dest}; every checksum verified")
            return EXIT_OK
        if args.command == "list":
            from export.store import list_store

            for name, versions, latest in list_store(args.store):
                console.print(f"{name}: {', '.join(versions)}  (latest: {latest})")
            return EXIT_OK
        if args.command == "demo-data":
            from curation.demo_traffic import write_demo

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
