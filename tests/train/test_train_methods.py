"""Methods and objectives of the train stage on tiny checkpoints: QLoRA, dense / sparse / on-policy logit
distillation, each shown to lower its loss and change the trained weights; distillation also lowers held-out KL to
the teacher. Plus the early checks that stop a recipe before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from train_helpers import add_teacher_logprobs, losses, save_checkpoint, tiny_tokenizer

from pipeline.cli import main as cli
from pipeline.recipe import RecipeError, load_recipe, parse_recipe
from pipeline.record import to_table
from pipeline.rundir import RunDir
from pipeline.stages import run_stage

from conftest import BASE_RECIPE, make_project, merge

FAST = {"max_steps": 12, "batch_size": 8, "max_length": 256, "logging_steps": 3, "eval_steps": 6, "save_steps": 100,
        "learning_rate": 5e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant"}
CKPT_STUDENT = {"student": {"from_config": None, "checkpoint": "student"}}


@pytest.fixture(scope="module")
def kd(tmp_path_factory):
    """Logs, one curated run per test name, a student checkpoint and a sharp teacher sharing its tokenizer."""
    root = tmp_path_factory.mktemp("kd")
    make_project(root, {"2026-11-23": 260})
    tok = tiny_tokenizer()
    save_checkpoint(root / "student", tok, seed=1)
    save_checkpoint(root / "teacher", tok, seed=2, sharpen=25.0)

    class Project:
        path = root

        def recipe(self, name: str, **train) -> Path:
            data = merge(BASE_RECIPE, {"name": name, "train": {**FAST, **CKPT_STUDENT, **train}})
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(data))
            return path

    return Project()


def _trained(run: Path) -> dict[str, torch.Tensor]:
    info = json.loads((run / "train" / "student.json").read_text())
    if info["method"] == "full":
        return load_file(run / "train" / "model" / "model.safetensors")
    return load_file(run / "train" / "adapter" / "adapter_model.safetensors")


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in after.items() if k in before and not torch.allclose(before[k].float(), v.float())]


def _heldout(kd, run: Path, name: str, teacher_dir: Path | None = None) -> tuple[float, float]:
    """Held-out KL(teacher || student) on the val split, for the untrained and the trained student."""
    from training.train.data import tokenize_records
    from training.train.kd import heldout_kl
    from training.train.outputs import load_trained_student
    from training.train.packing import Collator
    from training.train.stage import read_split
    from training.train.student import load_checkpoint

    recipe = load_recipe(kd.path / f"{name}.yaml")
    records = read_split(run / "curate", "val") + read_split(run / "curate", "test")[:16]
    sparse = teacher_dir is None
    if sparse:
        records = add_teacher_logprobs(records, kd.path / "teacher")
    before, tok = load_checkpoint(recipe.train.student)
    ds, _ = tokenize_records(records, tok, tok.chat_template, 256, 5 if sparse else None)
    collate = Collator(tok.pad_token_id)
    batches = [collate([ds[i] for i in range(j, min(j + 16, len(ds)))]) for j in range(0, len(ds), 16)]
    teacher = None
    if not sparse:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    after, _ = load_trained_student(run / "train")
    return heldout_kl(before, batches, teacher), heldout_kl(after, batches, teacher)


@pytest.mark.parametrize("loss, temperature, ce_weight", [("forward_kl", 1.0, 0.0), ("jsd", 2.0, 0.0)])
def test_dense_kd_moves_the_student_towards_the_teacher(kd, monkeypatch, loss, temperature, ce_weight):
    monkeypatch.chdir(kd.path)
    name = f"dense-{loss}"
    recipe = kd.recipe(name, method="full", objective="dense_kd",
                       distill={"teacher": "teacher", "loss": loss, "temperature": temperature,
                                "ce_weight": ce_weight})
    assert cli(["train", str(recipe)]) == 0
    run = kd.path / "runs" / name
    train = losses(run)
    assert train[-1] < train[0]
    kls = losses(run, "eval_kl_to_teacher")
    assert len(kls) == 2 and kls[-1] < kls[0]
    before = load_file(kd.path / "student" / "model.safetensors")
    assert len(_changed(before, _trained(run))) == len(before)
    kl0, kl1 = _heldout(kd, run, name, kd.path / "teacher")
    assert kl1 < 0.8 * kl0, (kl0, kl1)
    info = json.loads((run / "train" / "student.json").read_text())
    assert info["objective"] == "dense_kd" and info["teacher"] == "teacher"
    assert info["last_kl_to_teacher"] == kls[-1]


def test_sparse_kd_from_logged_top_k_logprobs(kd, monkeypatch):
    """Records carry the teacher's top-5 logprobs; the student learns them with reverse KL over top-k + rest."""
    monkeypatch.chdir(kd.path)
    name = "sparse"
    recipe_path = kd.recipe(name, method="full", objective="sparse_kd",
                            distill={"loss": "reverse_kl", "ce_weight": 0.0, "top_k": 5})
    assert cli(["curate", str(recipe_path)]) == 0
    run = RunDir(kd.path / "runs" / name)
    from training.train.stage import read_split

    curated = {s: read_split(run.stage_dir("curate"), s) for s in ("train", "val", "test")}
    # the logs of a serving engine that returns logprobs: the curated records plus the teacher's top-k per token
    fp = run.manifest("curate")["fingerprint"]
    work = run.begin("curate", fp)
    for split, records in curated.items():
        records = add_teacher_logprobs(records, kd.path / "teacher") if split != "test" else records
        if split == "train":  # some records without logprobs, and some whose logs belong to another tokenizer
            records[0]["teacher"]["logprobs"] = None
            records[1]["teacher"]["logprobs"][0]["token"] = "\u2603\u2603 snowman"
        import pyarrow.parquet as pq

        pq.write_table(to_table(records), work / f"{split}.parquet")
    run.complete("curate", {**run.manifest("curate"), "fingerprint": fp})
    recipe = load_recipe(recipe_path)
    run_stage(recipe, run, "train", Console(quiet=True))

    info = json.loads((run.path / "train" / "student.json").read_text())
    sp = info["sparse"]
    assert sp["records_with_logprobs"] == info["examples"] - 1
    assert sp["aligned"] == sp["records_with_logprobs"] - 1 >= 0.8 * info["examples"]
    assert sp["not_used"] == {"no teacher logprobs on the record": 1,
                              "the logged tokens do not spell the answer the student is trained on": 1}
    assert sp["methods"] == {"same_tokenizer": sp["aligned"]}
    assert sp["answer_tokens"]["soft target"] == sp["tokens_with_targets"]
    train = losses(run.path)
    assert train[-1] < train[0]
    before = load_file(kd.path / "student" / "model.safetensors")
    assert len(_changed(before, _trained(run.path))) == len(before)
    kl0, kl1 = _heldout(kd, run.path, name)
    assert kl1 < 0.8 * kl0, (kl0, kl1)


def test_qlora_trains_a_4bit_base_and_survives_evaluation(kd, monkeypatch):
    """bitsandbytes 4-bit base + LoRA on CPU; evaluation mid-training must not freeze the adapter (the
    AVX512-BF16 repacking trap)."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(kd.path)
    name = "qlora"
    recipe = kd.recipe(name, method="qlora", lora={"r": 8, "alpha": 16}, eval_steps=4, logging_steps=2,
                       learning_rate=2e-2)  # evaluations at steps 4 and 8 of 12
    assert cli(["train", str(recipe)]) == 0
    run = kd.path / "runs" / name
    train = losses(run)
    assert train[-1] < train[0]
    after_first_eval = train[2:]  # logged at steps 6, 8, 10, 12: after the evaluation at step 4
    assert len(set(after_first_eval)) == len(after_first_eval), "loss stuck after evaluation"
    assert after_first_eval[-1] < after_first_eval[0]
    adapter = _trained(run)
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)
    info = json.loads((run / "train" / "student.json").read_text())
    assert info["method"] == "qlora" and info["trainable_parameters"] < info["parameters"] / 2


def test_on_policy_kd_through_trl(kd, monkeypatch):
    """The student samples answers and the teacher scores them (trl.DistillationTrainer)."""
    monkeypatch.chdir(kd.path)
    name = "onpolicy"
    recipe = kd.recipe(name, method="full", objective="on_policy_kd", batch_size=8, max_steps=8, logging_steps=2,
                       eval_steps=None, learning_rate=1e-2,
                       distill={"teacher": "teacher", "loss": "forward_kl", "max_new_tokens": 8})
    assert cli(["train", str(recipe)]) == 0
    run = kd.path / "runs" / name
    train = losses(run)
    assert sum(train[-2:]) < sum(train[:2])
    before = load_file(kd.path / "student" / "model.safetensors")
    assert _changed(before, _trained(run))


# --- early checks: refused before any stage does work -------------------------------------------------------------


def test_teacher_with_another_tokenizer_is_refused_before_any_work(kd, monkeypatch, capsys):
    monkeypatch.chdir(kd.path)
    if not (kd.path / "other").exists():
        save_checkpoint(kd.path / "other", tiny_tokenizer(vocab_size=400), seed=3)
    recipe = kd.recipe("mismatch", objective="dense_kd", distill={"teacher": "other"})
    assert cli(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.distill.teacher 'other'" in err and "do not share a tokenizer" in err
    assert not (kd.path / "runs" / "mismatch").exists(), "nothing may run before the check"


def test_unmarked_chat_template_is_refused_before_any_work(kd, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from training.train.chat_template import CHATML_TEMPLATE

    monkeypatch.chdir(kd.path)
    if not (kd.path / "plain").exists():
        tok = AutoTokenizer.from_pretrained(kd.path / "student")
        tok.chat_template = CHATML_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
        save_checkpoint(kd.path / "plain", tok, seed=1)
    recipe = kd.recipe("plain", student={"from_config": None, "checkpoint": "plain"})
    assert cli(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.student.checkpoint 'plain'" in err and "{% generation %}" in err
    assert not (kd.path / "runs" / "plain").exists()


def test_qlora_under_zero3_is_refused(kd, monkeypatch, capsys):
    with pytest.raises(RecipeError, match="QLoRA cannot run under DeepSpeed ZeRO-3"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"method": "qlora", "deepspeed": "zero3_offload"}}))
    parse_recipe(merge(BASE_RECIPE, {"train": {"method": "qlora", "deepspeed": "zero2"}}))
    # ... and when the launcher, not the recipe, selects ZeRO-3
    monkeypatch.chdir(kd.path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    recipe = kd.recipe("qlora-z3", method="qlora")
    assert cli(["train", str(recipe)]) == 2
    assert "cannot run under DeepSpeed ZeRO-3" in capsys.readouterr().err
    assert not (kd.path / "runs" / "qlora-z3").exists()


def test_distillation_recipe_rules():
    with pytest.raises(RecipeError, match="needs train.distill.teacher"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"objective": "dense_kd"}}))
    with pytest.raises(RecipeError, match="trains its own tokenizer"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"objective": "dense_kd", "distill": {"teacher": "t"}}}))
    with pytest.raises(RecipeError, match="not used by objective 'sparse_kd'"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"objective": "sparse_kd", "distill": {"teacher": "t"}}}))
    with pytest.raises(RecipeError, match="train.distill.beta"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"distill": {"beta": 1.5}}}))
    with pytest.raises(RecipeError, match="save_steps .* multiple of eval_steps"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"early_stopping_patience": 2, "eval_steps": 7}}))
    ok = parse_recipe(merge(BASE_RECIPE, {"train": {"objective": "dense_kd", "distill": {"teacher": "t"},
                                                    "student": {"from_config": {"tokenizer": "t"}}}}))
    assert ok.train.distill.loss == "forward_kl"
