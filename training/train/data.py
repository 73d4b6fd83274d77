"""Curated records to training examples: chat-templated token ids, assistant-only labels and, for sparse logit
distillation, the teacher's top-k alternatives lined up with the student's tokens.

Examples are tokenized here rather than inside TRL so that every objective sees the same ids and labels, and so
that sparse targets can travel with them through packing (see ``training.train.packing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.chat import prompt_messages, training_messages

IGNORE = -100


@dataclass
class DataStats:
    """What tokenization did, for the stage summary (nothing is dropped silently)."""

    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0  # truncation left no assistant token to learn from
    target_tokens: int = 0
    sparse_records: int = 0  # records that carry teacher logprobs
    sparse_aligned: int = 0  # ... whose tokens line up with the student's tokenization
    sparse_tokens: int = 0  # assistant tokens with teacher targets
    reasons: dict[str, int] = field(default_factory=dict)  # why sparse targets were not used

    def miss(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def encode_chat(tokenizer, template: str, messages: list[dict[str, str]], max_length: int) -> tuple[list, list, bool]:
    """(input_ids, labels, truncated): labels keep the assistant tokens, -100 elsewhere."""
    enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)], truncated


def _single_id(tokenizer, text: str, cache: dict[str, int | None]) -> int | None:
    """The student's id for a teacher token given as text, if the student has exactly one token for it."""
    if text not in cache:
        ids = tokenizer.encode(text, add_special_tokens=False)
        cache[text] = ids[0] if len(ids) == 1 else None
    return cache[text]


def sparse_targets(tokenizer, ids: list[int], labels: list[int], logprobs: list[dict[str, Any]], top_k: int,
                   cache: dict[str, int | None]) -> tuple[list[list[int]], list[list[float]], str | None]:
    """Per position, the teacher's top-k (student ids, logprobs) for the token at that position.

    The logged tokens must spell the final assistant turn exactly as the student tokenizes it (same tokenizer);
    otherwise nothing is used and the reason is returned. Alternatives the student cannot express as one token
    are left out, so their probability falls into the 'rest' bucket of the loss.
    """
    empty_ids: list[list[int]] = [[] for _ in ids]
    empty_lps: list[list[float]] = [[] for _ in ids]
    # the final assistant turn: the last run of labelled positions
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    teacher_ids = [_single_id(tokenizer, t["token"], cache) for t in logprobs]
    if None in teacher_ids:
        return empty_ids, empty_lps, "a logged token is not one student token (different tokenizer)"
    n = min(len(teacher_ids), end - start)
    if n == 0 or ids[start:start + n] != teacher_ids[:n]:
        return empty_ids, empty_lps, "logged tokens do not spell the output as the student tokenizes it"
    out_ids, out_lps = empty_ids, empty_lps
    for j in range(n):
        tok = logprobs[j]
        alts: dict[int, float] = {}
        for alt in tok.get("top") or []:
            i = _single_id(tokenizer, alt["token"], cache)
            if i is not None and i not in alts:
                alts[i] = float(alt["logprob"])
        alts.setdefault(teacher_ids[j], float(tok["logprob"]))  # the chosen token is always a target
        best = sorted(alts.items(), key=lambda kv: -kv[1])[:top_k]
        out_ids[start + j] = [i for i, _ in best]
        out_lps[start + j] = [lp for _, lp in best]
    return out_ids, out_lps, None


def tokenize_records(records: list[dict[str, Any]], tokenizer, template: str, max_length: int,
                     sparse_top_k: int | None = None) -> tuple[Any, DataStats]:
    """A `datasets.Dataset` of input_ids / labels (plus kd_ids / kd_logprobs when sparse_top_k is set)."""
    from datasets import Dataset, Features, List, Value

    stats = DataStats()
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    if sparse_top_k:
        rows.update(kd_ids=[], kd_logprobs=[])
    cache: dict[str, int | None] = {}
    for r in records:
        ids, labels, truncated = encode_chat(tokenizer, template, training_messages(r), max_length)
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
            if logprobs:
                stats.sparse_records += 1
                kd_ids, kd_lps, why = sparse_targets(tokenizer, ids, labels, logprobs, sparse_top_k, cache)
                if why:
                    stats.miss(why)
                else:
                    stats.sparse_aligned += 1
                    stats.sparse_tokens += sum(bool(x) for x in kd_ids)
            else:
                stats.miss("no teacher logprobs on the record")
                kd_ids, kd_lps = [[] for _ in ids], [[] for _ in ids]
            rows["kd_ids"].append(kd_ids)
            rows["kd_logprobs"].append(kd_lps)
    features = {"input_ids": List(Value("int32")), "labels": List(Value("int32"))}
    if sparse_top_k:
        features.update(kd_ids=List(List(Value("int32"))), kd_logprobs=List(List(Value("float32"))))
    return Dataset.from_dict(rows, features=Features(features)), stats


def prompt_dataset(records: list[dict[str, Any]]):
    """Prompts only (conversational), for on-policy distillation where the student writes the answers."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": prompt_messages(r)} for r in records])
