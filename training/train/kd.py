"""Logit distillation: divergences between teacher and student next-token distributions, dense (a teacher
checkpoint scores the same tokens every step) or sparse (the teacher's top-k logprobs logged on the records, with
the probability mass they leave out kept as one 'rest' bucket), as a ``compute_loss`` on TRL's SFTTrainer; and
on-policy distillation through TRL's DistillationTrainer.

Per assistant token the loss is ``ce_weight * CE + (1 - ce_weight) * T^2 * D(teacher_T, student_T)`` where D is
forward KL, reverse KL or the generalised JSD (mixture ``beta * teacher + (1 - beta) * student``, TRL's
convention) and ``_T`` means softened by the temperature. Sparse targets are built in ``training.train.align``
(from logs in the student's own tokens, or lined up by byte offsets when the teacher's tokenizer is another);
tokens without a teacher distribution keep plain cross-entropy. The sum over tokens is divided by
the number of target tokens in the whole accumulated batch across devices, as TRL does for SFT, so gradient
accumulation and data parallelism do not change the gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from pipeline.config.train import DistillConfig

IGNORE = -100
_FLOOR = -1e4  # log-probabilities are clamped here so that 0 * log 0 terms stay 0 in forward and backward


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probabilities (-inf allowed where p is 0)."""
    logp, logq = logp.clamp(min=_FLOOR), logq.clamp(min=_FLOOR)
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher and student distributions given as log-probabilities."""
    if kind == "forward_kl":
        return kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return kl(student_logp, teacher_logp)
    if kind == "jsd":
        log_m = torch.logaddexp(teacher_logp.clamp(min=_FLOOR) + math.log(beta),
                                student_logp.clamp(min=_FLOOR) + math.log(1 - beta))
        return beta * kl(teacher_logp, log_m) + (1 - beta) * kl(student_logp, log_m)
    raise ValueError(f"unknown divergence {kind!r}")


def _rest(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp))): the mass outside the given buckets (at least 1e-6)."""
    return torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-6))


def sparse_buckets(student_logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor, temperature: float = 1.0):
    """Student and teacher log-probabilities over the teacher's top-k tokens plus one 'rest' bucket.

    student_logp: (N, V) log-softmax of the student at the temperature; ids: (N, K) token ids, -1 for none;
    teacher_lp: (N, K) logged teacher logprobs (temperature 1); where they add up to more than 1 (float16
    rounding), the K + 1 buckets are renormalised. The teacher side is softened by raising each
    bucket, 'rest' included, to 1/T and renormalising (exact for the listed tokens; 'rest' is treated as one
    outcome). Returns two (N, K + 1) tensors.
    """
    valid = ids >= 0
    s = student_logp.gather(-1, ids.clamp(min=0)).masked_fill(~valid, -math.inf)
    student = torch.cat([s, _rest(s)[:, None]], -1)
    t = teacher_lp.masked_fill(~valid, -math.inf)
    teacher = torch.cat([t, _rest(t)[:, None]], -1)
    # logged logprobs rounded to float16 can add up to slightly more than 1: scale those rows back to a distribution
    teacher = teacher - teacher.logsumexp(-1, keepdim=True).clamp(min=0)
    if temperature != 1.0:
        teacher = (teacher / temperature).log_softmax(-1)
    return student, teacher


class KDTrainer(SFTTrainer):
    """SFTTrainer whose loss mixes cross-entropy with a divergence to the teacher (dense or sparse)."""

    def __init__(self, *args, distill: DistillConfig, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.teacher = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.teacher = prepare_deepspeed(teacher, self.accelerator)
            else:
                self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _log_mean(self, mode: str, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        total = self.accelerator.gather_for_metrics(total.detach().reshape(1)).sum()
        count = self.accelerator.gather_for_metrics(count.detach().reshape(1)).sum()
        if count > 0:
            self._metrics[mode][name].append((total / count).item())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill
        mode = "train" if model.training else "eval"
        kd_ids, kd_lps = inputs.pop("kd_ids", None), inputs.pop("kd_logprobs", None)
        labels = inputs.pop("labels")
        inputs["use_cache"] = False  # a KV cache would disable the packed-sequence mask
        outputs = model(**inputs)
        target = labels[:, 1:]
        sel = target != IGNORE
        z = outputs.logits[:, :-1][sel].float()  # (N, V): only the positions that are scored
        ce = F.cross_entropy(z, target[sel], reduction="none")
        t = cfg.temperature
        if self.teacher is not None:
            with torch.no_grad():
                tz = self.teacher(**inputs).logits[:, :-1][sel].float()
            v = min(z.shape[-1], tz.shape[-1])  # vocabularies agree up to padding rows (checked before training)
            student_logp, teacher_logp = (z[:, :v] / t).log_softmax(-1), (tz[:, :v] / t).log_softmax(-1)
            has = torch.ones_like(ce, dtype=torch.bool)
            with torch.no_grad():
                kl1 = kl(tz[:, :v].log_softmax(-1), z[:, :v].log_softmax(-1))
        elif kd_ids is not None:
            ids, lps = kd_ids[:, 1:][sel], kd_lps[:, 1:][sel]
            has = (ids >= 0).any(-1)
            student_logp, teacher_logp = sparse_buckets((z / t).log_softmax(-1), ids, lps, t)
            with torch.no_grad():
                kl1 = kl(*reversed(sparse_buckets(z.log_softmax(-1), ids, lps)))
        else:
            raise ValueError("KDTrainer needs a teacher model (dense_kd) or kd_ids in the batch (sparse_kd)")
        div = divergence(student_logp, teacher_logp, cfg.loss, cfg.beta)
        mixed = cfg.ce_weight * ce + (1 - cfg.ce_weight) * t * t * div
        per_token = torch.where(has, mixed, ce)
        denom = num_items_in_batch if num_items_in_batch is not None else sel.sum()
        loss = per_token.sum() / torch.as_tensor(denom, device=per_token.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the denominator is global

        n, k = sel.sum(), has.sum()
        self._log_mean(mode, "ce_loss", ce.sum(), n)
        self._log_mean(mode, "kd_loss", torch.where(has, div, 0).sum(), k)
        self._log_mean(mode, "kl_to_teacher", torch.where(has, kl1, 0).sum(), k)
        self._metrics[mode]["teacher_token_share"].append(
            (self.accelerator.gather_for_metrics(k.reshape(1)).sum()
             / self.accelerator.gather_for_metrics(n.reshape(1)).sum().clamp(min=1)).item())
        return (loss, outputs) if return_outputs else loss


def load_teacher(cfg: DistillConfig, dtype=None):
    """The teacher checkpoint (safetensors only, remote code only if allowed), frozen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        cfg.teacher, revision=cfg.teacher_revision, dtype=dtype or "auto", use_safetensors=True,
        trust_remote_code=cfg.teacher_trust_remote_code,
    )
    return model.eval().requires_grad_(False)


def on_policy_beta(cfg: DistillConfig) -> float:
    """TRL's beta for our divergence name: 0 forward KL, 1 reverse KL, in between the generalised JSD."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(cfg.loss, cfg.beta)


@torch.no_grad()
def heldout_kl(model, batches, teacher=None) -> float:
    """Mean KL(teacher || student) per scored token over collated batches: against a teacher model (dense) or
    against the logged top-k logprobs in the batches (sparse, over the top-k + 'rest' buckets)."""
    total, count = 0.0, 0
    model.eval()
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k != "real_tokens"}
        kd_ids, kd_lps, labels = batch.pop("kd_ids", None), batch.pop("kd_logprobs", None), batch.pop("labels")
        sel = labels[:, 1:] != IGNORE
        batch["use_cache"] = False
        z = model(**batch).logits[:, :-1][sel].float()
        if teacher is not None:
            tz = teacher(**batch).logits[:, :-1][sel].float()
            v = min(z.shape[-1], tz.shape[-1])
            per = kl(tz[:, :v].log_softmax(-1), z[:, :v].log_softmax(-1))
        else:
            ids, lps = kd_ids[:, 1:][sel], kd_lps[:, 1:][sel]
            has = (ids >= 0).any(-1)
            student, teacher_b = sparse_buckets(z[has].log_softmax(-1), ids[has], lps[has])
            per = kl(teacher_b, student)
        total += float(per.sum())
        count += per.numel()
    return total / max(count, 1)
