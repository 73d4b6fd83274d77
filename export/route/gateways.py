"""Compile a routing policy into gateway configs: a LiteLLM proxy config and a TensorZero config.

Neither gateway routes on a request's content or on the answer's confidence: their fallbacks fire on errors.
What each can express is written; what it cannot is listed at the top of the file and in ``NOT_EXPRESSED``,
and both configs also name ``distill serve-router`` (the sidecar that applies the whole policy) as a model,
so a platform team can keep its gateway in front and delegate the routing decision to the sidecar.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

NOT_EXPRESSED = {
    "litellm": [
        "language and distance rules (no content-based routing on these signals)",
        "post-generation confidence threshold (fallbacks fire on errors only)",
        "input length is checked with LiteLLM's own token counter, not the student's tokenizer",
    ],
    "tensorzero": [
        "input length, language and distance rules (variants are sampled per episode, not chosen per input)",
        "post-generation confidence threshold (fallback_variants are tried only when a variant errors)",
    ],
}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _teacher(policy: dict[str, Any], gw) -> str:
    if gw.teacher_model:
        return gw.teacher_model
    models = (policy.get("teacher") or {}).get("models") or ["gpt-4o"]
    return f"openai/{models[0]}"


def litellm_config(policy: dict[str, Any], gw, student_model: str) -> str:
    """LiteLLM proxy ``config.yaml``: one model group per function (``distill/<function>``), the student with
    the teacher as fallback when the function is enabled, the teacher alone when it is not; input length as
    the student deployment's ``max_input_tokens`` with pre-call checks and context-window fallbacks."""
    teacher = _teacher(policy, gw)
    key_t = f"os.environ/{gw.teacher_key_env}"
    student = {"model": f"openai/{student_model}", "api_base": gw.student_api_base,
               "api_key": f"os.environ/{gw.student_key_env}"}
    model_list: list[dict[str, Any]] = []
    fallbacks, window = [], []
    for fn, rule in sorted(policy["functions"].items()):
        group = f"distill/{fn}"
        teacher_group = f"distill/{fn}/teacher"
        model_list.append({"model_name": teacher_group, "litellm_params": {"model": teacher, "api_key": key_t}})
        if rule.get("enabled"):
            entry: dict[str, Any] = {"model_name": group, "litellm_params": dict(student)}
            limit = (rule.get("before") or {}).get("max_input_tokens")
            if limit is not None:
                entry["model_info"] = {"max_input_tokens": int(limit)}
                window.append({group: [teacher_group]})
            model_list.append(entry)
            fallbacks.append({group: [teacher_group]})
        else:
            model_list.append({"model_name": group, "litellm_params": {"model": teacher, "api_key": key_t}})
    model_list.append({"model_name": "distill/router", "litellm_params": {
        "model": f"openai/{student_model}", "api_base": gw.router_api_base,
        "api_key": f"os.environ/{gw.student_key_env}"}})
    config = {"model_list": model_list,
              "router_settings": {"enable_pre_call_checks": True, "fallbacks": fallbacks,
                                  "context_window_fallbacks": window}}
    head = ["# LiteLLM proxy config compiled by `distill route` from routing_policy.json.",
            "# Call model 'distill/<function>'. Expressed: which functions may use the student (others go to the",
            "# teacher), the input-length limit (approximate, see below), fallback to the teacher on errors.",
            "# Not expressed (use model 'distill/router', which forwards to `distill serve-router`):",
            *[f"#   - {x}" for x in NOT_EXPRESSED["litellm"]],
            "# Start: litellm --config litellm.yaml"]
    return "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _table(name: str, items: dict[str, Any]) -> list[str]:
    return [f"[{name}]", *[f"{k} = {_toml_value(v)}" for k, v in items.items()], ""]


def tensorzero_config(policy: dict[str, Any], gw, student_model: str) -> str:
    """``tensorzero.toml``: per function, a student and a teacher variant; enabled functions sample the
    student and fall back to the teacher on errors, others use the teacher. A ``router`` model points at
    ``distill serve-router`` for the content and confidence rules."""
    teacher = _teacher(policy, gw)
    t_provider, _, t_model = teacher.partition("/")
    if not t_model:
        t_provider, t_model = "openai", teacher
    lines = ["# TensorZero config compiled by `distill route` from routing_policy.json.",
             "# Expressed: which functions may use the student; the teacher as fallback variant on errors.",
             "# Not expressed (TensorZero picks variants per episode, not per input; call the 'router' model,",
             "# i.e. `distill serve-router`, or set variant_name from a client that runs the distill Router):",
             *[f"#   - {x}" for x in NOT_EXPRESSED["tensorzero"]], ""]
    lines += _table("models.student", {"routing": ["student"]})
    lines += _table("models.student.providers.student", {
        "type": "openai", "model_name": student_model, "api_base": gw.student_api_base.rstrip("/") + "/",
        "api_key_location": f"env::{gw.student_key_env}"})
    lines += _table("models.teacher", {"routing": ["teacher"]})
    lines += _table("models.teacher.providers.teacher", {
        "type": t_provider, "model_name": t_model, "api_key_location": f"env::{gw.teacher_key_env}"})
    lines += _table("models.router", {"routing": ["router"]})
    lines += _table("models.router.providers.router", {
        "type": "openai", "model_name": student_model, "api_base": gw.router_api_base.rstrip("/") + "/",
        "api_key_location": f"env::{gw.student_key_env}"})
    for fn, rule in sorted(policy["functions"].items()):
        f = f"functions.{_slug(fn)}"
        lines += _table(f, {"type": "chat"})
        lines += _table(f"{f}.variants.student", {"type": "chat_completion", "model": "student"})
        lines += _table(f"{f}.variants.teacher", {"type": "chat_completion", "model": "teacher"})
        lines += _table(f"{f}.variants.router", {"type": "chat_completion", "model": "router"})
        if rule.get("enabled"):
            lines += _table(f"{f}.experimentation", {"type": "static", "candidate_variants": {"student": 1.0},
                                                      "fallback_variants": ["teacher"]})
        else:
            lines += _table(f"{f}.experimentation", {"type": "static", "candidate_variants": {"teacher": 1.0},
                                                      "fallback_variants": []})
    return "\n".join(lines)
