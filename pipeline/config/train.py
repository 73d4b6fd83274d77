"""Recipe section `train`: the student, the method, the objective (SFT or logit distillation), the optimisation
settings and the distributed setup.

Checks that need no files are made here, when the recipe is validated. Checks that must load tokenizers or
configs (teacher and student share a vocabulary, the chat template marks assistant turns, max_length fits the
model) run in ``training.train.preflight`` before any stage does work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.base import MAX_BATCH, MAX_COUNT, MAX_TOKENS, Section, short

# DeepSpeed configs shipped in recipes/deepspeed/, by the name a recipe may use instead of a path.
SHIPPED_DEEPSPEED = {"zero2": 2, "zero3": 3, "zero3_offload": 3}


def deepspeed_stage(value: str) -> int:
    """ZeRO stage of a shipped DeepSpeed config name or of a DeepSpeed JSON file."""
    if value in SHIPPED_DEEPSPEED:
        return SHIPPED_DEEPSPEED[value]
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{short(value)} is neither a shipped config ({', '.join(SHIPPED_DEEPSPEED)}) nor a JSON file")
    try:
        stage = json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0)
        return int(stage)
    except (OSError, ValueError, TypeError, AttributeError, OverflowError) as err:
        raise ValueError(f"{short(value)} is not a DeepSpeed JSON config: {short(str(err), 200)}") from None


class StudentFromConfig(Section):
    architecture: Literal["llama", "qwen2"] = Field("llama", description="Model family of the new student.")
    hidden_size: int = Field(128, gt=0, le=65_536, description="Width of the student.")
    num_layers: int = Field(4, gt=0, le=1024, description="Number of transformer layers.")
    num_heads: int = Field(4, gt=0, le=1024, description="Attention heads (must divide hidden_size).")
    num_kv_heads: int | None = Field(None, gt=0, le=1024, description="Key/value heads for grouped-query attention.")
    intermediate_size: int | None = Field(None, gt=0, le=262_144, description="MLP width; default 4 x hidden_size.")
    vocab_size: int = Field(2048, ge=300, le=1_048_576, description="Size of the BPE tokenizer trained on the curated data.")
    tokenizer: str | None = Field(
        None,
        description="Reuse this tokenizer (local folder or hub id) instead of training one on the curated data; "
        "logit distillation needs it to be the teacher's. vocab_size is then ignored.",
    )

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
    r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: int = Field(32, gt=0, le=65_536, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules that get adapters.")


class QLoraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")


class DistillConfig(Section):
    """How the student learns from the teacher when train.objective is a distillation objective."""

    teacher: str | None = Field(
        None,
        description="Teacher checkpoint (local folder or hub id) for dense_kd and on_policy_kd; it must share the "
        "student's tokenizer. Not used by sparse_kd, which reads the top-k logprobs logged on the records.",
    )
    teacher_revision: str | None = Field(None, description="Hub revision of the teacher checkpoint.")
    teacher_trust_remote_code: bool = Field(False, description="Allow the teacher checkpoint's own Python code.")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl",
        description="Divergence between teacher and student next-token distributions: forward_kl KL(teacher||student) "
        "(mass-covering), reverse_kl KL(student||teacher) (mode-seeking), jsd the generalised Jensen-Shannon "
        "divergence with weight beta.",
    )
    beta: float = Field(0.5, gt=0, lt=1, description="jsd only: mixture weight of the teacher in M = beta P + (1-beta) Q.")
    temperature: float = Field(
        1.0, gt=0, le=100, description="Both distributions are softened by this temperature; the loss is scaled by T^2."
    )
    ce_weight: float = Field(
        0.5, ge=0, le=1,
        description="Loss = ce_weight x cross-entropy on the teacher's text + (1 - ce_weight) x divergence.",
    )
    top_k: int = Field(
        20, gt=0, le=100,
        description="sparse_kd: keep at most this many logged alternatives per token; the probability mass the "
        "logs do not cover goes to one 'rest' bucket.",
    )
    max_new_tokens: int = Field(128, gt=0, le=MAX_TOKENS, description="on_policy_kd: longest completion the student samples.")


Objective = Literal["sft", "dense_kd", "sparse_kd", "on_policy_kd"]


class SelectConfig(Section):
    """How training measures task quality on the validation split when train.select_by is 'quality'."""

    metric: Literal["auto", "exact_match", "field_accuracy", "chrf"] = Field(
        "auto",
        description="Per-answer quality, computed by the same functions as evaluate.quality: 'auto' is JSON field "
        "accuracy on JSON answers and exact match elsewhere, against the teacher's answer.",
    )
    max_records: int = Field(
        256, gt=0, le=MAX_COUNT,
        description="Score at most this many validation records (the first ones by id, the same every time).",
    )
    max_new_tokens: int = Field(128, gt=0, le=MAX_TOKENS, description="Longest answer generated (greedy).")
    batch_size: int = Field(64, gt=0, le=MAX_BATCH, description="Prompts generated together.")


class PlateauConfig(Section):
    """When lr_scheduler 'plateau' cuts the learning rate."""

    patience: int = Field(
        2, gt=0, le=1_000_000,
        description="Evaluations in a row without a better select_by figure (by more than early_stopping_threshold; "
        "a tie in quality is not better) before each cut.",
    )
    factor: float = Field(0.5, gt=0, lt=1, description="The rate is multiplied by this at each cut.")


class TrainConfig(Section):
    student: StudentConfig
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="Full fine-tuning, a LoRA adapter, or QLoRA (a LoRA adapter on a 4-bit base)."
    )
    objective: Objective = Field(
        "sft",
        description="sft: cross-entropy on the teacher's outputs. dense_kd: match the full next-token distribution "
        "of a local teacher checkpoint (train.distill.teacher). sparse_kd: match the top-k teacher logprobs logged on "
        "the records. on_policy_kd: the student samples its own answers and the teacher scores them (TRL).",
    )
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Logit distillation settings.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QLoraConfig = Field(default_factory=QLoraConfig)
    epochs: float = Field(3.0, gt=0, le=10_000, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, le=MAX_BATCH, description="Sequences (packed rows when packing) per device per step.")
    grad_accum: int = Field(1, gt=0, le=MAX_BATCH, description="Gradient accumulation steps.")
    learning_rate: float = Field(2e-4, gt=0, le=10, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "plateau"] = Field(
        "cosine",
        description="How the learning rate moves after warm-up. 'plateau': constant, cut by plateau.factor each time "
        "plateau.patience evaluations bring no better select_by figure (needs a validation split).",
    )
    plateau: PlateauConfig = Field(default_factory=PlateauConfig, description="lr_scheduler: plateau settings.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, le=10)
    max_length: int = Field(512, gt=8, le=MAX_TOKENS, description="Longest tokenized example; longer ones are truncated.")
    packing: bool | None = Field(
        None,
        description="Pack several examples per row of max_length tokens (best-fit decreasing); position ids keep "
        "them apart, so no example attends to or is scored across another. Default: on when exact, i.e. for every "
        "objective but on_policy_kd and when a probe on the student shows packed examples score as if alone; "
        "true insists (and fails when the probe does not hold), false turns it off.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    logging_steps: int = Field(10, gt=0, le=MAX_COUNT, description="Write a metrics.jsonl line every N steps.")
    save_steps: int = Field(
        200, gt=0, le=MAX_COUNT,
        description="Checkpoint every N steps (training resumes from the last one). When the best checkpoint is kept "
        "(select_by: quality, early_stopping_patience) and eval_steps is unset, checkpoints follow the evaluations: "
        "each epoch.",
    )
    eval_steps: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Validation (loss, and quality when select_by is 'quality') every N "
        "steps (default: each epoch).",
    )
    select_by: Literal["loss", "quality"] = Field(
        "loss",
        description="Which validation figure picks the checkpoint that is kept and drives early stopping: 'loss' "
        "(validation loss; the best is kept only with early_stopping_patience) or 'quality' (the student answers "
        "the validation split greedily at every evaluation, scored as train.select says; the best checkpoint is "
        "always kept). Both need a validation split.",
    )
    select: SelectConfig = Field(default_factory=SelectConfig, description="Quality scoring for select_by: quality.")
    early_stopping_patience: int | None = Field(
        None, gt=0, le=1_000_000,
        description="Stop when the select_by figure has not improved for this many evaluations, and keep the best "
        "checkpoint. With eval_steps, save_steps must be a multiple of it.",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, le=1_000,
        description="Smallest improvement that counts (loss, or quality as a 0-1 share).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto' is bf16 on a GPU that supports it, fp32 on CPU."
    )
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed config for the Trainer: a shipped one (zero2, zero3, zero3_offload from "
        "recipes/deepspeed/) or a JSON file. Alternatively launch with recipes/accelerate/zero*.yaml.",
    )
    report_to: list[Literal["wandb", "tensorboard"]] = Field(default_factory=list, description="Extra loggers.")
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1,
        description="Seed of the student's initialization and the data order; default: the recipe's seed. Set it "
        "to train again with another seed while harvest and curate stay as they are.",
    )
    candidates: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Students to try, each a set of overrides of this section (e.g. {name: small, learning_rate: "
        "1.0e-3, student: {from_config: {hidden_size: 64}}}; nested sections merge key by key). Each is trained "
        "(cached by its effective section, so adding one trains only it), scored on the validation split as "
        "train.select says, and the best that clears evaluate.gate there (quality first, then serving cost) is "
        "the stage's output. Empty: train this section alone.",
    )
    candidates_until: float | None = Field(
        None, gt=0, le=1,
        description="Train the candidates in the listed order and stop at the first that clears evaluate.gate on "
        "validation with a validation quality of at least this (0-1, in evaluate's quality metric); the later ones "
        "are not trained. List the cheapest first to pass on the cheapest student that is good enough, or list "
        "seeds of one student to retrain only when a run falls short. Unset: train every candidate.",
    )

    @model_validator(mode="after")
    def _candidates(self) -> TrainConfig:
        from pipeline.config.candidates import effective_candidates

        effective_candidates(self)  # raises naming candidates[i].<field>
        if self.candidates_until is not None and not self.candidates:
            raise ValueError("candidates_until stops a search over train.candidates, and there are none: list "
                             "candidates or remove candidates_until")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        kd = self.objective in ("dense_kd", "on_policy_kd")
        if kd and not self.distill.teacher:
            raise ValueError(f"objective '{self.objective}' needs train.distill.teacher (a local folder or hub id)")
        if self.objective in ("sft", "sparse_kd") and self.distill.teacher:
            raise ValueError(f"train.distill.teacher is not used by objective '{self.objective}'; remove it")
        fc = self.student.from_config
        if kd and fc is not None and fc.tokenizer is None:
            raise ValueError(
                "a student built from_config trains its own tokenizer, which no teacher shares: set "
                "train.student.from_config.tokenizer to the teacher's, or use train.student.checkpoint"
            )
        if self.deepspeed is not None:
            stage = deepspeed_stage(self.deepspeed)
            if self.method == "qlora" and stage == 3:
                raise ValueError(
                    f"QLoRA cannot run under DeepSpeed ZeRO-3 (train.deepspeed: {self.deepspeed}): ZeRO-3 shards "
                    "parameters and cannot partition 4-bit weights. Use zero2, or method: lora"
                )
        if self.objective == "on_policy_kd" and self.packing:
            raise ValueError("packing does not apply to on_policy_kd (the student generates its own sequences)")
        keeps_best = self.early_stopping_patience is not None or self.select_by == "quality"
        if keeps_best and self.eval_steps is not None and self.save_steps % self.eval_steps:
            why = "select_by: quality" if self.select_by == "quality" else "early_stopping_patience"
            raise ValueError(
                f"{why} keeps the best checkpoint, so save_steps ({self.save_steps}) must be a multiple of "
                f"eval_steps ({self.eval_steps})"
            )
        return self

    def seed_or(self, recipe_seed: int) -> int:
        """The training seed: train.seed, else the recipe's."""
        return recipe_seed if self.seed is None else self.seed

    @property
    def keeps_best(self) -> bool:
        """Whether the trained model is the best evaluated checkpoint rather than the last one."""
        return self.early_stopping_patience is not None or self.select_by == "quality"
