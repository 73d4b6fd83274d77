"""What every recipe section shares: strict, frozen pydantic models and the rule for names used as paths."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "must be 1-64 letters, digits, '.', '_' or '-' and start with a letter or digit"


class Section(BaseModel):
    """A recipe section: unknown fields are errors, values are read-only once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_name(v: str) -> str:
    """Validate a name that becomes part of a path (run name, model name)."""
    if not NAME_RE.match(v):
        raise ValueError(NAME_RULE)
    return v
