"""The export stage: check the quality gate, merge the student (LoRA folded in) into one master in the recipe's
dtype, make every quantized format from that master, evaluate each again on the test split, and publish the
master, the artefacts that kept their quality, the routing policy, a model card and a manifest to the store as
one immutable version.

    export/<model_name>/            the version's files: master at the top, one folder per format, README.md
                                    (model card), routing_policy.json and the policy's own files
    export/flagged/<format>/        artefacts that lost more than the tolerance: kept for inspection, not published
    export/evals/<format>.json      per-artefact re-evaluation (a rerun of an interrupted export reuses them)
    export/published.json           where the version went

A student that fails the gate is not published: the stage fails with exit code 5 and names each function that
failed and by how much.

:func:`run` is a list of named steps: :func:`check_gate`, :func:`make_master`, :func:`plan` (what every artefact
shares), :func:`evaluate_master`, :func:`make_format` for each format, :func:`publish_version`. Artefacts are
re-evaluated with the evaluation engine (``training.evaluate.engine``) and published with ``pipeline.store``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from export.export import quantize
from export.export.modelcard import model_card, system_prompts, usage, write_generation_config
from pipeline.config.export import FORMATS
from pipeline.record import from_table
from pipeline.report import render_run
from pipeline.rundir import digest, sha256_file
from pipeline.stages import StageContext, StageFailed, StageResult
from pipeline.store import publish
from pipeline.ui import stage_progress
from training.evaluate import gate, metrics
from training.evaluate import tables as eval_tables
from training.evaluate.engine import evaluate_model
from training.train.outputs import load_trained_student, student_info

# The stage's contract (pipeline/stages.py).
READS = ("curate", "train", "evaluate", "route")
# It also reads the evaluate section (to re-evaluate each format as evaluate did) and train.max_length: a change
# to either reruns that stage, whose outputs (inputs of export) then change, so export reruns too.


SCHEMA = "distill-export/v1"


def _signing_key() -> bytes | None:
    """The publisher's ed25519 private key (PEM) from the file DISTILL_SIGNING_KEY names, if set: the manifest is
    then signed (manifest.sig) for `distill pull --public-key`. An environment variable, not a recipe field: the
    key's path is the scheduler's secret, and signing changes nothing in the artefact."""
    path = os.environ.get("DISTILL_SIGNING_KEY")
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise StageFailed("export", f"DISTILL_SIGNING_KEY names {path}, which cannot be read: {err.strerror}") from None


def _reload_check(model, folder) -> float:
    """Max absolute difference between the merged model's parameters and the saved copy's, reloaded by
    transformers from safetensors (0.0 when the copy is exact)."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype, use_safetensors=True)
    saved = dict(reloaded.named_parameters())
    diff = 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in saved or saved[name].shape != p.shape:
                return float("inf")
            diff = max(diff, float((saved[name].float() - p.float()).abs().max()))
    return diff


def _packages(formats: list[str]) -> dict[str, str]:
    names = ["distill", "torch", "transformers", "peft", "trl", "safetensors", "tokenizers"]
    if any(f.startswith("gguf-") for f in formats):
        names.append("gguf")
    if any(f.startswith("bnb-") for f in formats):
        names.append("bitsandbytes")
    if any(f in ("w8a8", "w4a16") for f in formats):
        names += ["llmcompressor", "compressed-tensors"]
    out = {}
    for p in names:
        try:
            out[p] = pkg_version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def check_gate(ctx: StageContext) -> dict[str, Any]:
    """The quality gate on evaluate's scores, the regression part against the store as it is now (one function,
    :func:`training.evaluate.gate.against_store`, computes it for both stages; export alone acts on it). Raises
    StageFailed (exit code 5) when the student fails, and StageFailed naming the store when it cannot be read."""
    cfg, ecfg = ctx.recipe.export, ctx.recipe.evaluate
    scores = json.loads((ctx.inputs["evaluate"] / "scores.json").read_text())
    try:
        result = gate.against_store(scores["functions"], ecfg.gate, scores.get("quality_metric", ecfg.quality),
                                    cfg.store, cfg.model_name, strict=True,
                                    golden=(scores.get("golden") or {}).get("functions"))
    except gate.StoreUnreadable as err:
        raise StageFailed("export", str(err)) from err.__cause__
    (ctx.work / "gate.json").write_text(json.dumps(result, indent=2) + "\n")
    if not result["passed"]:
        raise StageFailed(
            "export",
            "the student failed the quality gate and was not published:\n  " + "\n  ".join(result["failures"])
            + "\n(evaluate.gate in the recipe sets the limits; details in "
            f"{ctx.run.path / '.partial' / 'export' / 'gate.json'})",
            exit_code=gate.EXIT_GATE_FAILED,
        )
    return result


def _copy_policy(route_dir: Path, art: Path) -> dict[str, str]:
    """routing_policy.json and every file it names, into the artefact; returns {file: sha256}."""
    if (route_dir / "tokenizer.json").read_bytes() != (art / "tokenizer.json").read_bytes():
        raise RuntimeError("the routing policy was fitted with another tokenizer than the exported student's")
    policy = json.loads((route_dir / "routing_policy.json").read_text())
    copied = {"routing_policy.json": sha256_file(route_dir / "routing_policy.json")}
    shutil.copyfile(route_dir / "routing_policy.json", art / "routing_policy.json")
    for rel, want in (policy.get("files") or {}).items():
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or not rel:
            raise RuntimeError(f"routing_policy.json names a file outside the route folder: {rel!r}")
        src = route_dir / p
        if not src.is_file():
            raise RuntimeError(f"routing_policy.json names {rel}, which the route stage did not write")
        got = sha256_file(src)
        if want and got != want:
            raise RuntimeError(f"{rel} in the route folder does not match the sha256 in routing_policy.json")
        if (art / p).exists() and sha256_file(art / p) == got:
            copied[rel] = got
            continue
        (art / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, art / p)
        copied[rel] = got
    return copied


def _routed_cost(route_dir: Path, route_manifest: dict[str, Any] | None, cost: dict[str, Any]) -> dict[str, Any]:
    """Cost per 1,000 requests of the routed blend, from the operating point route measured on held-out traffic
    (requests the student tried and escalated pay for both models)."""
    policy = json.loads((route_dir / "routing_policy.json").read_text())
    op = policy.get("operating_point") or (route_manifest or {}).get("operating_point") or {}
    share = op.get("student_share")
    routed = op.get("cost_per_1k_routed_usd", op.get("cost_per_1k_routed"))
    if routed is None and share is not None:
        routed = share * cost["student"] + (1 - share) * cost["teacher"]
    out = {**cost, "routed": routed, "routed_student_share": share}
    for key, name in (("cost_per_1k_routed_usd_ci", "routed_ci"), ("student_share_ci", "routed_student_share_ci")):
        if op.get(key) is not None:
            out[name] = op[key]
    if routed is not None and cost.get("teacher"):
        out["routed_saving"] = 1 - routed / cost["teacher"]
    return out


def _calibration_texts(curate_dir: Path, tokenizer, n: int, seed: int) -> list[str]:
    """``n`` curated training examples (prompt and teacher answer) in the chat format, chosen by seed."""
    from pipeline.chat import training_messages

    records = from_table(pq.read_table(curate_dir / "train.parquet"))
    chosen = random.Random(seed).sample(records, min(n, len(records)))
    return [tokenizer.apply_chat_template(training_messages(r), tokenize=False) for r in chosen]


def _evaluate(model, tokenizer, records, ecfg, progress, label: str, metric: str) -> dict[str, Any]:
    """An artefact's answers to ``records`` (the columns the comparison needs) and the seconds they took."""
    rows, wall = evaluate_model(model, tokenizer, records, ecfg, progress, label, metric=metric)
    return {"rows": [{k: r[k] for k in ("id", "function", "prediction", "quality", "exact_match")} for r in rows],
            "seconds": wall}


def _compare(rows: list[dict[str, Any]], master_rows: list[dict[str, Any]], ecfg, seed: int) -> dict[str, Any]:
    """Quality of an artefact's answers and its change against the master's on the same records (points), with
    a paired bootstrap interval of the change."""
    q = [r["quality"] for r in rows]
    m = [r["quality"] for r in master_rows]
    pairs = [(a, b) for a, b in zip(q, m, strict=True) if a is not None and b is not None]
    quality = sum(a for a, _ in pairs) / len(pairs) if pairs else None
    master = sum(b for _, b in pairs) / len(pairs) if pairs else None
    out = {
        "quality": quality,
        "points_vs_master": None if quality is None else 100 * (quality - master),
        "agreement_with_master": sum(a["prediction"] == b["prediction"] for a, b in zip(rows, master_rows, strict=True))
        / len(rows),
        "functions": {},
    }
    ci = eval_tables.bootstrap_ci([100 * (a - b) for a, b in pairs], ecfg.bootstrap, ecfg.confidence, seed)
    if ci:
        out["points_vs_master_ci"] = ci
    fns = sorted({r["function"] for r in rows})
    for fn in fns:
        xs = [r["quality"] for r in rows if r["function"] == fn and r["quality"] is not None]
        out["functions"][fn] = sum(xs) / len(xs) if xs else None
    return out


@dataclass
class Master:
    """The merged master, saved at the top of the version folder."""

    folder: Path
    tokenizer: Any
    reload_diff: float  # max difference between the saved weights and the merged model's (0.0)
    policy_files: dict[str, str]  # routing_policy.json and every file it names, with their sha256
    usage: dict[str, Any] = field(default_factory=dict)  # generation settings and system prompts (model card)


@dataclass
class Job:
    """What the steps after the master share: the records every artefact answers again, the metric their
    answers are scored on, and what goes into every artefact."""

    ctx: StageContext
    master: Master
    scores: dict[str, Any]  # evaluate's scores.json
    metric: str  # an agreement metric: the LLM judge is not called again for each artefact
    records: list[dict[str, Any]]
    calibration: list[str] | None  # llm-compressor's calibration texts (w8a8, w4a16)
    lineage: dict[str, Any]
    gguf_meta: dict[str, Any]

    @property
    def evals(self) -> Path:  # one JSON per artefact: a rerun of an interrupted export reuses them
        return self.ctx.work / "evals"

    @property
    def flagged(self) -> Path:
        return self.ctx.work / "flagged"

    @property
    def build(self) -> Path:
        return self.ctx.work / "build"


def make_master(ctx: StageContext) -> Master:
    """1. The master: merged, in the recipe's dtype, saved and checked to reproduce the merged model, with the
    routing policy beside it."""
    import torch

    cfg = ctx.recipe.export
    model, tokenizer = load_trained_student(ctx.inputs["train"], merge=True)
    model = model.to(getattr(torch, cfg.dtype))
    art = ctx.work / cfg.model_name
    art.mkdir(exist_ok=True)
    model.save_pretrained(art, safe_serialization=True)
    tokenizer.save_pretrained(art)
    diff = _reload_check(model, art)
    if diff != 0.0:
        raise RuntimeError(f"the saved master does not hold the merged weights (max difference {diff:.3g})")
    del model
    use = usage(tokenizer, ctx.recipe.evaluate.max_new_tokens, system_prompts(ctx.inputs["curate"] / "train.parquet"))
    write_generation_config(art, use)  # what reproduces the evaluated answers: greedy, max_new_tokens, stop
    return Master(art, tokenizer, diff, _copy_policy(ctx.inputs["route"], art), use)


def plan(ctx: StageContext, master: Master) -> Job:
    """The records, the metric, the calibration texts and the GGUF metadata every artefact gets."""
    cfg, ecfg = ctx.recipe.export, ctx.recipe.evaluate
    scores = json.loads((ctx.inputs["evaluate"] / "scores.json").read_text())
    metric = scores.get("quality_metric", ecfg.quality)
    records = from_table(pq.read_table(ctx.inputs["curate"] / "test.parquet"))
    records = records[: min(ecfg.max_records or len(records), cfg.max_eval_records or len(records))]
    (ctx.work / "evals").mkdir(exist_ok=True)
    calibration = None
    if any(f in ("w8a8", "w4a16") for f in cfg.formats):
        calibration = _calibration_texts(ctx.inputs["curate"], master.tokenizer, cfg.calibration_samples,
                                         ctx.recipe.seed)
    lineage = _lineage(ctx)
    gguf_meta = {"description": f"distilled student of {', '.join(lineage['teacher_models']) or 'a teacher'}",
                 "license": cfg.license, "tags": ["distill"],
                 "base_model": None if lineage["base_model"] == "built from config" else lineage["base_model"],
                 "distill": {"recipe_sha256": lineage["recipe_sha256"], "data_sha256": lineage["data_sha256"],
                             "teacher_models": ",".join(lineage["teacher_models"])}}
    return Job(ctx, master, scores, "auto" if metric == "judge" else metric, records, calibration, lineage, gguf_meta)


def evaluate_master(job: Job, progress) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """2. The master evaluated again (in its stored dtype) against the student evaluate scored; returns its
    artefact entry and its answers. Raises StageFailed (exit code 5) when the dtype cost too much quality."""
    import torch

    ctx, cfg, ecfg = job.ctx, job.ctx.recipe.export, job.ctx.recipe.evaluate
    evaluated = pq.read_table(ctx.inputs["evaluate"] / "predictions.parquet").to_pylist()[: len(job.records)]
    for r in evaluated:
        r["quality"] = metrics.quality(r, job.metric)
    cached = job.evals / "master.json"
    if not cached.is_file():
        if (cfg.dtype == "float32" and student_info(ctx.inputs["train"])["method"] == "full"
                and not torch.cuda.is_available()):
            # The very float32 weights evaluate scored (no adapter folded in), on the same device: its answers
            # are the master's.
            master_eval = {"rows": [{k: r[k] for k in ("id", "function", "prediction", "quality", "exact_match")}
                                    for r in evaluated], "seconds": 0.0, "reused": "evaluate"}
        else:
            master_model = quantize.load("master", job.master.folder, cfg.model_name)
            master_eval = _evaluate(master_model, job.master.tokenizer, job.records, ecfg, progress, "master",
                                    job.metric)
            del master_model
        cached.write_text(json.dumps(master_eval))
    master_eval = json.loads(cached.read_text())
    cmp = _compare(master_eval["rows"], evaluated, ecfg, ctx.recipe.seed)
    entry = {"format": "master", "path": ".", "dtype": cfg.dtype,
             "bytes": quantize.weight_bytes("master", job.master.folder),
             "total_bytes": _folder_bytes(job.master.folder, exclude_dirs=True), "size_vs_master": 1.0,
             "quality": cmp["quality"], "points_vs_master": 0.0,
             "points_vs_evaluated_student": cmp["points_vs_master"],
             "agreement_with_evaluated_student": cmp["agreement_with_master"],
             "functions": cmp["functions"], "flagged": False, "published": True,
             "eval_seconds": master_eval["seconds"],
             "evaluation": "answers of the evaluate stage (identical float32 weights)"
             if master_eval.get("reused") else "evaluated again"}
    allowed = cfg.max_points_lost
    if cmp["points_vs_master"] is not None and -cmp["points_vs_master"] > allowed + 1e-9:
        raise StageFailed("export", f"the {cfg.dtype} master loses {-cmp['points_vs_master']:.1f} points "
                                    f"against the evaluated student (allowed {allowed:g}); export in float32 "
                                    "(export.dtype) or raise export.max_points_lost",
                          exit_code=gate.EXIT_GATE_FAILED)
    return entry, master_eval["rows"]


def make_format(job: Job, fmt: str, master_rows: list[dict[str, Any]], master_bytes: int, progress) -> dict[str, Any]:
    """3. One format, made from the master and evaluated again on the same records; flagged (kept aside, not
    published) when it loses more than the format's allowance against the master. Returns its artefact entry."""
    import torch

    ctx, cfg, art = job.ctx, job.ctx.recipe.export, job.master.folder
    done = job.evals / f"{fmt}.json"
    if done.is_file() and ((art / fmt).is_dir() or (job.flagged / fmt).is_dir()):
        return json.loads(done.read_text())
    task = progress.add_task(f"{fmt}: quantize", total=None)
    out = job.build / fmt
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    quantize.make(fmt, art, out, name=cfg.model_name, dtype=getattr(torch, cfg.dtype), calibration=job.calibration,
                  max_length=student_info(ctx.inputs["train"]).get("max_length", ctx.recipe.train.max_length),
                  metadata=job.gguf_meta)
    made_s = time.perf_counter() - t0
    progress.remove_task(task)
    qmodel = quantize.load(fmt, out, cfg.model_name)
    with quantize.quiet():
        ev = _evaluate(qmodel, job.master.tokenizer, job.records, ctx.recipe.evaluate, progress, fmt, job.metric)
    del qmodel
    cmp = _compare(ev["rows"], master_rows, ctx.recipe.evaluate, ctx.recipe.seed)
    limit = cfg.points_allowed(fmt)
    lost = -cmp["points_vs_master"] if cmp["points_vs_master"] is not None else 0.0
    flagged = lost > limit + 1e-9
    wbytes = quantize.weight_bytes(fmt, out)
    entry = {
        "format": fmt, "path": f"{fmt}/" + (quantize.gguf_file(fmt, cfg.model_name) if fmt.startswith("gguf-")
                                            else ""),
        "needs_extra": FORMATS[fmt], "bytes": wbytes, "total_bytes": _folder_bytes(out),
        "size_vs_master": wbytes / master_bytes, **{k: v for k, v in cmp.items()},
        "allowed_points_lost": limit, "flagged": flagged, "published": not flagged,
        "make_seconds": made_s, "eval_seconds": ev["seconds"],
    }
    if flagged:
        entry["why"] = (f"loses {lost:.2f} points against the master (allowed {limit:g}): not published; "
                        f"kept in {ctx.run.stage_dir('export') / 'flagged' / fmt}")
    dest = (job.flagged if flagged else art) / fmt
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(str(out), str(dest))
    done.write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def publish_version(job: Job, gate_result: dict[str, Any], artefacts: list[dict[str, Any]]) -> StageResult:
    """4. The card, the manifest, the store."""
    import torch

    ctx, cfg, ecfg, art, scores = job.ctx, job.ctx.recipe.export, job.ctx.recipe.evaluate, job.master.folder, job.scores
    cost = _routed_cost(ctx.inputs["route"], ctx.run.manifest("route"), scores["cost_per_1k_requests_usd"])
    published_arts = [a for a in artefacts if a["published"]]
    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "format": f"safetensors ({cfg.dtype})",
        "lineage": job.lineage,
        "scores": {k: scores[k] for k in ("quality_metric", "quality_description", "bootstrap", "overall", "functions",
                                          "by_length", "by_language", "tokens", "latency_ms") if k in scores}
                  | {"cost_per_1k_requests_usd": cost},
        "gate": gate_result,
        "artefacts": published_arts,
        "flagged": [a for a in artefacts if a["flagged"]],
        "evaluation": {"records": len(job.records), "max_new_tokens": ecfg.max_new_tokens,
                       "quality_metric": job.metric,
                       "compute": "float32 on CPU" if not torch.cuda.is_available() else "the artefact's dtype on GPU"},
        "reload_max_weight_diff": job.master.reload_diff,
        "routing_policy_sha256": job.master.policy_files["routing_policy.json"],
        "routing_policy_files": job.master.policy_files,
        "packages": _packages(cfg.formats),
    }
    card_meta = {k: meta[k] for k in ("lineage", "scores", "gate", "artefacts", "routing_policy_sha256")}
    card_meta["usage"] = job.master.usage
    card_meta["gate"] = {"passed": gate_result["passed"]}  # the card holds nothing that changes on a rerun
    (art / "README.md").write_text(model_card(cfg.model_name, card_meta, cfg.intended_use, cfg.license))
    (art / "report.html").write_text(render_run(ctx.run.path, ctx.recipe, pending_export=meta), encoding="utf-8")
    version = publish(cfg.store, cfg.model_name, art, meta, signing_key=_signing_key())
    (ctx.work / "published.json").write_text(json.dumps({"store": cfg.store, "name": cfg.model_name,
                                                         "version": version}, indent=2) + "\n")
    return StageResult(
        counts={"bytes": _folder_bytes(art), "files": sum(1 for p in art.rglob("*") if p.is_file()),
                "formats": len(published_arts) - 1, "flagged": len(meta["flagged"])},
        summary=_summary(cfg, artefacts, job.lineage, version, cost),
        extra={"lineage": job.lineage, "published": {"store": cfg.store, "name": cfg.model_name, "version": version},
               "artefacts": [{k: a.get(k) for k in ("format", "bytes", "size_vs_master", "quality",
                                                    "points_vs_master", "flagged")} for a in artefacts],
               "cost_per_1k_requests_usd": cost},
    )


def run(ctx: StageContext) -> StageResult:
    from pipeline.hf import quiet_hf

    quiet_hf()
    quantize.check_extras(ctx.recipe.export.formats)  # before any work: a missing extra is named at once
    gate_result = check_gate(ctx)
    job = plan(ctx, make_master(ctx))
    with stage_progress(ctx.console, "export") as progress:
        master_entry, master_rows = evaluate_master(job, progress)
        artefacts = [master_entry] + [make_format(job, fmt, master_rows, master_entry["bytes"], progress)
                                      for fmt in ctx.recipe.export.formats]
    shutil.rmtree(job.build, ignore_errors=True)
    return publish_version(job, gate_result, artefacts)


def _lineage(ctx: StageContext) -> dict[str, Any]:
    info = student_info(ctx.inputs["train"])
    train_table = pq.read_table(ctx.inputs["curate"] / "train.parquet", columns=["teacher"])
    teachers = sorted({t["model"] for t in train_table.column("teacher").to_pylist() if t and t.get("model")})
    return {
        "recipe": ctx.recipe.name,
        "recipe_sha256": digest(ctx.recipe.model_dump(mode="json")),
        "data_sha256": ctx.run.manifest("curate")["outputs"]["train.parquet"],
        "test_data_sha256": ctx.run.manifest("curate")["outputs"].get("test.parquet"),
        "base_model": info["base"],
        "base_revision": info.get("base_revision"),
        "method": info["method"],
        "teacher_models": teachers,
        "train_records": info["train_records"],
        "train_fingerprint": ctx.run.manifest("train")["fingerprint"],
    }


def _folder_bytes(folder: Path, exclude_dirs: bool = False) -> int:
    files = folder.iterdir() if exclude_dirs else folder.rglob("*")
    return sum(p.stat().st_size for p in files if p.is_file())


def _summary(cfg, artefacts, lineage, version, cost) -> list[tuple[str, str]]:
    out = []
    for a in artefacts:
        pts = a.get("points_vs_master")
        q = "-" if a.get("quality") is None else f"{100 * a['quality']:.1f}%"
        change = "" if a["format"] == "master" or pts is None else f" ({pts:+.2f} points vs master)"
        state = ("[bold red]flagged, not published[/]: " + a["why"]) if a["flagged"] else "published"
        out.append((a["format"], f"{a['bytes'] / 1e6:.2f} MB ({a['size_vs_master']:.2f}x), quality {q}{change}, "
                                 f"{state}"))
    out.append(("master dtype", f"{cfg.dtype}; the saved copy holds exactly the merged weights"))
    if cost.get("routed") is not None:
        out.append(("cost / 1k requests", f"teacher ${cost['teacher']:.4f}, student ${cost['student']:.4f}, routed "
                                          f"${cost['routed']:.4f} ({100 * (cost['routed_student_share'] or 0):.0f}% "
                                          "to the student)"))
    out.append(("published", f"{cfg.store}/{cfg.model_name}/{version} (latest -> {version})"))
    out.append(("lineage", f"base {lineage['base_model']}, teacher {', '.join(lineage['teacher_models']) or '?'}, "
                           f"data {lineage['data_sha256'][:12]}"))
    out.append(("pull", f"distill pull {cfg.store} {cfg.model_name}@{version} DEST"))
    return out
