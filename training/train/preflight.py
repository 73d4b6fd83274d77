"""Checks of the train section that need files (tokenizers, model configs, the launcher's environment), run
before any stage does work: a recipe that cannot train fails in seconds, not after harvest and curate.

- the optional packages the recipe needs are installed (bitsandbytes, deepspeed, wandb, tensorboard);
- QLoRA is not launched under DeepSpeed ZeRO-3, and DeepSpeed is not configured twice;
- the student's chat template marks assistant turns (else assistant-only masks come out empty);
- max_length fits the student's context;
- for logit distillation, teacher and student share one tokenizer and their output layers cover it;
- for sparse_kd on curated data already in the run folder, enough answer tokens get a teacher target (the same
  check the train stage makes on all of its data, ``check_sparse_coverage``).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from pipeline.config.train import TrainConfig
from training.train.chat_template import check_assistant_mask
from training.train.distributed import launcher_zero_stage

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional-kernel hint on import, not actionable
EXTRAS = {"bitsandbytes": "quant", "deepspeed": "deepspeed", "wandb": "wandb"}


def _need(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        extra = EXTRAS.get(module)
        how = f"pip install -c constraints.txt -e '.[{extra}]'" if extra else f"pip install {module}"
        raise ValueError(f"{why} needs the package '{module}', which is not installed: {how}")


def _load(what: str, field: str, source: str, loader, **kw) -> Any:
    try:
        return loader(source, **kw)
    except Exception as err:  # noqa: BLE001 - any loading failure is reported with the recipe field
        raise ValueError(f"{field}: cannot load the {what} of '{source}': {type(err).__name__}: {err}") from None


def _text_vocab_size(config) -> int:
    return int(config.get_text_config().vocab_size)


def check(recipe) -> None:
    """Raise ValueError naming the recipe field when the train stage could not run as configured."""
    from transformers import AutoConfig

    from training.train.student import load_tokenizer

    cfg: TrainConfig = recipe.train
    launcher_stage = launcher_zero_stage()
    if cfg.method == "qlora":
        _need("bitsandbytes", "train.method 'qlora'")
        if launcher_stage == 3:
            raise ValueError("train.method 'qlora' cannot run under DeepSpeed ZeRO-3 (the accelerate launch config "
                             "selects stage 3): ZeRO-3 cannot partition 4-bit weights. Launch with "
                             "recipes/accelerate/zero2.yaml or ddp.yaml, or use method: lora")
    if cfg.deepspeed or launcher_stage is not None:
        _need("deepspeed", "DeepSpeed")
    if cfg.deepspeed and launcher_stage is not None:
        raise ValueError(f"train.deepspeed ({cfg.deepspeed}) and `accelerate launch --use_deepspeed` both configure "
                         "DeepSpeed: keep one (launch with recipes/accelerate/ddp.yaml, or remove train.deepspeed)")
    for logger in cfg.report_to:
        _need(logger, f"train.report_to '{logger}'")

    s = cfg.student
    if s.checkpoint:
        field, source = "train.student.checkpoint", s.checkpoint
        tokenizer = _load("tokenizer", field, source, load_tokenizer, revision=s.revision,
                          trust_remote_code=s.trust_remote_code)
        config = _load("config", field, source, AutoConfig.from_pretrained, revision=s.revision,
                       trust_remote_code=s.trust_remote_code)
        student_vocab = _text_vocab_size(config)
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        if limit and cfg.max_length > limit:
            raise ValueError(f"train.max_length ({cfg.max_length}) exceeds the student's context ({limit} tokens)")
    elif s.from_config.tokenizer:
        field, source = "train.student.from_config.tokenizer", s.from_config.tokenizer
        tokenizer = _load("tokenizer", field, source, load_tokenizer)
        student_vocab = len(tokenizer)
    else:
        return  # a tokenizer trained on the curated data, with distill's own ChatML template
    try:
        check_assistant_mask(tokenizer)
    except ValueError as err:
        raise ValueError(f"{field} '{source}': {err}") from None

    if cfg.objective in ("dense_kd", "on_policy_kd"):
        d = cfg.distill
        tf = "train.distill.teacher"
        teacher_tok = _load("tokenizer", tf, d.teacher, load_tokenizer, revision=d.teacher_revision,
                            trust_remote_code=d.teacher_trust_remote_code)
        teacher_config = _load("config", tf, d.teacher, AutoConfig.from_pretrained, revision=d.teacher_revision,
                               trust_remote_code=d.teacher_trust_remote_code)
        check_same_vocabulary(tokenizer, teacher_tok, student_vocab, _text_vocab_size(teacher_config),
                              f"{field} '{source}'", f"{tf} '{d.teacher}'")
    if cfg.objective == "sparse_kd":
        sample_sparse_coverage(recipe, tokenizer)


def check_same_vocabulary(student_tok, teacher_tok, student_rows: int, teacher_rows: int, student: str,
                          teacher: str) -> None:
    """Logit distillation compares distributions id by id: both tokenizers must map every token to the same id,
    and both output layers must cover the tokenizer (extra padding rows are fine and are cut off)."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        differ = sorted(set(sv.items()) ^ set(tv.items()), key=lambda kv: kv[1])
        token, _ = differ[0]
        raise ValueError(
            f"{teacher} and the student ({student}) do not share a tokenizer: "
            f"{len({k for k, _ in differ}):,} of {max(len(sv), len(tv)):,} tokens differ (e.g. {token!r}: "
            f"{sv.get(token)} vs {tv.get(token)}). Logit distillation compares next-token distributions id by "
            "id, so both must use one vocabulary: pick a teacher of the student's family, or use objective: sft, "
            "which trains on the teacher's text"
        )
    needed = len(student_tok)
    for who, rows in ((student, student_rows), (teacher, teacher_rows)):
        if rows < needed:
            raise ValueError(f"{who}: its output layer has {rows:,} rows but the tokenizer has {needed:,} tokens")


MIN_SOFT_SHARE = 0.05  # sparse_kd is refused when fewer answer tokens than this get a teacher target
PREFLIGHT_SAMPLE = 200  # curated records the preflight check lines up


def check_sparse_coverage(stats, where: str = "the curated training records") -> None:
    """Refuse sparse_kd when almost no answer token gets a teacher target (``stats``: training.train.data's
    DataStats), naming the main reason; the share and the reasons are in student.json otherwise."""
    outcomes = stats.token_outcomes
    total = sum(outcomes.values())
    soft = outcomes.get("soft target", 0)
    if total and soft / total >= MIN_SOFT_SHARE:
        return
    from training.train.align import NO_LOGPROBS

    misses = sorted(((n, r) for r, n in outcomes.items() if r != "soft target"), reverse=True)
    why = "; ".join(f"{n:,} x {r}" for n, r in misses[:3]) or "no answer tokens"
    hint = ("harvest records that carry teacher.logprobs (logs with logprobs, or harvest.regenerate with "
            "top_logprobs > 0), or use objective: sft" if misses and misses[0][1] == NO_LOGPROBS else
            "check that the logged tokens spell the answers as curated (PII redaction or edits change the text), "
            "or use objective: sft")
    raise ValueError(f"train.objective 'sparse_kd': only {soft:,} of {total:,} answer tokens in {where} get a "
                     f"teacher target (at least {MIN_SOFT_SHARE:.0%} needed). Main reasons: {why}. Fix: {hint}")


def sample_sparse_coverage(recipe, tokenizer) -> None:
    """When curate's training split is up to date with this recipe, line up a sample of it with the student's
    tokens. Data that harvest or curate will write afresh (missing, or stale: e.g. harvest re-generates with
    logprobs once the objective is sparse_kd) is left to the train stage, which checks all of its data."""
    from pipeline.rundir import RunDir
    from pipeline.stages import plan, stage_state

    run = RunDir(recipe.run_path)
    try:
        due = any(stage_state(recipe, run, stage)[0] != "complete" for stage in plan(["curate"]))
    except (OSError, ValueError, RuntimeError):  # the logs cannot be listed now: harvest will say why
        return
    if due:
        return
    path = run.stage_dir("curate") / "train.parquet"
    if not path.is_file():
        return
    import pyarrow.parquet as pq

    from pipeline.record import from_table
    from training.train.chat_template import training_template
    from training.train.data import tokenize_records

    table = pq.read_table(path)
    records = from_table(table.slice(0, PREFLIGHT_SAMPLE))
    cfg = recipe.train
    _, stats = tokenize_records(records, tokenizer, training_template(tokenizer), cfg.max_length, cfg.distill.top_k)
    check_sparse_coverage(stats, f"a sample of {len(records)} records of {path}")
