"""``distill route-check``: compare recent traffic with what the routing policy was calibrated on.

Reads OpenAI chat-completions logs (the format ``distill harvest`` reads, and ``distill serve-router`` writes),
replays phase 1 of the Router on every request, and compares per function with the policy's ``drift`` section:

- the share escalated before generation (length, language, distance) and, for serve-router logs that carry the
  routing decision, the share the teacher answered in the end: flagged when it moves more than
  ``max_rate_change`` (absolute) from calibration;
- the distributions of the input's distance from the training inputs and of its length: population stability
  index (PSI) over the calibration deciles, flagged above ``max_psi`` (0.1 is a small shift, 0.2 a real one)
  and above what sampling alone gives for that many requests (99th percentile; see ``psi_noise``);
- traffic for functions the policy does not know.

Functions with fewer than ``min_requests`` logged requests are reported but never flagged. The route stage writes
the ``drift`` section with ``drift_reference``.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import re
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from export.route.router import Router
from export.route.signals import user_text

# serve-router's files that hold no requests: live-loop scores, refused requests, passed-through calls
NOT_CALLS = ("live-", "errors-", "passthrough-")
DATED = re.compile(r"-(\d{4}-\d{2}-\d{2})\.jsonl")


def log_files(path: str | Path, day: str | None = None) -> list[Path]:
    """The .jsonl(.gz) files under a folder, of a glob, or the file; with ``day`` (YYYY-MM-DD), not those whose
    name dates them earlier (serve-router names its files by UTC day)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.name.endswith((".jsonl", ".jsonl.gz")))
    elif any(c in str(path) for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path)))
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise FileNotFoundError(f"--logs {path}: no .jsonl or .jsonl.gz files there")
    if day:
        files = [f for f in files if (m := DATED.search(f.name)) is None or m.group(1) >= day]
    names = {str(f) for f in files}
    twins = [f for f in files if f.name.endswith(".gz") and str(f)[:-3] in names]
    for f in twins:  # `gzip -k` leaves both: each line would count twice
        print(f"distill: {f} skipped: {f.name[:-3]} beside it holds the same log", file=sys.stderr)
    return [f for f in files if f not in twins]


def _plain_lines(f: Path) -> Iterator[str]:
    with open(f, "rb") as fh:  # split on "\n" only: orjson writes U+2028, U+2029 and U+0085 raw
        for raw in fh:
            yield raw.rstrip(b"\n").decode("utf-8", errors="replace")


def lines_of(f: Path) -> tuple[Iterable[str], int]:
    """``text_lines``, one line at a time for a plain file (a day's log need not fit in memory)."""
    return (_plain_lines(f), 0) if not f.name.endswith(".gz") else text_lines(f)


def text_lines(f: Path) -> tuple[list[str], int]:
    """A log file's lines (gzipped or not), and 1 when it could not be read whole (a truncated or corrupt .gz:
    what it held up to the damage is kept, the rest counted as one unreadable line, with a warning)."""
    if not f.name.endswith(".gz"):
        return list(_plain_lines(f)), 0
    out: list[str] = []
    try:
        with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                out.append(line)
    except (OSError, EOFError, zlib.error) as err:
        print(f"distill: {f} is damaged after {len(out)} lines ({type(err).__name__}: {err}): the rest is skipped",
              file=sys.stderr)
        if out and not out[-1].endswith("\n"):
            out.pop()  # cut by the damage
        return [x.rstrip("\n") for x in out], 1
    return [x.rstrip("\n") for x in out], 0


def read_logs(path: str | Path, *, requests_only: bool = False, day: str | None = None,
              keep: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], int]:
    """(log lines holding a request with messages, number of lines that could not be read). serve-router's files
    that hold no requests (``NOT_CALLS``) are skipped; with ``requests_only`` also the teacher calls that audited a
    student answer (``routing.audit``: they repeat a request already logged), so each client request counts once.
    ``keep``: what to keep of each line (the ledger and the live loop keep no request or answer text)."""
    out, bad = [], 0

    for f in log_files(path, day):
        if f.name.startswith(NOT_CALLS):
            continue
        raws, damaged = lines_of(f)
        bad += damaged
        for raw in raws:
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(line, dict):
                bad += 1
                continue
            req = line.get("request")
            if requests_only and isinstance(line.get("routing"), dict) and line["routing"].get("audit"):
                continue
            if isinstance(req, dict) and isinstance(req.get("messages"), list) and req["messages"]:
                out.append(keep(line) if keep else line)
            else:
                bad += 1
    return out, bad


def reference_bins(values: list[float]) -> dict[str, Any] | None:
    """Decile bins of a reference distribution, for the population stability index in route-check."""
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    edges = sorted({float(x) for x in np.quantile(v, np.linspace(0.1, 0.9, 9), method="higher")})
    counts = np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(edges) + 1)
    return {"edges": edges, "probs": (counts / counts.sum()).tolist(), "n": len(values)}


def drift_reference(functions: list[str], by_fn: dict[str, list[int]], to_student_before: list[bool],
                    kept: Any, held_tokens: dict[str, list[int]], heldout_dist: dict[str, list[float]],
                    train_languages: dict[str, Any]) -> dict[str, Any]:
    """The policy's ``drift`` section, what ``check`` compares live traffic with: per function, the held-out
    shares escalated before generation and in the end, the held-out distance and input-length distributions,
    and the training languages; and the mix of functions in held-out traffic."""
    n_all = sum(map(len, by_fn.values()))
    drift: dict[str, Any] = {"functions": {}, "function_mix": {fn: len(ix) / max(1, n_all) for fn, ix in by_fn.items()}}
    for fn in functions:
        idx = by_fn.get(fn, [])
        n_pass = sum(to_student_before[i] for i in idx)
        drift["functions"][fn] = {
            "n": len(idx),
            "escalated_before": 1 - n_pass / len(idx) if idx else None,
            "escalated": 1 - sum(bool(kept[i]) for i in idx) / len(idx) if idx else None,
            "distance": reference_bins(heldout_dist.get(fn, [])),
            "input_tokens": reference_bins(held_tokens[fn]),
            "languages": ({lang: c / sum(train_languages[fn].values()) for lang, c in train_languages[fn].most_common()}
                          if fn in train_languages else None),
        }
    return drift


def psi(reference: dict[str, Any], values: list[float]) -> float:
    """Population stability index of ``values`` against a reference binned by ``edges`` with ``probs`` (and
    ``n`` records). Half a record is added to every bin on both sides, so that an empty bin in a small sample
    does not blow the index up."""
    k = len(reference["probs"])
    counts = np.bincount(np.searchsorted(reference["edges"], np.asarray(values, dtype=np.float64), side="left"),
                         minlength=k)
    live = (counts + 0.5) / (counts.sum() + 0.5 * k)
    ref_n = float(reference.get("n") or 1000)
    ref = (np.asarray(reference["probs"], dtype=np.float64) * ref_n + 0.5) / (ref_n + 0.5 * k)
    return float(np.sum((live - ref) * np.log(live / ref)))


def psi_noise(reference: dict[str, Any], n: int, z: float = 2.3263) -> float:
    """The PSI that sampling alone exceeds with probability about 1% (``z``: the normal quantile) when ``n`` live values come from the
    reference distribution: ``(1/n + 1/n_ref) * chi2_p(bins - 1)`` (PSI is a symmetric divergence whose scaled
    value is asymptotically chi-squared; Wilson-Hilferty quantile). Small samples need large shifts."""
    df = max(1, len(reference["probs"]) - 1)
    chi2 = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return chi2 * (1 / max(1, n) + 1 / float(reference.get("n") or 1000))


def check(router: Router, lines: list[dict[str, Any]], max_rate_change: float = 0.1, max_psi: float = 0.2,
          min_requests: int = 30) -> dict[str, Any]:
    """Replay phase 1 on the logged requests and compare with the policy's calibration. The pre-generation
    rules (length, language, distance) are replayed for every function, enabled or not, as in calibration."""
    policy = router.policy
    rules = Router({**policy, "functions": {fn: {**r, "enabled": True} for fn, r in policy["functions"].items()}},
                   router.encode, language=router.language, embed=router.embed, reference=router.reference,
                   skip=tuple(router.skipped))
    ref = (policy.get("drift") or {}).get("functions") or {}
    by_fn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        fn = ((line["request"].get("metadata") or {}).get("function")) or "default"
        by_fn[fn].append(line)
    embeddings: dict[int, Any] = {}
    if router.embed is not None and lines:
        vecs = router.embed([user_text(line["request"]["messages"]) for line in lines])
        embeddings = {id(line): v for line, v in zip(lines, vecs, strict=True)}
    rows: list[dict[str, Any]] = []

    def row(fn: str, metric: str, calibrated: Any, live: Any, n: int, flagged: bool, note: str = "") -> None:
        rows.append({"function": fn, "metric": metric, "calibration": calibrated, "live": live, "n": n,
                     "drift": bool(flagged), "note": note})

    unknown = sum(len(v) for fn, v in by_fn.items() if fn not in policy["functions"])
    total = len(lines)
    if total:
        row("*", "requests for functions the policy does not know", 0.0, unknown / total, total,
            unknown / total > max_rate_change and total >= min_requests,
            ", ".join(sorted(fn for fn in by_fn if fn not in policy["functions"])))
    for fn in sorted(by_fn):
        if fn not in policy["functions"]:
            continue
        items = by_fn[fn]
        n = len(items)
        enough = n >= min_requests
        r = ref.get(fn) or {}
        decisions = [rules.before(line["request"], fn, embedding=embeddings.get(id(line))) for line in items]
        esc = sum(not d.to_student for d in decisions) / n
        exp = r.get("escalated_before")
        if exp is not None:
            row(fn, "escalated before generation", exp, esc, n, enough and abs(esc - exp) > max_rate_change)
        routed = [line["routing"]["route"] for line in items if isinstance(line.get("routing"), dict)
                  and line["routing"].get("route") in ("student", "teacher")]
        if routed and r.get("escalated") is not None:
            live = sum(x == "teacher" for x in routed) / len(routed)
            row(fn, "answered by the teacher (serve-router decisions)", r["escalated"], live, len(routed),
                len(routed) >= min_requests and abs(live - r["escalated"]) > max_rate_change)
        lengths = [router.counter.exact(line["request"]["messages"]) for line in items] if router.counter else []
        for key, metric in (("distance", "distance from training inputs (PSI)"),
                            ("input_tokens", "input length (PSI)")):
            values = lengths if key == "input_tokens" else \
                [d.signals[key] for d in decisions if d.signals.get(key) is not None]
            if r.get(key) and values:
                score, noise = psi(r[key], values), psi_noise(r[key], len(values))
                row(fn, metric, 0.0, round(score, 4), len(values),
                    len(values) >= min_requests and score > max(max_psi, noise),
                    f"median {float(np.median(values)):.3g}; sampling alone reaches {noise:.2f}")
            elif key == "distance" and r.get(key) and router.embed is None:
                row(fn, metric, None, None, 0, False, "not compared: embeddings not loaded")
        if not enough:
            rows[-1]["note"] = (rows[-1]["note"] + "; " if rows[-1]["note"] else "") + \
                f"only {n} requests (< {min_requests}): not flagged"
    return {"requests": total, "drift": any(r["drift"] for r in rows), "rows": rows,
            "thresholds": {"max_rate_change": max_rate_change, "max_psi": max_psi, "min_requests": min_requests}}


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if not math.isnan(v) else "nan"
    return str(v)
