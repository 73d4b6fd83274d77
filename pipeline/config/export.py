"""Recipe section `export`: the merged master, the quantized artefacts made from it and the store they are
published to."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import MAX_COUNT, Section, check_dir_path, check_name, short

# Artefact formats made from the merged master, and the extra each needs (None: the core install).
FORMATS: dict[str, str | None] = {
    "bnb-8bit": "quant",  # bitsandbytes LLM.int8 (transformers + vLLM on GPU)
    "bnb-nf4": "quant",  # bitsandbytes 4-bit NormalFloat
    "w8a8": "compress",  # compressed-tensors INT8 weights and activations (llm-compressor SmoothQuant + GPTQ)
    "w4a16": "compress",  # compressed-tensors INT4 weights, 16-bit activations (llm-compressor GPTQ)
    "gguf-f16": None,  # GGUF for llama.cpp / Ollama, float16 weights
    "gguf-q8_0": None,  # GGUF, 8-bit block quantization
}
Format = Literal["bnb-8bit", "bnb-nf4", "w8a8", "w4a16", "gguf-f16", "gguf-q8_0"]


def check_store(v: str) -> str:
    """A store is a local folder (which must not be an existing non-directory) or an fsspec URL whose protocol
    fsspec knows and whose filesystem can be loaded here, so that a bad store fails at validate, not at export."""
    if "://" not in v and "::" not in v:
        return check_dir_path(v, "store folder")
    import fsspec
    from fsspec.registry import known_implementations, registry

    url = v.split("::")[-1] if "::" in v else v
    protocols = [part.split("://", 1)[0] for part in v.split("::") if "://" in part]
    if not protocols:
        raise ValueError(f"{short(v)} is neither a folder nor an fsspec URL (protocol://path)")
    for protocol in protocols:
        if protocol not in known_implementations and protocol not in registry:
            raise ValueError(f"unknown fsspec protocol {short(protocol, 40)} in {short(v)} (known: file, memory, s3, "
                             "gcs, az, ...; or give a local folder)")
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as err:
            raise ValueError(f"store protocol {short(protocol, 40)} cannot be used here: {short(str(err), 200)}") from None
    if protocols[-1] in ("file", "local"):
        check_dir_path(url.split("://", 1)[1], "store folder")
    return v


class ExportConfig(Section):
    store: str = Field(
        "store", description="Where versions are published: a folder, or an fsspec URL (file://, s3://, memory://)."
    )
    model_name: str = Field(description="Name of the student in the store (letters, digits, '.', '_', '-').")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the merged master every other format is made from."
    )
    formats: list[Format] = Field(
        ["gguf-f16", "gguf-q8_0"],
        description="Artefacts made from the master and published next to it, each re-evaluated on the test "
                    "split. bnb-* need the 'quant' extra, w8a8/w4a16 the 'compress' extra; gguf-* the core install.",
    )
    max_points_lost: float = Field(
        2.0, ge=0, le=100,
        description="An artefact whose quality is more than this many points (0-100) below the master's is "
                    "flagged and not published.",
    )
    format_points_lost: dict[str, float] = Field(
        default_factory=dict, description="Per-format overrides of max_points_lost, e.g. {bnb-nf4: 3}."
    )
    max_eval_records: int | None = Field(
        None, gt=0, le=MAX_COUNT,
        description="Re-evaluate the master and each artefact on at most this many test records (default: all the "
                    "records evaluate scored). Fewer records make a slow format cheaper to check but the check coarser.",
    )
    calibration_samples: int = Field(
        128, gt=0, le=100_000, description="Curated training prompts that calibrate llm-compressor (w8a8, w4a16)."
    )
    license: str = Field("other", description="License named in the model card's front matter.")
    intended_use: str | None = Field(
        None, description="Intended-use paragraph of the model card (default: written from the functions trained)."
    )

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        return check_store(v)

    @field_validator("formats")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a format twice")
        return v

    @model_validator(mode="after")
    def _known_overrides(self) -> ExportConfig:
        bad = [k for k in self.format_points_lost if k not in FORMATS]
        if bad:
            raise ValueError(f"format_points_lost names unknown format {short(bad[0])} (formats: {', '.join(FORMATS)})")
        if any(not 0 <= x <= 100 for x in self.format_points_lost.values()):
            raise ValueError("format_points_lost values must be within 0-100")
        return self

    def points_allowed(self, fmt: str) -> float:
        return self.format_points_lost.get(fmt, self.max_points_lost)
