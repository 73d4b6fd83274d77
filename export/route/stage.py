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

Writes ``routing_policy.json`` (schema in export/router.py), the files the Router needs beside it
(``tokenizer.json``, ``routing/lid.176.ftz``, ``routing/embeddings.safetensors``), gateway configs
(``routing/litellm.yaml``, ``routing/tensorzero.toml``), ``calibration.json`` (per function: every signal's curve area, the whole curve of routed
quality against student share with bootstrap intervals) and ``heldout.parquet`` (each held-out record's
signals and decisions). The Router is replayed on the held-out records and must reproduce the calibration.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from export.route import calibrate
from export.route.calibrate import choose_threshold  # noqa: F401  (public API: re-exported)
from export.route.gateways import NOT_EXPRESSED, litellm_config, tensorzero_config
from export.route.router import POLICY_FILE, POLICY_SCHEMA, Router
from export.route.signals import (
    CACHED_ROLES,
    ENTROPY_SIGNALS,
    LANGUAGE_MODEL,
    SIGNALS,
    LanguageDetector,
    TokenCounter,
    all_signals,
    bundled_language_model,
    message_text,
    user_text,
)
from pipeline.record import from_table
from pipeline.rundir import sha256_file
from pipeline.stages import StageContext, StageResult
from pipeline.ui import stage_progress

# The stage's contract (pipeline/stages.py): the policy names the student it is published with.
READS = ("curate", "train", "evaluate")
ALSO_READS = ("export.model_name",)

EXTRAS = "routing"  # the policy's other files, in a subfolder so that no weight-file glob of the artefact sees them


def _quantile(xs: list[int], q: float) -> int:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _quality(row: dict[str, Any], metric: str) -> float:
    if metric == "field_accuracy" and row.get("field_accuracy") is not None:
        return float(row["field_accuracy"])
    if metric == "chrf":
        from sacrebleu.metrics import CHRF

        return CHRF().sentence_score(row["prediction"] or "", [row["reference"] or ""]).score / 100
    return float(bool(row["exact_match"]))


def _bins(values: list[float]) -> dict[str, Any] | None:
    """Decile bins of a reference distribution, for the population stability index in route-check."""
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    edges = sorted({float(x) for x in np.quantile(v, np.linspace(0.1, 0.9, 9), method="higher")})
    counts = np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(edges) + 1)
    return {"edges": edges, "probs": (counts / counts.sum()).tolist(), "n": len(values)}


def fit_token_estimate(samples: list[tuple[int, int, int]]) -> dict[str, Any] | None:
    """Least squares ``tokens ~ a + b * bytes + c * spaces`` over (bytes, spaces, tokens) of the training
    inputs' non-system text, with the residual range (plus one token of slack) as the bound."""
    if len(samples) < 3:
        return None
    x = np.array([[1.0, b, s] for b, s, _ in samples])
    y = np.array([t for *_, t in samples], dtype=np.float64)
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    res = y - x @ coef
    return {"coef": [float(v) for v in coef], "residual": [float(res.min()) - 1, float(res.max()) + 1],
            "fitted_on": len(samples)}


def score_answers(train_dir, records: list[dict[str, Any]], answers: list[str], n_logprobs: list[int], k: int,
                  progress=None, batch_size: int = 16) -> tuple[list[list[float]], list[list[list[float]]], int]:
    """The student's logprob of each token of its own answers and the top-k logprobs there (what an
    OpenAI-compatible server returns with ``logprobs``/``top_logprobs``), by one teacher-forced forward pass.
    Returns (chosen, top-k, records whose re-tokenized answer has as many tokens as evaluate generated)."""
    import torch

    from pipeline.chat import prompt_messages
    from pipeline.hf import quiet_hf
    from training.train.outputs import load_trained_student

    quiet_hf()
    model, tok = load_trained_student(train_dir)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    seqs, aligned = [], 0
    for r, ans, n in zip(records, answers, n_logprobs, strict=True):
        text = tok.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(ans, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None and n == len(a) + 1:
            a = [*a, tok.eos_token_id]  # the generation ended with the end-of-turn token
        aligned += n == len(a)
        seqs.append((p, a))
    chosen: list[list[float]] = []
    tops: list[list[list[float]]] = []
    task = progress.add_task("score student answers", total=len(seqs)) if progress else None
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        tail = max(len(a) for _, a in chunk) + 1
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (p, a) in enumerate(chunk):  # left padding: every answer ends at the last position
            s = p + a
            ids[j, width - len(s) :] = torch.tensor(s)
            mask[j, width - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=tail).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        top_v = logp.topk(min(k, logp.shape[-1]), dim=-1).values if k else None
        for j, (_, a) in enumerate(chunk):
            if not a:
                chosen.append([])
                tops.append([])
                continue
            at = torch.arange(tail - 1 - len(a), tail - 1)  # logits at these positions predict the answer tokens
            chosen.append(logp[j, at, torch.tensor(a)].tolist())
            tops.append(top_v[j, at].tolist() if top_v is not None else [])
        if progress:
            progress.advance(task, len(chunk))
    return chosen, tops, aligned


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.route
    work = ctx.work
    train_dir, curate_dir, eval_dir = ctx.inputs["train"], ctx.inputs["curate"], ctx.inputs["evaluate"]
    (work / EXTRAS).mkdir(exist_ok=True)
    tok_src = next(p for p in (train_dir / "model" / "tokenizer.json", train_dir / "adapter" / "tokenizer.json")
                   if p.is_file())
    shutil.copyfile(tok_src, work / "tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    counter = TokenCounter(encode)
    train = from_table(pq.read_table(curate_dir / "train.parquet", columns=["function", "messages", "teacher"]))
    test = {r["id"]: r for r in from_table(pq.read_table(curate_dir / "test.parquet",
                                                         columns=["id", "function", "messages"]))}
    val = from_table(pq.read_table(curate_dir / "val.parquet", columns=["id", "function", "messages"]))
    preds = pq.read_table(eval_dir / "predictions.parquet").to_pylist()
    preds = [p for p in preds if p["id"] in test]
    trained: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in train:
        trained[r["function"]].append(r)
    by_fn: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(preds):
        by_fn[p["function"]].append(i)
    heldout_inputs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in [*val, *test.values()]:
        heldout_inputs[r["function"]].append(r)
    notes: list[str] = []

    # ---- before generation: length --------------------------------------------------------------------------
    before_rules: dict[str, dict[str, Any]] = {}
    for fn, rows in trained.items():
        lengths, samples = [], []
        for r in rows:
            lengths.append(counter.exact(r["messages"]))
            rest = [message_text(m) for m in r["messages"] if m["role"] not in CACHED_ROLES]
            if rest and all(t.isascii() for t in rest):
                samples.append((sum(len(t) for t in rest), sum(t.count(" ") for t in rest),
                                sum(len(encode(t)) for t in rest)))
        before_rules[fn] = {"max_input_tokens": _quantile(lengths, cfg.length_quantile),
                            "token_estimate": fit_token_estimate(samples), "languages": None, "max_distance": None}

    with stage_progress(ctx.console, "route") as progress:
        # ---- before generation: language ---------------------------------------------------------------------
        detector, language_meta = None, None
        train_languages: dict[str, Counter] = {}
        if cfg.language.enabled:
            shutil.copyfile(bundled_language_model(), work / EXTRAS / LANGUAGE_MODEL)
            detector = LanguageDetector(work / EXTRAS / LANGUAGE_MODEL)
            language_meta = {"detector": "fastText lid.176.ftz (176 languages; CC BY-SA 3.0, Joulin et al. 2016)",
                             "file": f"{EXTRAS}/{LANGUAGE_MODEL}", "sha256": sha256_file(work / EXTRAS / LANGUAGE_MODEL),
                             "min_confidence": cfg.language.min_confidence}
            task = progress.add_task("detect languages", total=len(train))
            for fn, rows in trained.items():
                seen: Counter = Counter()
                for r in rows:
                    lang, p = detector(user_text(r["messages"]))
                    seen[lang if p >= cfg.language.min_confidence else "uncertain"] += 1
                progress.advance(task, len(rows))
                train_languages[fn] = seen
                before_rules[fn]["languages"] = sorted(lang for lang, c in seen.items()
                                                       if c >= cfg.language.min_records and lang != "uncertain")
        # ---- before generation: distance ---------------------------------------------------------------------
        embedder, embedder_meta, distance_meta = None, None, None
        reference: dict[str, np.ndarray] = {}
        heldout_vecs: dict[str, np.ndarray] = {}
        heldout_dist: dict[str, list[float]] = {}
        if cfg.distance.enabled:
            from safetensors.numpy import save_file

            from export.route.embedder import Embedder, knn_distance

            task = progress.add_task("embed inputs (MiniLM)", total=len(train) + sum(map(len, heldout_inputs.values())))
            embedder = Embedder()
            embedder_meta = embedder.identity
            rng = np.random.default_rng(ctx.recipe.seed)
            for fn, rows in sorted(trained.items()):
                if len(rows) > cfg.distance.max_reference:
                    rows = [rows[i] for i in sorted(rng.choice(len(rows), cfg.distance.max_reference, replace=False))]
                reference[fn] = embedder([user_text(r["messages"]) for r in rows])
                progress.advance(task, len(trained[fn]))
                held = heldout_inputs.get(fn, [])
                if held:
                    vecs = embedder([user_text(r["messages"]) for r in held])
                    heldout_vecs.update({r["id"]: v for r, v in zip(held, vecs, strict=True)})
                    dist = knn_distance(vecs, reference[fn], cfg.distance.k)
                    progress.advance(task, len(held))
                else:  # no held-out input of this function: leave-one-out distances of the training inputs
                    dist = knn_distance(reference[fn], reference[fn], cfg.distance.k, exclude_self=True)
                    notes.append(f"{fn}: no held-out inputs, distance limit from leave-one-out training distances")
                heldout_dist[fn] = dist.tolist()
                before_rules[fn]["max_distance"] = float(np.quantile(dist, cfg.distance.quantile, method="higher"))
            save_file(reference, str(work / EXTRAS / "embeddings.safetensors"))
            distance_meta = {"method": "knn-cosine", "k": cfg.distance.k, "file": f"{EXTRAS}/embeddings.safetensors",
                             "sha256": sha256_file(work / EXTRAS / "embeddings.safetensors")}

        # ---- the pre-generation rules replayed on the test records by the Router itself ----------------------
        draft = {"schema": POLICY_SCHEMA, "tokenizer": None, "unknown_function": "teacher",
                 "length": {"count": cfg.length_count},
                 "language": language_meta, "distance": distance_meta,
                 "functions": {fn: {"enabled": True, "before": b, "after": {"signal": "min_logprob", "threshold": None}}
                               for fn, b in before_rules.items()}}
        replay = Router(draft, encode, language=detector, embed=embedder, reference=reference)
        exact_router = Router({**draft, "length": {"count": "exact"}}, encode, language=detector, embed=embedder,
                              reference=reference)
        befores = [replay.before({"messages": test[p["id"]]["messages"]}, p["function"],
                                 embedding=heldout_vecs.get(p["id"])) for p in preds]
        length_disagree = sum(
            b.to_student != exact_router.before({"messages": test[p["id"]]["messages"]}, p["function"],
                                                embedding=heldout_vecs.get(p["id"])).to_student
            for p, b in zip(preds, befores, strict=True)) if cfg.length_count == "estimate" else 0

        # ---- after generation: the student's confidence signals ----------------------------------------------
        if cfg.top_logprobs > 0:
            chosen, tops, aligned = score_answers(train_dir, [test[p["id"]] for p in preds],
                                                  [p["prediction"] or "" for p in preds],
                                                  [len(p["logprobs"] or []) for p in preds], cfg.top_logprobs, progress)
            diffs = [abs(a - b) for p, c in zip(preds, chosen, strict=True) if len(p["logprobs"] or []) == len(c)
                     for a, b in zip(p["logprobs"], c, strict=True)]
            rescore = {"aligned_records": aligned, "records": len(preds),
                       "max_abs_logprob_diff_vs_evaluate": max(diffs) if diffs else None}
        else:
            chosen, tops = [list(p["logprobs"] or []) for p in preds], [None] * len(preds)
            rescore = None
    quality = np.array([_quality(p, cfg.quality_metric) for p in preds], dtype=np.float64)
    sig = [all_signals(c, t) for c, t in zip(chosen, tops, strict=True)]

    # ---- calibration per function ---------------------------------------------------------------------------
    functions: dict[str, Any] = {}
    calibration: dict[str, Any] = {}
    kept = np.zeros(len(preds), dtype=bool)
    level = cfg.confidence_level
    for fn in sorted(before_rules):
        idx = np.array(by_fn.get(fn, []), dtype=np.int64)
        rule: dict[str, Any] = {"enabled": False, "why": "", "before": before_rules[fn],
                                "after": {"signal": "min_logprob", "threshold": None}}
        functions[fn] = rule
        if len(idx) < cfg.min_records:
            rule["why"] = f"only {len(idx)} held-out records (< route.min_records {cfg.min_records})"
            continue
        q = quality[idx]
        passed = np.array([befores[i].to_student for i in idx])
        candidates = [s for s in SIGNALS if s not in ENTROPY_SIGNALS or cfg.top_logprobs > 0]
        if cfg.signal != "auto":
            candidates = [cfg.signal]
        curves = {s: calibrate.build_curve(np.array([sig[i][s] for i in idx]), q, passed) for s in candidates}
        areas = {s: calibrate.area(c) for s, c in curves.items()}
        signal = max(candidates, key=lambda s: (areas[s], -candidates.index(s)))
        curve = curves[signal]
        shares_b, routed_b = calibrate.bootstrap(curve, q, cfg.bootstrap, seed=ctx.recipe.seed)
        lower = np.quantile(routed_b, 1 - level, axis=0)
        best = calibrate.choose(curve, cfg.tolerance, lower if cfg.guarantee == "lower_bound" else None)
        point = curve.point(best)
        k = int(curve.cuts[best])
        kept[idx[curve.order[:k]]] = True
        n_pass = int(passed.sum())
        rule["after"] = {"signal": signal, "threshold": point["threshold"] if k > 0 else None}
        rule["enabled"] = k > 0
        if k == 0:
            rule["why"] = ("every held-out input failed the pre-generation rules" if n_pass == 0 else
                           f"no confidence threshold keeps routed {cfg.quality_metric} within {cfg.tolerance:g} "
                           f"of the teacher" + (" (lower confidence bound)" if cfg.guarantee == "lower_bound" else ""))
        rule["calibration"] = {
            "n": len(idx), "signal": signal,
            "student_share": point["student_share"], "student_share_ci": calibrate.interval(shares_b[:, best], level),
            "routed_quality": point["routed_quality"],
            "routed_quality_ci": calibrate.interval(routed_b[:, best], level),
            "routed_quality_lower_bound": float(lower[best]),
            "student_quality_kept": point["student_quality"] if k else None,
            "student_quality_all": float(q.mean()),
            "escalated_before": 1 - n_pass / len(idx), "escalated_after": (n_pass - k) / len(idx),
            "area": areas[signal], "ranking_skill": calibrate.ranking_skill(curve, q),
        }
        lo_b, hi_b = np.quantile(routed_b, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
        points = []
        for j in calibrate.thin(curve, {best}):
            pt = curve.point(j)
            pt["threshold"] = None if pt["threshold"] is None or math.isinf(pt["threshold"]) else pt["threshold"]
            pt["routed_quality_ci"] = [float(lo_b[j]), float(hi_b[j])]
            pt["chosen"] = j == best
            points.append(pt)
        calibration[fn] = {"n": len(idx), "n_passing_before": n_pass, "signal": signal, "areas": areas,
                           "curve": points}

    # ---- operating point over all held-out traffic ----------------------------------------------------------
    scores = json.loads((eval_dir / "scores.json").read_text())
    price = ctx.recipe.evaluate.teacher_price
    teacher_cost = np.array([((p.get("teacher_input_tokens") or 0) * price.input_per_mtok
                              + (p.get("teacher_output_tokens") or 0) * price.output_per_mtok) / 1e6 for p in preds])
    student_cost = scores["cost_per_1k_requests_usd"]["student"] / 1000
    tried = np.array([befores[i].to_student and functions.get(p["function"], {}).get("enabled", False)
                      for i, p in enumerate(preds)])
    per_request = np.where(tried, student_cost, 0.0) + np.where(kept, 0.0, teacher_cost)  # escalations pay both
    routed_q = np.where(kept, quality, 1.0)
    n_all = len(preds)
    rng = np.random.default_rng(ctx.recipe.seed)
    w = rng.multinomial(n_all, np.full(n_all, 1 / n_all), size=cfg.bootstrap).astype(np.float64) if n_all else None
    op = {
        "n": n_all,
        "student_share": float(kept.mean()) if n_all else 0.0,
        "routed_quality": float(routed_q.mean()) if n_all else 1.0,
        "teacher_quality": 1.0,
        "student_quality_all": float(quality.mean()) if n_all else None,
        "cost_per_1k_routed_usd": 1000 * float(per_request.mean()) if n_all else 0.0,
        "cost_per_1k_teacher_usd": 1000 * float(teacher_cost.mean()) if n_all else 0.0,
        "cost_per_1k_student_usd": 1000 * student_cost,
        "quality_metric": cfg.quality_metric,
    }
    if w is not None:
        op["student_share_ci"] = calibrate.interval(w @ kept / n_all, level)
        op["routed_quality_ci"] = calibrate.interval(w @ routed_q / n_all, level)
        op["cost_per_1k_routed_usd_ci"] = [1000 * x for x in calibrate.interval(w @ per_request / n_all, level)]

    # ---- what route-check compares live traffic with --------------------------------------------------------
    drift: dict[str, Any] = {"functions": {}, "function_mix": {fn: len(ix) / max(1, n_all) for fn, ix in by_fn.items()}}
    for fn in functions:
        idx = by_fn.get(fn, [])
        held_tokens = [counter.exact(r["messages"]) for r in heldout_inputs.get(fn, [])]
        n_pass = sum(befores[i].to_student for i in idx)
        drift["functions"][fn] = {
            "n": len(idx),
            "escalated_before": 1 - n_pass / len(idx) if idx else None,
            "escalated": 1 - sum(bool(kept[i]) for i in idx) / len(idx) if idx else None,
            "distance": _bins(heldout_dist.get(fn, [])),
            "input_tokens": _bins(held_tokens),
            "languages": ({lang: c / sum(train_languages[fn].values()) for lang, c in train_languages[fn].most_common()}
                          if fn in train_languages else None),
        }

    # ---- the policy, its files, the gateway configs ---------------------------------------------------------
    teachers = sorted({t["model"] for t in (r["teacher"] for r in train) if t and t.get("model")})
    policy: dict[str, Any] = {
        "schema": POLICY_SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "student": {"name": ctx.recipe.export.model_name,
                    "train_fingerprint": ctx.run.manifest("train")["fingerprint"]},
        "teacher": {"models": teachers},
        "quality": {"metric": cfg.quality_metric, "tolerance": cfg.tolerance, "guarantee": cfg.guarantee,
                    "confidence_level": level},
        "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(work / "tokenizer.json")},
        "length": {"count": cfg.length_count},
        "language": language_meta,
        "embedder": embedder_meta,
        "distance": distance_meta,
        "confidence": {"top_logprobs": cfg.top_logprobs},
        "unknown_function": "teacher",
        "functions": functions,
        "operating_point": op,
        "drift": drift,
    }
    gw = cfg.gateway
    student_model = gw.student_model or ctx.recipe.export.model_name
    (work / EXTRAS / "litellm.yaml").write_text(litellm_config(policy, gw, student_model))
    (work / EXTRAS / "tensorzero.toml").write_text(tensorzero_config(policy, gw, student_model))
    policy["gateways"] = {f"{EXTRAS}/litellm.yaml": {"not_expressed": NOT_EXPRESSED["litellm"]},
                          f"{EXTRAS}/tensorzero.toml": {"not_expressed": NOT_EXPRESSED["tensorzero"]}}
    names = ["tokenizer.json", *(f"{EXTRAS}/{f}" for f in (LANGUAGE_MODEL, "embeddings.safetensors", "litellm.yaml",
                                                              "tensorzero.toml"))]
    policy["files"] = {f: sha256_file(work / f) for f in names if (work / f).is_file()}
    (work / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")
    (work / "calibration.json").write_text(json.dumps({
        "quality_metric": cfg.quality_metric, "tolerance": cfg.tolerance, "guarantee": cfg.guarantee,
        "confidence_level": level, "bootstrap": cfg.bootstrap, "rescoring": rescore,
        "length_estimate_disagreements": length_disagree, "notes": notes, "operating_point": op,
        "functions": calibration}, indent=2) + "\n")

    # ---- the Router, loaded from what was written, must reproduce the calibration ---------------------------
    Router.load(work, language=detector is not None, embeddings=False)
    router = Router(policy, encode, language=detector, embed=embedder, reference=reference)
    rows = []
    for i, p in enumerate(preds):
        req = {"messages": test[p["id"]]["messages"], "metadata": {"function": p["function"]}}
        b = router.before(req, embedding=heldout_vecs.get(p["id"]))
        lp = ([{"logprob": c, "top_logprobs": [{"logprob": x} for x in t]} for c, t in zip(chosen[i], tops[i],
                                                                                              strict=True)]
              if tops[i] else chosen[i])
        d = router.after(req, lp, before=b) if b.to_student else b
        if d.to_student != bool(kept[i]):
            raise RuntimeError(f"the Router does not reproduce the calibration on held-out record {p['id']}: "
                               f"{d.reasons}")
        rows.append({"id": p["id"], "function": p["function"], "quality": float(quality[i]),
                     "route": d.route, "phase": d.phase, "reasons": d.reasons,
                     "input_tokens": d.signals.get("input_tokens"), "language": d.signals.get("language"),
                     "distance": d.signals.get("distance"), "logprobs": chosen[i], "top_logprobs": tops[i],
                     "signals": json.dumps({k: (v if math.isfinite(v) else None) for k, v in sig[i].items()})})
    pq.write_table(pa.Table.from_pylist(rows), work / "heldout.parquet")

    # ---- summary --------------------------------------------------------------------------------------------
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    ci = lambda v: f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]"  # noqa: E731
    summary = []
    for fn, f in functions.items():
        c = f.get("calibration")
        if not f["enabled"]:
            summary.append((fn, f"teacher only: {f['why']}"))
            continue
        thr = f["after"]["threshold"]
        summary.append((fn, f"{pct(c['student_share'])} {ci(c['student_share_ci'])} to the student, routed "
                            f"{cfg.quality_metric} {pct(c['routed_quality'])} {ci(c['routed_quality_ci'])}; "
                            f"{c['signal']} >= {'any' if thr is None else f'{thr:.3f}'}; escalated before "
                            f"{pct(c['escalated_before'])}, after {pct(c['escalated_after'])}"))
    summary += [
        ("overall", f"{pct(op['student_share'])} of held-out traffic to the student, routed {cfg.quality_metric} "
                    f"{pct(op['routed_quality'])} (teacher 100%, tolerance {100 * cfg.tolerance:g} points)"),
        ("cost / 1k requests", f"routed ${op['cost_per_1k_routed_usd']:.4f} vs teacher-only "
                               f"${op['cost_per_1k_teacher_usd']:.4f}"),
        ("policy", str(ctx.run.stage_dir("route") / POLICY_FILE)),
        ("serve", f"distill serve-router {ctx.run.stage_dir('route')} --student-url URL --teacher-url URL"),
    ]
    if length_disagree:
        summary.append(("length estimate", f"{length_disagree} held-out decisions differ from exact counting"))
    return StageResult(
        counts={"functions": len(functions), "student_share": op["student_share"]},
        summary=summary,
        extra={"operating_point": {"student_share": op["student_share"], "routed_quality": op["routed_quality"],
                                   "cost_per_1k_routed": op["cost_per_1k_routed_usd"],
                                   "cost_per_1k_teacher": op["cost_per_1k_teacher_usd"]}},
    )
