"""What every recipe section shares: strict, frozen pydantic models, the rule for names used as paths, the upper
bounds of numbers and the checks of paths and URLs made when a recipe is validated."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

# \Z, not $: '$' also matches before a trailing newline, so "demo\n" would pass.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
NAME_RULE = "must be 1-64 letters, digits, '.', '_' or '-' and start with a letter or digit"

# Upper bounds shared by the sections (generous: far above any real setup, far below what exhausts a machine).
MAX_COUNT = 10**9  # records, steps, calls, samples
MAX_BATCH = 65_536  # sequences or prompts per batch
MAX_TOKENS = 1_048_576  # a sequence length or token limit (1 Mi tokens)
MAX_PRICE = 100_000.0  # USD per million tokens or per hour
MAX_SECONDS = 86_400.0  # a timeout or delay (one day)
MAX_DEPTH = 32  # nesting of a recipe's mappings and lists


class Section(BaseModel):
    """A recipe section: unknown fields are errors, values are read-only once validated, NaN and infinities are
    refused in every float field."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_name(v: str) -> str:
    """Validate a name that becomes part of a path (run name, model name)."""
    if not NAME_RE.match(v):
        raise ValueError(NAME_RULE)
    return v


def non_finite(value: Any, path: str = "", depth: int = 0) -> list[str]:
    """Dotted paths of the NaN or infinite floats in a nested structure of mappings and lists (a free-form
    field such as harvest.regenerate.params, which no float type checks)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path or "(value)"]
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += non_finite(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            out += non_finite(v, f"{path}.{i}" if path else str(i), depth + 1)
    return out


def check_finite(v: Any) -> Any:
    bad = non_finite(v)
    if bad:
        raise ValueError(f"must hold finite numbers only (NaN or infinity at {short(bad[0], 80)})")
    return v


def short(value: Any, limit: int = 80) -> str:
    """repr of a value cut to `limit` characters, for error messages that must not echo unbounded input."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_dir_path(v: str, what: str = "path") -> str:
    """A local folder that may not exist yet: it must not be an existing non-directory, nor lie under one."""
    if not v or "\x00" in v:
        raise ValueError(f"{what} must be a non-empty path without NUL characters")
    p = Path(v).expanduser()
    try:
        if p.exists() and not p.is_dir():
            raise ValueError(f"{what} {short(v)} exists and is not a directory")
        for parent in p.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"{what} {short(v)} is not a directory path: {short(str(parent))} is a file")
                break
    except OSError as err:
        raise ValueError(f"{what} {short(v)} cannot be used: {short(str(err), 200)}") from None
    return v
