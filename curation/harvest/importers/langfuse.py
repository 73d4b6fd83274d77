"""Importer: Langfuse observation exports -> canonical records.

A row is one observation as the Langfuse UI batch export (JSON / JSONL) or the public API
(``GET /api/public/observations``, v1, or ``/v2/observations`` with ``fields=io,model,usage,time``) gives it; a
page of the API ``{"data": [...], "meta": {...}}`` is one row whose observations each give records. Only
``GENERATION`` observations are teacher calls; others (SPAN, EVENT, TOOL, ...) are quarantined with the reason.

``input``: OpenAI-style messages, ``{"messages": [...], "tools": [...]}``, a prompt string, or any of these as JSON
text (API v2); ``output``: an assistant message, a string, a choice or a ``chat.completion``. ``level: ERROR``
with ``statusMessage`` is the error (curate drops it). ``modelParameters`` become the sampling parameters (numeric
text read as numbers), ``usageDetails`` (else ``usage``) the tokens, ``latency`` (seconds) the latency,
``totalCost`` / ``costDetails.total`` the cost. Scores are feedback: the export's one column per score name (a
list of values: the last wins) and ``scores: [{name, value}]`` objects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from curation.harvest.importers.common import (
    COERCED,
    BadRecord,
    chat_message,
    chat_messages,
    decode_json_text,
    dotted,
    integer,
    json_text,
    many,
    new_record,
    number,
    opt_str,
    timestamp,
)
from curation.harvest.importers.openai import logprobs
from pipeline.config.harvest import Source
from pipeline.record import dumps, message

# Columns of the observation export and API that are not score columns.
KNOWN = frozenset({
    "id", "traceId", "projectId", "environment", "type", "startTime", "endTime", "name", "metadata",
    "parentObservationId", "level", "statusMessage", "version", "createdAt", "updatedAt", "model", "internalModelId",
    "modelParameters", "input", "output", "completionStartTime", "promptId", "promptName", "promptVersion",
    "latency", "timeToFirstToken", "providedUsageDetails", "usageDetails", "costDetails", "providedCostDetails",
    "inputCost", "outputCost", "totalCost", "inputUsage", "outputUsage", "totalUsage", "usagePricingTierId",
    "usagePricingTierName", "toolDefinitions", "toolCalls", "toolCallNames", "traceName", "traceTags",
    "traceTimestamp", "userId", "sessionId", "toolDefinitionsCount", "toolCallsCount", "modelId", "inputPrice",
    "outputPrice", "totalPrice", "comments", "usage", "calculatedInputCost", "calculatedOutputCost",
    "calculatedTotalCost", "promptTokens", "completionTokens", "totalTokens", "unit", "providedModelName",
    "tags", "release", "isRootObservation", "scores",
})
INT_PARAMS = ("max_tokens", "max_completion_tokens", "seed", "n", "top_k", "top_logprobs")


def _params(v: Any) -> dict[str, Any]:
    v = decode_json_text(v)
    if not isinstance(v, dict):
        return {}
    out: dict[str, Any] = {}
    for k, x in v.items():
        if x is None:
            continue
        if isinstance(x, str) and k in INT_PARAMS and integer(x) is not None:
            x = integer(x)
        elif isinstance(x, str) and k not in ("stop",) and number(x) is not None:
            x = number(x)
        out[str(k)] = x
    return out


def _input(v: Any) -> tuple[list[dict[str, Any]], Any]:
    """(messages, tools) from an observation's input."""
    v = decode_json_text(v)
    tools = None
    if isinstance(v, dict):
        tools = v.get("tools") or v.get("functions")
        if isinstance(v.get("messages"), list):
            v = v["messages"]
        elif isinstance(v.get("prompt"), str):
            v = v["prompt"]
        elif isinstance(v.get("role"), str):
            v = [v]
        else:
            raise BadRecord("input is an object without 'messages' or 'prompt'")
    if isinstance(v, str):
        if not v:
            raise BadRecord("input is empty")
        return [message("user", v)], tools
    if v is None:
        raise BadRecord("no input")
    return chat_messages(v, "input"), tools


def _output(v: Any) -> tuple[dict[str, Any] | None, str | None, Any]:
    """(output message, finish reason, logprobs) from an observation's output."""
    v = decode_json_text(v)
    if v is None:
        return None, None, None
    if isinstance(v, str):
        return message("assistant", v), None, None
    if isinstance(v, dict) and isinstance(v.get("choices"), list) and v["choices"]:  # a chat.completion
        v = v["choices"][0]
    if isinstance(v, list):
        if not v:
            return None, None, None
        v = v[-1]
    if isinstance(v, dict) and isinstance(v.get("message"), dict):  # a choice
        fin = v.get("finish_reason")
        return (chat_message({"role": "assistant", **v["message"]}, "output.message"),
                fin if isinstance(fin, str) else None, logprobs(v))
    if isinstance(v, dict) and ("content" in v or "tool_calls" in v or "role" in v):
        if v.get("content") is None and isinstance(v.get("refusal"), str):
            v = {**v, "content": v["refusal"]}
        return chat_message({"role": "assistant", **v}, "output"), None, None
    if isinstance(v, dict):  # structured output (a JSON object the teacher answered)
        return message("assistant", dumps(v)), None, None
    return message("assistant", str(v)), None, None


def _scores(row: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in row.items():
        if k in KNOWN or not isinstance(v, list) or not v:
            continue
        last = v[-1]
        if isinstance(last, bool) or isinstance(last, (int, float)) and last == last and abs(last) != float("inf"):
            out[str(k)] = float(last)
    for s in row.get("scores") if isinstance(row.get("scores"), list) else ():
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            x = s.get("value")
            if isinstance(x, (bool, int, float)) and x == x and abs(x) != float("inf"):
                out[s["name"]] = float(x)
    return out


def _usage(row: dict[str, Any]) -> tuple[int | None, int | None]:
    d = decode_json_text(row.get("usageDetails"))
    if isinstance(d, dict) and ("input" in d or "output" in d):
        return integer(d.get("input"), "usage.input_tokens"), integer(d.get("output"), "usage.output_tokens")
    u = row.get("usage")
    if isinstance(u, dict) and ("input" in u or "output" in u):
        return integer(u.get("input"), "usage.input_tokens"), integer(u.get("output"), "usage.output_tokens")
    return (integer(row.get("inputUsage") if row.get("inputUsage") is not None else row.get("promptTokens"),
                    "usage.input_tokens"),
            integer(row.get("outputUsage") if row.get("outputUsage") is not None else row.get("completionTokens"),
                    "usage.output_tokens"))


def observation(row: Any, where: str, cfg: Source) -> list[dict[str, Any]]:
    if not isinstance(row, dict):
        raise BadRecord(f"an observation is a JSON {type(row).__name__}, not an object")
    kind = row.get("type")
    if kind is not None and kind != "GENERATION":
        raise BadRecord(f"observation type '{str(kind)[:20]}' is not a GENERATION (not a teacher call)")
    rid = opt_str(row.get("id"))
    if not rid:
        raise BadRecord("observation has no 'id'")
    msgs, tools = _input(row.get("input"))
    out, finish, lps = _output(row.get("output"))
    error = None
    if row.get("level") == "ERROR":
        error = opt_str(row.get("statusMessage")) or "level ERROR"
    if out is None and error is None:
        raise BadRecord("generation has no output and no error (level ERROR)")
    start = row.get("startTime")
    ts = timestamp(start, "startTime")
    latency = number(row.get("latency"), "latency_ms")
    latency = latency * 1000 if latency is not None else None
    if latency is None and row.get("endTime") is not None:
        try:
            latency = (timestamp(row["endTime"], "endTime") - ts).total_seconds() * 1000
        except BadRecord:
            latency = None
    cost = number(row.get("totalCost"), "cost_usd")
    if cost is None:
        cost = number(dotted(row, "costDetails.total"))
    if cost is None:
        cost = number(row.get("calculatedTotalCost"))
    meta = decode_json_text(row.get("metadata"))
    if meta is not None and not isinstance(meta, dict):
        COERCED["tags"] += 1  # metadata that is not an object: no tags from it
    meta = meta if isinstance(meta, dict) else {}
    tags = {k: v for k, v in (
        ("trace_id", opt_str(row.get("traceId"))), ("parent_observation_id", opt_str(row.get("parentObservationId"))),
        ("trace_name", opt_str(row.get("traceName"))), ("environment", opt_str(row.get("environment"))),
        ("prompt_name", opt_str(row.get("promptName"))), ("prompt_version", opt_str(row.get("promptVersion"))),
        ("session_id", opt_str(row.get("sessionId"))),
    ) if v}
    trace_tags = row.get("traceTags") if row.get("traceTags") is not None else row.get("tags")
    if isinstance(trace_tags, list) and trace_tags:
        tags["trace_tags"] = dumps(trace_tags)
    if isinstance(row.get("timeToFirstToken"), (int, float)) and not isinstance(row.get("timeToFirstToken"), bool):
        tags["time_to_first_token_s"] = str(row["timeToFirstToken"])
    fn = cfg.function or dotted(row, cfg.function_field or "name")
    usage_in, usage_out = _usage(row)
    params = _params(row.get("modelParameters"))
    model = opt_str(row.get("model")) or opt_str(row.get("providedModelName"))
    provider = opt_str(meta.get("ls_provider")) or "langfuse"
    return [new_record(
        rid, where, ts, str(fn) if fn not in (None, "") else "default", msgs,
        episode_id=opt_str(row.get("traceId")), tools=json_text(tools or row.get("toolDefinitions")),
        output=out, finish_reason=finish, status_code=500 if error else 200, error=error,
        teacher={"model": model, "provider": provider, "params": dumps(params) if params else "{}", "logprobs": lps},
        usage={"input_tokens": usage_in, "output_tokens": usage_out}, latency_ms=latency, cost_usd=cost,
        feedback=_scores(row), tags=tags,
    )]


def langfuse(row: Any, where: str, cfg: Source, default_ts: datetime) -> list[dict[str, Any]]:
    """One observation (or an API page of them) -> its record."""
    if not isinstance(row, dict):
        raise BadRecord(f"row is a JSON {type(row).__name__}, not an object")
    if isinstance(row.get("data"), list) and "type" not in row:  # an API page {"data": [...], "meta": {...}}
        # Other observation types (spans, events, tools) are not teacher calls: a page's generations are its calls.
        gens = [o for o in row["data"] if not (isinstance(o, dict) and o.get("type") not in (None, "GENERATION"))]
        if not gens:
            raise BadRecord(f"no GENERATION observation among the page's {len(row['data'])} observations")
        return many(gens, lambda obs, _i: observation(obs, where, cfg), where, cfg.function or "default",
                    default_ts, "data")
    return observation(row, where, cfg)
