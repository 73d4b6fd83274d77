"""``train.candidates``: several students tried, the best one passed on.

Each candidate is the train section with its overrides applied (``pipeline.config.candidates``). It is trained by
the stage's own code into ``<run>/cache/candidates/<fingerprint>/`` (the fingerprint of its effective section, the
recipe's seed, curate's data and distill's version), so a candidate trained before is reused and adding one trains
only it; a killed candidate resumes from its last checkpoint. Every candidate then answers the validation split
greedily and is scored with the evaluate stage's metric (``pipeline.metrics``) under the base section's
``train.select`` settings, so all are scored alike. The winner: among the candidates that clear the recipe's
``evaluate.gate`` on validation (each function at most ``max_points_below_teacher`` below the teacher, per-function
overrides and ``min_records`` as evaluate applies them), the highest quality, then the lowest serving cost (the
parameters the served model runs), then the lowest validation loss. When none clears the gate the best is passed on
anyway and evaluate's gate decides. With ``train.candidates_until`` the candidates are trained in the listed order
and the search stops at the first that clears the gate with at least that validation quality (a cheaper student
first, or more seeds of one student as retries): the winner is chosen among those trained. Its files become the
stage's output; ``candidates.json`` records every one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.chat import prompt_messages
from pipeline.config.candidates import effective_candidates
from pipeline.metrics import quality, response_schema, score
from pipeline.record import from_table
from pipeline.rundir import digest, write_json_atomic
from pipeline.stages import StageContext, data_digest
from training.train.outputs import load_trained_student
from training.train.select import greedy_answers, scored_records

DONE = "candidate.json"
# Fields of the train section that change what is reported, not the weights: left out of a candidate's fingerprint
# (train.select decides which checkpoint is kept only with select_by: quality, where it stays in).
NOT_WEIGHTS = ("candidates", "candidates_until", "logging_steps", "report_to")


def read_done(path: Path) -> dict[str, Any] | None:
    """A finished candidate's record, or None when it is missing or cannot be read (a cut-off write): not done."""
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and isinstance(done.get("student"), dict) else None


def gate_metric(recipe) -> str:
    """The quality metric the candidates are gated and ranked with: evaluate's (its gate's points are in it; 'judge'
    is scored by 'auto', as on the golden set), else train.select.metric."""
    ev = recipe.evaluate
    if ev is None:
        return recipe.train.select.metric
    return "auto" if ev.quality == "judge" else ev.quality


def choice_inputs(recipe) -> dict[str, str]:
    """What the choice among candidates reads outside the train section (the gate), as a fingerprint input; nothing
    without candidates, so a recipe without them keeps its fingerprint."""
    if not recipe.train or not recipe.train.candidates or recipe.evaluate is None:
        return {}
    return {"candidates: evaluate.gate": digest(recipe.evaluate.gate.model_dump(mode="json")),
            "candidates: evaluate.quality": recipe.evaluate.quality}


def check_length_tokens(base, eff) -> None:
    """Curate's length filter counts tokens with train.student's tokenizer (when it names a checkpoint; a student
    built from config is counted by the documented approximation). A candidate with another tokenizer would train on
    records filtered by counts in tokens it does not use: refused (checkpoints of one family share theirs)."""
    b, c = base.student, eff.student
    if not b.checkpoint or (c.checkpoint, c.revision) == (b.checkpoint, b.revision):
        return
    if not c.checkpoint:
        raise ValueError(f"train.student.from_config: curate counts lengths in the tokens of train.student "
                         f"({b.checkpoint}), but a student built from config trains its own tokenizer; give the "
                         f"candidate a checkpoint with the same tokenizer")
    from training.train.student import load_tokenizer

    vocab = [load_tokenizer(s.checkpoint, s.revision, s.trust_remote_code).get_vocab() for s in (b, c)]
    if vocab[0] != vocab[1]:
        raise ValueError(f"train.student.checkpoint: the tokenizer of {c.checkpoint} differs from train.student's "
                         f"({b.checkpoint}), in whose tokens curate counts lengths: candidates must share it")


def candidate_fingerprint(ctx: StageContext, eff) -> str:
    """What the candidate's weights depend on: its effective section less what only reports (NOT_WEIGHTS, and
    train.select unless it picks the checkpoint), the seed, curate's data and the version."""
    outputs = (ctx.run.manifest("curate") or {}).get("outputs", {})
    skip = set(NOT_WEIGHTS) | ({"select"} if eff.select_by != "quality" else set())
    return digest({"train": eff.model_dump(mode="json", exclude=skip), "seed": ctx.recipe.seed,
                   "curate": data_digest("curate", outputs), "version": __version__})


def score_validation(folder: Path, records: list[dict[str, Any]], select, metric: str) -> dict[str, Any]:
    """The trained candidate's greedy answers to the scored validation records: quality (in ``metric``) and exact
    match, overall and per function."""
    model, tokenizer = load_trained_student(folder)
    chosen = scored_records(records, select.max_records)
    rows: dict[str, list[tuple[float | None, float]]] = defaultdict(list)
    t0 = time.perf_counter()
    for i in range(0, len(chosen), select.batch_size):
        batch = chosen[i:i + select.batch_size]
        answers = greedy_answers(model, tokenizer, [prompt_messages(r) for r in batch], select.max_new_tokens)
        for r, answer in zip(batch, answers, strict=True):
            s = score(answer, r["output"]["content"] or "", response_schema(r.get("response_format")))
            rows[r["function"]].append((quality(s, metric), float(s["exact_match"])))

    def summary(pairs: list[tuple[float | None, float]]) -> dict[str, Any]:
        q = [x for x, _ in pairs if x is not None]
        return {"n": len(pairs), "quality": sum(q) / len(q) if q else None,
                "exact_match": sum(e for _, e in pairs) / len(pairs)}

    every = [p for pairs in rows.values() for p in pairs]
    return {**summary(every), "functions": {fn: summary(p) for fn, p in sorted(rows.items())},
            "seconds": round(time.perf_counter() - t0, 2), "scored_with": scored_with(select, metric)}


def scored_with(select, metric: str) -> dict[str, Any]:
    """What a validation score depends on besides the weights: a cached score with other settings is redone."""
    return {**select.model_dump(mode="json"), "metric": metric}


def gate_on_validation(val: dict[str, Any], gate) -> dict[str, Any]:
    """evaluate.gate's teacher checks on validation scores (agreement metrics: the teacher scores 100). A gated
    function without a quality score fails: a floor nothing was measured against is not cleared."""
    failures = []
    for fn, s in val["functions"].items():
        allowed = gate.functions.get(fn, gate.max_points_below_teacher) if gate else None
        if allowed is None or s["n"] < gate.min_records:
            continue
        if s["quality"] is None:
            failures.append(f"{fn}: no quality score on validation (allowed {allowed:g} points below the teacher)")
            continue
        below = 100 - 100 * s["quality"]
        if below > allowed + 1e-9:
            failures.append(f"{fn}: {below:.1f} points below the teacher (allowed {allowed:g})")
    return {"passed": not failures, "failures": failures}


def train_one(ctx: StageContext, name: str, eff, over: dict[str, Any], train_student: Callable) -> tuple[Path, bool]:
    """The candidate's folder in the cache, trained now unless it was before (or the stage runs with --force);
    (folder, reused)."""
    fp = candidate_fingerprint(ctx, eff)
    root = ctx.run.path / "cache" / "candidates"
    folder = root / fp[:20]
    partial = root / f".partial-{fp[:20]}"  # kept when killed: the next run resumes from its checkpoints
    if ctx.force:  # `distill train --force` retrains, candidates included
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    if read_done(folder / DONE) is not None:
        return folder, True
    if read_done(partial / DONE) is not None:  # trained, killed before it was moved: move it now
        _finish(partial, folder)
        return folder, True
    partial.mkdir(parents=True, exist_ok=True)
    ctx.console.print(f"[bold]candidate {name}[/]: training")
    cctx = StageContext(ctx.recipe.model_copy(update={"train": eff}), ctx.run, partial, ctx.inputs, ctx.console,
                        ctx.force)
    info = train_student(cctx)
    write_json_atomic(partial / DONE, {"fingerprint": fp, "overrides": over, "student": info})
    _finish(partial, folder)
    return folder, False


def _finish(partial: Path, folder: Path) -> None:
    """A trained candidate's partial folder (its DONE written) becomes its cache folder, less its checkpoints."""
    shutil.rmtree(partial / "checkpoints", ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished or unreadable earlier copy
    partial.rename(folder)


def rank_key(c: dict[str, Any]) -> tuple:
    """Clears the gate, then quality, then serving cost (parameters), then validation loss, then listed order."""
    q = c["val"]["quality"]
    loss = c["student"].get("best_eval_loss")
    return (not c["gate"]["passed"], -(round(q, 6) if q is not None else -1.0), c["student"]["parameters"],
            loss if loss is not None else float("inf"), c["index"])


def train_candidates(ctx: StageContext, train_student: Callable) -> dict[str, Any]:
    """Train (or reuse) every candidate, score each on validation, and copy the winner into the stage's folder;
    returns the winner's student info with ``candidate`` and ``candidates`` added."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("train.candidates trains its candidates one after another in one process: run it "
                         "without a launcher (accelerate, torchrun)")
    cfg = ctx.recipe.train
    val_records = from_table(pq.read_table(ctx.inputs["curate"] / "val.parquet"))
    if not val_records:
        raise ValueError("train.candidates chooses on the validation split, which is empty: set "
                         "curate.split.val_fraction > 0")
    gate = ctx.recipe.evaluate.gate if ctx.recipe.evaluate else None
    metric = gate_metric(ctx.recipe)
    found, listed = [], effective_candidates(cfg)
    for i, (name, eff) in enumerate(listed):
        over = {k: v for k, v in cfg.candidates[i].items() if k != "name"}
        folder, reused = train_one(ctx, name, eff, over, train_student)
        done = read_done(folder / DONE)
        if done.get("val", {}).get("scored_with") != scored_with(cfg.select, metric):
            done["val"] = score_validation(folder, val_records, cfg.select, metric)
            write_json_atomic(folder / DONE, done)
        found.append({"index": i, "name": name, "folder": folder, "reused": reused, "overrides": over,
                      "student": done["student"], "val": done["val"], "gate": gate_on_validation(done["val"], gate)})
        if good_enough(found[-1], cfg.candidates_until) and i + 1 < len(listed):
            ctx.console.print(f"[bold]candidate {name}[/]: validation quality {found[-1]['val']['quality']:.3f} "
                              f">= candidates_until {cfg.candidates_until:g} and the gate cleared: "
                              f"{len(listed) - i - 1} later candidate(s) skipped")
            break
    skipped = [name for name, _ in listed[len(found):]]
    best = min(found, key=rank_key)
    for item in best["folder"].iterdir():
        if item.is_dir():
            shutil.copytree(item, ctx.work / item.name, dirs_exist_ok=True)
        elif item.name != DONE:
            shutil.copy2(item, ctx.work / item.name)
    table = [candidate_row(c, c is best) for c in found]
    (ctx.work / "candidates.json").write_text(json.dumps(  # a report file: reruns and losers change only it
        {"chosen": best["name"], "gate_cleared": best["gate"]["passed"], "quality_metric": metric,
         "candidates_until": cfg.candidates_until, "candidates": table, "skipped": skipped}, indent=2) + "\n")
    info = {**best["student"], "candidate": best["name"]}  # the winner alone: its settings are in its info
    (ctx.work / "student.json").write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "candidates": table, "candidates_skipped": skipped}


def good_enough(c: dict[str, Any], until: float | None) -> bool:
    """Whether a scored candidate ends the search (train.candidates_until): the gate cleared on validation and a
    validation quality of at least ``until``."""
    q = c["val"]["quality"]
    return until is not None and c["gate"]["passed"] and q is not None and q >= until - 1e-9


def candidate_row(c: dict[str, Any], chosen: bool) -> dict[str, Any]:
    s, v = c["student"], c["val"]
    return {"name": c["name"], "chosen": chosen, "overrides": c["overrides"], "reused": c["reused"],
            "cache": c["folder"].name, "method": s["method"], "parameters": s["parameters"], "steps": s["steps"],
            "train_seconds": s["train_seconds"], "best_eval_loss": s.get("best_eval_loss"),
            "val_n": v["n"], "val_quality": v["quality"], "val_exact_match": v["exact_match"],
            "val_functions": v["functions"], "gate": c["gate"]}


def candidates_summary(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The stage summary's table of candidates, one line each, side by side (empty without candidates)."""
    rows = info.get("candidates") or []
    if not rows:
        return []
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    out = [("candidates", f"{len(rows)}, scored on {rows[0]['val_n']} validation records; chosen: "
                          f"[bold]{info['candidate']}[/]"
                          + ("" if any(r["chosen"] and r["gate"]["passed"] for r in rows)
                             else " (none clears evaluate.gate on validation: the best is passed on)"))]
    for r in rows:
        out.append((("> " if r["chosen"] else "  ") + r["name"],
                    f"quality {pct(r['val_quality']):>6}  exact {pct(r['val_exact_match']):>6}  "
                    f"{r['parameters']:>11,} params  {r['steps']:>6,} steps  {r['train_seconds']:>7.0f}s  "
                    + ("gate ok" if r["gate"]["passed"] else f"gate: {len(r['gate']['failures'])} function(s) below")
                    + ("  (cached)" if r["reused"] else "")))
    for name in info.get("candidates_skipped") or []:
        out.append(("  " + name, "skipped (not trained, or if cached not considered): an earlier candidate "
                                 "reached train.candidates_until"))
    return out
