"""GGUF (llama.cpp, Ollama) from a merged Hugging Face master, written with the ``gguf`` package.

The ``gguf`` package writes and reads the file format but ships no converter from Hugging Face checkpoints; this
is one for the architectures a distill student can have (Llama and Qwen2 with a byte-level BPE tokenizer), in
F16 or Q8_0. It follows llama.cpp's own conventions (``convert_hf_to_gguf.py``): tensor names from gguf's name
map, Llama's query/key rows permuted for its rotary layout, 1-D tensors in F32, tied output embeddings left
out, the tokenizer as a ``gpt2`` vocabulary with merges, special-token ids and the chat template. For other
architectures or SentencePiece tokenizers, use llama.cpp's ``convert_hf_to_gguf.py`` on the master.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

ARCHITECTURES = ("llama", "qwen2")
OUTTYPES = ("f16", "q8_0")

# Byte-level BPE pre-tokenizer regexes and llama.cpp's name for each (``tokenizer.ggml.pre``).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    GPT2_REGEX: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


class GGUFUnsupported(ValueError):
    """The master cannot be written by this converter (architecture, tokenizer or rope scaling)."""


def _pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, or GGUFUnsupported."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFUnsupported("only byte-level BPE tokenizers are converted here (this one is "
                              f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex = None
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            regex = GPT2_REGEX
        elif step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
    if regex not in PRE_TOKENIZERS or not any(s.get("type") == "ByteLevel" for s in steps):
        raise GGUFUnsupported("the tokenizer's pre-tokenizer is not one llama.cpp knows by name (gpt-2, qwen2, "
                              "llama-bpe)")
    return PRE_TOKENIZERS[regex]


def _vocab(master: Path, vocab_size: int):
    """(tokens, token types) in llama.cpp's layout for a byte-level BPE tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(master)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tok, tokens, types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Llama query/key rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise GGUFUnsupported(f"rope scaling '{kind}' is not converted here")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def write_gguf(master: Path, out: Path, outtype: str, name: str, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``master`` (a saved Llama or Qwen2 checkpoint) as one GGUF file at ``out``; returns ``out``.

    ``metadata``: optional ``description``, ``license``, ``base_model``, ``tags`` and ``distill`` (a flat dict
    of strings written under ``distill.*``, e.g. the recipe and data hashes)."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    config = json.loads((master / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise GGUFUnsupported(f"architecture '{arch}' is not converted here (llama, qwen2); use llama.cpp's "
                              "convert_hf_to_gguf.py on the master folder")
    pre = _pre_tokenizer(json.loads((master / "tokenizer.json").read_text()))

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    _add_metadata(writer, name, metadata or {})
    _add_hyperparameters(writer, config, outtype)
    _add_tokenizer(writer, master, config["vocab_size"], pre)
    _add_tensors(writer, master, config, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def _add_metadata(writer, name: str, meta: dict[str, Any]) -> None:
    """The general keys: name, description, license, base model, tags and ``distill.*``."""
    writer.add_type("model")
    writer.add_name(name)
    writer.add_quantized_by("distill")
    if meta.get("description"):
        writer.add_description(meta["description"])
    if meta.get("license"):
        writer.add_license(meta["license"])
    if meta.get("base_model"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(meta["base_model"]))
    if meta.get("tags"):
        writer.add_tags(list(meta["tags"]))
    for k, v in (meta.get("distill") or {}).items():
        writer.add_string(f"distill.{k}", str(v))


def _add_hyperparameters(writer, config: dict[str, Any], outtype: str) -> None:
    """The architecture's keys, from the Hugging Face config, and the file type."""
    import gguf

    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hidden, n_layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // n_head
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, master: Path, vocab_size: int, pre: str) -> None:
    """The vocabulary, merges, special-token ids and chat template."""
    import gguf

    tok, tokens, types = _vocab(master, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(master, load_merges=True, n_vocab=vocab_size)
    if "bos" not in special.special_token_ids:
        # Tokenizers without a BOS token (Qwen2) still get an id: transformers cannot read a GGUF tokenizer
        # without one; nothing prepends it, since add_bos_token stays false.
        special.special_token_ids["bos"] = tok.eos_token_id if tok.eos_token_id is not None else 0
        special.add_special_token.setdefault("bos", False)
    if not special.chat_template and tok.chat_template:
        special.chat_template = tok.chat_template
    special.add_to_gguf(writer, quiet=True)


def _add_tensors(writer, master: Path, config: dict[str, Any], outtype: str) -> None:
    """Every weight under its GGUF name: 1-D tensors in F32, the others in F16 or Q8_0 (F16 where a row does not
    split into Q8_0 blocks of 32); Llama's query/key rows permuted; a tied output embedding left out."""
    import gguf
    from safetensors import safe_open

    arch = config["model_type"]
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    qtype = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                        config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    files = sorted(master.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {master}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if tied and hf_name == "lm_head.weight":
                    continue
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise GGUFUnsupported(f"no GGUF name for tensor {hf_name}")
                data = f.get_tensor(hf_name).float().numpy()
                if arch == "llama" and hf_name.endswith("q_proj.weight"):
                    data = _permute(data, n_head)
                elif arch == "llama" and hf_name.endswith("k_proj.weight"):
                    data = _permute(data, n_kv)
                if data.ndim == 1:
                    writer.add_tensor(gguf_name, data.astype(np.float32))
                elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
                    q = gguf.quants.quantize(data, qtype)
                    writer.add_tensor(gguf_name, q, raw_dtype=qtype)
                else:
                    writer.add_tensor(gguf_name, data.astype(np.float16))


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF file's key-value metadata (strings, numbers and short arrays) as a dict, for checks and tests."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode()
        elif kind == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == GGUFValueType.STRING:
                out[key] = [bytes(field.parts[i]).decode() for i in field.data]
            else:
                out[key] = [field.parts[i].tolist()[0] for i in field.data]
        else:
            out[key] = field.parts[field.data[0]].tolist()[0]
    out["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return out
