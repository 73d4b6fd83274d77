"""Compile a routing policy into gateway configs: a LiteLLM proxy config, a vLLM Semantic Router config and a
TensorZero config (legacy: the TensorZero project is archived since June 2026).

LiteLLM and TensorZero do not route on a request's content or on the answer's confidence (their fallbacks fire
on errors); vLLM Semantic Router expresses the function, the length limit and (for ``mean_logprob``) the
confidence check. What each can express is written; what it cannot is listed at the top of the file and in
``NOT_EXPRESSED``, and every config also names ``distill serve-router`` (the sidecar that applies the whole
policy) as a model, so a platform team can keep its gateway in front and delegate the decision to the sidecar.

LiteLLM's length check counts with its own tokenizer (tiktoken cl100k_base plus per-message overhead for a
custom student), not the student's: ``litellm_limits`` converts each function's limit into LiteLLM's count on
the held-out inputs when the route stage compiles the config.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import yaml

NOT_EXPRESSED = {
    "litellm": [
        "language and distance rules (no content-based routing on these signals)",
        "post-generation confidence threshold (fallbacks fire on errors only)",
        "input length is checked with LiteLLM's own token counter (cl100k_base plus message overhead), not the "
        "student's tokenizer: the limit is calibrated into that count on the held-out inputs (see the comments)",
    ],
    "vllm_sr": [
        "language and distance rules (no signal for the student's languages or the MiniLM kNN distance)",
        "the post-generation check for signals other than mean_logprob (its confidence algorithm averages logprobs)",
        "input length is vLLM Semantic Router's own token estimate, not the student's tokenizer",
    ],
    "tensorzero": [
        "input length, language and distance rules (variants are sampled per episode, not chosen per input)",
        "post-generation confidence threshold (fallback_variants are tried only when a variant errors)",
    ],
}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


MASTER_KEY_ENV = "LITELLM_MASTER_KEY"
ROUTER_GROUP = "distill/router"
FUNCTION_HEADER = "x-distill-function"


def _teacher(policy: dict[str, Any], gw) -> str:
    if gw.teacher_model:
        return gw.teacher_model
    models = (policy.get("teacher") or {}).get("models") or ["gpt-4o"]
    return f"openai/{models[0]}"


def _teacher_name(teacher: str) -> str:
    """The model name the teacher's endpoint expects: ``openai/gpt-4o`` -> ``gpt-4o``."""
    return teacher.partition("/")[2] or teacher


def litellm_counter() -> Callable[[Sequence[dict[str, Any]]], int] | None:
    """LiteLLM's own count of a chat request, as its pre-call check makes it for a custom (non-OpenAI) student
    deployment (``token_counter(model="")``: cl100k_base, 3 tokens per message plus its role, 3 reply-primer
    tokens); None where litellm is not installed (extra ``gateways``)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch of the price list
    try:
        from litellm import token_counter
    except ImportError:
        return None
    return lambda messages: int(token_counter(model="", messages=list(messages)))


def litellm_limits(policy: dict[str, Any], heldout: dict[str, list[Sequence[dict[str, Any]]]],
                   student_count: Callable[[Sequence[dict[str, Any]]], int],
                   gateway_count: Callable[[Sequence[dict[str, Any]]], int]) -> dict[str, dict[str, Any]]:
    """Per enabled function with a length limit ``L`` (student tokens): the limit in the gateway's count, the
    largest gateway count among the held-out inputs within ``L``, so that every held-out input the student may
    take passes the gateway's check too (the bound that does not turn the student off). Also how many held-out
    inputs over ``L`` that bound lets through (the student's length rule is then approximate)."""
    out: dict[str, dict[str, Any]] = {}
    for fn, rule in policy["functions"].items():
        limit = (rule.get("before") or {}).get("max_input_tokens")
        if not rule.get("enabled") or limit is None:
            continue
        counted = [(student_count(m), gateway_count(m)) for m in heldout.get(fn) or []]
        inside = [g for s, g in counted if s <= limit]
        if not inside:
            continue
        bound = max(inside)
        out[fn] = {"max_input_tokens": bound, "student_limit": int(limit), "heldout_within": len(inside),
                   "heldout_over": sum(s > limit for s, _ in counted),
                   "heldout_over_admitted": sum(s > limit and g <= bound for s, g in counted)}
    return out


def litellm_config(policy: dict[str, Any], gw, student_model: str,
                   limits: dict[str, dict[str, Any]] | None = None) -> str:
    """LiteLLM proxy ``config.yaml``: one model group per function (``distill/<function>``), the student with
    the teacher as fallback when the function is enabled, the teacher alone when it is not; input length as
    the student deployment's ``max_input_tokens`` with pre-call checks and context-window fallbacks, in
    LiteLLM's count where ``limits`` (from ``litellm_limits``) has the function, else as the policy states it.
    ``distill/router`` forwards to ``distill serve-router`` with the client's ``x-distill-function`` header and
    the teacher's own model name (what serve-router sends the teacher; it names the student itself)."""
    teacher = _teacher(policy, gw)
    key_t = f"os.environ/{gw.teacher_key_env}"
    teacher_params = {"model": teacher, "api_key": key_t}
    if getattr(gw, "teacher_api_base", None):
        teacher_params["api_base"] = gw.teacher_api_base
    student = {"model": f"openai/{student_model}", "api_base": gw.student_api_base,
               "api_key": f"os.environ/{gw.student_key_env}"}
    limits = limits or {}
    model_list: list[dict[str, Any]] = []
    fallbacks, window, notes = [], [], []
    for fn, rule in sorted(policy["functions"].items()):
        group = f"distill/{fn}"
        teacher_group = f"distill/{fn}/teacher"
        model_list.append({"model_name": teacher_group, "litellm_params": dict(teacher_params)})
        if rule.get("enabled"):
            # The id is LiteLLM's deployment id, logged as model_id: harvest tells the student's calls by it
            entry: dict[str, Any] = {"model_name": group, "litellm_params": dict(student),
                                     "model_info": {"id": f"{group}/student"}}
            limit = (rule.get("before") or {}).get("max_input_tokens")
            if limit is not None:
                cal = limits.get(fn)
                entry["model_info"]["max_input_tokens"] = int(cal["max_input_tokens"] if cal else limit)
                window.append({group: [teacher_group]})
                if cal:
                    notes.append(f"#   {fn}: {cal['student_limit']} student tokens -> {cal['max_input_tokens']} in "
                                 f"LiteLLM's count ({cal['heldout_within']} held-out inputs within the limit all "
                                 f"pass; {cal['heldout_over_admitted']} of {cal['heldout_over']} over it pass too)")
                else:
                    notes.append(f"#   {fn}: {limit} (student tokens, not calibrated: LiteLLM counts more)")
            model_list.append(entry)
            fallbacks.append({group: [teacher_group]})
        else:
            model_list.append({"model_name": group, "litellm_params": dict(teacher_params)})
    model_list.append({"model_name": ROUTER_GROUP, "litellm_params": {
        "model": f"openai/{_teacher_name(teacher)}", "api_base": gw.router_api_base,
        "api_key": f"os.environ/{gw.student_key_env}"}})
    config = {"model_list": model_list,
              "litellm_settings": {"model_group_settings": {"forward_client_headers_to_llm_api": [ROUTER_GROUP]}},
              "router_settings": {"enable_pre_call_checks": True, "fallbacks": fallbacks,
                                  "context_window_fallbacks": window},
              "general_settings": {"master_key": f"os.environ/{MASTER_KEY_ENV}"}}
    teacher_url = getattr(gw, "teacher_api_base", None) or "https://api.openai.com/v1"
    head = ["# LiteLLM proxy config compiled by `distill route` from routing_policy.json (checked with LiteLLM 1.110.2).",
            "# Call model 'distill/<function>'. Expressed: which functions may use the student (others go to the",
            "# teacher), the input-length limit in LiteLLM's own count, fallback to the teacher on errors.",
            "# Length limits (max_input_tokens, LiteLLM counts cl100k_base tokens plus per-message overhead):",
            *notes,
            f"# Not expressed (call model '{ROUTER_GROUP}' with header '{FUNCTION_HEADER}: <function>'; LiteLLM",
            "# forwards the header to `distill serve-router`, which applies the whole policy):",
            *[f"#   - {x}" for x in NOT_EXPRESSED["litellm"]],
            f"# Start: export {MASTER_KEY_ENV}=sk-<random>  (LiteLLM refuses to start without a master key; clients",
            f"#        send it as their API key) and {gw.student_key_env}, {gw.teacher_key_env}; then",
            "#   LITELLM_LOCAL_MODEL_COST_MAP=True litellm --config litellm.yaml --host 127.0.0.1 --port 4000",
            f"# and, for '{ROUTER_GROUP}', serve-router where router_api_base points:",
            f"#   distill serve-router <route folder> --student-url {gw.student_api_base} --teacher-url {teacher_url} \\",
            f"#     --student-model {student_model} --student-key-env {gw.student_key_env} "
            f"--teacher-key-env {gw.teacher_key_env}"]
    return "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False)


def vllm_sr_config(policy: dict[str, Any], gw, student_model: str) -> str:
    """vLLM Semantic Router ``config.yaml`` (canonical layout ``version: v0.3``, written from its public docs; not
    run here). Per enabled function: a ``metadata`` signal on the request's ``metadata.function``, a ``context``
    signal for the input-length limit, and a decision (priority 200) that tries the student and escalates to the
    teacher with the ``confidence`` algorithm; a second decision (priority 100) sends the function's other
    requests to the teacher, and the default model (the teacher) takes everything else.

    Confidence: vLLM-SR's ``avg_logprob`` confidence is ``clip((mean token logprob + 3) / 3, 0, 1)``, accepted
    when ``>=`` the threshold (``pkg/looper/confidence.go``), so a ``mean_logprob`` threshold ``T`` is exactly
    ``(T + 3) / 3``. Other signals (min, p10, entropy) have no counterpart: those functions' in-band requests go
    to the ``distill/router`` model, i.e. ``distill serve-router``."""
    teacher = _teacher(policy, gw)
    t_name = _teacher_name(teacher)
    t_base = getattr(gw, "teacher_api_base", None) or "https://api.openai.com/v1"

    def backend(name: str, base: str, key_env: str) -> dict[str, Any]:
        return {"name": name, "base_url": base, "provider": "openai", "api_key_env": key_env, "weight": 100}

    models = [
        {"name": "distill/student", "provider_model_id": student_model, "api_format": "openai",
         "backend_refs": [backend("student", gw.student_api_base, gw.student_key_env)]},
        {"name": "distill/teacher", "provider_model_id": t_name, "api_format": "openai",
         "backend_refs": [backend("teacher", t_base, gw.teacher_key_env)]},
        {"name": ROUTER_GROUP, "provider_model_id": t_name, "api_format": "openai",
         "backend_refs": [backend("serve-router", gw.router_api_base, gw.student_key_env)]},
    ]
    cards = [{"name": m["name"], "modality": "text", "capabilities": ["chat"]} for m in models]
    metadata, context, decisions, notes = [], [], [], []
    for fn, rule in sorted(policy["functions"].items()):
        if not rule.get("enabled"):
            notes.append(f"#   {fn}: teacher only ({rule.get('why') or 'not enabled'})")
            continue
        slug = _slug(fn)
        metadata.append({"name": f"function_{slug}", "key": "function", "predicate": {"equals": fn}})
        conditions = [{"type": "metadata", "name": f"function_{slug}"}]
        limit = (rule.get("before") or {}).get("max_input_tokens")
        if limit is not None:
            context.append({"name": f"within_length_{slug}", "min_tokens": "0", "max_tokens": str(int(limit)),
                            "description": f"{fn}: inputs the student was trained on ({int(limit)} student tokens)"})
            conditions.append({"type": "context", "name": f"within_length_{slug}"})
        decisions.append(_vllm_sr_student_decision(fn, slug, rule, conditions, notes))
        decisions.append({"name": f"{slug}_teacher", "description": f"{fn}: outside the student's band",
                          "priority": 100, "rules": {"operator": "AND", "conditions": [dict(conditions[0])]},
                          "modelRefs": [{"model": "distill/teacher", "use_reasoning": False}]})
    config = {"version": "v0.3",
              "listeners": [{"name": "http-8899", "address": "0.0.0.0", "port": 8899, "timeout": "300s"}],
              "providers": {"defaults": {"default_model": "distill/teacher"}, "models": models},
              "routing": {"strategy": "priority", "modelCards": cards,
                          "signals": {"metadata": metadata, "context": context}, "decisions": decisions}}
    head = ["# vLLM Semantic Router config compiled by `distill route` from routing_policy.json (canonical layout",
            "# v0.3, written from the project's docs and not run by distill's tests: check it with",
            "# `vllm-sr config validate --config vllm-sr.yaml`, serve it with `vllm-sr serve --config vllm-sr.yaml`).",
            "# Send each request with metadata {\"function\": \"<function>\"} (an untrusted caller hint in vLLM-SR).",
            "# The distill/router model is `distill serve-router`, which needs the function too (the x-distill-function",
            "# header or metadata.function reaching it).",
            "# Per function:",
            *notes,
            "# The confidence algorithm asks every candidate for logprobs; the teacher must return them too (OpenAI",
            "# does), otherwise vLLM-SR skips the teacher's answer and returns the student's.",
            "# Not expressed (use model 'distill/router', i.e. `distill serve-router`):",
            *[f"#   - {x}" for x in NOT_EXPRESSED["vllm_sr"]], ""]
    return "\n".join(head) + yaml.safe_dump(config, sort_keys=False)


def _vllm_sr_student_decision(fn: str, slug: str, rule: dict[str, Any], conditions: list[dict[str, Any]],
                              notes: list[str]) -> dict[str, Any]:
    """The decision that sends a function's in-band requests to the student (escalating by its confidence where
    vLLM-SR can express the policy's signal); appends a line about it to ``notes``."""
    after = rule.get("after") or {}
    signal, thr = after.get("signal"), after.get("threshold")
    student_dec: dict[str, Any] = {
        "name": f"{slug}_student", "description": f"{fn}: the student, escalated to the teacher when unsure",
        "priority": 200, "rules": {"operator": "AND", "conditions": conditions}}
    if thr is None:
        student_dec["modelRefs"] = [{"model": "distill/student", "use_reasoning": False}]
        notes.append(f"#   {fn}: student, no post-generation check (the policy has no threshold)")
    elif signal == "mean_logprob" and thr > -3.0:
        vt = round((float(thr) + 3.0) / 3.0, 6)
        student_dec["modelRefs"] = [{"model": "distill/student", "use_reasoning": False},
                                    {"model": "distill/teacher", "use_reasoning": False}]
        student_dec["algorithm"] = {"type": "confidence", "confidence": {
            "confidence_method": "avg_logprob", "threshold": vt, "escalation_order": "declared",
            "token_filter": "all", "on_error": "skip"}}
        notes.append(f"#   {fn}: mean_logprob >= {float(thr):.4f} -> avg_logprob confidence >= {vt}")
    elif signal == "mean_logprob":  # every answer passes
        student_dec["modelRefs"] = [{"model": "distill/student", "use_reasoning": False}]
        notes.append(f"#   {fn}: mean_logprob >= {float(thr):.4f} (every answer passes): student")
    else:
        student_dec["modelRefs"] = [{"model": ROUTER_GROUP, "use_reasoning": False}]
        notes.append(f"#   {fn}: {signal} >= {float(thr):.4f} has no vLLM-SR counterpart: in-band requests go "
                     f"to {ROUTER_GROUP} (distill serve-router)")
    return student_dec


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
    """``tensorzero.toml`` (legacy target: TensorZero is archived since June 2026; the emitter is frozen): per
    function, a student and a teacher variant; enabled functions sample the student and fall back to the teacher
    on errors, others use the teacher. A ``router`` model points at ``distill serve-router`` for the content and
    confidence rules."""
    teacher = _teacher(policy, gw)
    t_provider, _, t_model = teacher.partition("/")
    if not t_model:
        t_provider, t_model = "openai", teacher
    lines = ["# TensorZero config compiled by `distill route` from routing_policy.json. Legacy target: the TensorZero",
             "# project is archived (no longer maintained since June 2026; checked with 2026.6.0, its last release).",
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
