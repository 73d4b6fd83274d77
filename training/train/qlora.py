"""QLoRA: the frozen base loaded in 4 bits by bitsandbytes, a LoRA adapter trained on top (TRL/PEFT do the rest).

bitsandbytes quantizes while loading, so the base must be a checkpoint on disk (a student built from config is
saved first). On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for faster inference the first time
the model runs a no-grad forward in eval mode (an evaluation, a generate); the repacked weights no longer pass
gradients to the adapter and the loss silently stops moving. ``keep_trainable`` turns that repacking off.
"""

from __future__ import annotations

from pipeline.config.train import QLoraConfig


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(
            "train.method 'qlora' needs bitsandbytes: pip install -c constraints.txt -e '.[quant]'"
        ) from None
    return bitsandbytes


def load_4bit(path: str, cfg: QLoraConfig, compute_dtype, revision=None, trust_remote_code=False):
    """A causal LM from a local folder or hub id with its linear layers quantized to 4 bits."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    require_bitsandbytes()
    if torch.cuda.is_available():
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    else:
        device_map = {"": "cpu"}
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                               bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, quantization_config=quant,
                                                 dtype=compute_dtype, device_map=device_map, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return keep_trainable(model)


def keep_trainable(model):
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (which cuts the adapter's gradients),
    and undo a repacking that already happened."""
    bnb = require_bitsandbytes()
    # bitsandbytes has no public call that undoes its CPU repacking; this private one is pinned with the package
    # (pyproject's quant extra) and tests/train/test_train_methods.py checks that QLoRA's loss moves on CPU.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
    return model
