"""Packing several examples into each row, kept apart by position ids.

Rows are filled by TRL's best-fit-decreasing packer (``trl.pack_dataset``), which records each example's length.
The collator turns those lengths into position ids that restart at 0 for every example and sends no attention
mask (and use_cache=False): transformers then builds a block-diagonal causal mask from the position ids, so no
token attends across an example boundary, and the first token of each example is never a target of the one
before.

Unlike TRL's own padding-free mode, which flattens a whole batch into one long sequence (cheap with FlashAttention
varlen kernels, quadratic in batch x length with SDPA or on CPU), each packed row stays its own sequence of at most
max_length tokens, so attention cost is the same as for an unpacked batch of full rows.

Packing is the default wherever it is exact (``train.packing`` unset): for every objective that trains on logged
text (not on_policy_kd, whose sequences the student writes), and only when ``isolates`` finds that the student
at hand scores two examples packed into one row exactly as it scores each alone. That holds for the models whose
attention masks transformers builds from position ids; a model whose own code ignores them fails the probe and is
trained unpacked (or, with ``packing: true``, the stage stops and says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.train.data import IGNORE

PROBE_TOLERANCE = 1e-3  # largest logit difference, relative to the logits' scale, that still counts as exact


def isolates(model, vocab_size: int) -> tuple[bool, float]:
    """(isolated, relative difference): whether the model's logits for an example packed after another one
    (position ids restarting at 0, no attention mask, no KV cache, as the Collator sends it) match those of the
    example alone. Runs two short no-grad forwards on the model as it is."""
    import torch

    g = torch.Generator().manual_seed(0)
    high = max(2, min(vocab_size, getattr(model.config.get_text_config(), "vocab_size", vocab_size)))
    first, second = (torch.randint(1, high, (1, n), generator=g) for n in (9, 7))
    device, was_training = model.device, model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=second.to(device), use_cache=False).logits.float()
            ids = torch.cat([first, second], dim=1).to(device)
            pos = torch.cat([torch.arange(first.shape[1]), torch.arange(second.shape[1])])[None].to(device)
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, first.shape[1]:].float()
    finally:
        model.train(was_training)
    diff = float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-12))
    return diff <= PROBE_TOLERANCE, diff


def decide(cfg, model, vocab_size: int) -> tuple[bool, str]:
    """(pack or not, why) for the recipe's train section and the student: packing is on where it is exact."""
    if cfg.packing is False:
        return False, "off (train.packing: false)"
    if cfg.objective == "on_policy_kd":
        return False, "off (on_policy_kd trains on the student's own answers)"
    exact, diff = isolates(model, vocab_size)
    if exact:
        return True, "on" + (" (train.packing: true)" if cfg.packing else " (default: examples stay isolated)")
    why = (f"this student attends across packed examples (logits differ by {diff:.2g} of their scale when an "
           "example follows another in a row)")
    if cfg.packing:
        raise ValueError(f"train.packing is true but {why}: set train.packing: false")
    return False, f"off ({why})"


def pack(dataset, max_length: int):
    """Examples packed into rows of at most max_length tokens (every list column travels along)."""
    from trl import pack_dataset

    return pack_dataset(dataset, max_length, strategy="bfd")


@dataclass
class Collator:
    """Pads a batch; packed rows (those with seq_lengths) get per-example position ids and no attention mask. Sparse-distillation columns
    (kd_ids, kd_logprobs: per token a ragged list of teacher alternatives) become (batch, length, k) tensors with
    id -1 where there is no target. ``real_tokens`` counts the non-padding tokens, for throughput."""

    pad_token_id: int
    packed: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        packed = self.packed and "seq_lengths" in examples[0]  # validation rows stay unpacked
        keys = ("input_ids", "labels", "seq_lengths") if packed else ("input_ids", "labels")
        base = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id, return_position_ids=packed)
        batch = base([{k: e[k] for k in keys} for e in examples])
        batch["real_tokens"] = torch.tensor(sum(len(e["input_ids"]) for e in examples))  # popped by the trainer
        if packed:
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
