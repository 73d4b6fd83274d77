"""The Router: applies a ``routing_policy.json`` to one request and says student or teacher, with reasons.

Dependencies: the standard library and ``tokenizers``; ``fasttext-predict`` when the policy checks the input's
language; numpy, safetensors and the MiniLM embedder (extra ``semantic``, torch) only when it checks the
distance from the training inputs and the Router is loaded with ``embeddings=True`` (the default). Two phases:

    router = Router.load("runs/demo/route")        # a policy file, or the folder holding routing_policy.json
    d = router.before(request)                     # function, input length, language, distance
    if d.route == "student":
        answer, logprobs = call_student(request)   # logprobs: floats, or OpenAI logprobs.content with top_logprobs
        d = router.after(request, logprobs, before=d)   # the student's confidence in its own answer
    # d.route is "student" or "teacher"; d.reasons lists the checks in order, the last one decided;
    # d.signals holds the measured values (input_tokens, language, distance; confidence where a threshold needs it)

``request`` is an OpenAI chat-completions body; its function is read from ``metadata.function`` unless given.

Policy schema ``distill-routing/v2``, written once as the pydantic model ``export.route.policy.RoutingPolicy``
(every policy the Router is given is validated through it; ``POLICY_JSON_SCHEMA`` below is its JSON Schema); the
Router refuses other major versions and upgrades v1 policies in memory:

- ``schema``, ``created_at``, ``student`` {name, train_fingerprint}, ``teacher`` {models}
- ``quality`` {metric, tolerance, guarantee, confidence_level}: what the thresholds were chosen to keep
- ``tokenizer`` {file, sha256}: the student's tokenizer.json, beside the policy; input length is counted with it
- ``length`` {count}: "exact", "bounded" or "estimate" (see ``export.route.signals.TokenCounter``)
- ``language``: null, or {detector, file, sha256, min_confidence}: fastText lid.176, beside the policy
- ``embedder``: null, or {name, package, weights_sha256, dim, normalized, text}; ``distance``: null, or
  {method: "knn-cosine", k, file, sha256}: unit-norm training embeddings per function (safetensors)
- ``confidence`` {top_logprobs}: top-k the student endpoint must return for the entropy signals
- ``unknown_function``: "teacher"
- ``functions`` {name: {enabled, why, before {max_input_tokens, token_estimate {coef, residual} | null,
  languages [codes] | null, max_distance | null}, after {signal, threshold | null}, calibration {...}}}
- ``operating_point``: the held-out share, quality, cost and their bootstrap intervals
- ``drift``: per function, the reference distributions `distill route-check` compares live traffic with
- ``files`` {relative name: sha256}: every file beside the policy that it needs (published with it)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.route.policy import (  # noqa: F401  (POLICY_FILE, PolicyError: the Router's API)
    POLICY_FILE,
    POLICY_SCHEMA,
    DistanceReference,
    FunctionRule,
    LanguageModel,
    PolicyError,
    PolicyFile,
    RoutingPolicy,
    validate,
)
from export.route.signals import (
    ENTROPY_SIGNALS,
    LanguageDetector,
    TokenCounter,
    content_entropies,
    signal_value,
    split_logprobs,
    user_text,
)
from pipeline.rundir import sha256_file

POLICY_JSON_SCHEMA: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                                      **RoutingPolicy.model_json_schema()}


@dataclass(slots=True)
class Decision:
    route: str  # "student" | "teacher"
    reasons: list[str] = field(default_factory=list)  # the checks in order; the last one decided
    phase: str = "before"  # "before" | "after"
    signals: dict[str, Any] = field(default_factory=dict)

    @property
    def to_student(self) -> bool:
        return self.route == "student"

    def as_dict(self) -> dict[str, Any]:
        return {"route": self.route, "phase": self.phase, "reasons": self.reasons, "signals": self.signals}


def confidence(logprobs: Sequence[float]) -> float:
    """The v1 confidence signal (lowest token logprob); kept for callers of the first API."""
    return signal_value("min_logprob", list(logprobs))


def upgrade_v1(policy: dict[str, Any]) -> dict[str, Any]:
    """A distill-routing/v1 policy in the v2 layout (v1 had function, length and min-logprob rules only)."""
    functions = {}
    for fn, r in policy.get("functions", {}).items():
        functions[fn] = {
            "enabled": r.get("enabled", True), "why": r.get("why", ""),
            "before": {"max_input_tokens": r.get("max_input_tokens"), "token_estimate": None, "languages": None,
                       "max_distance": None},
            "after": {"signal": "min_logprob", "threshold": (r.get("confidence") or {}).get("threshold")},
            "calibration": r.get("calibration"),
        }
    return {**policy, "schema": POLICY_SCHEMA, "upgraded_from": policy.get("schema"), "tokenizer": policy.get("tokenizer"),
            "length": {"count": "exact"},
            "language": None, "embedder": None, "distance": None, "confidence": {"top_logprobs": 0},
            "unknown_function": "teacher", "functions": functions}


def check_schema(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy in the v2 layout; PolicyError for an unknown major version."""
    schema = str(policy.get("schema", ""))
    name, _, version = schema.partition("/v")
    major = version.split(".")[0]
    if name != "distill-routing" or not major.isdigit():
        raise PolicyError(f"not a distill routing policy (schema {schema!r}; expected {POLICY_SCHEMA!r})")
    if major == "1":
        return upgrade_v1(policy)
    if major != "2":
        raise PolicyError(f"routing policy schema {schema!r} is newer than this Router understands ({POLICY_SCHEMA}): "
                          "upgrade distill to read it")
    return policy


class _Rule:
    """One function's rule, unpacked once so that a decision is a few attribute reads; the reasons that do not
    depend on the request are formatted here, once."""

    __slots__ = ("enabled", "why", "limit", "estimate", "languages", "max_distance", "signal", "threshold", "entropy",
                 "calibrated", "disabled", "below", "kept", "unchecked", "_length_reasons")

    def __init__(self, fn: str, r: FunctionRule):
        self.enabled = r.enabled
        self.why = r.why or "disabled"
        self.limit = r.before.max_input_tokens
        self.estimate = r.before.token_estimate.model_dump() if r.before.token_estimate is not None else None
        self.languages = frozenset(r.before.languages) if r.before.languages is not None else None
        self.max_distance = r.before.max_distance
        self.signal = r.after.signal
        self.threshold = r.after.threshold
        self.entropy = self.signal in ENTROPY_SIGNALS
        self.calibrated = f"function '{fn}' is calibrated"
        self.disabled = f"function '{fn}' is routed to the teacher: {self.why}"
        thr = self.threshold
        self.below = f" ({self.signal}) < threshold {thr:.3f}" if thr is not None else ""
        self.kept = f" ({self.signal}) " + ("no threshold" if thr is None else f">= threshold {thr:.3f}")
        # No threshold on an entropy signal: its value would only be logged, and it costs more than the rest of the
        # decision; only whether it could be computed matters (calibration keeps no answer without top-k).
        self.unchecked = (f"student answer kept: no threshold ({self.signal} not computed)"
                          if self.entropy and thr is None else None)
        self._length_reasons: dict[str, dict[int, str]] = {}

    def length_reason(self, n: int, how: str) -> str:
        """The length check's reason for ``n`` tokens counted ``how`` (over the limit exactly when n > limit);
        formatted once per (how, n) and kept (at most 4,096 per way of counting)."""
        seen = self._length_reasons.get(how)
        if seen is None:
            seen = self._length_reasons[how] = {}
        reason = seen.get(n)
        if reason is None:
            shown = f"{n}" if how == "exact" else f"{how} {n}"
            reason = (f"input {shown} tokens <= {self.limit}" if n <= self.limit
                      else f"input is {shown} tokens, over the {self.limit} seen in training")
            if len(seen) < 4096:
                seen[n] = reason
        return reason

    def has_top_k(self, logprobs: Sequence[Any]) -> bool:
        """Whether every token of a non-empty answer has top-k logprobs (an entropy signal is finite exactly then,
        for logprobs below 700)."""
        if not isinstance(logprobs[0], dict):
            return False
        for t in logprobs:  # noqa: SIM110  (a loop: faster than all() over a generator or map() on CPython 3.11)
            if not t.get("top_logprobs"):
                return False
        return True

    def confidence(self, logprobs: Sequence[Any]) -> float | None:
        """The rule's confidence signal of a non-empty answer; None when it needs top-k the answer lacks."""
        if self.entropy and isinstance(logprobs[0], dict):  # the hot path: one pass over the dicts
            ent = content_entropies(logprobs)
            if ent is None:
                return None
            return -(sum(ent) / len(ent)) if self.signal == "mean_entropy" else -max(ent)
        chosen, tops = split_logprobs(logprobs, self.entropy)
        if self.entropy and tops is None:
            return None
        return signal_value(self.signal, chosen, tops)


class Router:
    """Decides, per request, whether the student may answer.

    ``encode`` (text -> token ids) counts input length; ``language`` (text -> (code, probability)) and
    ``embed`` (texts -> unit-norm embeddings) with ``reference`` (function -> training embeddings) serve the
    language and distance rules. A rule the policy holds but whose helper is missing is an error unless named
    in ``skip`` ("language", "distance"); skipped rules are reported in the reasons.
    """

    def __init__(self, policy: dict[str, Any], encode: Callable[[str], list[int]] | None = None, *,
                 language: Callable[[str], tuple[str, float]] | None = None,
                 embed: Callable[[list[str]], Any] | None = None, reference: dict[str, Any] | None = None,
                 skip: Sequence[str] = ()):
        policy = check_schema(policy)
        model = validate(policy)
        self.policy = policy
        self.functions: dict[str, dict[str, Any]] = policy["functions"]
        self.length_mode = model.length.count
        self._rules = {fn: _Rule(fn, r) for fn, r in model.functions.items()}
        self.encode = encode
        self.counter = TokenCounter(encode) if encode else None
        if encode is None and any(r.limit is not None for r in self._rules.values()):
            raise PolicyError("this policy limits input length: pass encode= or load it with Router.load")
        self.language = language
        self.min_language_confidence = model.language.min_confidence if model.language else 0.5
        self.embed, self.reference = embed, reference or {}
        self.k = model.distance.k if model.distance else 5
        self.skipped: list[str] = []
        for what, present, helper in (
            ("language", any(r.languages is not None for r in self._rules.values()), language),
            ("distance", any(r.max_distance is not None for r in self._rules.values()), embed),
        ):
            if present and helper is None:
                if what not in skip:
                    raise PolicyError(f"this policy checks {what}: pass its helper or skip=('{what}',)")
                self.skipped.append(what)
        self._not_checked = f"not checked: {', '.join(self.skipped)}" if self.skipped else None

    @classmethod
    def load(cls, path: str | Path, *, language: bool = True, embeddings: bool = True) -> Router:
        """Read a policy (file, or folder holding routing_policy.json) and the files beside it, each checked
        against its sha256 in the policy. ``language=False`` / ``embeddings=False`` skip those rules (no
        fastText / no torch); the reasons then say so."""
        path = Path(path)
        if path.is_dir():
            path = path / POLICY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no routing policy at {path}")
        try:
            policy = check_schema(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise PolicyError(f"{path} is not valid JSON: {err}") from None
        model = validate(policy, str(path))

        def local(entry: PolicyFile | LanguageModel | DistanceReference | None) -> Path | None:
            if not entry:
                return None
            f = (path.parent / entry.file).resolve()
            if path.parent.resolve() not in f.parents:
                raise PolicyError(f"{path}: file {entry.file!r} is outside the policy's folder")
            if not f.is_file():
                raise PolicyError(f"{f} is missing: it is listed in the policy (copy every file in policy['files'])")
            if sha256_file(f) != entry.sha256:
                raise PolicyError(f"{f} does not match the policy's sha256")
            return f

        encode = None
        tok_path = local(model.tokenizer)
        if tok_path:
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(str(tok_path))
            encode = lambda s: t.encode(s, add_special_tokens=False).ids  # noqa: E731
        detector = None
        lang_path = local(model.language) if language else None
        if lang_path:
            detector = LanguageDetector(lang_path)
        embed, reference = None, None
        dist_path = local(model.distance) if embeddings else None
        if dist_path:
            from safetensors.numpy import load_file

            from export.route.embedder import shared_embedder

            embed = shared_embedder(expected=policy.get("embedder"))
            reference = load_file(str(dist_path))
        return cls(policy, encode, language=detector, embed=embed, reference=reference,
                   skip=tuple(w for w, on in (("language", language), ("distance", embeddings)) if not on))

    def distance(self, fn: str, text: str | None = None, embedding: Any = None) -> float:
        """Cosine distance of an input to its k-th nearest training input of the function."""
        import numpy as np

        from export.route.embedder import knn_distance

        vec = np.asarray(embedding if embedding is not None else self.embed([text or ""])[0], dtype=np.float32)
        return float(knn_distance(vec[None, :], self.reference[fn], self.k)[0])

    def before(self, request: dict[str, Any], function: str | None = None, embedding: Any = None) -> Decision:
        """Phase 1, before any model call: function known and enabled, input length, language, distance.
        ``embedding``: the input's unit-norm MiniLM embedding, when the caller computed it (batching)."""
        fn = function or (request.get("metadata") or {}).get("function") or "default"
        rule = self._rules.get(fn)
        signals: dict[str, Any] = {"function": fn}
        if rule is None:
            return Decision("teacher", [f"function '{fn}' was not trained or not calibrated"], "before", signals)
        if not rule.enabled:
            return Decision("teacher", [rule.disabled], "before", signals)
        reasons = [rule.calibrated]
        messages = request.get("messages") or []
        if rule.limit is not None:
            ok, n, how = self.counter.check(messages, rule.limit, rule.estimate, self.length_mode)
            signals["input_tokens"] = n
            reasons.append(rule.length_reason(n, how))
            if not ok:
                return Decision("teacher", reasons, "before", signals)
        text = None
        if rule.languages is not None and self.language is not None:
            text = user_text(messages)
            lang, p = self.language(text)
            signals["language"], signals["language_p"] = lang, round(p, 3)
            if p < self.min_language_confidence:
                reasons.append(f"language uncertain ('{lang}' p={p:.2f})")
            elif lang not in rule.languages:
                reasons.append(f"language '{lang}' (p={p:.2f}) was not in training ({', '.join(sorted(rule.languages))})")
                return Decision("teacher", reasons, "before", signals)
            else:
                reasons.append(f"language '{lang}' was in training")
        if rule.max_distance is not None and self.embed is not None:
            d = self.distance(fn, user_text(messages) if text is None else text, embedding)
            signals["distance"] = round(d, 4)
            if d > rule.max_distance:
                reasons.append(f"distance {d:.3f} from the training inputs is over the limit {rule.max_distance:.3f}")
                return Decision("teacher", reasons, "before", signals)
            reasons.append(f"distance {d:.3f} <= {rule.max_distance:.3f}")
        if self._not_checked:
            reasons.append(self._not_checked)
        return Decision("student", reasons, "before", signals)

    def after(self, request: dict[str, Any], logprobs: Sequence[Any], function: str | None = None,
              before: Decision | None = None) -> Decision:
        """Phase 2, after the student answered: keep its answer only if it was confident enough.
        ``logprobs``: the answer's token logprobs (floats), or OpenAI ``logprobs.content`` (needed, with
        ``top_logprobs``, by the entropy signals). ``before``: the phase-1 decision, to skip recomputing it.
        With no threshold the answer is kept if its signal is finite, as calibration keeps it; an entropy signal is
        then not computed (only whether every token has top-k), and ``signals`` has no ``confidence``."""
        first = before if before is not None else self.before(request, function)
        signals = dict(first.signals)
        if first.route != "student":
            return Decision("teacher", list(first.reasons), "after", signals)
        if not logprobs:
            return Decision("teacher", [*first.reasons, "the student's answer is empty"], "after", signals)
        rule = self._rules[signals["function"]]
        if rule.unchecked is not None and rule.has_top_k(logprobs):  # no threshold: the value would change nothing
            return Decision("student", [*first.reasons, rule.unchecked], "after", signals)
        c = rule.confidence(logprobs)
        if c is None:
            raise ValueError(f"function '{signals['function']}' routes on {rule.signal}: pass logprobs as OpenAI "
                             f"logprobs.content with top_logprobs (ask the student endpoint for top_logprobs)")
        signals["confidence"] = c
        thr = rule.threshold
        if thr is not None and (c < thr or c != c):  # c != c: NaN
            return Decision("teacher", [*first.reasons, f"student confidence {c:.3f}{rule.below}"], "after", signals)
        if c - c != 0:  # inf or NaN: calibration keeps no answer whose signal is not finite, threshold or not
            return Decision("teacher", [*first.reasons, f"student confidence {c} ({rule.signal}) is not finite"],
                            "after", signals)
        return Decision("student", [*first.reasons, f"student confidence {c:.3f}{rule.kept}"], "after", signals)

    def decide(self, request: dict[str, Any], logprobs: Sequence[Any] | None = None,
               function: str | None = None) -> Decision:
        return self.before(request, function) if logprobs is None else self.after(request, logprobs, function)
