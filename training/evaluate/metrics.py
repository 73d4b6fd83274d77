"""Task metrics of a student answer against the teacher's. They live in ``pipeline.metrics`` (the train stage
scores validation answers with them too); this module keeps the evaluate room's import path."""

from pipeline.metrics import (
    QUALITY_METRICS,
    chrf,
    describe_quality,
    exact_match,
    field_accuracy,
    parse_json_object,
    quality,
    response_schema,
    schema_valid,
    score,
)

__all__ = ["QUALITY_METRICS", "chrf", "describe_quality", "exact_match", "field_accuracy", "parse_json_object",
           "quality", "response_schema", "schema_valid", "score"]
