"""Recipe section `export`: the artefacts and the store they are published to."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.base import Section, check_name


class ExportConfig(Section):
    store: str = Field("store", description="Store folder where versions are published.")
    model_name: str = Field(description="Name of the student in the store (letters, digits, '.', '_', '-').")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the merged master.")

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v)
