"""Recipe section `evaluate`: held-out evaluation, prices for cost per 1,000 requests."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.base import Section


class TeacherPrice(Section):
    input_per_mtok: float = Field(ge=0, description="Teacher price in USD per million input tokens.")
    output_per_mtok: float = Field(ge=0, description="Teacher price in USD per million output tokens.")


class StudentPrice(Section):
    usd_per_hour: float = Field(ge=0, description="What the machine serving the student costs per hour.")


class EvaluateConfig(Section):
    max_new_tokens: int = Field(128, gt=0, description="Longest student answer generated.")
    batch_size: int = Field(32, gt=0, description="Prompts generated together.")
    max_records: int | None = Field(None, gt=0, description="Evaluate at most this many test records.")
    teacher_price: TeacherPrice = Field(description="Token prices of the teacher, for cost per 1,000 requests.")
    student_price: StudentPrice = Field(description="Hourly cost of serving the student.")
