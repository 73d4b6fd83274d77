"""Issue 15, item 5 and 6: the published version says how to reproduce the evaluated answers (generation_config.json
and the model card), with commands current llama.cpp accepts."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
from transformers import AutoTokenizer, GenerationConfig


def _version(e2e):
    store = e2e / "store" / "tiny-student"
    return store / (store / "latest").read_text().strip()


def test_generation_config_carries_greedy_max_new_tokens_stop_and_system_prompts(e2e):
    v = _version(e2e)
    cfg = json.loads((v / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(v)
    assert cfg["max_new_tokens"] == 40 and cfg["do_sample"] is False  # evaluate.max_new_tokens of the fixture
    assert cfg["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>")] == [tok.eos_token_id]
    loaded = GenerationConfig.from_pretrained(v)  # transformers reads the settings
    assert loaded.max_new_tokens == 40 and loaded.do_sample is False
    # the most frequent (redacted) system message per function of the curated training data
    train = pq.read_table(e2e / "runs/t/curate/train.parquet").to_pylist()
    for fn in {r["function"] for r in train}:
        c = Counter(next(m["content"] for m in r["messages"] if m["role"] == "system")
                    for r in train if r["function"] == fn)
        assert cfg["distill_system_prompts"][fn] == c.most_common(1)[0][0]


def test_model_card_usage_is_what_reproduces_the_evaluated_answers(e2e):
    v = _version(e2e)
    card = (v / "README.md").read_text()
    prompts = json.loads((v / "generation_config.json").read_text())["distill_system_prompts"]
    assert all(p in card for p in prompts.values())
    assert "max_new_tokens=40, do_sample=False" in card and "`<|im_end|>`" in card
    assert 'inputs["input_ids"].shape[1]:' in card  # only the new tokens are decoded
    assert "-cnv" not in card
    assert "llama-cli -m DEST/gguf-q8_0/tiny-student-Q8_0.gguf -sys " in card and "-n 40 --temp 0" in card
    assert "--no-repack" in card and "AMX" in card
