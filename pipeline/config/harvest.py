"""Recipe section `harvest`: where the logged teacher traffic lives and how it is read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import Section


class OpenAISource(Section):
    format: Literal["openai"] = Field(
        "openai",
        description="Log format. 'openai': one JSON object per line holding a chat-completions request and response "
        "as a logging proxy keeps them (timestamp, status_code, request, response).",
    )
    path: str = Field(description="A file, directory or glob of .jsonl / .jsonl.gz files (an fsspec URL works too).")
    function_field: str = Field(
        "request.metadata.function",
        description="Dotted path, inside each log line, of the function (task) name. Missing -> function 'default'.",
    )
    feedback_field: str = Field("feedback", description="Dotted path of an object of metric name -> value.")


class HarvestConfig(Section):
    sources: list[OpenAISource] = Field(min_length=1, description="Where the logged teacher traffic lives.")
    batch_size: int = Field(50_000, gt=0, description="Records per Parquet file written.")
