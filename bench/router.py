"""Router throughput: routing decisions per second, per set of signals, on a policy fitted in this process.

    python bench/router.py                     # builds everything it needs (about 10 s), then measures
    python bench/router.py --embeddings        # also the MiniLM distance rule (torch; slow by design)
    python bench/router.py --append-results    # and append the table to bench/RESULTS.md
    python bench/router.py --language-chars    # only fastText's cost against how many characters it reads

What it builds (``build_policy``), shaped like the demo's route stage: demo traffic (``distill demo-data``'s
generator, seed 0), split 80/20 into training and held-out records; a byte-level BPE tokenizer of the demo's size
(1,024) trained on the training texts; the length rule (``length.count: estimate``) and the language rule
(fastText lid.176) fitted by ``export.route.rules``; synthetic student answers for the held-out records (one token
per teacher-answer token, top-5 logprobs per token, seeded; wrong answers get unsure tokens); the post-generation
rule fitted by ``export.route.thresholds`` with ``signal: mean_entropy`` (a threshold). The policy is written with
its files and loaded back by ``Router.load``, as serve-router does, and must reproduce the calibration on every
held-out request (checked before timing).

Each request is decided in both phases (before generation, then after it on the student's logprobs with top-k),
the way serve-router does. Rows: the demo policy as the route stage now writes it (``DEMO_AFTER``: no threshold,
``max_entropy`` for ticket_triage and ``min_logprob`` for product_faq; so the entropy is not computed), the same
rules with the signal computed as before that change (a threshold of -1e300: every finite signal kept, the same
work), the fitted ``mean_entropy`` threshold, and every other signal with that threshold. The baseline, run in the
same process, is the first Router's algorithm: every message tokenized on every request and the lowest token
logprob. Prints a table; ``--append-results`` appends it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from curation.harvest.demo_traffic import generate  # noqa: E402
from export.route.policy import EXTRAS, POLICY_FILE, POLICY_SCHEMA, RoutingPolicy  # noqa: E402
from export.route.router import Router  # noqa: E402
from export.route.rules import fit_distance, fit_language, fit_length  # noqa: E402
from export.route.signals import SIGNALS, TokenCounter, all_signals  # noqa: E402
from export.route.thresholds import calibrate_functions  # noqa: E402
from pipeline.config.route import RouteConfig  # noqa: E402
from pipeline.rundir import sha256_file  # noqa: E402

Request = tuple[dict[str, Any], list[dict[str, Any]]]  # (chat-completions body, OpenAI logprobs.content)
TOP_K = 5  # the demo recipe's route.top_logprobs (the default)
# The post-generation rules of the demo's policy (runs/ds0 quality-s0-t1, 2026-12-06): a signal, no threshold.
DEMO_AFTER = {"ticket_triage": {"signal": "max_entropy", "threshold": None},
              "product_faq": {"signal": "min_logprob", "threshold": None}}
MAX_NEW_TOKENS = 48  # the demo recipe's evaluate.max_new_tokens


class _Quiet:
    """The progress interface export.route.rules expects, showing nothing."""

    def add_task(self, *_a: Any, **_k: Any) -> int:
        return 0

    def advance(self, *_a: Any) -> None:
        pass


def demo_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The demo generator's answered calls: {id, function, messages, answer}."""
    out = []
    for line in generate(n, "2026-11-23", seed):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the generator's deliberately torn lines
        choices = (row.get("response") or {}).get("choices") or []
        if row.get("status_code") != 200 or not choices or not choices[0]["message"]["content"]:
            continue
        req = row["request"]
        out.append({"id": row["id"], "function": req["metadata"]["function"], "messages": req["messages"],
                    "answer": choices[0]["message"]["content"]})
    return out


def train_tokenizer(texts: list[str], path: Path, vocab_size: int = 1024):
    """A byte-level BPE tokenizer (as the train stage builds one from_config), saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return tok


def student_logprobs(n_tokens: int, correct: bool, rng: random.Random) -> list[dict[str, Any]]:
    """An answer's OpenAI ``logprobs.content`` with TOP_K alternatives per token: confident tokens mostly, and
    for a wrong answer a few unsure ones (noisy, so that the signal ranks answers imperfectly)."""
    out = []
    unsure = {rng.randrange(n_tokens) for _ in range(rng.randint(1, 3))} if not correct else set()
    if correct and rng.random() < 0.1:
        unsure.add(rng.randrange(n_tokens))
    for i in range(n_tokens):
        p = rng.uniform(0.35, 0.7) if i in unsure else 1 - rng.expovariate(1 / 0.01) % 0.2
        rest = 1 - p
        alts = sorted((rest * rng.uniform(0.1, 0.6) / (j + 1) for j in range(TOP_K - 1)), reverse=True)
        lp = math.log(p)
        top = [{"token": f"t{i}", "logprob": lp}] + [{"token": f"a{j}", "logprob": math.log(a)}
                                                      for j, a in enumerate(alts)]
        out.append({"token": f"t{i}", "logprob": lp, "bytes": None, "top_logprobs": top})
    return out


def build_policy(work: Path, n: int = 3000, seed: int = 0,
                 embeddings: bool = False) -> tuple[Path, list[Request], list[bool]]:
    """Fit a demo-shaped routing policy in ``work`` (see the module docstring); returns its path, the held-out
    requests with the student's synthetic logprobs, and which of them calibration keeps for the student."""
    (work / EXTRAS).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    recs = demo_records(n, seed)
    rng.shuffle(recs)
    cut = int(0.8 * len(recs))
    train, held = recs[:cut], recs[cut:]
    tok = train_tokenizer([m["content"] for r in train for m in r["messages"]] + [r["answer"] for r in train],
                          work / "tokenizer.json")
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    trained: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in train:
        trained[r["function"]].append(r)
    cfg = RouteConfig(signal="mean_entropy", top_logprobs=TOP_K, length_count="estimate", bootstrap=200)
    fit = fit_length(trained, TokenCounter(encode), encode, cfg.length_quantile)
    fit_language(fit, trained, cfg.language, work, _Quiet())
    by_fn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in held:
        by_fn[r["function"]].append(r)
    if embeddings:
        fit_distance(fit, trained, by_fn, cfg.distance, seed, work, _Quiet())
    reqs: list[Request] = []
    quality = np.zeros(len(held))
    for i, r in enumerate(held):
        correct = rng.random() < (0.93 if r["function"] == "ticket_triage" else 0.97)
        quality[i] = float(correct)
        n_tok = min(MAX_NEW_TOKENS, len(encode(r["answer"])) + 1)  # + the end-of-turn token
        reqs.append(({"model": "gpt-4o", "messages": r["messages"], "metadata": {"function": r["function"]}},
                     student_logprobs(n_tok, correct, rng)))
    draft = {"schema": POLICY_SCHEMA, "tokenizer": None, "unknown_function": "teacher",
             "length": {"count": cfg.length_count}, "language": fit.language_meta, "distance": fit.distance_meta,
             "functions": {fn: {"enabled": True, "before": b, "after": {"signal": "min_logprob", "threshold": None}}
                           for fn, b in fit.rules.items()}}
    replay = Router(draft, encode, language=fit.detector, embed=fit.embedder, reference=fit.reference)
    passed = np.array([replay.before(q, embedding=fit.heldout_vecs.get(r["id"])).to_student
                       for (q, _), r in zip(reqs, held, strict=True)])
    sig = [all_signals([t["logprob"] for t in lp], [[a["logprob"] for a in t["top_logprobs"]] for t in lp])
           for _, lp in reqs]
    idx = {fn: [i for i, r in enumerate(held) if r["function"] == fn] for fn in fit.rules}
    fitted = calibrate_functions(fit.rules, idx, quality, passed, sig, cfg, seed)
    files = ["tokenizer.json", *(f"{EXTRAS}/{f.name}" for f in sorted((work / EXTRAS).iterdir()))]
    policy = RoutingPolicy(
        schema=POLICY_SCHEMA, student={"name": "bench-student"}, teacher={"models": ["gpt-4o-2024-08-06"]},
        quality={"metric": cfg.quality_metric, "tolerance": cfg.tolerance},
        tokenizer={"file": "tokenizer.json", "sha256": sha256_file(work / "tokenizer.json")},
        length={"count": cfg.length_count}, language=fit.language_meta, embedder=fit.embedder_meta,
        distance=fit.distance_meta, confidence={"top_logprobs": TOP_K}, unknown_function="teacher",
        functions=fitted.functions, files={f: sha256_file(work / f) for f in files},
    ).to_json_dict()
    (work / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")
    return work / POLICY_FILE, reqs, fitted.kept.tolist()


def measure(router: Router, reqs: list[Request], min_seconds: float) -> tuple[float, int]:
    """Decisions per CPU-second of this process (a decision = phase 1, plus phase 2 when phase 1 said student).
    CPU time, not wall time: the cores are shared, and a wall clock would time the other processes too."""
    n, start = 0, time.process_time()
    while True:
        for req, lp in reqs:
            d = router.before(req)
            if d.to_student:
                router.after(req, lp, before=d)
            n += 1
        elapsed = time.process_time() - start
        if elapsed >= min_seconds:
            return n / elapsed, n


def configs(full: Router, embeddings: bool, n_reqs: int) -> list[tuple[str, Router, int | None]]:
    """(row name, Router, how many of the requests it is timed on: None for all) per measured set of signals;
    the first row is the baseline."""
    policy = full.policy
    v1 = {"schema": "distill-routing/v1", "functions": {
        fn: {"enabled": f["enabled"], "why": f.get("why", ""), "max_input_tokens": f["before"]["max_input_tokens"],
             "confidence": {"signal": "min_token_logprob", "threshold": -1.0}}
        for fn, f in policy["functions"].items()}}
    baseline = Router(v1, full.encode)
    baseline.counter.cache_size = 0  # v1 tokenized every message of every request

    def variant(count: str = "estimate", language: bool = False, distance: bool = False,
                after: dict[str, dict[str, Any]] | None = None, signal: str | None = None,
                threshold: float | None = None) -> Router:
        p = {**policy, "length": {"count": count}}
        if after or signal:  # the thresholds' share is not kept: only the cost of the rules is measured
            p["functions"] = {fn: {**f, "after": {**f["after"], **(after or {}).get(fn, {}),
                                                  **({"signal": signal} if signal else {}),
                                                  **({"threshold": threshold} if threshold is not None else {})}}
                              for fn, f in p["functions"].items()}
        return Router(p, full.encode, language=full.language if language else None,
                      embed=full.embed if distance else None, reference=full.reference if distance else None,
                      skip=tuple(s for s, on in (("language", language), ("distance", distance)) if not on))

    demo = "demo policy (function + length estimate; max_entropy / min_logprob, no threshold)"
    rows: list[tuple[str, Router, int | None]] = [
        ("baseline: v1 Router (every message tokenized, min logprob)", baseline, None),
        (f"{demo}, without language", variant(after=DEMO_AFTER), None),
        (f"{demo} + language (fastText lid.176): as served without embeddings",
         variant(language=True, after=DEMO_AFTER), None),
        ("  the same without language, signal computed as before (threshold -1e300)",
         variant(after=DEMO_AFTER, threshold=-1e300), None),
        ("  the same + language, signal computed as before (threshold -1e300)",
         variant(language=True, after=DEMO_AFTER, threshold=-1e300), None),
        ("function + length (estimate) + mean_entropy with its threshold", variant(), None),
        ("  + language (fastText lid.176)", variant(language=True), None),
        ("function + length (bounded) + mean_entropy with its threshold", variant("bounded"), None),
        ("function + length (exact, cached system prompt) + mean_entropy with its threshold", variant("exact"), None),
    ]
    rows += [(f"function + length (estimate) + {s} with a threshold", variant(signal=s), None)
             for s in SIGNALS if s != "mean_entropy"]
    if embeddings:  # about 1 ms an embedding on a quiet core, far more on a busy one: 100 requests suffice
        rows.append(("+ language + distance (MiniLM kNN, one request at a time; 100 requests)",
                     variant(language=True, distance=True), min(100, n_reqs)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum time per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per configuration (median and range shown)")
    ap.add_argument("--records", type=int, default=3000, help="demo calls generated (80%% train, 20%% held out)")
    ap.add_argument("--embeddings", action="store_true", help="also time the MiniLM distance rule (torch)")
    ap.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--language-chars", action="store_true",
                    help="only time fastText on the first N characters of every demo input (N = 200, the Router's, "
                         "down to 40) and count the language decisions that differ from N = 200")
    args = ap.parse_args()
    if args.language_chars:
        language_chars(args.records)
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path, reqs, kept = build_policy(Path(tmp), args.records, embeddings=args.embeddings)
        full = Router.load(path, language=True, embeddings=args.embeddings)
    built = time.perf_counter() - t0
    served = [full.after(r, lp).to_student for r, lp in reqs]
    if served != kept:
        sys.exit(f"the Router does not reproduce the calibration on {sum(a != b for a, b in zip(served, kept, strict=True))} "
                 f"of {len(reqs)} held-out requests")
    table = Table(title=f"Router decisions on {len(reqs)} held-out demo-shaped requests (before + after phases; "
                        f"median of {args.repeats} x {args.seconds:g} s)", title_justify="left")
    for col in ("signals", "decisions/CPU-s", "range", "µs/decision", "vs baseline"):
        table.add_column(col, justify="left" if col == "signals" else "right")
    base, lines = None, []
    for name, router, subset in configs(full, args.embeddings, len(reqs)):
        measure(router, reqs[:10] if subset else reqs[:50], 0.2)  # warm caches and code paths
        timed = reqs[:subset] if subset else reqs
        rates = sorted(measure(router, timed, args.seconds if not subset else 0)[0]
                       for _ in range(args.repeats if not subset else 1))
        rate = rates[len(rates) // 2]
        base = base or rate
        row = (name, f"{rate:,.0f}", f"{rates[0]:,.0f}–{rates[-1]:,.0f}", f"{1e6 / rate:.1f}", f"{rate / base:.2f}x")
        table.add_row(*row)
        lines.append(row)
    share = sum(served) / len(reqs)
    Console(width=160).print(table)
    note = (f"policy built in {built:.1f} s; the fitted policy's decisions equal its calibration's on all "
            f"{len(reqs)} held-out requests (student share {share:.1%} with every loaded rule); "
            f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
            "(other processes share them: compare ratios, not rates)")
    print(note)
    if args.append_results:
        append_results(lines, note)


def language_chars(n: int, seed: int = 0) -> None:
    """fastText lid.176's cost per input against how much of it is read, and what reading less changes: the
    language (code, and whether p >= 0.5) of each demo input against reading the first 200 characters."""
    from export.route.signals import LanguageDetector, bundled_language_model, user_text

    texts = [user_text(r["messages"]) for r in demo_records(n, seed)]
    detect = LanguageDetector(bundled_language_model())
    ref = [(lang, p >= 0.5) for lang, p in map(detect, texts)]
    table = Table(title=f"fastText lid.176 on {len(texts)} demo inputs ({len(set(texts))} distinct; mean "
                        f"{sum(map(len, texts)) / len(texts):.0f} characters)", title_justify="left")
    for col in ("max_chars", "µs/input (best of 3)", "results unlike 200's (code, or p >= 0.5)"):
        table.add_column(col, justify="right")
    for chars in (200, 120, 80, 60, 40):
        detect.max_chars = chars
        best = math.inf
        for _ in range(3):
            start = time.process_time()
            got = [(lang, p >= 0.5) for lang, p in map(detect, texts)]
            best = min(best, (time.process_time() - start) / len(texts))
        table.add_row(str(chars), f"{1e6 * best:.1f}", str(sum(a != b for a, b in zip(got, ref, strict=True))))
    Console(width=120).print(table)
    print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


def append_results(lines: list[tuple[str, ...]], note: str) -> None:
    """The table as Markdown at the end of bench/RESULTS.md."""
    md = ["", f"### bench/router.py, {time.strftime('%Y-%m-%d %H:%M')}", "",
          "| signals | decisions/CPU-s | range | µs/decision | vs baseline |", "| --- | ---: | ---: | ---: | ---: |",
          *(f"| {' | '.join(r)} |" for r in lines), "", note, ""]
    with open(Path(__file__).parent / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(md))


if __name__ == "__main__":
    main()
