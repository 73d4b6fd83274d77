"""The recipe schema: one pydantic model validates a whole recipe before any work starts.

Field descriptions double as the recipe reference (the README's recipe section links here).
Relative paths in a recipe are resolved against the current working directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from pipeline.config.base import NAME_RE, Section, check_name
from pipeline.config.curate import CurateConfig
from pipeline.config.evaluate import EvaluateConfig
from pipeline.config.export import ExportConfig
from pipeline.config.harvest import HarvestConfig
from pipeline.config.route import RouteConfig
from pipeline.config.train import TrainConfig

__all__ = ["NAME_RE", "Recipe", "RecipeError", "load_recipe", "parse_recipe"]


class RecipeError(ValueError):
    """An invalid recipe: the message names the file, the field path, the bad value and what is allowed."""


class Recipe(Section):
    name: str = Field(description="Run name: the run directory is <run_dir>/<name>.")
    run_dir: str = Field("runs", description="Parent folder of run directories.")
    seed: int = Field(0, description="Seed for splits, initialisation and training.")
    harvest: HarvestConfig
    curate: CurateConfig = Field(default_factory=CurateConfig)
    train: TrainConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    route: RouteConfig = Field(default_factory=RouteConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    def section(self, stage: str, also_reads: tuple[str, ...] = ()) -> dict[str, Any]:
        """The config a stage's fingerprint depends on: its section, the seed (which every stage may use) and the
        fields outside its section that it declares it reads (dotted paths such as ``train.student``)."""
        out: dict[str, Any] = {"seed": self.seed, stage: getattr(self, stage).model_dump(mode="json")}
        for dotted in also_reads:
            value: Any = self
            for part in dotted.split("."):
                value = getattr(value, part)
            out[dotted] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return out


def _format_errors(err: ValidationError, data: Any, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _lookup_model(e["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            msg = f"unknown field.{hint} Allowed: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = "required field is missing"
        value = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def _lookup_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model at a location path, for listing the fields allowed there."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for c in candidates:
            for cc in [c, *getattr(c, "__args__", ())]:
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        if nxt is None:
            return None
        model = nxt
    return model


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a mapping; raise RecipeError naming every bad field."""
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, data, source)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe not found: {p} (pass the path of a YAML file, e.g. recipes/demo.yaml)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {p} is not valid YAML: {err}") from None
    return parse_recipe(data, str(p))
