"""Recipe section `curate`: the filters, dedup, PII handling and split of the curate stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Section


class FeedbackFilter(Section):
    metric: str = Field(description="Feedback metric to filter on, e.g. 'thumbs_up'.")
    min_value: float = Field(
        0.5, description="Records whose metric is below this value are dropped; records without it are kept."
    )
    higher_is_better: bool = Field(True, description="Set false for metrics where lower is better (then max_value).")


class SplitConfig(Section):
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of distinct inputs in the validation split.")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="Share of distinct inputs in the test split.")
    salt: str = Field("distill", description="Salt of the stable hash; change it only to reshuffle every split.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 so that train is not empty")
        return self


class CurateConfig(Section):
    drop_http_errors: bool = Field(True, description="Drop records whose logged call failed (status >= 400 or error).")
    drop_empty_outputs: bool = Field(True, description="Drop records whose teacher output is empty.")
    drop_truncated_outputs: bool = Field(True, description="Drop outputs cut off by the length limit.")
    drop_refusals: bool = Field(True, description="Drop teacher refusals ('I can't help with that').")
    feedback: FeedbackFilter | None = Field(None, description="Drop records with bad user feedback.")
    pii: Literal["redact", "drop", "keep"] = Field(
        "redact",
        description="E-mail addresses and phone numbers in inputs and outputs: replace with a placeholder "
        "('redact'), drop the record ('drop') or leave them ('keep').",
    )
    dedup: bool = Field(True, description="Exact dedup on (function, user turns); keeps the best-feedback copy.")
    split: SplitConfig = Field(default_factory=SplitConfig)
