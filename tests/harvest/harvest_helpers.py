"""Helpers for the harvest tests: recipes with given sources, reading what harvest wrote, realistic log rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main as cli
from pipeline.record import from_table

from conftest import BASE_RECIPE, merge


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Tests run in their tmp_path (the run directory and relative log paths live there)."""
    monkeypatch.chdir(tmp_path)


def write_recipe(root: Path, harvest: dict[str, Any], **over: Any) -> Path:
    data = merge(BASE_RECIPE, {"harvest": harvest, **over})
    data["harvest"] = harvest  # replace, not merge, the sources
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def harvest(recipe: Path, *args: str) -> dict[str, Any]:
    """Run the harvest stage; returns its manifest."""
    assert cli(["harvest", str(recipe), *args]) == 0
    return json.loads((recipe.parent / "runs" / "t" / "harvest" / "manifest.json").read_text())


def records(recipe_or_dir: Path) -> list[dict[str, Any]]:
    """Every record harvest wrote (records-*.parquet), by id."""
    folder = recipe_or_dir if recipe_or_dir.is_dir() else recipe_or_dir.parent / "runs" / "t" / "harvest"
    files = sorted(folder.glob("records-*.parquet"))
    rows = from_table(pa.concat_tables([pq.read_table(f) for f in files])) if files else []
    return sorted(rows, key=lambda r: r["id"])


def by_id(recipe: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in records(recipe)}


def quarantine(recipe: Path) -> list[dict[str, Any]]:
    p = recipe.parent / "runs" / "t" / "harvest" / "quarantine.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()]


def jsonl(path: Path, rows: list[Any], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# --- realistic OpenAI chat-completions log rows -------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}},
                                                                "required": ["city"]}}}


def openai_row(i: int, ts: str = "2026-11-23T10:00:00Z", **over: Any) -> dict[str, Any]:
    row = {
        "id": f"req_{i}", "timestamp": ts, "status_code": 200, "latency_ms": 300 + i,
        "request": {"model": "gpt-4o", "temperature": 0,
                    "messages": [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": f"Question number {i}?"}],
                    "metadata": {"function": "qa", "episode_id": f"ep{i // 2}"}},
        "response": {"id": f"chatcmpl-{i}", "model": "gpt-4o-2024-08-06", "created": 1795392000 + i,
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"Answer {i}."}}],
                     "usage": {"prompt_tokens": 20, "completion_tokens": 3}},
    }
    row.update(over)
    return row


TOOL_ROUND_TRIP = {
    "id": "req_tool", "timestamp": "2026-11-23T11:00:00Z", "status_code": 200,
    "request": {
        "model": "gpt-4o", "tools": [WEATHER_TOOL], "tool_choice": "auto",
        "messages": [
            {"role": "user", "content": "Weather in Oslo, and should I bring an umbrella?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 4, \"rain\": true}"},
        ],
        "metadata": {"function": "weather_agent"},
    },
    "response": {"model": "gpt-4o-2024-08-06", "choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": "4 °C and rain in Oslo: bring an umbrella."}}],
        "usage": {"prompt_tokens": 70, "completion_tokens": 12}},
}

STRUCTURED = {
    "id": "req_json", "timestamp": "2026-11-23T12:00:00Z",
    "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Triage: my card was billed twice"}],
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "triage", "strict": True,
                    "schema": {"type": "object", "properties": {"intent": {"type": "string"}},
                               "required": ["intent"], "additionalProperties": False}}},
                "metadata": {"function": "triage"}},
    "response": {"model": "gpt-4o-2024-08-06", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "{\"intent\": \"billing\"}"}},
    ]},
}

SEVERAL_CHOICES = {
    "id": "req_n3", "timestamp": "2026-11-23T13:00:00Z",
    "request": {"model": "gpt-4o", "n": 3, "temperature": 0.9,
                "messages": [{"role": "user", "content": "A name for a cat?"}]},
    "response": {"model": "gpt-4o-2024-08-06", "usage": {"prompt_tokens": 9, "completion_tokens": 6},
                 "choices": [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": n}}
                             for i, n in enumerate(["Miso", "Tofu", "Pixel"])]},
}


def stream_chunks() -> list[dict[str, Any]]:
    """A streamed answer as the proxy logged it: text deltas, a tool call in fragments, then usage."""
    base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1795392000, "model": "gpt-4o-mini"}
    deltas = [
        {"role": "assistant", "content": ""}, {"content": "Let me "}, {"content": "check."},
        {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "\"Bergen\"}"}}]},
    ]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 17}})
    return chunks
