"""The route stage: fit ``routing_policy.json`` on the held-out results of this run's own student.

Per function trained on, rules in two phases:

- before generation: the input's length in student tokens (at most the training inputs' ``length_quantile``),
  its language (one the function was trained on, fastText lid.176), its distance from the training inputs
  (cosine distance to the k-th nearest MiniLM embedding, at most the ``distance.quantile`` of held-out
  in-domain inputs);
- after generation: a confidence signal of the student's own answer (token-logprob statistics or top-k
  entropy; ``auto`` picks per function the one with the largest area under the quality-vs-share curve) and a
  threshold chosen on the test split so that routed quality (student answers where kept, the teacher's
  elsewhere, scored against the teacher) stays within ``route.tolerance`` while the student's share is largest;
  with ``guarantee: lower_bound`` it is the bootstrap lower bound of routed quality that must stay within.

Writes ``routing_policy.json`` (its shape: ``export.route.policy.RoutingPolicy``), the files the Router needs
beside it (``tokenizer.json``, ``routing/lid.176.ftz``, ``routing/embeddings.safetensors``), gateway configs
(``routing/litellm.yaml``, ``routing/tensorzero.toml``), ``calibration.json`` (per function: every signal's curve
area, the whole curve of routed quality against student share with bootstrap intervals) and ``heldout.parquet``
(each held-out record's signals and decisions). The Router is replayed on the held-out records and must reproduce
the calibration.

The work is in the room's modules: ``rules`` (the pre-generation rules), ``scoring`` (the student's top-k logprobs),
``calibrate`` and ``thresholds`` (signal, threshold, operating point), ``drift`` (the route-check reference),
``gateways`` (LiteLLM and TensorZero configs) and ``router`` (the Router that applies the policy).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from export.route.drift import drift_reference
from export.route.gateways import (
    NOT_EXPRESSED,
    litellm_config,
    litellm_counter,
    litellm_limits,
    tensorzero_config,
    vllm_sr_config,
)
from export.route.policy import EXTRAS, POLICY_FILE, POLICY_SCHEMA, RoutingPolicy
from export.route.router import Decision, Router
from export.route.rules import BeforeFit, fit_distance, fit_language, fit_length
from export.route.scoring import score_answers
from export.route.signals import LANGUAGE_MODEL, TokenCounter, all_signals
from export.route.thresholds import Fitted, answer_quality, calibrate_functions, operating_point
from pipeline.record import from_table
from pipeline.rundir import sha256_file
from pipeline.stages import StageContext, StageResult
from pipeline.ui import stage_progress

# The stage's contract (pipeline/stages.py): the policy names the student it is published with.
READS = ("curate", "train", "evaluate")
ALSO_READS = ("export.model_name",)
# It also reads evaluate.teacher_price and student_price for the routed cost: a change reruns evaluate, whose
# scores.json (an input of route) then changes, so route reruns too.


@dataclass
class Heldout:
    """What the stage reads: the student's tokenizer, the training records per function, and the evaluated test
    records (``preds``, in evaluate's order) with their inputs."""

    encode: Callable[[str], list[int]]
    counter: TokenCounter
    train: list[dict[str, Any]]
    trained: dict[str, list[dict[str, Any]]]  # function -> training records
    test: dict[str, dict[str, Any]]  # id -> test record
    preds: list[dict[str, Any]]
    by_fn: dict[str, list[int]]  # function -> indices into preds
    heldout_inputs: dict[str, list[dict[str, Any]]]  # function -> val and test records


def read_inputs(ctx: StageContext) -> Heldout:
    """Copies the student's tokenizer.json beside the policy and reads curate's splits and evaluate's predictions."""
    train_dir, curate_dir, eval_dir = ctx.inputs["train"], ctx.inputs["curate"], ctx.inputs["evaluate"]
    tok_src = next(p for p in (train_dir / "model" / "tokenizer.json", train_dir / "adapter" / "tokenizer.json")
                   if p.is_file())
    shutil.copyfile(tok_src, ctx.work / "tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ctx.work / "tokenizer.json"))
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    train = from_table(pq.read_table(curate_dir / "train.parquet", columns=["function", "messages", "teacher"]))
    test = {r["id"]: r for r in from_table(pq.read_table(curate_dir / "test.parquet",
                                                         columns=["id", "function", "messages"]))}
    val = from_table(pq.read_table(curate_dir / "val.parquet", columns=["id", "function", "messages"]))
    preds = [p for p in pq.read_table(eval_dir / "predictions.parquet").to_pylist() if p["id"] in test]
    trained: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in train:
        trained[r["function"]].append(r)
    by_fn: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(preds):
        by_fn[p["function"]].append(i)
    heldout_inputs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in [*val, *test.values()]:
        heldout_inputs[r["function"]].append(r)
    return Heldout(encode, TokenCounter(encode), train, trained, test, preds, by_fn, heldout_inputs)


def replay_before(data: Heldout, fit: BeforeFit, cfg) -> tuple[list[Decision], int]:
    """The pre-generation rules replayed on the test records by the Router itself, and with length.count
    'estimate' how many of its decisions differ from exact counting."""
    draft = {"schema": POLICY_SCHEMA, "tokenizer": None, "unknown_function": "teacher",
             "length": {"count": cfg.length_count}, "language": fit.language_meta, "distance": fit.distance_meta,
             "functions": {fn: {"enabled": True, "before": b, "after": {"signal": "min_logprob", "threshold": None}}
                           for fn, b in fit.rules.items()}}
    helpers = {"language": fit.detector, "embed": fit.embedder, "reference": fit.reference}
    replay = Router(draft, data.encode, **helpers)
    exact_router = Router({**draft, "length": {"count": "exact"}}, data.encode, **helpers)

    def before(router: Router, p: dict[str, Any]) -> Decision:
        return router.before({"messages": data.test[p["id"]]["messages"]}, p["function"],
                             embedding=fit.heldout_vecs.get(p["id"]))

    befores = [before(replay, p) for p in data.preds]
    disagree = sum(b.to_student != before(exact_router, p).to_student
                   for p, b in zip(data.preds, befores, strict=True)) if cfg.length_count == "estimate" else 0
    return befores, disagree


def confidence_logprobs(ctx: StageContext, data: Heldout, progress) -> tuple[list, list, dict[str, Any] | None]:
    """The student's token logprobs per held-out answer and, with ``route.top_logprobs > 0``, the top-k there
    (by scoring the answers again), with how the rescoring agrees with evaluate's logprobs."""
    preds, k = data.preds, ctx.recipe.route.top_logprobs
    if k <= 0:
        return [list(p["logprobs"] or []) for p in preds], [None] * len(preds), None
    chosen, tops, aligned = score_answers(ctx.inputs["train"], [data.test[p["id"]] for p in preds],
                                          [p["prediction"] or "" for p in preds],
                                          [len(p["logprobs"] or []) for p in preds], k, progress)
    diffs = [abs(a - b) for p, c in zip(preds, chosen, strict=True) if len(p["logprobs"] or []) == len(c)
             for a, b in zip(p["logprobs"], c, strict=True)]
    return chosen, tops, {"aligned_records": aligned, "records": len(preds),
                          "max_abs_logprob_diff_vs_evaluate": max(diffs) if diffs else None}


def write_policy(ctx: StageContext, data: Heldout, fit: BeforeFit, fitted: Fitted, op: dict[str, Any],
                 drift: dict[str, Any]) -> dict[str, Any]:
    """routing_policy.json and the gateway configs beside it; returns the policy as written."""
    cfg, work = ctx.recipe.route, ctx.work
    teachers = sorted({t["model"] for t in (r["teacher"] for r in data.train) if t and t.get("model")})
    policy = RoutingPolicy(
        schema=POLICY_SCHEMA, created_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        student={"name": ctx.recipe.export.model_name, "train_fingerprint": ctx.run.manifest("train")["fingerprint"]},
        teacher={"models": teachers},
        quality={"metric": cfg.quality_metric, "tolerance": cfg.tolerance, "guarantee": cfg.guarantee,
                 "confidence_level": cfg.confidence_level},
        tokenizer={"file": "tokenizer.json", "sha256": sha256_file(work / "tokenizer.json")},
        length={"count": cfg.length_count}, language=fit.language_meta, embedder=fit.embedder_meta,
        distance=fit.distance_meta, confidence={"top_logprobs": cfg.top_logprobs}, unknown_function="teacher",
        functions=fitted.functions, operating_point=op, drift=drift,
    ).to_json_dict()
    gw = cfg.gateway
    student_model = gw.student_model or ctx.recipe.export.model_name
    # LiteLLM checks input length in its own count: the limits are calibrated into it on the held-out inputs
    # (where litellm is installed; else they stay in student tokens and the config says so).
    gateway_count = litellm_counter()
    limits = litellm_limits(policy, {fn: [r["messages"] for r in rs] for fn, rs in data.heldout_inputs.items()},
                            data.counter.exact, gateway_count) if gateway_count else None
    (work / EXTRAS / "litellm.yaml").write_text(litellm_config(policy, gw, student_model, limits))
    (work / EXTRAS / "vllm-sr.yaml").write_text(vllm_sr_config(policy, gw, student_model))
    (work / EXTRAS / "tensorzero.toml").write_text(tensorzero_config(policy, gw, student_model))
    names = ["tokenizer.json", *(f"{EXTRAS}/{f}" for f in (LANGUAGE_MODEL, "embeddings.safetensors", "litellm.yaml",
                                                              "vllm-sr.yaml", "tensorzero.toml"))]
    policy = RoutingPolicy.model_validate({
        **policy,
        "gateways": {f"{EXTRAS}/litellm.yaml": {"not_expressed": NOT_EXPRESSED["litellm"]},
                     f"{EXTRAS}/vllm-sr.yaml": {"not_expressed": NOT_EXPRESSED["vllm_sr"]},
                     f"{EXTRAS}/tensorzero.toml": {"not_expressed": NOT_EXPRESSED["tensorzero"]}},
        "files": {f: sha256_file(work / f) for f in names if (work / f).is_file()},
    }).to_json_dict()
    (work / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")
    return policy


def replay_router(ctx: StageContext, data: Heldout, fit: BeforeFit, policy: dict[str, Any], fitted: Fitted,
                  quality: np.ndarray, chosen: list, tops: list, sig: list[dict[str, float]]) -> None:
    """The Router, loaded from what was written, must reproduce the calibration; heldout.parquet holds each held-out
    record's signals and decision."""
    Router.load(ctx.work, language=fit.detector is not None, embeddings=False)
    router = Router(policy, data.encode, language=fit.detector, embed=fit.embedder, reference=fit.reference)
    rows = []
    for i, p in enumerate(data.preds):
        req = {"messages": data.test[p["id"]]["messages"], "metadata": {"function": p["function"]}}
        b = router.before(req, embedding=fit.heldout_vecs.get(p["id"]))
        lp = ([{"logprob": c, "top_logprobs": [{"logprob": x} for x in t]} for c, t in zip(chosen[i], tops[i],
                                                                                              strict=True)]
              if tops[i] else chosen[i])
        d = router.after(req, lp, before=b) if b.to_student else b
        if d.to_student != bool(fitted.kept[i]):
            raise RuntimeError(f"the Router does not reproduce the calibration on held-out record {p['id']}: "
                               f"{d.reasons}")
        rows.append({"id": p["id"], "function": p["function"], "quality": float(quality[i]),
                     "route": d.route, "phase": d.phase, "reasons": d.reasons,
                     "input_tokens": d.signals.get("input_tokens"), "language": d.signals.get("language"),
                     "distance": d.signals.get("distance"), "logprobs": chosen[i], "top_logprobs": tops[i],
                     "signals": json.dumps({k: (v if math.isfinite(v) else None) for k, v in sig[i].items()})})
    pq.write_table(pa.Table.from_pylist(rows), ctx.work / "heldout.parquet")


def summary(ctx: StageContext, policy: dict[str, Any], length_disagree: int) -> list[tuple[str, str]]:
    cfg, op = ctx.recipe.route, policy["operating_point"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    ci = lambda v: f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]"  # noqa: E731
    out = []
    for fn, f in policy["functions"].items():
        c = f.get("calibration")
        if not f["enabled"]:
            out.append((fn, f"teacher only: {f['why']}"))
            continue
        thr = f["after"]["threshold"]
        out.append((fn, f"{pct(c['student_share'])} {ci(c['student_share_ci'])} to the student, routed "
                        f"{cfg.quality_metric} {pct(c['routed_quality'])} {ci(c['routed_quality_ci'])}; "
                        f"{c['signal']} >= {'any' if thr is None else f'{thr:.3f}'}; escalated before "
                        f"{pct(c['escalated_before'])}, after {pct(c['escalated_after'])}"))
    out += [
        ("overall", f"{pct(op['student_share'])} of held-out traffic to the student, routed {cfg.quality_metric} "
                    f"{pct(op['routed_quality'])} (teacher 100%, tolerance {100 * cfg.tolerance:g} points)"),
        ("cost / 1k requests", f"routed ${op['cost_per_1k_routed_usd']:.4f} vs teacher-only "
                               f"${op['cost_per_1k_teacher_usd']:.4f}"),
        ("policy", str(ctx.run.stage_dir("route") / POLICY_FILE)),
        ("serve", f"distill serve-router {ctx.run.stage_dir('route')} --student-url URL --teacher-url URL"),
    ]
    if length_disagree:
        out.append(("length estimate", f"{length_disagree} held-out decisions differ from exact counting"))
    return out


def run(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.recipe.route, ctx.recipe.seed
    (ctx.work / EXTRAS).mkdir(exist_ok=True)
    data = read_inputs(ctx)
    fit = fit_length(data.trained, data.counter, data.encode, cfg.length_quantile)
    with stage_progress(ctx.console, "route") as progress:
        if cfg.language.enabled:
            fit_language(fit, data.trained, cfg.language, ctx.work, progress)
        if cfg.distance.enabled:
            fit_distance(fit, data.trained, data.heldout_inputs, cfg.distance, seed, ctx.work, progress)
        befores, length_disagree = replay_before(data, fit, cfg)
        chosen, tops, rescore = confidence_logprobs(ctx, data, progress)
    quality = np.array([answer_quality(p, cfg.quality_metric) for p in data.preds], dtype=np.float64)
    sig = [all_signals(c, t) for c, t in zip(chosen, tops, strict=True)]
    to_student = [b.to_student for b in befores]
    fitted = calibrate_functions(fit.rules, data.by_fn, quality, np.array(to_student, dtype=bool), sig, cfg, seed)
    scores = json.loads((ctx.inputs["evaluate"] / "scores.json").read_text())
    op = operating_point(fitted, data.preds, to_student, quality, ctx.recipe.evaluate.teacher_price,
                         scores["cost_per_1k_requests_usd"]["student"] / 1000, cfg, seed)
    held_tokens = {fn: [data.counter.exact(r["messages"]) for r in data.heldout_inputs.get(fn, [])]
                   for fn in fitted.functions}
    drift = drift_reference(list(fitted.functions), data.by_fn, to_student, fitted.kept, held_tokens,
                            fit.heldout_dist, fit.train_languages)
    policy = write_policy(ctx, data, fit, fitted, op, drift)
    (ctx.work / "calibration.json").write_text(json.dumps({
        "quality_metric": cfg.quality_metric, "tolerance": cfg.tolerance, "guarantee": cfg.guarantee,
        "confidence_level": cfg.confidence_level, "bootstrap": cfg.bootstrap, "rescoring": rescore,
        "length_estimate_disagreements": length_disagree, "notes": fit.notes, "operating_point": op,
        "functions": fitted.calibration}, indent=2) + "\n")
    replay_router(ctx, data, fit, policy, fitted, quality, chosen, tops, sig)
    return StageResult(
        counts={"functions": len(policy["functions"]), "student_share": op["student_share"]},
        summary=summary(ctx, policy, length_disagree),
        extra={"operating_point": {"student_share": op["student_share"], "routed_quality": op["routed_quality"],
                                   "cost_per_1k_routed": op["cost_per_1k_routed_usd"],
                                   "cost_per_1k_teacher": op["cost_per_1k_teacher_usd"]}},
    )
