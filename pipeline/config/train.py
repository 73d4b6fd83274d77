"""Recipe section `train`: the student, the method and the optimisation settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Section


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
