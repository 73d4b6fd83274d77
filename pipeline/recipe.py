"""The recipe schema: one pydantic model validates a whole recipe before any work starts.

Field descriptions double as the recipe reference (`distill explain` prints them, the README links here).
Relative paths in a recipe are resolved against the current working directory.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RecipeError(ValueError):
    """An invalid recipe: the message names the file, the field path, the bad value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- harvest
class OpenAISource(Section):
    format: Literal["openai"] = Field(
        "openai",
        description="Log format. 'openai': one JSON object per line holding a chat-completions request and response "
        "as a logging proxy keeps them (timestamp, status_code, request, response).",
    )
    path: str = Field(description="A file, directory or glob of .jsonl / .jsonl.gz files (an fsspec URL works too).")
    function_field: str = Field(
        "request.metadata.function",
        description="Dotted path, inside each log line, of the function (task) name. Missing -> function 'default'.",
    )
    feedback_field: str = Field("feedback", description="Dotted path of an object of metric name -> value.")


class HarvestConfig(Section):
    sources: list[OpenAISource] = Field(min_length=1, description="Where the logged teacher traffic lives.")
    batch_size: int = Field(50_000, gt=0, description="Records per Parquet file written.")


# --------------------------------------------------------------------------- curate
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


# --------------------------------------------------------------------------- train
class StudentFromConfig(Section):
    architecture: Literal["llama", "qwen2"] = Field("llama", description="Model family of the new student.")
    hidden_size: int = Field(128, gt=0, description="Width of the student.")
    num_layers: int = Field(4, gt=0, description="Number of transformer layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads (must divide hidden_size).")
    num_kv_heads: int | None = Field(None, gt=0, description="Key/value heads for grouped-query attention.")
    intermediate_size: int | None = Field(None, gt=0, description="MLP width; default 4 x hidden_size.")
    vocab_size: int = Field(2048, ge=300, description="Size of the BPE tokenizer trained on the curated data.")

    @model_validator(mode="after")
    def _heads(self) -> StudentFromConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        return self


class StudentConfig(Section):
    checkpoint: str | None = Field(
        None, description="Local folder or hub id of a pretrained student (weights are loaded from safetensors only)."
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) of the checkpoint.")
    from_config: StudentFromConfig | None = Field(
        None, description="Build a new student from this config, with a tokenizer trained on the curated data."
    )
    trust_remote_code: bool = Field(False, description="Allow the checkpoint's own Python code to run. Off by default.")

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (self.checkpoint is None) == (self.from_config is None):
            raise ValueError("set exactly one of 'checkpoint' or 'from_config'")
        return self


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules that get adapters.")


class TrainConfig(Section):
    student: StudentConfig
    method: Literal["full", "lora"] = Field("lora", description="Full fine-tuning or a LoRA adapter.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    epochs: float = Field(3.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per device per step.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("cosine")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(512, gt=8, description="Longest tokenized example; longer ones are truncated.")
    packing: bool = Field(False, description="Pack several examples per row (kept apart by position ids).")
    logging_steps: int = Field(10, gt=0, description="Write a metrics.jsonl line every N steps.")
    save_steps: int = Field(200, gt=0, description="Checkpoint every N steps (training resumes from the last one).")
    eval_steps: int | None = Field(None, gt=0, description="Validation loss every N steps (default: each epoch).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto' is bf16 on a GPU that supports it, fp32 on CPU."
    )
    report_to: list[Literal["wandb", "tensorboard"]] = Field(default_factory=list, description="Extra loggers.")


# --------------------------------------------------------------------------- evaluate
class TeacherPrice(Section):
    input_per_mtok: float = Field(ge=0, description="Teacher price in USD per million input tokens.")
    output_per_mtok: float = Field(ge=0, description="Teacher price in USD per million output tokens.")


class StudentPrice(Section):
    usd_per_hour: float = Field(ge=0, description="What the machine serving the student costs per hour.")


class EvaluateConfig(Section):
    max_new_tokens: int = Field(128, gt=0, description="Longest student answer generated.")
    batch_size: int = Field(32, gt=0, description="Prompts generated together.")
    max_records: int | None = Field(None, gt=0, description="Evaluate at most this many test records.")
    teacher_price: TeacherPrice = Field(description="Token prices of the teacher, for cost per 1,000 requests.")
    student_price: StudentPrice = Field(description="Hourly cost of serving the student.")


# --------------------------------------------------------------------------- export
class ExportConfig(Section):
    store: str = Field("store", description="Store folder where versions are published.")
    model_name: str = Field(description="Name of the student in the store (letters, digits, '.', '_', '-').")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the merged master.")

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-' and start with a letter or digit")
        return v


# --------------------------------------------------------------------------- route
class RouteConfig(Section):
    tolerance: float = Field(
        0.02, ge=0, le=1, description="Routed quality may fall at most this far below the teacher's (0.02 = 2 points)."
    )
    length_quantile: float = Field(
        1.0, gt=0, le=1, description="Inputs longer than this quantile of trained input lengths go to the teacher."
    )
    min_records: int = Field(
        5, gt=0, description="A function with fewer held-out records than this is never sent to the student."
    )


# --------------------------------------------------------------------------- recipe
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
        if not NAME_RE.match(v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-' and start with a letter or digit")
        return v

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    def section(self, stage: str) -> dict[str, Any]:
        """The config a stage's fingerprint depends on (plus the seed, which every stage may use)."""
        return {"seed": self.seed, stage: getattr(self, stage).model_dump(mode="json")}


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
