"""Chat formatting for training: a ChatML template that marks assistant turns
for assistant-only loss, and a BPE tokenizer trained from the curated data for students built from config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pipeline.chat import training_messages

# ChatML. {% generation %} marks the assistant tokens, so TRL's assistant_only_loss trains on them alone.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def has_generation_markers(template: str | None) -> bool:
    return bool(re.search(r"{%-?\s*generation\s*-?%}", template or ""))


def training_template(tokenizer) -> str:
    """The chat template to tokenize training examples with: the tokenizer's own when it marks assistant turns
    with {% generation %}, else TRL's training variant of a known template (Qwen, Llama 3, Gemma, Phi, ...).
    The tokenizer itself is left as it is, so the saved student keeps its own template."""
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):
        template = template.get("default", "")
    if has_generation_markers(template):
        return template
    if template:
        from trl.chat_template_utils import get_training_chat_template

        try:
            patched = get_training_chat_template(tokenizer)
        except ValueError:
            patched = None
        if patched:
            return patched
    raise ValueError(
        "the student's chat template has no {% generation %} block, so assistant-only loss would train on "
        "nothing. Use a tokenizer whose template marks assistant turns, or set the template to "
        "training.train.chat_template.CHATML_TEMPLATE."
    )


def check_assistant_mask(tokenizer) -> str:
    """Fail early when the chat template does not mark assistant turns (the loss mask would be all zeros);
    returns the template training will use."""
    template = training_template(tokenizer)
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    enc = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    if not any(enc["assistant_masks"]):
        raise ValueError("the chat template marks no assistant tokens (empty assistant mask)")
    return template


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the given texts, with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token=None, model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tokenizer_corpus(records: Iterable[dict[str, Any]]) -> Iterable[str]:
    """Every message text of the records, for tokenizer training."""
    for r in records:
        for m in training_messages(r):
            yield m["content"]
