"""Quantized artefacts made from the merged master, and how each is loaded back for re-evaluation.

    bnb-8bit, bnb-nf4   bitsandbytes through transformers (extra: quant)
    w8a8, w4a16         compressed-tensors through llm-compressor ``oneshot``, calibrated on curated prompts
                        (extra: compress): SmoothQuant + GPTQ for W8A8, GPTQ for W4A16
    gguf-f16, gguf-q8_0 GGUF with the ``gguf`` package (core install; see export.export.gguf_writer)

Every maker reads the master folder and writes a self-contained folder (weights, config, tokenizer, chat
template) that ``AutoModelForCausalLM.from_pretrained`` loads (GGUF: with ``gguf_file=``).
"""

from __future__ import annotations

import importlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config.export import FORMATS

# What a format needs beyond the core install: (module to import, pip package).
NEEDS = {"quant": ("bitsandbytes", "bitsandbytes"), "compress": ("llmcompressor", "llmcompressor")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


class MissingExtra(ImportError, ValueError):
    """A format needs an optional dependency that is not installed (a ValueError too: the recipe asks for it)."""


def check_extras(formats: list[str]) -> None:
    """Fail before any work when a chosen format's extra is not installed, naming the extra."""
    for fmt in formats:
        extra = FORMATS[fmt]
        if extra is None:
            continue
        module, package = NEEDS[extra]
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # it logs each module it quantizes otherwise
        try:
            with quiet():  # bitsandbytes and deepspeed (through accelerate) greet on import
                importlib.import_module(module)
        except ImportError as err:
            raise MissingExtra(
                f"export.formats: '{fmt}' needs {package}, which is not installed ({err}). Install the extra: "
                f"pip install -c constraints.txt -e \".[{extra}]\", or remove '{fmt}' from export.formats"
            ) from None


def preflight(recipe) -> None:
    """Before `distill run` trains anything: the extras the recipe's export formats need are installed."""
    check_extras(list(recipe.export.formats))


def gguf_file(fmt: str, name: str) -> str:
    return f"{name}-{fmt.split('-', 1)[1].upper()}.gguf"


def _device_map() -> str:
    import torch

    return "auto" if torch.cuda.is_available() else "cpu"


def _copy_tokenizer(master: Path, out: Path) -> None:
    for f in TOKENIZER_FILES:
        if (master / f).is_file() and not (out / f).exists():
            shutil.copyfile(master / f, out / f)


def make_bnb(master: Path, out: Path, bits: int, dtype) -> None:
    """bitsandbytes LLM.int8 (bits=8) or 4-bit NormalFloat with double quantization (bits=4)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=dtype))
    model = AutoModelForCausalLM.from_pretrained(master, quantization_config=q, device_map=_device_map(), dtype=dtype,
                                                 use_safetensors=True)
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(master, out)


def _group_size(model, preferred: int = 128) -> int:
    """The W4A16 group size: 128 (vLLM's usual) unless some layer's input width is not a multiple of it."""
    import torch

    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    size = preferred
    while size > 8 and any(w % size for w in widths):
        size //= 2
    return size


def make_compressed(master: Path, out: Path, scheme: str, calibration: list[str], dtype, max_length: int) -> None:
    """compressed-tensors W8A8 (SmoothQuant, then GPTQ on weights, dynamic per-token int8 activations) or
    W4A16 (GPTQ, group size 128), calibrated on ``calibration`` (chat-formatted curated examples)."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # read when llmcompressor is first imported
    from datasets import Dataset
    from llmcompressor import LoggerConfig, configure_logger, oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    configure_logger(LoggerConfig(console_log_level=os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")))
    tokenizer = AutoTokenizer.from_pretrained(master)
    model = AutoModelForCausalLM.from_pretrained(master, dtype=dtype, use_safetensors=True)
    ds = Dataset.from_dict({"text": calibration}).map(
        lambda x: tokenizer(x["text"], truncation=True, max_length=max_length, add_special_tokens=False),
        remove_columns=["text"])
    if scheme == "w8a8":
        recipe: list[Any] = [SmoothQuantModifier(smoothing_strength=0.8),
                             GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    else:
        recipe = [GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": _group_size(model)}}})]
    import torch

    # The sequential pipeline saves GPU memory on large models; on CPU the basic one is several times faster.
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=max_length, num_calibration_samples=len(calibration),
            pipeline="sequential" if torch.cuda.is_available() else "basic", shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    _copy_tokenizer(master, out)


@contextmanager
def quiet():
    """Keep third-party chatter (tqdm bars of llm-compressor and transformers' GGUF loader, bitsandbytes' cast
    warnings) out of the stage's own progress display. Errors still raise."""
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def make(fmt: str, master: Path, out: Path, *, name: str, dtype, calibration: list[str] | None = None,
         max_length: int = 512, metadata: dict[str, Any] | None = None) -> None:
    """Write format ``fmt`` of the master into the (new) folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with quiet():
        _make(fmt, master, out, name=name, dtype=dtype, calibration=calibration, max_length=max_length,
              metadata=metadata)


def _make(fmt: str, master: Path, out: Path, *, name: str, dtype, calibration, max_length, metadata) -> None:
    if fmt == "bnb-8bit":
        make_bnb(master, out, 8, dtype)
    elif fmt == "bnb-nf4":
        make_bnb(master, out, 4, dtype)
    elif fmt in ("w8a8", "w4a16"):
        if not calibration:
            raise ValueError(f"format {fmt} needs calibration prompts (the curated train split is empty)")
        make_compressed(master, out, fmt, calibration, dtype, max_length)
    elif fmt in ("gguf-f16", "gguf-q8_0"):
        from export.export.gguf_writer import write_gguf

        write_gguf(master, out / gguf_file(fmt, name), fmt.split("-", 1)[1], name, metadata)
    else:
        raise ValueError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")


def load(fmt: str, folder: Path, name: str):
    """The artefact as a transformers model ready for evaluation on this machine (float32 compute on CPU)."""
    import torch

    compute = torch.float32 if not torch.cuda.is_available() else None
    kwargs: dict[str, Any] = {"dtype": compute or "auto"}
    with quiet():
        return _load(fmt, folder, name, compute, kwargs)


def _load(fmt, folder, name, compute, kwargs):
    from transformers import AutoModelForCausalLM

    if fmt.startswith("gguf-"):
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file(fmt, name), **kwargs)
    if fmt.startswith("bnb-"):
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=_device_map(), use_safetensors=True, **kwargs)
        if compute is not None:  # 4-bit layers compute in the dtype saved in the config; bf16 matmuls crawl on CPU
            for m in model.modules():
                if hasattr(m, "compute_dtype") and m.__class__.__name__ == "Linear4bit":
                    m.compute_dtype = compute
        return model
    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, **kwargs)


def weight_bytes(fmt: str, folder: Path) -> int:
    """Bytes of the weight files (safetensors or GGUF) of an artefact folder."""
    pattern = "*.gguf" if fmt.startswith("gguf-") else "*.safetensors"
    return sum(p.stat().st_size for p in folder.glob(pattern))
