"""Curated records to training examples: chat-templated token ids, assistant-only labels and, for sparse logit
distillation, the teacher's top-k alternatives lined up with the student's tokens.

Examples are tokenized here rather than inside TRL so that every objective sees the same ids and labels, and so
that sparse targets can travel with them through packing (see ``training.train.packing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.chat import prompt_messages, training_messages
from training.train.align import choose_method, final_turn, logs_in_student_tokens, record_targets

IGNORE = -100


@dataclass
class DataStats:
    """What tokenization did, for the stage summary (nothing is dropped silently)."""

    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0  # truncation left no assistant token to learn from
    target_tokens: int = 0
    sparse_records: int = 0  # records that carry teacher logprobs
    sparse_aligned: int = 0  # ... with at least one answer token given a teacher target
    sparse_tokens: int = 0  # assistant tokens with teacher targets
    reasons: dict[str, int] = field(default_factory=dict)  # why sparse targets were not used
    methods: dict[str, int] = field(default_factory=dict)  # records per method: same_tokenizer / aligned
    token_outcomes: dict[str, int] = field(default_factory=dict)  # assistant tokens: soft target, or why not

    def miss(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def count(self, got) -> None:
        """Add one record's sparse targets (a ``training.train.align.Targets``)."""
        if got.reason:
            self.miss(got.reason)
        else:
            soft = sum(bool(x) for x in got.ids)
            self.sparse_aligned += soft > 0
            self.methods[got.method] = self.methods.get(got.method, 0) + 1
            self.sparse_tokens += soft
        for k, v in got.tokens.items():
            self.token_outcomes[k] = self.token_outcomes.get(k, 0) + v


def encode_chat(tokenizer, template: str, messages: list[dict[str, str]], max_length: int) -> tuple[list, list, bool]:
    """(input_ids, labels, truncated): labels keep the assistant tokens, -100 elsewhere."""
    enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)], truncated


def sparse_targets(tokenizer, ids: list[int], labels: list[int], logprobs: list[dict[str, Any]], top_k: int,
                   cache: dict) -> tuple[list[list[int]], list[list[float]], str | None]:
    """Per position, the teacher's top-k (student ids, logprobs): see ``training.train.align``."""
    out = record_targets(tokenizer, ids, labels, logprobs, top_k, cache)
    return out.ids, out.logprobs, out.reason


def _final_kept(tokenizer, template: str, messages: list[dict[str, str]], labels: list[int], truncated: bool) -> bool:
    """Whether the final answer (the turn the logs cover) survived truncation, at least in part."""
    if not truncated:
        return True
    full = encode_chat(tokenizer, template, messages, 1 << 62)[1]
    return final_turn(full)[0] < len(labels)


def tokenize_records(records: list[dict[str, Any]], tokenizer, template: str, max_length: int,
                     sparse_top_k: int | None = None) -> tuple[Any, DataStats]:
    """A `datasets.Dataset` of input_ids / labels (plus kd_ids / kd_logprobs when sparse_top_k is set). Sparse
    targets are built by one method for the whole dataset (``training.train.align.choose_method``)."""
    from datasets import Dataset, Features, List, Value

    stats = DataStats()
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    kept: list[tuple[list, bool]] = []  # per example: the record's logprobs, and whether its final answer survived
    cache: dict[str, int | None] = {}
    for r in records:
        messages = training_messages(r)
        ids, labels, truncated = encode_chat(tokenizer, template, messages, max_length)
        stats.truncated += truncated
        if all(x == IGNORE for x in labels):
            stats.dropped_no_target += 1
            continue
        stats.examples += 1
        stats.target_tokens += sum(x != IGNORE for x in labels)
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        if sparse_top_k:
            logprobs = (r.get("teacher") or {}).get("logprobs") or []
            kept.append((logprobs, _final_kept(tokenizer, template, messages, labels, truncated)))
    features = {"input_ids": List(Value("int32")), "labels": List(Value("int32"))}
    if sparse_top_k:
        method = choose_method([logs_in_student_tokens(tokenizer, ids, labels, lp, cache) if ok else None
                                for ids, labels, (lp, ok) in zip(rows["input_ids"], rows["labels"], kept,
                                                                 strict=True)])
        rows.update(kd_ids=[], kd_logprobs=[])
        for ids, labels, (logprobs, ok) in zip(rows["input_ids"], rows["labels"], kept, strict=True):
            got = record_targets(tokenizer, ids, labels, logprobs, sparse_top_k, cache, method, ok)
            stats.sparse_records += bool(logprobs)
            stats.count(got)
            rows["kd_ids"].append(got.ids)
            rows["kd_logprobs"].append(got.logprobs)
        features.update(kd_ids=List(List(Value("int32"))), kd_logprobs=List(List(Value("float32"))))
    return Dataset.from_dict(rows, features=Features(features)), stats


def prompt_dataset(records: list[dict[str, Any]]):
    """Prompts only (conversational), for on-policy distillation where the student writes the answers."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": prompt_messages(r)} for r in records])
