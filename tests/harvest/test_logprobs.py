"""Teacher logprobs through harvest and curate, compactly: every importer whose format carries OpenAI-style
``logprobs.content`` keeps each token's text, float16 logprob, top alternatives and -- only where the text does not
spell them -- its bytes; curate passes them on to the curated splits; re-generation asks the teacher for them when
the recipe trains with sparse_kd. The teacher is a real HTTP server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from harvest_helpers import by_id, harvest, in_tmp, jsonl, openai_row, write_recipe  # noqa: F401
from test_regenerate import KEY, logs, recipe_for, teachers  # noqa: F401

from curation.harvest.importers.common import BadRecord
from curation.harvest.importers.openai import logprobs
from pipeline.cli import main as cli
from pipeline.record import RECORD_SCHEMA

FIXTURES = Path(__file__).parent / "fixtures"
SMILE = "\U0001f600"  # four UTF-8 bytes that a byte-level teacher may split over two tokens


def content(answer_tokens: list[tuple[str, list[int] | None]]) -> dict:
    """OpenAI's logprobs object: per token its text and bytes, and two alternatives."""
    return {"content": [{"token": t, "logprob": -0.25, "bytes": b,
                         "top_logprobs": [{"token": t, "logprob": -0.25, "bytes": b},
                                          {"token": "x", "logprob": -2.5, "bytes": [120]}]}
                        for t, b in answer_tokens]}


# "Hi 😀": the emoji is split in two tokens whose text cannot show the bytes (OpenAI writes 'bytes:\xf0\x9f')
TOKENS = [("Hi", [72, 105]), (" ", [32]), ("bytes:\\xf0\\x9f", [240, 159]), ("bytes:\\x98\\x80", [152, 128])]
ANSWER = "Hi " + SMILE


def test_logprobs_keep_bytes_only_where_the_text_does_not_spell_them():
    got = logprobs({"logprobs": content(TOKENS)})
    assert [t["bytes"] for t in got] == [None, None, bytes([240, 159]), bytes([152, 128])]
    assert got[2]["top"][0]["bytes"] == bytes([240, 159]) and got[2]["top"][1]["bytes"] is None
    assert b"".join(t["bytes"] or t["token"].encode() for t in got) == ANSWER.encode()
    bad = content(TOKENS)
    bad["content"][1]["bytes"] = [32, 300]
    with pytest.raises(BadRecord, match=r"logprobs.content\[1\].bytes is not a list of byte values"):
        logprobs({"logprobs": bad})


def _rows() -> dict[str, tuple[str, list]]:
    """One row per format that carries logprobs: source name -> (format, rows)."""
    oa = openai_row(1)
    oa["response"]["choices"][0].update(message={"role": "assistant", "content": ANSWER}, logprobs=content(TOKENS))
    ll = json.loads((FIXTURES / "litellm_payloads.jsonl").read_text().splitlines()[0])
    ll["response"]["choices"][0].update(message={"role": "assistant", "content": ANSWER}, logprobs=content(TOKENS))
    lf = json.loads((FIXTURES / "langfuse_observations.jsonl").read_text().splitlines()[0])
    lf["output"] = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ANSWER},
                    "logprobs": content(TOKENS)}
    st = json.loads((FIXTURES / "openai_stored.jsonl").read_text().splitlines()[0])
    st["choices"][0].update(message={"role": "assistant", "content": ANSWER}, logprobs=content(TOKENS))
    return {"oa": ("openai", [oa]), "ll": ("litellm", [ll]), "lf": ("langfuse", [lf]), "st": ("openai_stored", [st])}


def test_every_format_with_logprobs_keeps_them_through_harvest_and_curate(tmp_path):
    sources = []
    for name, (fmt, rows) in _rows().items():
        jsonl(tmp_path / name / "rows.jsonl", rows)
        sources.append({"format": fmt, "path": f"{name}/*.jsonl", "name": name})
    recipe = write_recipe(tmp_path, {"sources": sources})
    harvest(recipe)
    files = sorted((tmp_path / "runs" / "t" / "harvest").glob("records-*.parquet"))
    lp_type = pq.read_schema(files[0]).field("teacher").type.field("logprobs").type.value_type
    assert lp_type.field("logprob").type == pa.float16() and lp_type.field("bytes").type == pa.binary()
    recs = list(by_id(recipe).values())
    assert len(recs) == 4
    for r in recs:
        lp = r["teacher"]["logprobs"]
        assert [t["bytes"] for t in lp] == [None, None, bytes([240, 159]), bytes([152, 128])], r["source"]
        assert lp[0]["logprob"] == -0.25 and lp[0]["top"][1] == {"token": "x", "logprob": -2.5, "bytes": None}
    # curate keeps them on the curated records (nothing in the chain drops or re-types the column)
    assert cli(["curate", str(recipe)]) == 0
    curated = []
    for split in ("train", "val", "test"):
        t = pq.read_table(tmp_path / "runs" / "t" / "curate" / f"{split}.parquet")
        assert t.schema.field("teacher").type == RECORD_SCHEMA.field("teacher").type
        curated += t.to_pylist()
    kept = [r for r in curated if r["output"]["content"] == ANSWER]
    assert kept and all(r["teacher"]["logprobs"][2]["bytes"] == bytes([240, 159]) for r in kept)


def test_regeneration_asks_for_logprobs_when_the_objective_needs_them(tmp_path, teachers, monkeypatch):  # noqa: F811
    logs(tmp_path, n=3)
    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)
    t = teachers()
    recipe = recipe_for(tmp_path, t.url)  # top_logprobs not set
    data = yaml.safe_load(recipe.read_text())
    data["train"]["objective"] = "sparse_kd"
    recipe.write_text(yaml.safe_dump(data))
    harvest(recipe)
    assert t.requests and all(b["logprobs"] is True and b["top_logprobs"] == 20 for b in t.requests)
    lp = by_id(recipe)["req_1"]["teacher"]["logprobs"]
    assert [x["token"] for x in lp][:2] == ["Fresh", "answer"] and len(lp[0]["top"]) == 20
    data["train"]["objective"] = "sft"  # plain SFT needs no logprobs: the requests do not ask for them
    recipe.write_text(yaml.safe_dump(data))
    n = len(t.requests)
    harvest(recipe, "--force")
    assert len(t.requests) > n and all("logprobs" not in b for b in t.requests[n:])
    # switching to sparse_kd changes what harvest asks for, so harvest reruns without --force
    data["train"]["objective"] = "sparse_kd"
    recipe.write_text(yaml.safe_dump(data))
    n = len(t.requests)
    harvest(recipe)
    assert len(t.requests) > n and all(b["top_logprobs"] == 20 for b in t.requests[n:])
    assert len(by_id(recipe)["req_1"]["teacher"]["logprobs"][0]["top"]) == 20
    n = len(t.requests)
    harvest(recipe)  # nothing changed: nothing is asked again
    assert len(t.requests) == n
