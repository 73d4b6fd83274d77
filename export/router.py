"""The Router: applies a ``routing_policy.json`` to one request and says student or teacher, with reasons.

Dependencies: the standard library, plus the ``tokenizers`` package when the policy limits input length.
No torch. Two phases:

    router = Router.load("runs/demo/route/routing_policy.json")
    d = router.before(request)                 # before generation: function and input length
    if d.route == "student":
        answer, logprobs = call_student(request)
        d = router.after(request, logprobs)    # after: the student's confidence in its own answer
    # d.route is "student" or "teacher"; d.reasons says why

``request`` is an OpenAI chat-completions body; its function is read from ``metadata.function`` unless
given. Policy schema: see ``POLICY_SCHEMA`` below and the README.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLICY_SCHEMA = "distill-routing/v1"


@dataclass
class Decision:
    route: str  # "student" | "teacher"
    reasons: list[str] = field(default_factory=list)
    phase: str = "before"  # "before" | "after"

    @property
    def to_student(self) -> bool:
        return self.route == "student"


def confidence(logprobs: Sequence[float]) -> float:
    """The policy's confidence signal: the lowest token logprob of the answer (one unsure token is enough to
    doubt a structured answer, and unlike a sum it does not punish long answers). Empty answer: -inf."""
    return min(logprobs) if logprobs else -math.inf


def input_texts(messages: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
        out.append(c or "")
    return out


def count_input_tokens(encode: Callable[[str], list[int]], messages: Sequence[dict[str, Any]]) -> int:
    """Input length in student tokens: the tokens of every message's text (chat markup not counted)."""
    return sum(len(encode(t)) for t in input_texts(messages))


class Router:
    """Decides, per request, whether the student may answer."""

    def __init__(self, policy: dict[str, Any], encode: Callable[[str], list[int]] | None = None):
        if policy.get("schema") != POLICY_SCHEMA:
            raise ValueError(f"routing policy schema {policy.get('schema')!r} is not {POLICY_SCHEMA!r}")
        self.policy = policy
        self.functions: dict[str, dict[str, Any]] = policy["functions"]
        self.encode = encode
        if encode is None and any(f.get("max_input_tokens") is not None for f in self.functions.values()):
            raise ValueError("this policy limits input length: pass encode= or load it with Router.load")

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """Read a policy file and the tokenizer.json beside it (checked against the policy's sha256)."""
        import hashlib

        path = Path(path)
        policy = json.loads(path.read_text())
        tok = policy.get("tokenizer")
        encode = None
        if tok:
            tok_path = path.parent / tok["file"]
            if hashlib.sha256(tok_path.read_bytes()).hexdigest() != tok["sha256"]:
                raise ValueError(f"{tok_path} does not match the policy's tokenizer sha256")
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(str(tok_path))
            encode = lambda s: t.encode(s, add_special_tokens=False).ids  # noqa: E731
        return cls(policy, encode)

    def _function(self, request: dict[str, Any], function: str | None) -> str:
        return function or (request.get("metadata") or {}).get("function") or "default"

    def before(self, request: dict[str, Any], function: str | None = None) -> Decision:
        """Phase 1, before any model call: function known and trusted, input within the trained length."""
        fn = self._function(request, function)
        rule = self.functions.get(fn)
        if rule is None:
            return Decision("teacher", [f"function '{fn}' was not trained or not calibrated"])
        if not rule.get("enabled", True):
            return Decision("teacher", [f"function '{fn}' is routed to the teacher: {rule.get('why', 'disabled')}"])
        reasons = [f"function '{fn}' is calibrated"]
        limit = rule.get("max_input_tokens")
        if limit is not None:
            n = count_input_tokens(self.encode, request.get("messages") or [])
            if n > limit:
                return Decision("teacher", [f"input is {n} tokens, over the {limit} seen in training"])
            reasons.append(f"input {n} tokens <= {limit}")
        return Decision("student", reasons)

    def after(self, request: dict[str, Any], logprobs: Sequence[float], function: str | None = None) -> Decision:
        """Phase 2, after the student answered: keep its answer only if it was confident enough."""
        first = self.before(request, function)
        if not first.to_student:
            return Decision("teacher", first.reasons, "after")
        rule = self.functions[self._function(request, function)]
        threshold = rule["confidence"]["threshold"]
        c = confidence(logprobs)
        if threshold is not None and c < threshold:
            return Decision("teacher", [*first.reasons, f"student confidence {c:.3f} < threshold {threshold:.3f}"],
                            "after")
        shown = "no threshold" if threshold is None else f">= threshold {threshold:.3f}"
        return Decision("student", [*first.reasons, f"student confidence {c:.3f} {shown}"], "after")

    def decide(self, request: dict[str, Any], logprobs: Sequence[float] | None = None,
               function: str | None = None) -> Decision:
        return self.before(request, function) if logprobs is None else self.after(request, logprobs, function)
