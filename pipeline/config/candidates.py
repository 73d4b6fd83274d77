"""``train.candidates``: each item overrides fields of the train section; this module merges each with the section
and validates the result against the same schema, so a bad candidate fails when the recipe is validated, naming
its index and field (``candidates[1].learning_rate: ...``).

Merging: a key replaces the section's value; nested sections (``lora``, ``distill``, ``select``,
``student.from_config``, ...) merge key by key; a ``student`` naming ``checkpoint`` drops the section's
``from_config`` and the other way round. ``name`` labels the candidate (default ``candidate-<i>``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.config.base import short

if TYPE_CHECKING:
    from pipeline.config.train import TrainConfig

MAX_CANDIDATES = 16
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
SOURCES = ("checkpoint", "from_config")


def merge(base: dict[str, Any], over: dict[str, Any], path: str = "") -> dict[str, Any]:
    """The section ``base`` with the override ``over`` applied (see the module docstring)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            sub = dict(out[k])
            if path + k == "student" and any(s in v for s in SOURCES):
                for s in SOURCES:  # the student comes from one source: naming one drops the other
                    if s not in v:
                        sub.pop(s, None)
            out[k] = merge(sub, v, f"{path}{k}.")
        else:
            out[k] = v
    return out


def candidate_name(over: dict[str, Any], i: int) -> str:
    name = over.get("name", f"candidate-{i}")
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"candidates[{i}].name: must be 1-64 letters, digits, '.', '_' or '-' (got {short(name)})")
    return name


def effective_candidates(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, the train section each candidate trains with), validated; raises ValueError naming the candidate."""
    if not cfg.candidates:
        return []
    if len(cfg.candidates) > MAX_CANDIDATES:
        raise ValueError(f"candidates: at most {MAX_CANDIDATES} (got {len(cfg.candidates)})")
    base = cfg.model_dump(mode="python", exclude={"candidates", "candidates_until"}, exclude_unset=True)
    out: list[tuple[str, TrainConfig]] = []
    for i, over in enumerate(cfg.candidates):
        if not isinstance(over, dict):
            raise ValueError(f"candidates[{i}]: must be a mapping of train fields to override (got {short(over)})")
        name = candidate_name(over, i)
        for field in ("candidates", "candidates_until"):
            if field in over:
                raise ValueError(f"candidates[{i}].{field}: a candidate cannot hold candidates or candidates_until "
                                 "(they belong to the train section)")
        merged = merge(base, {k: v for k, v in over.items() if k != "name"})
        try:
            eff = type(cfg).model_validate(merged)
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(p) for p in e["loc"])
            where = f"candidates[{i}]" + (f".{loc}" if loc else "")
            raise ValueError(f"{where}: {e['msg']}" + (f" (got {short(e.get('input'))})"
                                                       if e["type"] not in ("missing", "extra_forbidden") else "")
                             ) from None
        out.append((name, eff))
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"candidates: the name {short(dup)} is used twice")
    return out
