"""Packing several examples into each row, kept apart by position ids.

Rows are filled by TRL's best-fit-decreasing packer (``trl.pack_dataset``), which records each example's length.
The collator turns those lengths into position ids that restart at 0 for every example and sends no attention
mask (and use_cache=False): transformers then builds a block-diagonal causal mask from the position ids, so no
token attends across an example boundary, and the first token of each example is never a target of the one
before.

Unlike TRL's own padding-free mode, which flattens a whole batch into one long sequence (cheap with FlashAttention
varlen kernels, quadratic in batch x length with SDPA or on CPU), each packed row stays its own sequence of at most
max_length tokens, so attention cost is the same as for an unpacked batch of full rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.train.data import IGNORE


def pack(dataset, max_length: int):
    """Examples packed into rows of at most max_length tokens (every list column travels along)."""
    from trl import pack_dataset

    return pack_dataset(dataset, max_length, strategy="bfd")


@dataclass
class Collator:
    """Pads a batch; packed rows get per-example position ids and no attention mask. Sparse-distillation columns
    (kd_ids, kd_logprobs: per token a ragged list of teacher alternatives) become (batch, length, k) tensors with
    id -1 where there is no target. ``real_tokens`` counts the non-padding tokens, for throughput."""

    pad_token_id: int
    packed: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        keys = ("input_ids", "labels", "seq_lengths") if self.packed else ("input_ids", "labels")
        base = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id, return_position_ids=self.packed)
        batch = base([{k: e[k] for k in keys} for e in examples])
        batch["real_tokens"] = torch.tensor(sum(len(e["input_ids"]) for e in examples))  # popped by the trainer
        if self.packed:
            del batch["attention_mask"]  # position ids alone mark the examples; a mask would hide the boundaries
            batch["labels"][batch["position_ids"] == 0] = IGNORE
            # transformers derives the block-diagonal mask from position ids only when no KV cache is passed; a
            # forward with the default use_cache=True would let examples attend to each other
            batch["use_cache"] = False
        if "kd_ids" in examples[0]:
            length = batch["input_ids"].shape[1]
            k = max([len(t) for e in examples for t in e["kd_ids"]] + [1])
            ids = torch.full((len(examples), length, k), -1, dtype=torch.long)
            lps = torch.zeros((len(examples), length, k), dtype=torch.float32)
            for b, e in enumerate(examples):
                for t, (ti, tl) in enumerate(zip(e["kd_ids"], e["kd_logprobs"], strict=True)):
                    if ti:
                        ids[b, t, : len(ti)] = torch.tensor(ti)
                        lps[b, t, : len(tl)] = torch.tensor(tl)
            batch["kd_ids"], batch["kd_logprobs"] = ids, lps
        return batch


def real_tokens(dataset) -> int:
    """Non-padding tokens in a (packed or not) tokenized dataset."""
    return sum(len(x) for x in dataset["input_ids"])
