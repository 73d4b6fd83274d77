"""The recipe schema: one pydantic model validates a whole recipe before any work starts.

Field descriptions double as the recipe reference (the README's recipe section links here).
Relative paths in a recipe are resolved against the current working directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.config.base import MAX_DEPTH, NAME_RE, Section, check_dir_path, check_name, non_finite, short
from pipeline.config.curate import CurateConfig
from pipeline.config.evaluate import EvaluateConfig
from pipeline.config.export import ExportConfig
from pipeline.config.harvest import HarvestConfig
from pipeline.config.route import RouteConfig
from pipeline.config.train import TrainConfig

__all__ = ["MAX_RECIPE_BYTES", "NAME_RE", "Recipe", "RecipeError", "load_recipe", "parse_recipe"]

MAX_RECIPE_BYTES = 1024 * 1024  # a recipe file larger than this is refused before it is parsed
MAX_MESSAGE = 300  # longest error message line echoed from a validator


class RecipeError(ValueError):
    """An invalid recipe: the message names the file, the field path, the bad value and what is allowed."""


class Recipe(Section):
    name: str = Field(description="Run name: the run directory is <run_dir>/<name>.")
    run_dir: str = Field("runs", description="Parent folder of run directories.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for splits, initialisation and training.")
    harvest: HarvestConfig
    curate: CurateConfig = Field(default_factory=CurateConfig)
    train: TrainConfig | None = Field(None, description="The student and how it is trained (needed from train on).")
    evaluate: EvaluateConfig | None = Field(
        None, description="How the student is scored against the teacher, prices and the gate (needed from evaluate on).")
    export: ExportConfig | None = Field(
        None, description="Where and how the student is published (needed by route and export).")
    route: RouteConfig = Field(default_factory=RouteConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, v: str) -> str:
        return check_dir_path(v, "run_dir")

    @model_validator(mode="after")
    def _run_path(self) -> Recipe:
        check_dir_path(str(self.run_path), "run directory <run_dir>/<name>")
        return self

    @model_validator(mode="after")
    def _golden_decontaminated(self) -> Recipe:
        from pipeline.config.evaluate import check_golden_decontaminated

        check_golden_decontaminated(self)
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    def section(self, stage: str, also_reads: tuple[str, ...] = ()) -> dict[str, Any]:
        """The config a stage's fingerprint depends on: its section, the seed (which every stage may use) and the
        fields outside its section that it declares it reads (dotted paths such as ``train.student``)."""
        own = getattr(self, stage)
        out: dict[str, Any] = {"seed": self.seed, stage: None if own is None else own.model_dump(mode="json")}
        for dotted in also_reads:
            value: Any = self
            for part in dotted.split("."):
                value = None if value is None else getattr(value, part)
            out[dotted] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return out


def _format_errors(err: ValidationError, data: Any, source: str) -> str:
    lines = [f"invalid recipe {_cut(source, 200)}:"]
    for e in err.errors():
        loc = ".".join(short(p, 80) if not isinstance(p, str) else _cut(p, 80) for p in e["loc"]) or "(top level)"
        msg = _cut(e["msg"], MAX_MESSAGE)
        if e["type"] == "extra_forbidden":
            parent = _lookup_model(e["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(e["loc"][-1])[:200], allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            msg = f"unknown field.{hint} Allowed: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = "required field is missing"
        shown = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {short(e.get('input'))})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        raise RecipeError(f"invalid recipe {_cut(source, 200)}: the top level must be a mapping, got "
                          f"{type(data).__name__}")
    try:
        bad = non_finite(data)
    except ValueError as err:
        raise RecipeError(f"invalid recipe {_cut(source, 200)}: {err}") from None
    if bad:
        raise RecipeError("\n".join([f"invalid recipe {_cut(source, 200)}:"]
                                     + [f"  {_cut(b, 200)}: must be a finite number (got NaN or infinity)"
                                        for b in bad[:20]]))
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, data, source)) from None


class RecipeLoader(yaml.SafeLoader):
    """A SafeLoader for untrusted recipes: no aliases (so no billion-laughs or recursive structures), no
    duplicate keys at any level, at most MAX_DEPTH nested mappings and lists. Each check runs on the event
    stream, before anything is built."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases are not allowed in a recipe (found *{_cut(str(event.anchor), 40)} on line "
                f"{event.start_mark.line + 1}); write the value out", event.start_mark)
        if self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"mappings and lists are nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})",
                    mark)
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as err:  # e.g. a 5,000-digit int, the date 2026-13-45
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the {_cut(node.tag.rsplit(':', 1)[-1], 40)} value on line {node.start_mark.line + 1}: "
                f"{_cut(str(err), 200)}",
                node.start_mark) from None

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # unhashable: the base class names it
                if dup:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"duplicate key {short(key)} on line {key_node.start_mark.line + 1}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_error(err: yaml.YAMLError) -> str:
    """The YAML error as PyYAML words it (problem and 'line N, column M'), each line cut short."""
    return "\n".join(_cut(line, MAX_MESSAGE) for line in str(err).splitlines()[:12])


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (at most MAX_RECIPE_BYTES; no aliases, no duplicate keys, at most
    MAX_DEPTH levels of nesting)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe not found: {_cut(str(p), 200)} (pass the path of a YAML file, e.g. "
                          "recipes/demo.yaml)")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(f"recipe {_cut(str(p), 200)} cannot be read: {_cut(str(err), 200)}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {_cut(str(p), 200)} is larger than 1 MiB ({MAX_RECIPE_BYTES} bytes); a recipe "
                          "is a short YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise RecipeError(f"recipe {_cut(str(p), 200)} is not valid UTF-8 (line {line})") from None
    loader = None
    try:
        loader = RecipeLoader(text)  # checks every character is printable
        loader.name = _cut(str(p), 200)
        data = loader.get_single_data()
    except yaml.reader.ReaderError as err:  # an unprintable character: PyYAML gives its position, not its line
        line = text[: err.position].count("\n") + 1
        raise RecipeError(f"recipe {_cut(str(p), 200)} is not valid YAML: character {short(err.character, 12)} is "
                          f"not allowed (line {line})") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {_cut(str(p), 200)} is not valid YAML: {_yaml_error(err)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return parse_recipe(data, str(p))
