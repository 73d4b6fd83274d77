"""Scoring the student's own answers again: the logprob of each answer token and the top-k logprobs there, by one
teacher-forced forward pass of the trained student (what an OpenAI-compatible server returns with ``logprobs`` and
``top_logprobs``). The route stage needs the top-k for the entropy signals when ``route.top_logprobs > 0``;
evaluate records only the chosen tokens' logprobs."""

from __future__ import annotations

from typing import Any


def score_answers(train_dir, records: list[dict[str, Any]], answers: list[str], n_logprobs: list[int], k: int,
                  progress=None, batch_size: int = 16) -> tuple[list[list[float]], list[list[list[float]]], int]:
    """The student's logprob of each token of its own answers and the top-k logprobs there (what an
    OpenAI-compatible server returns with ``logprobs``/``top_logprobs``), by one teacher-forced forward pass.
    Returns (chosen, top-k, records whose re-tokenized answer has as many tokens as evaluate generated)."""
    import torch

    from pipeline.chat import prompt_messages
    from pipeline.hf import quiet_hf
    from training.train.outputs import load_trained_student

    quiet_hf()
    model, tok = load_trained_student(train_dir)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    seqs, aligned = [], 0
    for r, ans, n in zip(records, answers, n_logprobs, strict=True):
        text = tok.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(ans, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None and n == len(a) + 1:
            a = [*a, tok.eos_token_id]  # the generation ended with the end-of-turn token
        aligned += n == len(a)
        seqs.append((p, a))
    chosen: list[list[float]] = []
    tops: list[list[list[float]]] = []
    task = progress.add_task("score student answers", total=len(seqs)) if progress else None
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        tail = max(len(a) for _, a in chunk) + 1
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (p, a) in enumerate(chunk):  # left padding: every answer ends at the last position
            s = p + a
            ids[j, width - len(s) :] = torch.tensor(s)
            mask[j, width - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=tail).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        top_v = logp.topk(min(k, logp.shape[-1]), dim=-1).values if k else None
        for j, (_, a) in enumerate(chunk):
            if not a:
                chosen.append([])
                tops.append([])
                continue
            at = torch.arange(tail - 1 - len(a), tail - 1)  # logits at these positions predict the answer tokens
            chosen.append(logp[j, at, torch.tensor(a)].tolist())
            tops.append(top_v[j, at].tolist() if top_v is not None else [])
        if progress:
            progress.advance(task, len(chunk))
    return chosen, tops, aligned
