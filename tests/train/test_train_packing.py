"""Packing keeps examples apart, and the loss is normalised over the whole accumulated batch: the same gradients
for batch 8 x 1 accumulation step as for batch 1 x 8, for SFT and for the distillation loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_tokenizer

from pipeline.config.train import StudentFromConfig, TrainConfig
from training.train.chat_template import check_assistant_mask
from training.train.data import IGNORE, tokenize_records
from training.train.kd import divergence, kl, sparse_buckets
from training.train.packing import Collator, pack
from training.train.student import build_from_config

WORDS = ["ticket", "refund", "order", "late", "broken", "charger", "speaker", "battery", "invoice", "address",
         "delivery", "warranty"]


def _records(n: int, seed: int = 0) -> list[dict]:
    """Chats of very different lengths (1 to 40 words per turn), some with two user turns."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        def text(lo: int, hi: int) -> str:
            k = int(torch.randint(lo, hi, (1,), generator=g))
            return " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g))

        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text(1, 40)}]
        if i % 3 == 0:
            msgs += [{"role": "assistant", "content": text(1, 5)}, {"role": "user", "content": text(1, 10)}]
        out.append({"messages": msgs, "output": {"content": text(1, 30)}})
    return out


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer(400)
    model = build_from_config(StudentFromConfig(hidden_size=32, num_layers=2, num_heads=2), tok, 256, seed=0)
    return tok, model.eval()


def test_a_packed_batch_scores_each_example_as_if_it_were_alone(tiny):
    tok, model = tiny
    template = check_assistant_mask(tok)
    ds, _ = tokenize_records(_records(24), tok, template, 256)
    ds = ds.add_column("example", [[i] * len(x) for i, x in enumerate(ds["input_ids"])])  # travels with packing
    packed = pack(ds, 512)
    assert len(packed) < len(ds) / 2, "examples were not packed several to a row"

    def per_example(batch, owner) -> dict[int, float]:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "real_tokens")}
        with torch.no_grad():
            logits = model(**inputs).logits[:, :-1]
        target = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                             ignore_index=IGNORE).view_as(target)
        out: dict[int, list[float]] = {}
        for b in range(target.shape[0]):
            for t in range(target.shape[1]):
                if target[b, t] != IGNORE:
                    out.setdefault(owner[b][t + 1], []).append(float(ce[b, t]))
        return {k: sum(v) / len(v) for k, v in out.items()}

    alone = per_example(Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))]), ds["example"])
    rows = [packed[i] for i in range(len(packed))]
    together = per_example(Collator(tok.pad_token_id, packed=True)(rows), [r["example"] for r in rows])
    assert together.keys() == alone.keys() == set(range(len(ds)))
    for i in alone:
        assert together[i] == pytest.approx(alone[i], abs=1e-4), i

    # the same rows without position ids (one causal sequence per row) leak context across examples
    leaky = Collator(tok.pad_token_id, packed=False)(rows)
    leaked = per_example(leaky, [r["example"] for r in rows])
    assert max(abs(leaked[i] - alone[i]) for i in alone) > 1e-3  # 10x the tolerance above


def _trainer(tiny, objective: str, batch: int, accum: int, packing: bool):
    from training.train.trainer import make_trainer, training_arguments

    tok, _ = tiny
    section = {"student": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}}, "method": "full",
               "objective": objective, "batch_size": batch, "grad_accum": accum, "max_length": 256,
               "packing": packing, "max_steps": 1}
    if objective == "dense_kd":  # the teacher model is passed in below; the recipe only has to name one
        section["distill"] = {"teacher": "t", "ce_weight": 0.3, "temperature": 2.0, "loss": "jsd"}
        section["student"]["from_config"]["tokenizer"] = "t"
    cfg = TrainConfig.model_validate(section)
    ds, _ = tokenize_records(_records(8 if not packing else 40, seed=3), tok, check_assistant_mask(tok), 256)
    if packing:
        ds = pack(ds, 256).select(range(8))
    model = build_from_config(StudentFromConfig(hidden_size=32, num_layers=2, num_heads=2), tok, 256, seed=0)
    teacher = None
    if objective == "dense_kd":
        teacher = build_from_config(StudentFromConfig(hidden_size=64, num_layers=2, num_heads=2), tok, 256, seed=7)
    common = training_arguments(cfg, "/tmp/unused-output", seed=0, run_name="t", has_val=False)
    return make_trainer(cfg, common, model, tok, ds, teacher=teacher), ds


def _accumulated_grads(trainer, accum: int, naive: bool = False) -> dict[str, torch.Tensor]:
    """One optimizer step's gradients, computed as Trainer's inner loop does: the batches of the step, the number
    of target tokens over all of them, a training_step (forward + backward) per batch."""
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = accum  # set by Trainer's loop; the naive path divides by it
    iterator = iter(trainer.get_train_dataloader())
    batches, num_items = trainer.get_batch_samples(iterator, accum, trainer.args.device)
    for batch in batches:
        if naive:  # the classic bug: each micro-batch averaged on its own, then the average of averages
            trainer.training_step(model, batch, None)
        else:
            trainer.training_step(model, batch, num_items)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective, packing", [("sft", False), ("dense_kd", True)])
def test_batch_8_equals_batch_1_with_8_accumulation_steps(tiny, objective, packing):
    one_big, ds = _trainer(tiny, objective, batch=8, accum=1, packing=packing)
    lengths = [sum(x != IGNORE for x in labels) for labels in ds["labels"]]
    assert max(lengths) > 3 * min(lengths), "examples of very different lengths make the test sensitive"
    big = _accumulated_grads(one_big, 1)
    many_small, _ = _trainer(tiny, objective, batch=1, accum=8, packing=packing)
    small = _accumulated_grads(many_small, 8)
    assert big.keys() == small.keys() and len(big) > 5
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-7, msg=name)
    naive = _accumulated_grads(many_small, 8, naive=True)
    worst = max(float((naive[n] - big[n]).norm() / big[n].norm()) for n in big)
    assert worst > 0.05, "the per-micro-batch average should differ: the test would not catch the bug"


def test_divergences():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g).log_softmax(-1), (3 * torch.randn(5, 11, generator=g)).log_softmax(-1)
    assert divergence(t, t, "forward_kl").abs().max() < 1e-6
    assert divergence(s, t, "jsd", 0.3).min() >= 0
    torch.testing.assert_close(divergence(s, t, "forward_kl"),
                               F.kl_div(s, t, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(divergence(s, t, "reverse_kl"), kl(s, t))
    torch.testing.assert_close(divergence(s, t, "jsd", 0.5), divergence(t, s, "jsd", 0.5))  # symmetric at 0.5
    assert (divergence(s, t, "jsd", 0.5) <= torch.log(torch.tensor(2.0)) + 1e-6).all()
    # sparse buckets: all K listed tokens + an empty rest reproduce the dense divergence
    ids = torch.arange(11).repeat(5, 1)
    student, teacher = sparse_buckets(s, ids, t)
    torch.testing.assert_close(kl(teacher, student), divergence(s, t, "forward_kl"), rtol=1e-4, atol=1e-4)
    # top-3 only: the rest bucket holds the remaining mass on both sides
    top = t.topk(3, -1).indices
    student, teacher = sparse_buckets(s, torch.cat([top, torch.full((5, 2), -1)], -1),
                                      torch.cat([t.gather(-1, top), torch.zeros(5, 2)], -1))
    torch.testing.assert_close(student.exp().sum(-1), torch.ones(5))
    rest = 1 - t.gather(-1, top).exp().sum(-1)
    torch.testing.assert_close(teacher[:, -1].exp(), rest, rtol=1e-4, atol=1e-6)
    assert torch.isneginf(student[:, 3:5]).all()
