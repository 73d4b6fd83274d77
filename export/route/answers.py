"""What a student's answer must be for serve-router to keep it (phase 2, per choice) and what the client gets of
it: not empty, not cut at the student's own length limit, confident enough on every choice (a tool call without
logprobs only when there is nothing to check), the logprobs the client asked for and no more; and when a relayed
stream is not a whole answer."""

from __future__ import annotations

from typing import Any

from export.route.jsonio import loads
from export.route.router import Decision, Router


def drop_logprobs(resp: dict[str, Any]) -> None:
    """Remove the logprobs the proxy asked for and the client did not."""
    for c in resp.get("choices") or []:
        if isinstance(c, dict):
            c.pop("logprobs", None)


def trim_top_logprobs(resp: dict[str, Any], k: int) -> None:
    """Keep the ``top_logprobs`` the client asked for (the proxy may have asked the student for more)."""
    for c in resp.get("choices") or []:
        lp = c.get("logprobs") if isinstance(c, dict) else None
        for tok in (lp.get("content") if isinstance(lp, dict) else None) or []:
            if isinstance(tok, dict) and isinstance(tok.get("top_logprobs"), list):
                tok["top_logprobs"] = tok["top_logprobs"][:k]


def unfinished(chunks: list[dict[str, Any]]) -> str | None:
    """Why a stream that ended without an error is still not a whole answer: a choice it began (with ``n`` > 1,
    any of them) got no finish_reason (an upstream, or a proxy between, cut it). Logged as an error, so harvest
    keeps it out of training."""
    began: set[Any] = set()
    done: set[Any] = set()
    for ch in chunks:
        for c in ch.get("choices") or ():
            if isinstance(c, dict):
                began.add(c.get("index", 0))
                if c.get("finish_reason"):
                    done.add(c.get("index", 0))
    if not done:
        return f"the stream ended after {len(chunks)} chunks without a finish_reason"
    if began - done:
        cut = ", ".join(str(i) for i in sorted(began - done, key=str))
        return f"the stream ended after {len(chunks)} chunks without a finish_reason for choice {cut}"
    return None


def answer_gap(body: dict[str, Any], choice: Any) -> str | None:
    """Why a student's answer cannot be kept whatever its confidence: empty (no text, tool call or refusal); cut
    at the student's own length limit when the client set none (the teacher would have finished it); not the
    tool call the client required (``tool_choice``); not the JSON its ``response_format`` asked for (an endpoint
    such as serve-student applies neither)."""
    msg = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(msg, dict):
        return "the student's answer has no message"
    text = msg.get("content")
    called = msg.get("tool_calls")  # a legacy function_call answer is not relayed in chunks: treated as empty
    if not (isinstance(text, str) and text.strip()) and not called and not msg.get("refusal"):
        return "the student's answer is empty"
    if choice.get("finish_reason") == "length" and not (body.get("max_tokens") or body.get("max_completion_tokens")):
        return "the student's answer was cut at its own length limit (finish_reason length; the client set none)"
    if requires_tool(body) and not called:
        return "the client required a tool call (tool_choice) and the student answered without one"
    want = json_wanted(body.get("response_format"))
    offered = bool(body.get("tools")) and body.get("tool_choice") != "none"
    if want and not msg.get("refusal") and not (called and offered) and not _json_of(text, want):
        return (f"the client asked for JSON (response_format) and the student's answer is not a JSON "
                f"{' or '.join(want)}")
    return None


def requires_tool(body: dict[str, Any]) -> bool:
    """Whether the request obliges the answer to call a tool: ``tool_choice`` "required", a named function, or
    allowed tools in mode "required" ("auto", "none" and allowed tools in mode "auto" do not); or the legacy
    ``function_call`` naming a function."""
    choice, legacy = body.get("tool_choice"), body.get("function_call")
    if choice == "required" or (isinstance(legacy, dict) and legacy.get("name")):
        return True
    if not isinstance(choice, dict):
        return False
    if choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        return isinstance(allowed, dict) and allowed.get("mode") == "required"
    return choice.get("type") in ("function", "custom")


def json_wanted(fmt: Any) -> tuple[str, ...] | None:
    """The JSON types the client's ``response_format`` allows at the root: ("object",) for json_object; for
    json_schema, its root ``type`` (a name or a list of names). None (nothing checked) for text, nothing, or a
    schema whose root names no type (``anyOf``, ``$ref``, ``enum``) or one this check does not know."""
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return ("object",)
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
        root = schema.get("type") if isinstance(schema, dict) else None
        kinds = tuple(root) if isinstance(root, list) else (root,)
        return kinds if kinds and all(isinstance(k, str) and k in JSON_TYPES for k in kinds) else None
    return None


JSON_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": (int, float),
              "boolean": bool, "null": type(None)}


def _json_of(text: Any, kinds: tuple[str, ...]) -> bool:
    """Whether the text is JSON of one of those root types (JSON Schema's: an integer may be written 1.0)."""
    if not isinstance(text, str):
        return False
    try:
        value = loads(text.encode())
    except (ValueError, RecursionError):
        return False
    return any(_is(value, kind) for kind in kinds)


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("number", "integer"):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, JSON_TYPES[kind])


def check_answer(router: Router, checked: bool, body: dict[str, Any], choices: list[Any], first: Decision,
                 fn: str | None) -> Decision:
    """Phase 2 on every choice (``n`` > 1: all must pass). An empty answer, and one cut at the student's own
    length limit (``finish_reason: length`` when the client set none), go to the teacher; a tool-call answer
    without logprobs (OpenAI's endpoints give none for tool calls) is kept only when there is nothing to
    check (``checked`` False: no threshold)."""
    decision = first
    for i, choice in enumerate(choices):
        which = f"choice {i}: " if len(choices) > 1 else ""
        why = answer_gap(body, choice)
        msg = (choice.get("message") or {}) if why is None else {}
        lp = choice.get("logprobs") if why is None else None
        content = (lp.get("content") if isinstance(lp, dict) else None) or []
        if why:
            return Decision("teacher", [*first.reasons, which + why], "after", first.signals)
        if not content and msg.get("tool_calls"):
            if checked:
                return Decision("teacher", [*first.reasons, f"{which}the student's tool-call answer has no "
                                            "logprobs to check (its endpoint gives none for tool calls)"],
                                "after", first.signals)
            decision = Decision("student", [*first.reasons, "tool-call answer kept: no threshold"], "after",
                                first.signals)
            continue
        try:
            decision = router.after(body, content, fn, before=first)
        except ValueError as err:  # the endpoint did not return what the signal needs
            return Decision("teacher", [*first.reasons, str(err)], "after", first.signals)
        if not decision.to_student:
            return Decision("teacher", [*decision.reasons[:-1], which + decision.reasons[-1]], "after",
                            decision.signals) if which else decision
    return decision
