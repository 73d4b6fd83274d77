"""Recipe section `evaluate`: held-out evaluation, its tables, the optional LLM judge, the quality gate and
the prices for cost per 1,000 requests."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import MAX_BATCH, MAX_COUNT, MAX_PRICE, MAX_SECONDS, MAX_TOKENS, Section, short


class TeacherPrice(Section):
    input_per_mtok: float = Field(ge=0, le=MAX_PRICE, description="Teacher price in USD per million input tokens.")
    output_per_mtok: float = Field(ge=0, le=MAX_PRICE, description="Teacher price in USD per million output tokens.")


class StudentPrice(Section):
    usd_per_hour: float = Field(ge=0, le=MAX_PRICE, description="What the machine serving the student costs per hour.")


class JudgeConfig(Section):
    """An LLM judge behind an OpenAI-compatible chat-completions endpoint grades student and teacher answers."""

    base_url: str = Field(description="Endpoint root, e.g. https://api.openai.com/v1 or http://localhost:8000/v1.")
    model: str = Field(description="Judge model name sent in each request.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key itself never goes in "
                          "a recipe). None: no Authorization header."
    )
    functions: list[str] | None = Field(None, description="Judge only these functions (default: all).")
    judge_teacher: bool = Field(True, description="Also grade the teacher's answers, so the gate compares like "
                                                  "with like.")
    max_concurrency: int = Field(8, gt=0, le=1024, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, le=MAX_SECONDS, description="Timeout of one judge request.")
    retries: int = Field(2, ge=0, le=100, description="Retries of a failed request (HTTP 429/5xx, timeouts), with backoff.")
    max_records: int | None = Field(None, gt=0, le=MAX_COUNT, description="Judge at most this many test records.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class GateConfig(Section):
    """When a student may be published. Points are percentage points of the quality metric (0-100)."""

    max_points_below_teacher: float | None = Field(
        None, ge=0, le=100,
        description="Each function's student quality may be at most this many points below the teacher's. "
                    "None: not checked.",
    )
    functions: dict[str, float] = Field(
        default_factory=dict, description="Per-function overrides of max_points_below_teacher, e.g. {faq: 5}."
    )
    max_regression_points: float | None = Field(
        1.0, ge=0, le=100,
        description="Each function may lose at most this many points against the student currently published "
                    "in the store (0: strictly no regression; None: not checked).",
    )
    min_records: int = Field(
        1, gt=0, le=MAX_COUNT, description="Functions with fewer held-out records than this are reported but not gated."
    )
    golden_min_quality: float | None = Field(
        None, ge=0, le=100,
        description="Each function's quality on the golden set (evaluate.golden, scored against its reviewed "
                    "answers), in points 0-100, must be at least this. None: the golden set is reported, not gated.",
    )
    golden_functions: dict[str, float] = Field(
        default_factory=dict, description="Per-function overrides of golden_min_quality, e.g. {ticket_triage: 95}.",
    )

    @field_validator("functions", "golden_functions")
    @classmethod
    def _points(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not 0 <= x <= 100]
        if bad:
            raise ValueError(f"points must be within 0-100 (function {short(bad[0])})")
        return v


class EvaluateConfig(Section):
    max_new_tokens: int = Field(128, gt=0, le=MAX_TOKENS, description="Longest student answer generated.")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Prompts generated together.")
    max_records: int | None = Field(None, gt=0, le=MAX_COUNT, description="Evaluate at most this many test records.")
    quality: Literal["auto", "exact_match", "field_accuracy", "chrf", "judge"] = Field(
        "auto",
        description="Per-answer quality that the gate, the tables and the artefact checks use. 'auto': JSON field "
                    "accuracy where the teacher answered a JSON object, exact match elsewhere; 'chrf': character "
                    "n-gram F-score (sacrebleu) against the teacher; 'judge': the LLM judge's grade.",
    )
    length_buckets: list[int] = Field(
        [64, 128, 256, 512, 1024, 2048],
        description="Upper edges (student input tokens) of the input-length buckets of the tables.",
    )
    languages: list[str] = Field(
        ["en", "es", "de", "fr", "it", "pt", "nl"],
        description="ISO 639-1 codes the language identifier chooses among (lingua); others count as 'other'.",
    )
    latency_samples: int = Field(
        8, ge=0, le=10_000, description="Prompts also timed alone (batch of one) for single-request latency (0: skip)."
    )
    bootstrap: int = Field(1000, ge=0, le=100_000, description="Bootstrap resamples for confidence intervals (0: none).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    judge: JudgeConfig | None = Field(None, description="Optional LLM judge (OpenAI-compatible endpoint).")
    gate: GateConfig = Field(default_factory=GateConfig, description="Quality gate checked before export publishes.")
    teacher_price: TeacherPrice = Field(description="Token prices of the teacher, for cost per 1,000 requests.")
    student_price: StudentPrice = Field(description="Hourly cost of serving the student.")
    golden: list[_harvest.Source] = Field(
        default_factory=list,
        description="Golden sets: files of fixed requests with reviewed answers, each given as a harvest source "
                    "(path, format and, for 'mapped', fields; the answer is the record's output). Scored beside the "
                    "test split and reported on their own (scores.json 'golden'); gated by gate.golden_min_quality; "
                    "curate removes training records that overlap them, as it does for the test split.",
    )

    @field_validator("length_buckets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v) or any(b >= c for b, c in zip(v, v[1:], strict=False)):
            raise ValueError("must be a non-empty list of increasing positive token counts")
        if len(v) > 64 or v[-1] > MAX_TOKENS:
            raise ValueError(f"at most 64 buckets, each at most {MAX_TOKENS:,} tokens")
        return v

    @field_validator("languages")
    @classmethod
    def _iso(cls, v: list[str]) -> list[str]:
        from lingua import Language

        known = {lang.iso_code_639_1.name.lower() for lang in Language.all()}
        bad = [c for c in v if c.lower() not in known]
        if bad:
            raise ValueError(f"unknown ISO 639-1 code {short(bad[0])}")
        if len(v) < 2:
            raise ValueError("name at least two languages")
        return [c.lower() for c in v]

    @model_validator(mode="after")
    def _judge_quality(self) -> EvaluateConfig:
        if self.quality == "judge" and self.judge is None:
            raise ValueError("quality 'judge' needs a judge section")
        return self

    @model_validator(mode="after")
    def _golden(self) -> EvaluateConfig:
        for i, src in enumerate(self.golden):
            if src.path is None:
                raise ValueError(f"golden[{i}]: a golden set is read from files: give 'path' (not 'sql')")
        if (self.gate.golden_min_quality is not None or self.gate.golden_functions) and not self.golden:
            raise ValueError("gate.golden_min_quality and gate.golden_functions need evaluate.golden (the files)")
        return self


# harvest's source schema describes a golden file; harvest imports this module (TeacherPrice), so it is bound last
from pipeline.config import harvest as _harvest  # noqa: E402

if hasattr(_harvest, "Source"):  # else harvest is being imported first, and pydantic completes the model on first use
    EvaluateConfig.model_rebuild()


def check_golden_decontaminated(recipe) -> None:
    """A golden set with curate.decontaminate off would stay in the training data unnoticed (its reviewed scores
    then measure memory): refused when the recipe is validated (``pipeline.recipe``)."""
    if recipe.evaluate is not None and recipe.evaluate.golden and recipe.curate.decontaminate is None:
        raise ValueError("evaluate.golden needs curate.decontaminate, which keeps the golden requests out of "
                         "training; it is null: remove 'decontaminate: null' from curate or drop evaluate.golden")
