"""Recipe section `harvest`: where the logged teacher traffic lives, how it is read, which feedback joins onto it,
and which records a teacher answers afresh."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import MAX_COUNT, MAX_SECONDS, Section, check_finite, check_name, short
from pipeline.config.curate import FeedbackFilter
from pipeline.config.evaluate import TeacherPrice

FORMATS = ("openai", "openai_finetune", "tensorzero", "openpipe", "mapped", "otel", "langfuse", "litellm",
           "openai_stored")
# Record fields a `mapped` source can fill, each from a dotted path into the row ('feedback.<metric>' and
# 'tags.<name>' fill one metric or tag).
MAPPED_FIELDS = (
    "id", "timestamp", "function", "episode_id", "messages", "system", "prompt", "output", "tools",
    "response_format", "finish_reason", "status_code", "error", "model", "provider", "input_tokens",
    "output_tokens", "latency_ms", "cost_usd", "feedback", "tags",
)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?\Z")  # \Z: no trailing newline
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SQLLocation(Section):
    url: str | None = Field(
        None, description="SQLAlchemy URL, e.g. 'sqlite:///logs.db' or 'postgresql+psycopg://user@host/db'. Put "
        "passwords in an environment variable and name it in url_env instead.",
    )
    url_env: str | None = Field(None, description="Name of an environment variable holding the SQLAlchemy URL.")
    table: str | None = Field(None, description="Table (or 'schema.table') to read; or give a query.")
    query: str | None = Field(None, description="A SELECT whose rows are the log records; or give a table.")
    timestamp_column: str | None = Field(
        None, description="Column compared with the watermark in SQL, so a nightly run reads only new rows. "
        "Without it every run reads all rows and filters them in Python.",
    )

    @model_validator(mode="after")
    def _check(self) -> SQLLocation:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("set exactly one of 'url' or 'url_env'")
        if (self.table is None) == (self.query is None):
            raise ValueError("set exactly one of 'table' or 'query'")
        if self.table is not None and not IDENTIFIER.match(self.table):
            raise ValueError(f"table {short(self.table)} must be a plain identifier or schema.table")
        if self.timestamp_column is not None and not IDENTIFIER.match(self.timestamp_column):
            raise ValueError(f"timestamp_column {short(self.timestamp_column)} must be a plain column name")
        if self.url_env is not None and not ENV_NAME.match(self.url_env):
            raise ValueError(f"url_env {short(self.url_env)} is not an environment variable name")
        return self


class Location(Section):
    """Where rows come from: files (`path`) or a SQL table or query (`sql`)."""

    path: str | None = Field(
        None, description="A file, directory or glob; local, file:// or any fsspec URL (s3:// etc. need the "
        "'cloud' extra). Files: .jsonl, .jsonl.gz, .json, .parquet, .csv (also .gz).",
    )
    sql: SQLLocation | None = Field(None, description="Read rows from a SQL table or query through SQLAlchemy.")
    file_format: Literal["auto", "jsonl", "parquet", "csv"] = Field(
        "auto", description="How files are read; 'auto' goes by the extension (.parquet, .csv, else JSON lines).",
    )

    @model_validator(mode="after")
    def _one_location(self) -> Location:
        if (self.path is None) == (self.sql is None):
            raise ValueError("set exactly one of 'path' (files) or 'sql' (a table or query)")
        return self

    @property
    def label(self) -> str:
        if self.path is not None:
            return self.path
        assert self.sql is not None
        return f"sql:{self.sql.table or 'query'}"


class Source(Location):
    format: Literal["openai", "openai_finetune", "tensorzero", "openpipe", "mapped", "otel", "langfuse", "litellm",
                    "openai_stored"] = Field(
        "openai",
        description="What a row holds. 'openai': a chat-completions request and response as a logging proxy keeps "
        "them (streamed responses as a list of chunks work too); 'openai_finetune': OpenAI fine-tuning chat "
        "JSONL (messages, the last assistant turn is the output); 'tensorzero': ChatInference / JsonInference "
        "rows or stored inferences from the TensorZero API; 'openpipe': OpenPipe exports (input, output, tags); "
        "'mapped': any rows, with `fields` saying where each record field is; 'otel': OpenTelemetry GenAI spans "
        "(OTLP/JSON documents, a record per inference span); 'langfuse': Langfuse observation exports (GENERATION "
        "observations, JSON/JSONL or API pages); 'litellm': LiteLLM proxy StandardLoggingPayload logs or "
        "LiteLLM_SpendLogs rows; 'openai_stored': OpenAI stored chat completions joined with their input messages.",
    )
    name: str | None = Field(None, description="Short name of the source in summaries (default: from the path).")
    function: str | None = Field(None, description="Function (task) name for every record of this source.")
    function_field: str | None = Field(
        None, description="Dotted path of the function name in a row. Default per format: openai "
        "'request.metadata.function', openpipe 'tags.prompt_id', tensorzero 'function_name', openai_finetune "
        "'metadata.function', otel the span attribute 'gen_ai.agent.name' (else the resource's service.name), "
        "langfuse 'name', litellm 'metadata.requester_metadata.function' (else the x-distill-function header it "
        "logged), openai_stored 'metadata.function'. "
        "Missing -> 'default'.",
    )
    feedback_field: str = Field("feedback", description="openai/openpipe: dotted path of an object metric -> value.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="mapped: record field -> dotted path into the row ('request.body.messages'); JSON text met on "
        f"the way is decoded. Fields: {', '.join(MAPPED_FIELDS)}, and 'feedback.<metric>', 'tags.<name>'. "
        "Give 'messages' (a chat list) or 'prompt' (one user turn, optionally with 'system').",
    )
    choices: Literal["all", "first"] = Field(
        "all", description="Responses with several choices (n > 1): one record per choice, or the first only.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v)

    @model_validator(mode="after")
    def _fields(self) -> Source:
        if self.format == "mapped":
            if not self.fields:
                raise ValueError("format 'mapped' needs 'fields': record field -> dotted path in the row")
            if "messages" not in self.fields and "prompt" not in self.fields:
                raise ValueError("format 'mapped' needs fields.messages (a chat list) or fields.prompt (a string)")
        elif self.fields:
            raise ValueError(f"'fields' is only for format 'mapped' (this source is '{self.format}')")
        for key in self.fields:
            head, _, rest = key.partition(".")
            if head not in MAPPED_FIELDS or (rest and head not in ("feedback", "tags")):
                raise ValueError(f"fields.{key}: unknown record field. Allowed: {', '.join(MAPPED_FIELDS)}, "
                                 "feedback.<metric>, tags.<name>")
        return self


class FeedbackSource(Location):
    format: Literal["tensorzero", "mapped"] = Field(
        "mapped", description="'tensorzero': BooleanMetricFeedback / FloatMetricFeedback / CommentFeedback / "
        "DemonstrationFeedback rows (or /feedback request bodies); 'mapped': rows with the fields named below.",
    )
    target_field: str = Field("target_id", description="mapped: dotted path of the inference or episode id.")
    metric_field: str | None = Field(
        "metric_name", description="mapped: path of the metric name (long format). Null for wide rows, where "
        "metric_columns are metrics.",
    )
    value_field: str = Field("value", description="mapped: path of the value (long format).")
    metric_columns: list[str] = Field(default_factory=list, description="mapped, wide format: metric columns.")
    timestamp_field: str | None = Field(
        "timestamp", description="Path of the feedback time: the latest value of a metric wins (else file order).",
    )
    level: Literal["auto", "inference", "episode"] = Field(
        "auto", description="What target ids name: 'inference' (a record id), 'episode' (every inference of the "
        "episode gets it) or 'auto' (a record id if one matches, else an episode id).",
    )
    metrics: list[str] | None = Field(None, description="Keep only these metrics (default: all).")
    demonstrations: Literal["output", "ignore"] = Field(
        "output", description="A demonstration (a corrected answer) replaces the record's output ('output'; the "
        "record is tagged output_source=demonstration) or is ignored.",
    )
    comments: Literal["drop", "tag"] = Field(
        "drop", description="Free-text comments may hold personal data: dropped (counted) or kept in tags.comment.",
    )

    @model_validator(mode="after")
    def _wide(self) -> FeedbackSource:
        if self.format == "mapped" and self.metric_field is None and not self.metric_columns:
            raise ValueError("mapped feedback needs metric_field (long rows) or metric_columns (wide rows)")
        return self


class RegenerateWhen(Section):
    no_output: bool = Field(True, description="Records whose call failed or whose output is empty.")
    teacher_models: list[str] = Field(
        default_factory=list, description="Records answered by these (older) teacher models; glob patterns "
        "like 'gpt-3.5*'.",
    )
    feedback: FeedbackFilter | None = Field(
        None, description="Records whose feedback metric is on the wrong side of the threshold (same shape as "
        "curate.feedback: metric, min_value, higher_is_better).",
    )
    functions: list[str] | None = Field(None, description="Only records of these functions (default: all).")


class RegenerateConfig(Section):
    endpoint: str = Field(
        description="Base URL of an OpenAI-compatible API (vLLM, OpenAI, LiteLLM), e.g. 'http://localhost:8000/v1'; "
        "requests go to <endpoint>/chat/completions.",
    )
    model: str = Field(description="Teacher model name sent in each request.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key itself never goes in a "
        "recipe, manifest or log).",
    )
    when: RegenerateWhen = Field(default_factory=RegenerateWhen, description="Which records are answered afresh.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Sampling parameters sent with every request (temperature, max_tokens ...); "
        "they override those logged with the record.",
    )
    top_logprobs: int = Field(
        0, ge=0, le=20, description="Ask for the top-k log-probabilities of every output token and keep them on the "
        "record (teacher.logprobs) for logit distillation; 0 = none, or 20 when train.objective is sparse_kd.",
    )
    concurrency: int = Field(8, gt=0, le=256, description="Requests in flight at once.")
    max_retries: int = Field(5, ge=0, le=100, description="Retries of a request after a 429, a 5xx, a timeout or a lost "
                             "connection, with exponential backoff (Retry-After is honoured).")
    backoff_s: float = Field(1.0, gt=0, le=MAX_SECONDS, description="First retry delay; doubled on each retry.")
    max_backoff_s: float = Field(60.0, gt=0, le=MAX_SECONDS, description="Longest delay between retries.")
    timeout_s: float = Field(120.0, gt=0, le=MAX_SECONDS, description="Timeout of one request.")
    max_calls: int | None = Field(None, gt=0, le=MAX_COUNT, description="Refuse to start when a run needs more new calls than this.")
    price: TeacherPrice | None = Field(None, description="Token prices of this teacher, for the cost accounting.")
    on_failure: Literal["fail", "keep"] = Field(
        "fail", description="When calls still fail after the retries: fail the stage (answers received so far are "
        "cached, a rerun sends only the rest) or keep the logged output and tag the record regenerate_failed.",
    )

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME.match(v):
            raise ValueError(f"{short(v)} is not an environment variable name (give the variable's name, not the key)")
        return v

    @field_validator("params")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_finite(v)

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


class HarvestConfig(Section):
    sources: list[Source] = Field(min_length=1, description="Where the logged teacher traffic lives.")
    feedback: list[FeedbackSource] = Field(
        default_factory=list, description="Feedback kept apart from the logs (files or tables), joined onto records "
        "by inference id or episode id; it lands in record.feedback (metric -> value).",
    )
    regenerate: RegenerateConfig | None = Field(
        None, description="Ask a teacher endpoint for a fresh output where the logged one is missing or poor.",
    )
    incremental: bool = Field(
        True, description="Keep what earlier runs harvested and read only what is new: files from where they "
        "stopped (by byte position), new or rewritten files whole (ids seen before dropped), SQL rows past the "
        "watermark. False: read everything again on every run.",
    )
    batch_size: int = Field(50_000, gt=0, le=10_000_000, description="About this many records per Parquet file written.")
    workers: int = Field(
        0, ge=0, le=64, description="Processes that parse log files: 1 = none (parse in the main process), N = N "
        "worker processes, 0 = one per CPU core when there is enough to read (over 32 MiB), else none.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> HarvestConfig:
        names = [s.name for s in self.sources if s.name]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique: {', '.join(sorted(dup))}")
        return self
