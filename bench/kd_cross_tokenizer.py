"""Distilling from an API teacher's logged top-20 logprobs when the teacher's tokenizer is not the student's.

    nice -n 10 .venv/bin/python bench/kd_cross_tokenizer.py              # 3 seeds, about 25 min on 2 busy cores
    nice -n 10 .venv/bin/python bench/kd_cross_tokenizer.py --quick      # a smoke run (1 seed, few steps)

1. The demo's traffic (``curation.harvest.demo_traffic``) is harvested and curated with distill's own stages.
2. A teacher that is not the student: a larger Llama-style model (hidden 128, 3 layers) with its own byte-level
   BPE tokenizer (1,536 tokens, trained on other text than the student's, so other merges) is trained on the
   curated answers.
3. The teacher answers every curated prompt, greedy, and its answers are logged as an API teacher logs them:
   OpenAI chat-completions rows whose ``logprobs.content`` has each token's text, bytes and logprob with its top-20
   alternatives. Those logs go through ``distill harvest`` and ``distill curate`` again: the training data.
4. The same small student (hidden 64, 2 layers) with its own tokenizer (640 tokens, trained on the curated prompts
   and answers) is trained three ways for the same steps, over 3 seeds: ``sft`` on the teacher's answers,
   ``kd_cross`` (sparse_kd across tokenizers: byte-offset alignment), and ``kd_ref`` (sparse_kd with the
   teacher's own tokenizer, where every logged token is a student token: the reference).
5. Each student answers the test split (greedy); scored against the teacher's answers: exact match, JSON field
   accuracy; calibration of the student's sequence probability as the probability that it matches the teacher
   (ECE over 10 bins, AUROC); and the router's share to the student at the demo's tolerance (2 points of exact
   match), fitted with export/route's calibration code on the student's own token-logprob signals.

Cost: CPU seconds per optimizer step of kd_cross against sft, same student, data and seed, one torch thread.
Results: stdout, bench/results/kd_cross_tokenizer.{md,json}, and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

TEACHER = {"architecture": "llama", "hidden_size": 128, "num_layers": 3, "num_heads": 4}
STUDENT = {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4}
MODES = ("sft", "kd_cross", "kd_ref")
TOLERANCE = 0.02  # recipes/demo.yaml's route.tolerance
TOP = 20


def recipe(folder: Path, logs: str) -> Path:
    """A harvest + curate recipe over the given logs (the demo's curation settings)."""
    data = {"name": "kd", "run_dir": "runs", "seed": 0,
            "harvest": {"sources": [{"format": "openai", "path": logs, "function_field": "request.metadata.function"}]},
            "curate": {"feedback": {"metric": "thumbs_up", "min_value": 0.5}, "pii": "redact",
                       "split": {"val_fraction": 0.05, "test_fraction": 0.15}}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def harvest_and_curate(folder: Path, logs: str) -> dict[str, list[dict[str, Any]]]:
    from pipeline.cli import main as cli
    from training.train.stage import read_split

    folder.mkdir(parents=True, exist_ok=True)
    path = recipe(folder, logs)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for stage in ("harvest", "curate"):
            if cli([stage, str(path)]) != 0:  # once more: the code under a shared working tree may be mid-edit
                time.sleep(30)
                if cli([stage, str(path)]) != 0:
                    raise SystemExit(f"distill {stage} failed in {folder}")
    finally:
        os.chdir(cwd)
    return {s: read_split(folder / "runs" / "kd" / "curate", s) for s in ("train", "val", "test")}


def tokenizers(records: list[dict[str, Any]], scratch: Path):
    """(student tokenizer, teacher tokenizer): byte-level BPEs of different sizes trained on different text."""
    from curation.harvest.demo_traffic import generate
    from training.train.chat_template import tokenizer_corpus, train_tokenizer

    student = train_tokenizer(list(tokenizer_corpus(records)), 640)
    other = []
    for line in generate(1500, "2026-06-01", seed=7):  # the teacher's "pretraining" text: other days, other seed
        try:
            row = json.loads(line)
            other += [m["content"] or "" for m in row["request"]["messages"]]
            other += [c["message"]["content"] or "" for c in (row.get("response") or {}).get("choices") or []]
        except (ValueError, KeyError, TypeError):  # the demo's deliberately broken lines
            continue
    teacher = train_tokenizer(other, 1536)
    teacher.save_pretrained(scratch / "teacher_tokenizer")
    return student, teacher


def train_cfg(objective: str, steps: int, lr: float, batch: int = 8):
    from pipeline.config.train import TrainConfig

    return TrainConfig.model_validate({
        "student": {"from_config": STUDENT}, "method": "full", "objective": objective, "max_steps": steps,
        "batch_size": batch, "learning_rate": lr, "max_length": 192, "logging_steps": max(steps // 4, 1),
        "save_steps": 10 ** 6, "warmup_ratio": 0.05, "lr_scheduler": "cosine", "packing": True,
        "distill": {"top_k": TOP}})


def fit(model, tokenizer, records, cfg, seed: int, out: Path) -> dict[str, Any]:
    """Train with distill's trainer for the objective; returns timing and what the sparse targets covered."""
    import torch

    from training.train.chat_template import training_template
    from training.train.data import tokenize_records
    from training.train.packing import pack
    from training.train.trainer import make_trainer, training_arguments

    top_k = cfg.distill.top_k if cfg.objective == "sparse_kd" else None
    ds, stats = tokenize_records(records, tokenizer, training_template(tokenizer), cfg.max_length, top_k)
    ds = pack(ds, cfg.max_length)
    common = training_arguments(cfg, str(out), seed, "bench", False)
    trainer = make_trainer(cfg, common, model, tokenizer, ds)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the loss dicts would flood the table
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    result = trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = result.global_step
    outcomes = stats.token_outcomes
    return {"steps": steps, "wall_s": wall, "cpu_s": cpu, "cpu_per_step": cpu / steps, "wall_per_step": wall / steps,
            "loss": result.training_loss, "soft_share": outcomes.get("soft target", 0) / max(sum(outcomes.values()), 1)
            if top_k else None, "answer_tokens": dict(outcomes) if top_k else None}


def teacher_logs(model, tok, records: list[dict[str, Any]], max_new: int, batch: int = 64) -> list[dict[str, Any]]:
    """The teacher answers each record's prompt (greedy); each answer as an OpenAI chat-completions log row with
    logprobs.content: every token's text, bytes, logprob and its top-20 alternatives."""
    import torch

    from pipeline.chat import prompt_messages
    from training.train.align import student_bytes

    table = student_bytes(tok)
    tok.padding_side = "left"
    rows = []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        texts = [tok.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
                 for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        new = gen.sequences[:, enc["input_ids"].shape[1]:]
        logp = torch.stack(gen.scores, 1).float().log_softmax(-1)  # (batch, steps, vocab)
        top_v, top_i = logp.topk(TOP, -1)
        for j, r in enumerate(chunk):
            rows.append(_log_row(r, new[j].tolist(), logp[j], top_v[j], top_i[j], tok, table))
    return rows


def _token(tok, table, i: int, logprob: float) -> dict[str, Any]:
    raw = table[i] or tok.convert_ids_to_tokens(i).encode()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)  # how OpenAI writes a token that ends mid-character
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def _log_row(r, ids, logp, top_v, top_i, tok, table) -> dict[str, Any]:
    content, answer, finish = [], b"", "length"
    for step, i in enumerate(ids):
        if i in (tok.eos_token_id, tok.pad_token_id):
            finish = "stop"
            break
        entry = _token(tok, table, i, float(logp[step, i]))
        entry["top_logprobs"] = [_token(tok, table, int(a), float(v)) for v, a in zip(top_v[step], top_i[step],
                                                                                        strict=True)]
        content.append(entry)
        answer += table[i] or b""
    text = answer.decode(errors="replace")
    return {"id": r["id"], "timestamp": "2026-11-24T10:00:00Z", "status_code": 200, "latency_ms": 500.0,
            "request": {"model": "bench-teacher", "messages": [{"role": m["role"], "content": m["content"]}
                                                                 for m in r["messages"]],
                        "logprobs": True, "top_logprobs": TOP, "metadata": {"function": r["function"]}},
            "response": {"model": "bench-teacher", "choices": [{
                "index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text},
                "logprobs": {"content": content}}],
                "usage": {"prompt_tokens": 50, "completion_tokens": len(content)}}}


def score(model, tok, records: list[dict[str, Any]], max_new: int) -> dict[str, Any]:
    """Agreement with the teacher, calibration and the router's share on the test records."""
    import numpy as np

    from export.route import calibrate, signals
    from pipeline.chat import prompt_messages
    from training.evaluate.engine import generate
    from training.evaluate.metrics import exact_match, field_accuracy

    out = generate(model, tok, [prompt_messages(r) for r in records], max_new, 64)
    em = np.array([exact_match(o["prediction"], r["output"]["content"] or "") for o, r in zip(out, records,
                                                                                           strict=True)], float)
    fa = [field_accuracy(o["prediction"], r["output"]["content"] or "") for o, r in zip(out, records, strict=True)]
    fa = [x for x in fa if x is not None]
    conf = np.array([math.exp(sum(o["logprobs"])) for o in out])
    share, signal = 0.0, None
    for name in ("min_logprob", "mean_logprob"):  # as route's 'auto': the signal with the larger curve area
        s = np.array([signals.signal_value(name, o["logprobs"]) if o["logprobs"] else -math.inf for o in out])
        curve = calibrate.build_curve(s, em)
        best = curve.point(calibrate.choose(curve, TOLERANCE))
        if signal is None or calibrate.area(curve) > signal[1]:
            signal, share = (name, calibrate.area(curve)), best["student_share"]
    return {"exact_match": float(em.mean()), "field_accuracy": float(np.mean(fa)) if fa else None,
            "ece": ece(conf, em), "auroc": auroc(conf, em), "router_share": share, "signal": signal[0],
            "n": len(records)}


def ece(conf, correct, bins: int = 10) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted by size."""
    import numpy as np

    idx = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum(abs(correct[idx == b].mean() - conf[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def auroc(conf, correct) -> float | None:
    """Probability that a matching answer gets a higher confidence than a non-matching one (ties count half)."""
    pos, neg = conf[correct == 1], conf[correct == 0]
    if not len(pos) or not len(neg):
        return None
    wins = sum(float((p > neg).sum()) + 0.5 * float((p == neg).sum()) for p in pos)
    return wins / (len(pos) * len(neg))


def build(tokenizer, spec: dict[str, Any], seed: int):
    from pipeline.config.train import StudentFromConfig
    from training.train.student import build_from_config

    return build_from_config(StudentFromConfig(**spec), tokenizer, 192, seed)


def make_teacher(data, teacher_tok, args, scratch: Path) -> tuple[Any, dict[str, Any]]:
    """The teacher: trained by SFT on the curated demo answers, then scored on the test split against them."""
    model = build(teacher_tok, TEACHER, seed=100)
    info = fit(model, teacher_tok, data["train"], train_cfg("sft", args.teacher_steps, 3e-3), 100, scratch / "t")
    info["vs_logged"] = score(model, teacher_tok, data["test"], args.max_new)  # how good a teacher it is
    return model.eval(), info


def students(data, student_tok, teacher_tok, args, scratch: Path) -> list[dict[str, Any]]:
    runs = []
    for seed in range(args.seeds):
        for mode in MODES:
            tok = teacher_tok if mode == "kd_ref" else student_tok
            model = build(tok, STUDENT, seed)
            cfg = train_cfg("sft" if mode == "sft" else "sparse_kd", args.steps, args.lr)
            info = fit(model, tok, data["train"], cfg, seed, scratch / f"{mode}-{seed}")
            info.update(score(model, tok, data["test"], args.max_new), mode=mode, seed=seed)
            runs.append(info)
            print(f"  seed {seed} {mode:9s} EM {info['exact_match']:.3f}  FA {info['field_accuracy'] or 0:.3f}  "
                  f"ECE {info['ece']:.3f}  AUROC {info['auroc'] or 0:.3f}  share {info['router_share']:.3f}  "
                  f"{info['cpu_per_step']:.3f} CPU-s/step  soft {info['soft_share'] or 0:.2f}", flush=True)
    return runs


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(runs: list[dict[str, Any]]) -> list[str]:
    keys = ("exact_match", "field_accuracy", "ece", "auroc", "router_share", "cpu_per_step", "soft_share")
    lines = ["| student | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        lines.append(f"| {mode} | " + " | ".join(_ms([r[k] for r in rows]) for k in keys) + " |")
    return lines


def paired(runs: list[dict[str, Any]], mode: str, key: str) -> str:
    """Per-seed difference of a metric between a KD student and the SFT student of the same seed."""
    by = {(r["mode"], r["seed"]): r[key] for r in runs}
    d = [by[(mode, s)] - by[("sft", s)] for m, s in by if m == "sft" and by.get((mode, s)) is not None
         and by[("sft", s)] is not None]
    if not d:
        return "-"
    return f"{statistics.mean(d):+.3f} (seeds: {', '.join(f'{x:+.3f}' for x in d)})"


def report(runs, teacher: dict[str, Any], coverage: dict[str, Any], args, minutes: float) -> str:
    cost = [r["cpu_per_step"] / s["cpu_per_step"] for r in runs if r["mode"] == "kd_cross"
            for s in runs if s["mode"] == "sft" and s["seed"] == r["seed"]]
    t = teacher["vs_logged"]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), torch threads 1; {args.seeds} seeds, "
             f"{args.steps} steps x batch 8 packed rows per student, lr {args.lr}; total {minutes:.1f} min.",
             f"Teacher (hidden 128, 3 layers, own 1,536-token BPE, {args.teacher_steps} steps): exact match "
             f"{t['exact_match']:.3f} against the logged demo answers on the test split ({t['n']} records).",
             f"Alignment of the teacher's logs with the student's 640-token BPE (train split): "
             f"{coverage['soft_share']:.1%} of answer tokens get a soft target; the rest: "
             + "; ".join(f"{k}: {v:,}" for k, v in coverage["answer_tokens"].items() if k != "soft target") + ".",
             "", "Test split scored against the teacher's answers (mean ± std over seeds):", "", *table(runs), "",
             f"kd_cross - sft, same seed: exact match {paired(runs, 'kd_cross', 'exact_match')}; field accuracy "
             f"{paired(runs, 'kd_cross', 'field_accuracy')}; ECE {paired(runs, 'kd_cross', 'ece')}; AUROC "
             f"{paired(runs, 'kd_cross', 'auroc')}; router share {paired(runs, 'kd_cross', 'router_share')}.",
             f"kd_ref - sft, same seed: exact match {paired(runs, 'kd_ref', 'exact_match')}; router share "
             f"{paired(runs, 'kd_ref', 'router_share')}.",
             f"Cost: kd_cross / sft CPU seconds per step, same seed: "
             f"{', '.join(f'{c:.2f}x' for c in cost)} (mean {statistics.mean(cost):.2f}x; target <= 1.3x)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=450, help="optimizer steps per student")
    p.add_argument("--teacher-steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--records", type=int, default=1800, help="demo log lines generated (two days)")
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="1 seed, few steps: a smoke run")
    p.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.teacher_steps, args.records = 1, 20, 30, 300
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    from curation.harvest.demo_traffic import write_demo
    from training.train.chat_template import training_template
    from training.train.data import tokenize_records

    with tempfile.TemporaryDirectory(prefix="kdx-") as tmp:
        scratch = Path(tmp)
        write_demo(scratch / "demo" / "logs", {"2026-11-22": args.records // 2, "2026-11-23": args.records // 2})
        demo = harvest_and_curate(scratch / "demo", "logs/*.jsonl.gz")
        student_tok, teacher_tok = tokenizers(demo["train"], scratch)
        print(f"curated {', '.join(f'{k} {len(v)}' for k, v in demo.items())}; teacher training ...", flush=True)
        teacher, tinfo = make_teacher(demo, teacher_tok, args, scratch)
        print(f"teacher: EM {tinfo['vs_logged']['exact_match']:.3f} vs the logged answers; answering ...", flush=True)
        logs = teacher_logs(teacher, teacher_tok, [r for s in demo.values() for r in s], args.max_new)
        (scratch / "api" / "logs").mkdir(parents=True)
        with open(scratch / "api" / "logs" / "teacher.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in logs)
        data = harvest_and_curate(scratch / "api", "logs/*.jsonl")
        _, stats = tokenize_records(data["train"], student_tok, training_template(student_tok), 192, TOP)
        outcomes = stats.token_outcomes
        coverage = {"soft_share": outcomes.get("soft target", 0) / max(sum(outcomes.values()), 1),
                    "answer_tokens": outcomes}
        print(f"API logs curated: {', '.join(f'{k} {len(v)}' for k, v in data.items())}; soft targets "
              f"{coverage['soft_share']:.1%} of answer tokens", flush=True)
        runs = students(data, student_tok, teacher_tok, args, scratch)
    text = report(runs, tinfo, coverage, args, (time.time() - t0) / 60)
    print("\n" + text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "kd_cross_tokenizer.md").write_text(text + "\n")
    (out / "kd_cross_tokenizer.json").write_text(json.dumps({"runs": runs, "teacher": tinfo, "coverage": coverage,
                                                             "args": vars(args)}, indent=1, default=str) + "\n")
    if not args.quick and not args.no_results:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## Distilling from an API teacher's logprobs across tokenizers (bench/kd_cross_tokenizer.py, "
                    f"{time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
