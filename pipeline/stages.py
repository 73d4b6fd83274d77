"""Running stages: fingerprint, skip when unchanged, run into a partial folder, complete atomically.

``PIPELINE`` is the one ordered list of the six stages. Each stage lives in its own room (``<package>/<stage>/``)
whose ``stage.py`` holds ``run(ctx) -> StageResult`` and declares the stage's contract as module attributes:

- ``READS``: the stages whose run-directory folders it reads (they run first; their data joins its fingerprint);
- ``ALSO_READS``: recipe fields outside its own section that it reads, as dotted paths (they join its fingerprint);
- ``DISTRIBUTED``: every process of a multi-process launch runs it (else rank 0 alone, the others wait);
- ``REPORT_FILES``: outputs that describe the run rather than feed the next stage (they hold timings), left out
  of the fingerprints of the stages that read this one;
- optionally ``external_inputs(recipe) -> {name: content hash}`` for files it reads outside the run directory
  (new or changed files rerun it) and ``preflight(recipe)``, checks that need files and run before any stage
  does work (raising ValueError naming the recipe field).

Everything the runner needs (the order, the inputs, the fingerprints) is derived from these declarations.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline import __version__
from pipeline.recipe import Recipe
from pipeline.rundir import RunDir, RunLockedError, digest, fingerprint

# The six stages in pipeline order, each with the module of its room that runs it. route runs before export: the
# routing policy is fitted for this student and published with it, inside the same immutable store version.
PIPELINE: tuple[tuple[str, str], ...] = (
    ("harvest", "curation.harvest.stage"),
    ("curate", "curation.curate.stage"),
    ("train", "training.train.stage"),
    ("evaluate", "training.evaluate.stage"),
    ("route", "export.route.stage"),
    ("export", "export.export.stage"),
)
STAGES: tuple[str, ...] = tuple(name for name, _ in PIPELINE)


@dataclass(frozen=True)
class Contract:
    """What a stage declares in its stage.py (see the module docstring). Its functions are looked up on the module
    when called, so that what a test or a plugin patches there is what runs."""

    name: str
    module: ModuleType
    reads: tuple[str, ...]
    also_reads: tuple[str, ...]
    distributed: bool
    report_files: tuple[str, ...]

    @property
    def run(self) -> Callable[..., Any]:
        return self.module.run

    @property
    def external_inputs(self) -> Callable[[Recipe], dict[str, str]] | None:
        return getattr(self.module, "external_inputs", None)

    @property
    def preflight(self) -> Callable[[Recipe], None] | None:
        return getattr(self.module, "preflight", None)


@cache
def contract(stage: str) -> Contract:
    """The declared contract of a stage, read from its stage.py (imported on first use)."""
    module = importlib.import_module(dict(PIPELINE)[stage])
    reads = tuple(module.READS)
    unknown = [s for s in reads if s not in STAGES[: STAGES.index(stage)]]
    if unknown:
        raise RuntimeError(f"{module.__name__}.READS names {unknown}: a stage reads only earlier stages")
    return Contract(stage, module, reads, tuple(getattr(module, "ALSO_READS", ())),
                    bool(getattr(module, "DISTRIBUTED", False)), tuple(getattr(module, "REPORT_FILES", ())))


def data_digest(stage: str, outputs: dict[str, str]) -> str:
    """Digest of a stage's output checksums, leaving out its report files."""
    skip = contract(stage).report_files
    return digest({k: v for k, v in outputs.items() if k.rsplit("/", 1)[-1] not in skip})


@dataclass
class StageContext:
    """What a stage gets: the recipe, its working folder and the folders of the stages it reads."""

    recipe: Recipe
    run: RunDir
    work: Path
    inputs: dict[str, Path]
    console: Console
    force: bool = False  # --force: the stage reruns; a stage that caches work inside it redoes that too


@dataclass
class StageResult:
    """What a stage returns: counts for the manifest and lines for the summary printed at its end."""

    counts: dict[str, Any] = field(default_factory=dict)
    summary: list[tuple[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # more manifest fields (lineage, scores, ...)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str, exit_code: int = 1):
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage
        self.exit_code = exit_code


def expected_fingerprint(recipe: Recipe, run: RunDir, stage: str) -> str | None:
    """The fingerprint the stage would have now; None when an input stage is not complete."""
    c = contract(stage)
    inputs: dict[str, str] = {}
    for dep in c.reads:
        m = run.manifest(dep)
        if m is None:
            return None
        inputs[dep] = data_digest(dep, m["outputs"])
    if c.external_inputs is not None:
        inputs.update(c.external_inputs(recipe))
    return fingerprint(recipe.section(stage, c.also_reads), inputs)


def stage_state(recipe: Recipe, run: RunDir, stage: str, verify: bool = False) -> tuple[str, dict[str, Any] | None]:
    """One of complete | stale | running | partial | missing | waiting, and the manifest if any (with ``why`` when stale
    because its outputs are not what it recorded; ``verify`` also compares every output's sha256)."""
    m = run.manifest(stage)
    fp = expected_fingerprint(recipe, run, stage)
    if m is not None:
        if fp is None or m.get("fingerprint") != fp:
            return "stale", m
        why = run.damaged(stage, m, verify)
        return ("stale", {**m, "why": why}) if why else ("complete", m)
    info = run.partial_info(stage)
    if info:
        return ("running" if run.locked() else "partial"), None
    return ("missing" if fp is not None else "waiting"), None


def plan(targets: list[str]) -> list[str]:
    """Targets plus every stage they need, in pipeline order."""
    need: set[str] = set()

    def add(s: str) -> None:
        if s not in need:
            need.add(s)
            for d in contract(s).reads:
                add(d)

    for t in targets:
        add(t)
    return [s for s in STAGES if s in need]


def _summary_table(stage: str, result: StageResult, seconds: float) -> Table:
    table = Table(title=f"[bold green]{stage}[/] done in {seconds:.1f}s", title_justify="left", show_header=False)
    table.add_column(style="cyan")
    table.add_column()
    for k, v in result.summary:
        table.add_row(k, v)
    return table


def _prepare(recipe: Recipe, run: RunDir, stage: str, force: bool,
             console: Console) -> tuple[str, Path | None, dict | None]:
    """(fingerprint, work folder or None when the stage is skipped, the complete manifest when skipped)."""
    fp = expected_fingerprint(recipe, run, stage)
    if fp is None:
        raise StageFailed(stage, f"its inputs {contract(stage).reads} are not complete")
    done = run.manifest(stage)
    if done is not None and done.get("fingerprint") == fp and not force:
        why = run.damaged(stage, done)
        if why is None:
            return fp, None, done
        console.print(f"[yellow]{stage}: complete but {why}: running it again[/]")
    return fp, run.begin(stage, fp), None


def _execute(recipe: Recipe, run: RunDir, stage: str, work: Path, console: Console,
             rank: int = 0, force: bool = False) -> tuple[StageResult, float, float]:
    """Run the stage's module in its work folder; a failure keeps its traceback in the run directory."""
    c = contract(stage)
    ctx = StageContext(recipe, run, work, {d: run.stage_dir(d) for d in c.reads}, console, force)
    console.rule(f"[bold]{stage}")
    started = time.time()
    try:
        result: StageResult = c.run(ctx)
    except StageFailed:
        raise
    except Exception as err:  # noqa: BLE001 - reported with the stage name, traceback kept in the run dir
        (run.path / ".partial").mkdir(parents=True, exist_ok=True)
        name = f"{stage}.error.txt" if rank == 0 else f"{stage}.rank{rank}.error.txt"
        (run.path / ".partial" / name).write_text(traceback.format_exc())
        raise StageFailed(stage, f"{type(err).__name__}: {err}") from err
    return result, started, time.time()


def _finish(recipe: Recipe, run: RunDir, stage: str, fp: str, result: StageResult, started: float,
            finished: float, console: Console) -> dict[str, Any]:
    manifest = {
        "stage": stage,
        "recipe": recipe.name,
        "fingerprint": fp,
        "distill_version": __version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
        "duration_s": round(finished - started, 3),
        "inputs": {d: run.manifest(d)["fingerprint"] for d in contract(stage).reads},
        "counts": result.counts,
        **result.extra,
    }
    manifest = run.complete(stage, manifest)
    console.print(_summary_table(stage, result, finished - started))
    return manifest


def _skipped(console: Console, stage: str, done: dict[str, Any]) -> None:
    console.print(f"[dim]{stage}: unchanged since {done.get('finished_at', '?')}, skipped[/]")


def run_stage(recipe: Recipe, run: RunDir, stage: str, console: Console, force: bool = False) -> dict[str, Any]:
    """Run one stage unless a complete manifest with the same fingerprint exists."""
    return _run_or_skip(recipe, run, stage, console, force)[0]


def _run_or_skip(recipe: Recipe, run: RunDir, stage: str, console: Console,
                 force: bool) -> tuple[dict[str, Any], bool]:
    """The stage's manifest, and whether it ran (False: unchanged, skipped)."""
    fp, work, done = _prepare(recipe, run, stage, force, console)
    if work is None:
        _skipped(console, stage, done)
        return done, False
    return _finish(recipe, run, stage, fp, *_execute(recipe, run, stage, work, console, force=force), console), True


def preflight(recipe: Recipe, stages: list[str], force: list[str]) -> None:
    """Run the early checks of the planned stages that are due (not already complete with this recipe)."""
    run = RunDir(recipe.run_path)
    for stage in stages:
        check = contract(stage).preflight
        if check is not None and (stage in force or stage_state(recipe, run, stage)[0] != "complete"):
            check(recipe)


OPTIONAL_SECTIONS = ("train", "evaluate", "export")  # a recipe that only harvests (and curates) leaves them out


def missing_sections(recipe: Recipe, stage: str) -> list[str]:
    """The optional recipe sections a stage needs that the recipe leaves out: its own, those of the stages it
    reads, and those it also reads (less what it declares it can do without, ``MAY_BE_ABSENT``)."""
    c = contract(stage)
    soft = set(getattr(c.module, "MAY_BE_ABSENT", ()))
    need = [stage, *c.reads, *(dotted.split(".")[0] for dotted in c.also_reads)]
    return sorted({s for s in need if s in OPTIONAL_SECTIONS and s not in soft and getattr(recipe, s) is None})


def configured_stages(recipe: Recipe) -> list[str]:
    """The stages this recipe has every section for (what `distill run` runs)."""
    return [s for s in STAGES if not missing_sections(recipe, s)]


def run_pipeline(recipe: Recipe, targets: list[str], console: Console, force: list[str] | None = None) -> list[str]:
    """Run the targets and what they need, under the run directory's lock (held by rank 0 under a launcher).
    Returns the stages skipped because they were unchanged (on rank 0; empty on the other ranks)."""
    stages, force = plan(targets), force or []
    missing = sorted({m for stage in stages for m in missing_sections(recipe, stage)}, key=STAGES.index)
    if missing:
        from pipeline.recipe import RecipeError

        raise RecipeError(f"{' and '.join(targets)} needs the recipe's {' and '.join(missing)} section"
                          f"{'s' if len(missing) > 1 else ''}, which the recipe leaves out: add "
                          f"{'them' if len(missing) > 1 else 'it'} (recipes/demo.yaml shows each)")
    preflight(recipe, stages, force)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_ranked(recipe, stages, console, force)
    run = RunDir(recipe.run_path)
    with run.lock():
        return [stage for stage in stages if not _run_or_skip(recipe, run, stage, console, stage in force)[1]]


def _run_ranked(recipe: Recipe, stages: list[str], console: Console, force: list[str]) -> list[str]:
    """The pipeline in one process of several (WORLD_SIZE > 1). Rank 0 takes the lock and runs the other stages
    alone; a distributed stage is prepared by rank 0, run by every rank, and completed by rank 0 once all ranks
    are done. Rank 0's decisions and failures reach the other ranks, which then stop with the same exit code."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # The process group the Trainer then reuses; the other ranks may wait this long for rank 0's harvest and curate.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=2))
    main, rank = state.is_main_process, state.process_index
    if not main:
        console = Console(quiet=True)

    def share(obj: Any) -> Any:
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def follow(failure: tuple | None, err: Exception | None) -> None:
        if failure is None:
            return
        if err is not None:
            raise err
        kind, stage, code = failure
        if kind == "locked":
            raise RunLockedError(f"run directory {run.path} is in use (rank 0 could not take its lock)")
        raise StageFailed(stage, "rank 0 failed it (see rank 0's output)", code)

    run, skipped = RunDir(recipe.run_path), []
    with ExitStack() as stack:
        failure, err = None, None
        if main:
            try:
                stack.enter_context(run.lock())
            except RunLockedError as e:
                failure, err = ("locked", "", 3), e
        follow(share(failure), err)
        for stage in stages:
            decision, err = None, None
            if main:
                try:
                    if contract(stage).distributed:
                        fp, work, done = _prepare(recipe, run, stage, stage in force, console)
                        if work is None:
                            _skipped(console, stage, done)
                            skipped.append(stage)
                        decision = {"fp": fp, "work": str(work) if work else None}
                    elif not _run_or_skip(recipe, run, stage, console, stage in force)[1]:
                        skipped.append(stage)
                except StageFailed as e:
                    decision, err = {"failure": ("stage", stage, e.exit_code)}, e
            decision = share(decision)
            follow(decision and decision.get("failure"), err)
            if not contract(stage).distributed or decision["work"] is None:
                continue
            result, started, finished = _execute(recipe, run, stage, Path(decision["work"]), console, rank,
                                                  force=stage in force)
            state.wait_for_everyone()  # every rank has written what it writes before the folder moves into place
            if main:
                _finish(recipe, run, stage, decision["fp"], result, started, finished, console)
    return skipped
