"""Every recipe field of the harvest, curate, train and evaluate sections is documented in its doc page.

The rule: a field counts as documented in docs/<section>.md when its name appears there as inline code, alone or
as a part of a dotted path, optionally followed by a value (`threshold`, `near_dedup.threshold`, `sources[].sql`,
`drop_refusals: false`), or as a key in a fenced ```yaml block (`bands: null`, `{ngram: 13}`).
The walk goes through nested sub-models (curate.near_dedup.threshold, evaluate.judge.retries, ...); a sub-model
defined by another section's module is checked against that section's page, where it is described
(evaluate.golden holds harvest sources: docs/harvest.md; harvest.regenerate.price is evaluate's TeacherPrice:
docs/evaluate.md). No model is loaded: this reads the pydantic classes and four Markdown files.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from pipeline.config.curate import CurateConfig
from pipeline.config.evaluate import EvaluateConfig
from pipeline.config.harvest import HarvestConfig
from pipeline.config.train import TrainConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"
SECTIONS: dict[str, type[BaseModel]] = {
    "harvest": HarvestConfig,
    "curate": CurateConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}
# Fields that are internal and need no documentation, as "section.dotted.path". Empty: every field is user-facing.
EXCLUDED: set[str] = set()

CODE_SPAN = re.compile(r"`([^`\n]+)`")
YAML_BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)
YAML_KEY = re.compile(r"(?:^|[\s{,\-])([A-Za-z_]\w*):(?=\s|$)", re.M)
LEADING_PATH = re.compile(r"[A-Za-z_]\w*(?:\[\])?(?:\.[A-Za-z_]\w*(?:\[\])?)*")


def documented_names(text: str) -> set[str]:
    """Names the page documents: the parts of inline-code paths, and the keys of its fenced YAML blocks."""
    names = set()
    for span in CODE_SPAN.findall(text):
        m = LEADING_PATH.match(span.strip())
        if m:
            names.update(part.removesuffix("[]") for part in m.group(0).split("."))
    for block in YAML_BLOCK.findall(text):
        for line in block.splitlines():
            names.update(YAML_KEY.findall(re.sub(r"\s#.*$", "", line)))
    return names


def sub_models(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside a field's type (through Optional, list, dict, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in sub_models(arg)]


def owner(model: type[BaseModel]) -> str | None:
    """The section whose module defines the model (pipeline.config.<section>)."""
    section = model.__module__.rsplit(".", 1)[-1]
    return section if section in SECTIONS else None


def walk(model: type[BaseModel], section: str, path: str, seen: set[type[BaseModel]]):
    """(section whose page documents it, dotted path, field name) for every field, sub-models included."""
    seen.add(model)
    for name, info in model.model_fields.items():
        dotted = f"{path}.{name}"
        yield section, dotted, name
        for sub in sub_models(info.annotation):
            if sub not in seen:
                yield from walk(sub, owner(sub) or section, dotted, seen)


def test_walk_reaches_nested_fields():
    paths = {p for s, p, _ in walk(CurateConfig, "curate", "curate", set())}
    assert {"curate.near_dedup.threshold", "curate.language.candidates", "curate.feedback.min_value"} <= paths
    found = {(s, p) for s, p, _ in walk(EvaluateConfig, "evaluate", "evaluate", set())}
    assert ("evaluate", "evaluate.judge.retries") in found
    assert ("harvest", "evaluate.golden.file_format") in found  # a golden set is a harvest source


def test_every_recipe_field_is_in_its_doc():
    pages = {s: documented_names((DOCS / f"{s}.md").read_text()) for s in SECTIONS}
    missing = []
    for section, model in SECTIONS.items():
        for doc, path, name in walk(model, section, section, set()):
            if path not in EXCLUDED and name not in pages[doc]:
                missing.append(f"{path}: `{name}` not in docs/{doc}.md")
    assert not missing, "recipe fields missing from the docs:\n" + "\n".join(sorted(set(missing)))
