"""The student: loaded from a checkpoint (local folder or hub id) or built from a small config."""

from __future__ import annotations

from pipeline.config.train import StudentConfig, StudentFromConfig


def build_from_config(cfg: StudentFromConfig, tokenizer, max_length: int, seed: int):
    """A freshly initialised causal LM sized by the recipe, matched to the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.architecture]
    config = cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=max(512, max_length),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """A tokenizer from a local folder or hub id, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_checkpoint(cfg: StudentConfig, dtype=None):
    """(model, tokenizer) from a local folder or hub id; safetensors only, remote code only if allowed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        cfg.checkpoint, revision=cfg.revision, dtype=dtype or "auto", use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
    )
    return model, load_tokenizer(cfg.checkpoint, cfg.revision, cfg.trust_remote_code)
