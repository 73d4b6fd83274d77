"""Importer: LiteLLM proxy request logs -> canonical records.

A row is either a ``StandardLoggingPayload`` (what LiteLLM's file, S3/GCS bucket and custom-callback loggers
write: ``messages``, ``response`` as a ``chat.completion`` object, ``model_parameters``, ``status``,
``startTime``/``endTime`` in unix seconds, ``response_cost``, ``error_str`` / ``error_information``) or a row of
the ``LiteLLM_SpendLogs`` table (through the SQL source or a JSON export: ``request_id``, ``messages`` and
``response`` -- stored only with ``store_prompts_in_spend_logs`` --, ``startTime``/``endTime``,
``request_duration_ms``, ``spend``, ``status``, ``proxy_server_request``; in LiteLLM 1.110 ``messages`` is ``{}``
for chat calls and the prompt is in ``proxy_server_request.messages``). Streamed calls are logged with the
response already assembled. A failed call (``status: failure``) is kept with its error (curate drops it); a row
whose messages were not logged (redacted, or not stored in the spend log) is quarantined with the reason.

Traffic routed by distill through LiteLLM (export.route.gateways' config) holds the student's own calls: those
that serve-router behind ``distill/router`` answered with the student (its ``x-distill-route: student`` header,
which LiteLLM logs among the upstream's headers) and those of the student deployment of a ``distill/<function>``
group (its ``model_info.id``, logged as ``model_id``: ``distill/<function>/student``). They are skipped and counted
(``NotACall``), never taken as the teacher's answers; so are ``distill/router`` calls whose route LiteLLM did not
log (a LiteLLM that keeps no upstream headers): who answered them cannot be told.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from curation.harvest.importers.common import (
    COERCED,
    BadRecord,
    NotACall,
    decode_json_text,
    dotted,
    integer,
    number,
    opt_str,
    timestamp,
)
from curation.harvest.importers.openai import from_call
from pipeline.config.harvest import Source
from pipeline.record import dumps

CHAT_CALLS = frozenset({"completion", "acompletion", "text_completion", "atext_completion"})
ROUTE_HEADER = "llm_provider-x-distill-route"  # serve-router's x-distill-route, as LiteLLM logs upstream headers
STUDENT_CALL = "student calls logged by LiteLLM (x-distill-route: student, or a distill/<function>/student deployment)"
UNKNOWN_ROUTE = ("distill/router calls with no x-distill-route header logged (this LiteLLM keeps no upstream "
                 "headers): harvest serve-router's teacher-*.jsonl instead")
# Where the function is when the source names no function_field: the client's metadata, else the header
# serve-router's clients send (LiteLLM logs the request's headers); payload rows, then spend-log rows.
FUNCTION_FIELDS = ("metadata.requester_metadata.function", "proxy_server_request.metadata.requester_metadata.function",
                   "proxy_server_request.metadata.function", "metadata.requester_metadata.headers.x-distill-function",
                   "proxy_server_request.metadata.headers.x-distill-function")


def not_the_teacher(row: dict[str, Any]) -> str | None:
    """Why this call's answer is not known to be the teacher's (see the module's docstring); None when it is."""
    hidden = decode_json_text(row.get("hidden_params"))
    if not isinstance(hidden, dict):  # a spend-log row keeps them in the request's metadata
        hidden = decode_json_text(dotted(row, "proxy_server_request.metadata.hidden_params"))
    hidden = hidden if isinstance(hidden, dict) else {}
    model_id = row.get("model_id") or hidden.get("model_id")
    if isinstance(model_id, str) and model_id.startswith("distill/") and model_id.endswith("/student"):
        return STUDENT_CALL
    headers = decode_json_text(hidden.get("additional_headers"))
    route = headers.get(ROUTE_HEADER) if isinstance(headers, dict) else None
    if route is not None:
        return STUDENT_CALL if route == "student" else None
    return UNKNOWN_ROUTE if row.get("model_group") == "distill/router" else None


def _function(row: dict[str, Any], cfg: Source) -> Any:
    """The source's function or function_field; else the logged metadata or header, else the distill/<function>
    group (or its .../teacher fallback) that answered."""
    if cfg.function:
        return cfg.function
    if cfg.function_field:
        return dotted(row, cfg.function_field)
    fn = next((fn for path in FUNCTION_FIELDS if (fn := dotted(row, path)) not in (None, "")), None)
    group = row.get("model_group")
    if fn is None and isinstance(group, str) and group.startswith("distill/") and group != "distill/router":
        fn = group[len("distill/"):].removesuffix("/teacher")
    return fn


def _error(row: dict[str, Any]) -> tuple[str | None, int | None]:
    info = decode_json_text(row.get("error_information"))
    if not isinstance(info, dict):
        info = decode_json_text(dotted(row, "metadata.error_information"))
    info = info if isinstance(info, dict) else {}
    text = opt_str(row.get("error_str")) or opt_str(info.get("error_message")) or opt_str(info.get("error_class"))
    code = integer(info.get("error_code"))
    return text, code if code is not None and 100 <= code < 1000 else None


def _tags(row: dict[str, Any]) -> dict[str, str]:
    """The client's requester_metadata, ids and the model group as tags (never the API-key hash)."""
    meta = decode_json_text(row.get("metadata"))
    if meta is not None and not isinstance(meta, dict):
        COERCED["tags"] += 1  # metadata that is not an object: no tags from it
    meta = meta if isinstance(meta, dict) else {}
    tags: dict[str, str] = {}
    requester = decode_json_text(meta.get("requester_metadata"))
    for k, v in (requester.items() if isinstance(requester, dict) else ()):
        if v is not None and k != "function":
            tags[str(k)] = v if isinstance(v, str) else dumps(v)
    for key, value in (("litellm_call_id", row.get("litellm_call_id")), ("trace_id", row.get("trace_id")),
                       ("model_group", row.get("model_group")), ("session_id", row.get("session_id")),
                       ("end_user", row.get("end_user")), ("team", meta.get("user_api_key_team_alias")
                                                           or meta.get("user_api_key_team_id"))):
        if opt_str(value):
            tags[key] = str(value)
    request_tags = decode_json_text(row.get("request_tags"))
    if isinstance(request_tags, list) and request_tags:
        tags["request_tags"] = dumps(request_tags)
    if row.get("cache_hit") in (True, "True", "true"):
        tags["cache_hit"] = "true"
    return tags


def litellm(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """One StandardLoggingPayload or LiteLLM_SpendLogs row -> one record per choice of its response."""
    if not isinstance(row, dict):
        raise BadRecord(f"row is a JSON {type(row).__name__}, not an object")
    # A spend-log row: request_id and spend (LiteLLM 1.110 also stores litellm_call_id there)
    spend_log = "request_id" in row and ("spend" in row or "litellm_call_id" not in row)
    call_type = row.get("call_type")
    if isinstance(call_type, str) and call_type not in CHAT_CALLS:
        raise BadRecord(f"call_type '{call_type[:40]}' is not a chat completion")
    if (why := not_the_teacher(row)) is not None:
        raise NotACall(why)
    msgs = decode_json_text(row.get("messages"))
    if spend_log and msgs in (None, {}, []):  # chat calls: the prompt is in the request as the proxy got it
        msgs = dotted(row, "proxy_server_request.messages")
    if isinstance(msgs, str):
        raise BadRecord("messages are not logged: redacted by LiteLLM (turn_off_message_logging)"
                        if "redacted" in msgs else "messages is text, not a list of chat messages")
    if msgs in (None, {}, []):
        raise BadRecord("messages not stored (LiteLLM spend logs keep them only with store_prompts_in_spend_logs)"
                        if spend_log else "no messages in the row")
    if isinstance(msgs, dict) and isinstance(msgs.get("messages"), list):
        msgs = msgs["messages"]
    params = decode_json_text(row.get("model_parameters"))
    if not isinstance(params, dict):
        body = decode_json_text(row.get("proxy_server_request"))
        params = {k: v for k, v in body.items() if k not in ("messages", "metadata")} if isinstance(body, dict) else {}
    request = {**params, "messages": msgs}
    request["model"] = row.get("model_group") or row.get("model") or params.get("model")
    status = row.get("status")
    response = decode_json_text(row.get("response"))
    error, code = _error(row)
    if status == "failure" or (error and not (isinstance(response, dict) and response.get("choices"))):
        response = {"error": {"message": error or "failure"}}
        code = code or 500
    elif isinstance(response, str) and not response.lstrip().startswith("data:"):
        raise BadRecord("response is text, not a chat.completion object")
    elif response in (None, {}) and spend_log:
        raise BadRecord("response not stored (LiteLLM spend logs keep it only with store_prompts_in_spend_logs)")
    start, end = row.get("startTime"), row.get("endTime")
    latency = number(row.get("request_duration_ms"), "latency_ms")
    if latency is None and start is not None and end is not None:
        try:
            latency = (timestamp(end, "endTime") - timestamp(start, "startTime")).total_seconds() * 1000
        except BadRecord:
            latency = None
    if latency is None and number(row.get("response_time"), "latency_ms") is not None:
        latency = number(row["response_time"]) * 1000  # type: ignore[operator]
    tags = _tags(row)
    fn = _function(row, cfg)
    rid = row.get("request_id") if spend_log else row.get("id") or row.get("litellm_call_id")
    records = from_call(request, response, rid=rid, source=where, ts=start if start is not None else None,
                        status=code, latency=latency, tags=tags, function=fn, choices=cfg.choices,
                        provider=opt_str(row.get("custom_llm_provider")) or "litellm")
    cost = number(row.get("spend") if spend_log else row.get("response_cost"), "cost_usd")
    for rec in records:
        rec["cost_usd"] = cost if len(records) == 1 else None
        u = rec["usage"]
        if u["input_tokens"] is None:
            u["input_tokens"] = integer(row.get("prompt_tokens"), "usage.input_tokens")
        if u["output_tokens"] is None and len(records) == 1:
            u["output_tokens"] = integer(row.get("completion_tokens"), "usage.output_tokens")
    return records
