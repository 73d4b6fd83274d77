"""The curate operator for PII and secrets. Detection and redaction live in ``pipeline.pii``, shared with harvest,
which already redacts every record it writes with the same recipe setting (``curate.pii``): on harvested records
this pass finds nothing new, and decides drops from the kinds the ``pii_redacted`` tag names (set by harvest or by
this pass), so curate's output is what it was when curate alone redacted."""

from __future__ import annotations

import pyarrow as pa

from pipeline.config.curate import PIIConfig
from pipeline.pii import (  # noqa: F401  (public names of this module before the move)
    SECRET_PATTERNS,
    SECRET_PLACEHOLDER,
    Detector,
    Finding,
    detector,
    enabled,
    is_personal,
    redact_table,
    replace,
    scrub,
    short_kind,
    tagged_kinds,
)


def pii(batch: pa.Table, plan) -> tuple[pa.Table, list[str | None]]:
    """Redact or mask PII and secrets per the recipe (``pipeline.pii.redact_table``: in every record, also those
    dropped later, so rejected.parquet holds no PII); drop the record when the action for a kind it holds is
    'drop'. Kinds found go to tag pii_redacted."""
    pcfg: PIIConfig = plan.cfg.pii
    if not enabled(pcfg):
        return batch, [None] * batch.num_rows
    batch, _ = redact_table(batch, pcfg)
    reasons: list[str | None] = [None] * batch.num_rows
    for i, ks in enumerate(tagged_kinds(batch)):
        secrets = sorted(k for k in ks if not is_personal(k))
        personal = sorted(k for k in ks if is_personal(k))
        if secrets and pcfg.secrets_action == "drop":
            reasons[i] = f"contains secrets: {', '.join(secrets)}"
        elif personal and pcfg.action == "drop":
            reasons[i] = f"contains {', '.join(personal)}"
    return batch, reasons
