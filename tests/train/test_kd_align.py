"""Sparse distillation targets across tokenizers (training.train.align): a teacher's logged top-k logprobs lined up
with the student's own tokens by byte offsets; same-tokenizer logs give exactly the targets distill built before;
coverage is counted per answer token and a recipe where almost nothing lines up is refused."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
import yaml
from train_helpers import tiny_tokenizer

from pipeline.chat import training_messages
from training.train import align
from training.train.chat_template import CHATML_TEMPLATE, SPECIAL_TOKENS, train_tokenizer
from training.train.data import IGNORE, encode_chat, tokenize_records
from training.train.preflight import check_sparse_coverage


def reference_targets(tokenizer, ids, labels, logprobs, top_k, cache):
    """distill's sparse targets before cross-tokenizer alignment (frozen copy of the old data.sparse_targets)."""
    def single(text):
        if text not in cache:
            enc = tokenizer.encode(text, add_special_tokens=False)
            cache[text] = enc[0] if len(enc) == 1 else None
        return cache[text]

    empty_ids, empty_lps = [[] for _ in ids], [[] for _ in ids]
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    teacher_ids = [single(t["token"]) for t in logprobs]
    if None in teacher_ids:
        return empty_ids, empty_lps, "x"
    n = min(len(teacher_ids), end - start)
    if n == 0 or ids[start:start + n] != teacher_ids[:n]:
        return empty_ids, empty_lps, "y"
    for j in range(n):
        tok, alts = logprobs[j], {}
        for alt in tok.get("top") or []:
            i = single(alt["token"])
            if i is not None and i not in alts:
                alts[i] = float(alt["logprob"])
        alts.setdefault(teacher_ids[j], float(tok["logprob"]))
        best = sorted(alts.items(), key=lambda kv: -kv[1])[:top_k]
        empty_ids[start + j] = [i for i, _ in best]
        empty_lps[start + j] = [lp for _, lp in best]
    return empty_ids, empty_lps, None


def byte_bpe(merges: list[str]):
    """A byte-level BPE tokenizer with exactly the given merges (strings split in two at their first '|'), with
    distill's specials and ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    enc = {b: c for c, b in align._byte_decoder().items()}
    to_bl = lambda s: "".join(enc[b] for b in s.encode())  # noqa: E731
    vocab = {c: i for i, c in enumerate(sorted(enc.values()))}
    pairs = []
    for m in merges:
        a, b = m.split("|")
        pairs.append((to_bl(a), to_bl(b)))
        vocab.setdefault(to_bl(a + b), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def entry(text: str, logprob: float, top: list[tuple[str, float]], with_bytes: bool = True) -> dict[str, Any]:
    """One logged token in OpenAI's logprobs.content shape."""
    e = {"token": text, "logprob": logprob,
         "top": [{"token": t, "logprob": lp, **({"bytes": list(t.encode())} if with_bytes else {})} for t, lp in top]}
    if with_bytes:
        e["bytes"] = list(text.encode())
    return e


def encode(tok, answer: str):
    return encode_chat(tok, CHATML_TEMPLATE, [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": answer}], 512)[:2]


@pytest.fixture(scope="module")
def student():
    # student writes "hello world!" as hel|lo| wor|ld|!
    return byte_bpe(["h|e", "he|l", "l|o", " |w", " w|o", " wo|r", "l|d"])


def _target(tok, ids, out, p) -> dict[bytes, float]:
    table = align.student_bytes(tok)
    return {table[i]: lp for i, lp in zip(out.ids[p], out.logprobs[p], strict=True)}


def test_cross_tokenizer_targets_follow_byte_boundaries(student):
    ids, labels = encode(student, "hello world!")
    table = align.student_bytes(student)
    start, end = align.final_turn(labels)
    assert [table[i] for i in ids[start:end]] == [b"hel", b"lo", b" wor", b"ld", b"!", None]
    # the teacher writes he|llo| wor|ld|!
    logs = [entry("he", -0.1, [("he", -0.1), ("hi", -2.5), ("hel", -3.0), ("x", -4.0), ("hx", -5.0)]),
            entry("llo", -0.2, [("llo", -0.2), ("ll", -2.0)]),
            entry(" wor", -0.3, [(" wor", -0.3), (" world", -1.5), (" w", -3.0)]),
            entry("ld", -0.05, [("ld", -0.05)]),
            entry("!", -0.5, [("!", -0.5), (".", -1.0)])]
    out = align.record_targets(student, ids, labels, logs, 20, {})
    assert out.method == "aligned" and out.reason is None
    # 'hel' starts where 'he' starts but spans he + part of llo: the chain rule gives it p(he) * p(llo); the
    # alternative 'hel' (a student token exactly) adds to it; 'hi' and 'hx' both begin with the student token 'h'
    first = _target(student, ids, out, start)
    assert first[b"hel"] == pytest.approx(math.log(math.exp(-0.3) + math.exp(-3.0)))
    assert first[b"h"] == pytest.approx(math.log(math.exp(-2.5) + math.exp(-5.0)))
    assert first[b"x"] == pytest.approx(-4.0) and len(first) == 3
    assert out.ids[start + 1] == []  # 'lo' starts inside the teacher's 'llo'
    third = _target(student, ids, out, start + 2)  # ' world' is not a student token: its first one is ' wor'
    assert third == pytest.approx({b" wor": math.log(math.exp(-0.3) + math.exp(-1.5)), b" w": -3.0})
    assert _target(student, ids, out, start + 3) == {b"ld": -0.05}
    assert _target(student, ids, out, start + 4) == pytest.approx({b"!": -0.5, b".": -1.0})
    assert out.ids[end - 1] == []  # <|im_end|>: the logs end with the answer
    assert dict(out.tokens) == {align.SOFT: 4, align.INSIDE: 1, align.END_OF_TURN: 1}
    # the mass no student token takes stays in the 'rest' bucket: the listed targets sum to less than 1
    assert sum(math.exp(v) for v in first.values()) < 1


def test_top_k_keeps_the_most_likely_student_tokens(student):
    ids, labels = encode(student, "hello world!")
    logs = [entry("he", -0.1, [("he", -0.1), ("hi", -2.5), ("x", -4.0), ("y", -1.0)]),
            entry("llo", -0.2, []), entry(" wor", -0.3, []), entry("ld", -0.05, []), entry("!", -0.5, [])]
    out = align.record_targets(student, ids, labels, logs, 2, {})
    start, _ = align.final_turn(labels)
    assert _target(student, ids, out, start) == pytest.approx({b"hel": -0.3, b"y": -1.0})


def test_logs_without_bytes_and_lossy_text(student):
    """Text-only logs work from the UTF-8 text; a replacement character stands for lost bytes: an alternative
    like that goes to 'rest', a chosen token like that leaves the record on cross-entropy with the reason."""
    ids, labels = encode(student, "hello world!")
    start, _ = align.final_turn(labels)
    logs = [entry("he", -0.1, [("he", -0.1), ("\ufffd", -1.0)], with_bytes=False),
            entry("llo", -0.2, [], False), entry(" wor", -0.3, [], False), entry("ld", -0.05, [], False),
            entry("!", -0.5, [], False)]
    out = align.record_targets(student, ids, labels, logs, 20, {})
    assert out.method == "aligned" and _target(student, ids, out, start) == pytest.approx({b"hel": -0.3})
    logs[1]["token"] = "\ufffd"
    out = align.record_targets(student, ids, labels, logs, 20, {})
    assert out.reason == align.NOT_SPELLED and not any(out.ids)
    assert dict(out.tokens) == {align.NOT_SPELLED: 5, align.END_OF_TURN: 1}


def test_logs_that_spell_another_answer_are_refused_by_record(student):
    ids, labels = encode(student, "hello world!")
    logs = [entry("goodbye", -0.1, [])]
    out = align.record_targets(student, ids, labels, logs, 20, {})
    assert out.reason == align.NOT_SPELLED and out.method is None
    out = align.record_targets(student, ids, labels, None, 20, {})
    assert out.reason == align.NO_LOGPROBS and dict(out.tokens) == {align.NO_LOGPROBS: 6}


def test_truncated_logs_cover_what_they_cover(student):
    ids, labels = encode(student, "hello world!")
    logs = [entry("he", -0.1, []), entry("llo", -0.2, []), entry(" wor", -0.3, [])]
    out = align.record_targets(student, ids, labels, logs, 20, {})
    assert dict(out.tokens) == {align.SOFT: 2, align.INSIDE: 1, align.BEYOND: 2, align.END_OF_TURN: 1}


# --- same tokenizer: exactly the old targets ---------------------------------------------------------------------

def _teacher_logs(tok, text: str, rng: random.Random, k: int = 5, with_bytes: bool = True) -> list[dict]:
    """Logs of an API teacher that uses ``tok``: per token its text (and bytes), a logprob and k alternatives."""
    table = align.student_bytes(tok)
    ids = tok.encode(text, add_special_tokens=False)
    normal = [i for i, b in enumerate(table) if b]
    out = []
    for i in ids:
        alts = [i, *rng.sample(normal, k - 1)]
        weights = [rng.random() ** 3 for _ in range(k + 1)]  # k alternatives and the rest: a distribution
        lps = [math.log(w / sum(weights)) for w in weights[:k]]
        top = [{"token": tok.decode([a]), "logprob": lp, **({"bytes": list(table[a])} if with_bytes else {})}
               for a, lp in zip(alts, lps, strict=True)]
        out.append({"token": tok.decode([i]), "logprob": lps[0], "top": top,
                    **({"bytes": list(table[i])} if with_bytes else {})})
    return out


def _demo_answers(n: int) -> list[str]:
    from curation.harvest.demo_traffic import generate

    out = []
    for line in generate(n, "2026-11-01"):
        try:
            out.append(json.loads(line)["response"]["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return [a for a in out if a]


@pytest.mark.parametrize("with_bytes", [True, False])
def test_same_tokenizer_logs_give_exactly_the_old_targets(with_bytes):
    tok = tiny_tokenizer(400)
    rng = random.Random(3)
    answers = _demo_answers(60) + ["caf\u00e9 \u2713 ok", "\U0001f600 emoji"]
    same = 0
    for answer in answers:
        ids, labels = encode(tok, answer)
        logs = _teacher_logs(tok, answer, rng, with_bytes=with_bytes)
        for top_k in (1, 3, 20):
            want = reference_targets(tok, ids, labels, logs, top_k, {})
            got = align.record_targets(tok, ids, labels, logs, top_k, {})
            if want[2] is None:
                same += 1
                assert got.method == "same_tokenizer" and (got.ids, got.logprobs) == (want[0], want[1]), answer
    assert same >= 0.8 * 3 * len(answers)


def test_alignment_reproduces_same_tokenizer_targets_when_forced():
    """The byte-offset path, run on same-tokenizer logs with bytes, builds the same targets as the id path, plus
    the alternatives the id path has to drop: byte tokens whose text alone is not valid UTF-8."""
    tok = tiny_tokenizer(400)
    rng = random.Random(5)
    extra = 0
    for answer in _demo_answers(30):
        ids, labels = encode(tok, answer)
        logs = _teacher_logs(tok, answer, rng)
        exact = align.record_targets(tok, ids, labels, logs, 20, {})
        forced = align.aligned_targets(tok, ids, labels, logs, 20, {})
        for p in range(len(ids)):
            a = dict(zip(forced.ids[p], forced.logprobs[p], strict=True))
            b = dict(zip(exact.ids[p], exact.logprobs[p], strict=True))
            assert {i: a[i] for i in b} == pytest.approx(b)
            assert all("\ufffd" in tok.decode([i]) for i in set(a) - set(b))
            extra += len(set(a) - set(b))
    assert extra > 0


# --- whole datasets: counts, and the refusal ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_tokenizers():
    answers = _demo_answers(300)
    return tiny_tokenizer(400), train_tokenizer(answers[::-1], 700)


def _stored(logs: list[dict]) -> list[dict]:
    """Logged tokens as harvest stores them: bytes as bytes (the loss-free text case would be null)."""
    return [{**t, "bytes": bytes(t["bytes"]), "top": [{**a, "bytes": bytes(a["bytes"])} for a in t["top"]]}
            for t in logs]


def _records(teacher, n: int) -> list[dict]:
    rng = random.Random(1)
    return [{"id": str(i), "messages": [{"role": "user", "content": f"q{i}"}], "output": {"content": a},
             "teacher": {"logprobs": _stored(_teacher_logs(teacher, a, rng, k=20))}}
            for i, a in enumerate(_demo_answers(n))]


def test_cross_tokenizer_records_get_soft_targets_and_counts(two_tokenizers):
    student, teacher = two_tokenizers
    assert student.get_vocab() != teacher.get_vocab()
    records = _records(teacher, 40)
    records[0]["teacher"]["logprobs"] = None
    ds, stats = tokenize_records(records, student, CHATML_TEMPLATE, 512, 20)
    n = len(records)
    assert stats.sparse_records == n - 1 and stats.sparse_aligned == n - 1
    assert stats.methods == {"aligned": n - 1}
    outcomes = stats.token_outcomes
    assert sum(outcomes.values()) == stats.target_tokens
    assert outcomes[align.SOFT] == stats.sparse_tokens >= 0.5 * stats.target_tokens
    assert outcomes[align.END_OF_TURN] == n - 1 and outcomes[align.NO_LOGPROBS] > 0
    for row in ds:  # every target id is a student id, the answer's own token is among them, logprobs <= 0
        for p, (t_ids, t_lps) in enumerate(zip(row["kd_ids"], row["kd_logprobs"], strict=True)):
            assert all(0 <= i < len(student) for i in t_ids) and all(lp <= 1e-6 for lp in t_lps)
            if t_ids and len(t_ids) < 20:
                assert row["input_ids"][p] in t_ids
            assert sum(math.exp(lp) for lp in t_lps) <= 1 + 1e-4


def test_almost_nothing_lined_up_is_refused_with_the_reason(two_tokenizers):
    student, teacher = two_tokenizers
    records = _records(teacher, 20)
    for r in records[1:]:
        r["teacher"]["logprobs"] = None
    _, stats = tokenize_records(records, student, CHATML_TEMPLATE, 512, 20)
    with pytest.raises(ValueError, match="no teacher logprobs on the record.*Fix: harvest records that carry"):
        check_sparse_coverage(stats)
    for r in records:
        r["output"]["content"] = r["output"]["content"].upper()  # curation changed the text after logging
        r["teacher"]["logprobs"] = _records(teacher, 20)[0]["teacher"]["logprobs"]
    _, stats = tokenize_records(records, student, CHATML_TEMPLATE, 512, 20)
    with pytest.raises(ValueError, match=r"only 0 of .* do not spell the answer"):
        check_sparse_coverage(stats)
    _, stats = tokenize_records(_records(teacher, 20), student, CHATML_TEMPLATE, 512, 20)
    check_sparse_coverage(stats)  # lined up: no error


def test_training_messages_final_turn_is_what_is_aligned(student):
    """Earlier assistant turns are labelled too but have no logs: counted, never given the final turn's targets."""
    r = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "b"}], "output": {"content": "hello world!"}}
    ids, labels, _ = encode_chat(student, CHATML_TEMPLATE, training_messages(r), 512)
    logs = [entry("hel", -0.1, []), entry("lo", -0.2, []), entry(" wor", -0.3, []), entry("ld", -0.05, []),
            entry("!", -0.5, [])]
    out = align.record_targets(student, ids, labels, logs, 20, {})
    start, _ = align.final_turn(labels)
    assert not any(out.ids[:start]) and out.tokens[align.EARLIER_TURN] == 3  # hel|lo|<|im_end|>
    assert out.tokens[align.SOFT] == 5


def _curated(recipe, records: list[dict], stages: tuple[str, ...] = ("harvest", "curate")) -> None:
    """Write ``records`` as curate's training split and mark the given stages complete with this recipe."""
    import pyarrow.parquet as pq

    from pipeline.record import to_table
    from pipeline.rundir import RunDir
    from pipeline.stages import expected_fingerprint

    run = RunDir(recipe.run_path)
    for stage in ("harvest", "curate"):
        work = run.begin(stage, "0" * 64)
        if stage == "curate":
            pq.write_table(to_table(records), work / "train.parquet")
        fp = expected_fingerprint(recipe, run, stage) if stage in stages else "stale"
        run.complete(stage, {"fingerprint": fp})


def test_preflight_lines_up_a_sample_of_curated_data_before_training(two_tokenizers, tmp_path, monkeypatch):
    """With up-to-date curated data in the run folder, preflight refuses sparse_kd in seconds, naming the reason;
    data that harvest or curate will write afresh is left to the train stage (it may be about to get logprobs)."""
    from pipeline.recipe import parse_recipe
    from training.train.preflight import check

    from conftest import BASE_RECIPE, merge

    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.jsonl.gz").write_bytes(b"")
    student, teacher = two_tokenizers
    student.save_pretrained(tmp_path / "student_tok")
    data = merge(BASE_RECIPE, {"run_dir": str(tmp_path / "runs"), "train": {
        "objective": "sparse_kd", "student": {"from_config": {"tokenizer": str(tmp_path / "student_tok")}}}})
    recipe = parse_recipe(data)
    check(recipe)  # nothing curated yet: the train stage checks its data when it runs
    records = _records(teacher, 30)
    for r in records:
        r["teacher"]["logprobs"] = None  # logs without logprobs
    _curated(recipe, records, stages=("curate",))  # harvest is stale: it will rerun (e.g. re-generate)
    check(recipe)  # before: refused on the stale data, blocking the rerun that the refusal suggests
    _curated(recipe, records)
    with pytest.raises(ValueError, match=r"train.objective 'sparse_kd': only 0 of .*no teacher logprobs"):
        check(recipe)
    _curated(recipe, _records(teacher, 30))
    check(recipe)


def test_train_stage_distils_across_tokenizers_and_reports_coverage(two_tokenizers, tmp_path, monkeypatch):
    """The train stage, sparse_kd, on curated records whose logs come from another tokenizer: it picks byte-offset
    alignment by itself, trains on the soft targets (kd_loss logged) and says in student.json what got a target."""
    import pyarrow.parquet as pq
    from rich.console import Console
    from train_helpers import losses, save_checkpoint

    from pipeline.cli import main as cli
    from pipeline.recipe import load_recipe
    from pipeline.record import to_table
    from pipeline.rundir import RunDir
    from pipeline.stages import run_stage

    from conftest import BASE_RECIPE, make_project, merge

    student, teacher = two_tokenizers
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, {"2026-11-23": 120})
    save_checkpoint(tmp_path / "student", student, seed=1)
    data = merge(BASE_RECIPE, {"train": {"student": {"from_config": None, "checkpoint": "student"},
                                         "objective": "sparse_kd", "max_steps": 6, "batch_size": 8,
                                         "max_length": 256, "logging_steps": 2, "save_steps": 100}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    assert cli(["curate", "recipe.yaml"]) == 0
    run = RunDir(tmp_path / "runs" / "t")
    fp = run.manifest("curate")["fingerprint"]
    work = run.begin("curate", fp)
    rng = random.Random(0)
    for split in ("train", "val", "test"):  # the logs of an API teacher with its own tokenizer
        records = pq.read_table(run.stage_dir("curate") / f"{split}.parquet").to_pylist()
        for r in records:
            r["teacher"] = {**(r["teacher"] or {}), "logprobs": _stored(
                _teacher_logs(teacher, r["output"]["content"] or "", rng, k=20))}
        pq.write_table(to_table(records), work / f"{split}.parquet")
    run.complete("curate", {**run.manifest("curate"), "fingerprint": fp})
    run_stage(load_recipe(tmp_path / "recipe.yaml"), run, "train", Console(quiet=True))
    sp = json.loads((run.path / "train" / "student.json").read_text())["sparse"]
    assert sp["methods"] == {"aligned": sp["aligned"]} and sp["aligned"] == sp["records_with_logprobs"] > 0
    tokens = sp["answer_tokens"]
    assert sum(tokens.values()) == sp["target_tokens"] and tokens[align.SOFT] == sp["tokens_with_targets"]
    assert tokens[align.SOFT] >= 0.5 * sp["target_tokens"] and tokens[align.END_OF_TURN] == sp["aligned"]
    assert losses(run.path, "kd_loss") and losses(run.path, "teacher_token_share")[-1] > 0.5


# --- fixes after review ------------------------------------------------------------------------------------------

def metaspace_student():
    """A SentencePiece-style (Metaspace) BPE student that writes 'hello' as ▁hel|lo, with distill's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\u2581", "h", "e", "l", "o", "i", "w", "r", "d", "!", "x"]
    merges = [("\u2581", "h"), ("\u2581h", "e"), ("\u2581he", "l"), ("l", "o"), ("\u2581h", "i"), ("\u2581", "w")]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return fast


def test_the_one_byte_lead_is_only_a_sentencepiece_students_own_space(student):
    """Byte-level student: ' hello' is the answer's own text, so logs of 'hello' do not spell it. SentencePiece
    student: its '▁' is its own, so 'hello' lines up; alternatives at the first teacher token map with the space."""
    r = {"messages": [{"role": "user", "content": "q"}], "output": {"content": " hello"}}
    ids, labels, _ = encode_chat(student, CHATML_TEMPLATE, training_messages(r), 512)
    logs = [entry("hello", -0.1, [("hello", -0.1), ("hi", -2.0)])]
    out = align.record_targets(student, ids, labels, logs, 20, {})
    assert out.reason == align.NOT_SPELLED and not any(out.ids)  # before: ' ' and 'hel' both got hello's target
    sp = metaspace_student()
    assert align.prepends_space(sp) and not align.prepends_space(student)
    ids = sp.encode("hello", add_special_tokens=False) + [sp.convert_tokens_to_ids("<|im_end|>")]
    assert [align.student_bytes(sp)[i] for i in ids[:-1]] == [b" hel", b"lo"]
    out = align.record_targets(sp, ids, ids, logs, 20, {})
    assert out.method == "aligned" and out.reason is None
    assert _target(sp, ids, out, 0) == pytest.approx({b" hel": -0.1, b" hi": -2.0})
    assert dict(out.tokens) == {align.SOFT: 1, align.INSIDE: 1, align.END_OF_TURN: 1}
    alone = [sp.convert_tokens_to_ids("\u2581"), *sp.encode("x", add_special_tokens=False)[1:]]
    assert [align.student_bytes(sp)[i] for i in alone] == [b" ", b"x"]
    out = align.record_targets(sp, alone, alone, [entry("x", -0.3, [("x", -0.3), ("hi", -1.0)])], 20, {})
    assert out.tokens[align.LEAD] == 1 and out.ids[0] == [] and out.tokens[align.SOFT] == 1
    assert _target(sp, alone, out, 1) == {b"x": -0.3}  # 'x' does not start with the space: 'hi' -> no token


def test_one_method_for_the_whole_dataset(two_tokenizers):
    """A cross-tokenizer recipe lines up every record by bytes, even one whose logged tokens happen to be single
    student tokens; same-tokenizer logs keep exactly the id path's targets."""
    student, teacher = two_tokenizers
    records = _records(teacher, 12)
    rng = random.Random(9)
    lucky = _teacher_logs(student, "ok", rng, k=3)  # logs that read as the student's own tokens
    records.append({"id": "lucky", "messages": [{"role": "user", "content": "q"}], "output": {"content": "ok"},
                    "teacher": {"logprobs": _stored(lucky)}})
    _, stats = tokenize_records(records, student, CHATML_TEMPLATE, 512, 20)
    assert stats.methods == {"aligned": len(records)}  # before: {'aligned': 12, 'same_tokenizer': 1}
    same = _records(student, 12)
    ds, stats = tokenize_records(same, student, CHATML_TEMPLATE, 512, 3)
    assert stats.methods.get("same_tokenizer", 0) >= 10
    for row, r in zip(ds, same, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        want = reference_targets(student, ids, labels, r["teacher"]["logprobs"], 3, {})
        if want[2] is None:
            assert row["kd_ids"] == want[0]


def test_float16_teacher_masses_above_one_are_renormalised():
    import torch

    from training.train.kd import sparse_buckets

    lps = torch.tensor([[math.log(0.6), math.log(0.45)]]).half().float()  # rounded logs that add up to 1.05
    student_logp = torch.log_softmax(torch.zeros(1, 5), -1)
    for t in (1.0, 2.0):
        _, teacher = sparse_buckets(student_logp, torch.tensor([[1, 2]]), lps, t)
        assert teacher.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    _, teacher = sparse_buckets(student_logp, torch.tensor([[1, 2]]), torch.tensor([[math.log(0.5), -3.0]]))
    assert teacher.exp()[0, :2].tolist() == pytest.approx([0.5, math.exp(-3.0)])  # under 1: left as logged


def test_a_final_answer_cut_away_by_truncation_gets_no_targets(student):
    r = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "b " * 40}], "output": {"content": "hello world!"},
         "teacher": {"logprobs": [entry("hel", -0.1, []), entry("lo", -0.2, []), entry(" wor", -0.3, []),
                                  entry("ld", -0.05, []), entry("!", -0.5, [])]}}
    ids, labels, truncated = encode_chat(student, CHATML_TEMPLATE, training_messages(r), 30)
    assert truncated and any(x != IGNORE for x in labels)  # only the earlier 'hello' turn is left
    ds, stats = tokenize_records([r], student, CHATML_TEMPLATE, 30, 20)
    assert not any(ds[0]["kd_ids"])  # before: 'hel' got the final answer's first target
    assert stats.reasons == {align.CUT_AWAY: 1} and stats.token_outcomes == {align.EARLIER_TURN: 3}
    assert stats.sparse_aligned == 0


def test_records_without_a_single_soft_token_are_not_counted_as_aligned(student):
    r = {"messages": [{"role": "user", "content": "q"}], "output": {"content": "hello world!"},
         "teacher": {"logprobs": [entry("he", -0.1, [])]}}  # logs cut short: 'hel' runs past their end
    _, stats = tokenize_records([r], student, CHATML_TEMPLATE, 512, 20)
    assert stats.token_outcomes.get(align.SOFT, 0) == 0 and stats.sparse_aligned == 0


def test_leading_whitespace_a_template_trims_still_lines_up(student):
    """A chat template that trims the answer (``|trim``) drops the teacher's leading whitespace: the rest lines up
    from the first teacher boundary after it; whitespace inside the first teacher token leaves that token on CE."""
    ids, labels = encode(student, "hello world!")
    start, _ = align.final_turn(labels)
    logs = [entry(" \n", -0.2, []), entry("hel", -0.1, [("hel", -0.1), ("hi", -2.0)]), entry("lo", -0.2, []),
            entry(" wor", -0.3, []), entry("ld", -0.05, []), entry("!", -0.5, [])]
    out = align.record_targets(student, ids, labels, logs, 20, {})
    assert out.reason is None and out.tokens[align.SOFT] == 5  # before: NOT_SPELLED for the whole record
    assert _target(student, ids, out, start) == pytest.approx({b"hel": -0.1, b"h": -2.0})
    logs = [entry(" hello", -0.1, []), entry(" wor", -0.3, []), entry("ld", -0.05, []), entry("!", -0.5, [])]
    out = align.record_targets(student, ids, labels, logs, 20, {})
    assert dict(out.tokens) == {align.SOFT: 3, align.INSIDE: 2, align.END_OF_TURN: 1}
