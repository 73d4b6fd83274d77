"""Harvest redacts PII and secrets in every record it writes, with curate's operator and the recipe's curate.pii:
nothing under harvest/ holds them raw, ids and feedback joins are untouched, earlier nights' batches are redacted
when they were written under another setting (or before harvest redacted), and changing the setting reruns
harvest."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from harvest_helpers import by_id, harvest, in_tmp, jsonl, openai_row, write_recipe  # noqa: F401
from test_real_log_shapes import T0, tz_recipe, tz_row, uuid7

from pipeline.cli import main as cli

from conftest import make_project

RUN = "runs/t/harvest"
EMAIL = "jane.canary@example.com"
PHONE = "+1 415 555 0199"
KEY = "sk-proj-CANARYabcdefghijklmnopqrstuvwxyz0123"
CANARIES = (EMAIL, "415 555 0199", "CANARYabcdefghijklmnop")


def pii_row(i: int, ts: str = "2026-11-23T10:00:00Z") -> dict:
    """A logged call with an e-mail and a phone number in the user turn, a key in the system prompt, the output
    and a tool call, and an e-mail in the error text and the metadata."""
    row = openai_row(i, ts=ts)
    row["request"]["messages"] = [
        {"role": "system", "content": f"Use key {KEY} for lookups."},
        {"role": "user", "content": f"I am {EMAIL}, call me on {PHONE} about order {i}"},
    ]
    row["request"]["metadata"]["customer"] = EMAIL
    row["response"]["choices"][0]["message"] = {
        "role": "assistant", "content": f"Noted, we will write to {EMAIL}.",
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "lookup", "arguments": json.dumps({"key": KEY, "email": EMAIL})}}]}
    return row


def raw_text_of(folder: Path) -> str:
    """Every file under a folder as text: Parquet decoded to JSON rows, the rest as bytes read leniently."""
    parts = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".parquet":
            parts.append(json.dumps(pq.read_table(p).to_pylist(), default=str))
        else:
            parts.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def leaks(folder: Path) -> list[str]:
    text = raw_text_of(folder)
    return [c for c in CANARIES if c in text]


def test_harvest_writes_no_raw_pii_or_secret_and_keeps_ids(tmp_path):
    jsonl(tmp_path / "logs" / "app.jsonl", [pii_row(i) for i in range(6)] + [openai_row(50)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]})
    m = harvest(recipe)
    assert leaks(tmp_path / RUN) == []
    got = by_id(recipe)
    assert set(got) == {f"req_{i}" for i in range(6)} | {"req_50"}  # ids come from the logs, unredacted
    r = got["req_3"]
    assert r["messages"][1]["content"] == "I am <EMAIL>, call me on <PHONE> about order 3"
    assert "<SECRET>" in r["messages"][0]["content"] and "<SECRET>" in r["output"]["tool_calls"]
    assert set(r["tags"]["pii_redacted"].split(",")) == {"email_address", "phone_number", "openai_api_key"}
    assert "pii_redacted" not in (got["req_50"]["tags"] or {})
    assert m["counts"]["sources"]["logs/*.jsonl"]["pii_redacted"] == 6


def test_changing_curate_pii_reruns_harvest(tmp_path, capsys):
    jsonl(tmp_path / "logs" / "app.jsonl", [pii_row(1)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]})
    harvest(recipe)
    capsys.readouterr()
    masked = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}], "incremental": False},
                          curate={"pii": {"action": "mask"}})
    assert cli(["harvest", str(masked)]) == 0
    assert "harvest: unchanged" not in capsys.readouterr().out
    assert by_id(masked)["req_1"]["messages"][1]["content"].startswith("I am ****.******@*******.***, call me on")


def test_earlier_nights_raw_batches_are_redacted_when_carried_forward(tmp_path):
    """Night 1 was harvested with nothing to redact (as before harvest redacted): its batch is raw. Night 2, under
    the default setting, redacts the carried batch in a new copy and leaves the ids and counts as they were."""
    log = jsonl(tmp_path / "logs" / "app.jsonl", [pii_row(i) for i in range(4)])
    keep = {"pii": {"action": "keep", "secrets": []}}
    night1 = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]}, curate=keep)
    harvest(night1)
    assert leaks(tmp_path / RUN) != []  # the control: the setting kept them
    jsonl(log, [pii_row(10, ts="2026-11-24T10:00:00Z")], mode="a")
    night2 = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]})
    m = harvest(night2)
    assert m["counts"]["this_run"]["lines"] == 1 and m["counts"]["records"] == 5
    assert leaks(tmp_path / RUN) == []
    assert set(by_id(night2)) == {"req_0", "req_1", "req_2", "req_3", "req_10"}


def test_a_harvest_from_before_redaction_is_redacted_on_the_next_night(tmp_path):
    """A harvest folder without redaction.json (written by a version that did not redact) counts as raw."""
    log = jsonl(tmp_path / "logs" / "app.jsonl", [pii_row(1)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]},
                          curate={"pii": {"action": "keep", "secrets": []}})
    harvest(recipe)
    (tmp_path / RUN / "redaction.json").unlink()
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]})
    jsonl(log, [openai_row(2, ts="2026-11-24T10:00:00Z")], mode="a")
    harvest(recipe)
    assert leaks(tmp_path / RUN) == []


def test_a_demonstration_with_pii_is_redacted_when_joined(tmp_path):
    """Feedback brings new text (a corrected answer): the rewritten records are redacted too; the join itself
    goes by ids, which redaction leaves alone."""
    a = tz_row(1, {"messages": [{"role": "user", "content": f"mail me at {EMAIL}"}]})
    fb = [{"id": uuid7(T0 + 9100, 11), "inference_id": a["id"],
           "value": json.dumps([{"type": "text", "text": f"Sent to {EMAIL}, key {KEY}"}])},
          {"id": uuid7(T0 + 9200, 12), "target_id": a["id"], "metric_name": "thumbs_up", "value": True}]
    recipe = tz_recipe(tmp_path, [a], fb)
    m = harvest(recipe)
    r = by_id(recipe)[a["id"]]
    assert r["output"]["content"] == "Sent to <EMAIL>, key <SECRET>"
    assert r["tags"]["output_source"] == "demonstration"
    assert m["counts"]["feedback"]["rows_matched"] == 2
    assert leaks(tmp_path / RUN) == []


def test_curate_still_drops_by_the_kinds_harvest_found(tmp_path):
    """With action 'drop', harvest redacts and tags; curate finds nothing new in the text but drops by the tag."""
    jsonl(tmp_path / "logs" / "app.jsonl", [pii_row(1), openai_row(2)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]},
                          curate={"pii": {"action": "drop"}, "split": {"val_fraction": 0, "test_fraction": 0}})
    assert cli(["curate", str(recipe)]) == 0
    rejected = pq.read_table(tmp_path / "runs/t/curate/rejected.parquet").to_pylist()
    assert [(r["id"], r["reason"]) for r in rejected if r["id"] == "req_1"] == [
        ("req_1", "contains email_address, phone_number")]
    assert leaks(tmp_path / "runs/t") == []


def test_curate_output_is_byte_identical_whether_harvest_redacted_or_not(tmp_path, monkeypatch):
    """The demo traffic (e-mails and phone numbers in it) curated twice: once harvested with redaction, once with
    harvest's redaction switched off (as before it redacted): train/val/test/rejected are the same bytes."""
    from curation.harvest import stage as harvest_stage

    outputs = {}
    for name in ("redacted", "raw"):
        root = tmp_path / name
        recipe = make_project(root, {"2026-11-23": 400})
        monkeypatch.chdir(root)
        if name == "raw":
            monkeypatch.setattr(harvest_stage, "_pii_config", lambda recipe: None)
        assert cli(["curate", str(recipe)]) == 0
        outputs[name] = {f: (root / "runs/t/curate" / f).read_bytes()
                         for f in ("train.parquet", "val.parquet", "test.parquet", "rejected.parquet")}
    assert leaks(tmp_path / "redacted/runs/t/harvest") == [] and "<EMAIL>" in raw_text_of(
        tmp_path / "redacted/runs/t/harvest")
    assert "<EMAIL>" not in raw_text_of(tmp_path / "raw/runs/t/harvest")  # the control: harvest kept them raw
    assert outputs["redacted"] == outputs["raw"]


def test_a_text_over_curate_max_record_bytes_is_masked_whole_in_seconds(tmp_path):
    """Finding PII costs seconds per megabyte of dense PII; a text over curate.max_record_bytes (which curate drops
    and blanks anyway) is masked whole at harvest instead, keeping its byte length, so curate's verdict holds."""
    import time

    row = pii_row(1)
    huge = f"call {PHONE} or mail {EMAIL} é " * 120_000  # 5.6 MB of dense PII
    row["request"]["messages"][1]["content"] = huge
    jsonl(tmp_path / "logs" / "app.jsonl", [row, pii_row(2)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]},
                          curate={"split": {"val_fraction": 0, "test_fraction": 0}})
    t0 = time.process_time()  # CPU time: the cores are shared, wall time says little
    harvest(recipe)
    assert time.process_time() - t0 < 25  # detection on the whole text: over 60 CPU-seconds
    got = by_id(recipe)["req_1"]["messages"][1]["content"]
    assert len(got.encode()) == len(huge.encode()) and set(got) == {"*", " "}
    assert leaks(tmp_path / RUN) == []
    assert cli(["curate", str(recipe)]) == 0
    rejected = pq.read_table(tmp_path / "runs/t/curate/rejected.parquet").to_pylist()
    reasons = [r["reason"] for r in rejected if r["id"] == "req_1"]
    assert len(reasons) == 1 and reasons[0].startswith("record texts are ") and "curate.max_record_bytes" in reasons[0]


def test_a_carried_batch_whose_only_change_is_a_masked_long_text_is_rewritten(tmp_path):
    """Night 1 kept everything raw; its one PII sits in a text over curate.max_record_bytes. Night 2 masks that
    text whole before detection (so nothing is 'found'): the carried batch must still be rewritten."""
    row = openai_row(1)
    row["request"]["messages"] = [{"role": "user", "content": f"mail {EMAIL} " + "padding " * 300}]
    log = jsonl(tmp_path / "logs" / "app.jsonl", [row])
    src = {"sources": [{"path": "logs/*.jsonl", "name": "app"}]}
    harvest(write_recipe(tmp_path, src, curate={"pii": {"action": "keep", "secrets": []}}))
    assert leaks(tmp_path / RUN) == [EMAIL]  # the control
    jsonl(log, [openai_row(2, ts="2026-11-24T10:00:00Z")], mode="a")
    night2 = write_recipe(tmp_path, src, curate={"max_record_bytes": 1000})
    harvest(night2)
    assert leaks(tmp_path / RUN) == []
    assert set(by_id(night2)["req_1"]["messages"][0]["content"]) == {"*", " "}


def test_carried_batches_are_scanned_again_when_the_detector_version_changes(tmp_path):
    """redaction.json names the detector's version: batches stamped by an older detector (same recipe setting)
    are scanned again on the next night."""
    from pipeline.config.curate import PIIConfig
    from pipeline.pii import Redaction

    log = jsonl(tmp_path / "logs" / "app.jsonl", [pii_row(1)])
    src = {"sources": [{"path": "logs/*.jsonl", "name": "app"}]}
    harvest(write_recipe(tmp_path, src, curate={"pii": {"action": "keep", "secrets": []}}))
    # as an older detector would have stamped it under the default setting (one that missed these canaries)
    stamp = Redaction(PIIConfig(), 2_000_000).stamp()
    assert "detector_version" in stamp
    stamp["detector_version"] -= 1
    (tmp_path / RUN / "redaction.json").write_text(json.dumps(stamp))
    jsonl(log, [openai_row(2, ts="2026-11-24T10:00:00Z")], mode="a")
    harvest(write_recipe(tmp_path, src))
    assert leaks(tmp_path / RUN) == []
    assert json.loads((tmp_path / RUN / "redaction.json").read_text())["detector_version"] == stamp[
        "detector_version"] + 1


AKIA = "AKIACANARYIMG0000001"
SIGNATURE = "f00dcafe0123456789abcdefCANARYSIG"
DATA_URI = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def test_image_urls_message_names_response_format_and_tag_keys_are_redacted(tmp_path):
    """Fields beyond the texts: a presigned image URL (an access key and a signature in its query), a message
    name, a response format's schema and a metadata key; a data URI (image bytes) is kept as it is."""
    row = openai_row(1)
    url = (f"https://bucket.s3.amazonaws.com/cat.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={AKIA}"
           f"%2F20261123%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={SIGNATURE}")
    row["request"]["messages"] = [{"role": "user", "name": EMAIL, "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": DATA_URI}}]}]
    row["request"]["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "description": f"reply to {EMAIL}"}}}
    row["request"]["metadata"][EMAIL] = "vip"
    jsonl(tmp_path / "logs" / "app.jsonl", [row])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]})
    harvest(recipe)
    text = raw_text_of(tmp_path / RUN)
    assert [c for c in (EMAIL, AKIA, SIGNATURE) if c in text] == []
    msg = by_id(recipe)["req_1"]["messages"][0]
    assert msg["name"] == "<EMAIL>"
    assert msg["images"][0].startswith("https://bucket.s3.amazonaws.com/cat.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&")
    assert msg["images"][1] == DATA_URI
    assert json.loads(by_id(recipe)["req_1"]["response_format"])["json_schema"]["schema"]["description"] == \
        "reply to <EMAIL>"


def test_a_function_name_a_client_chose_is_redacted(tmp_path):
    """Security review: an e-mail a client sent as metadata.function reached the records, the manifest and the
    report."""
    row = openai_row(1)
    row["request"]["metadata"].update(function="dave.canary@example.org")
    jsonl(tmp_path / "logs" / "app.jsonl", [row, openai_row(2)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}]})
    harvest(recipe)
    text = raw_text_of(tmp_path / RUN)
    assert "dave.canary@example.org" not in text
    got = by_id(recipe)
    assert got["req_1"]["function"] == "<EMAIL>"
    assert got["req_2"]["function"] == openai_row(2)["request"]["metadata"]["function"]  # a plain name stays


def test_an_episode_id_with_an_email_is_kept_as_a_hash_and_its_feedback_still_joins(tmp_path):
    """Security review: metadata.episode_id reached train.parquet raw (its tag copy was redacted). A client that
    names sessions by e-mail now gets them as episode-<hash> in records, the same for every record of the episode,
    and feedback naming the episode (by its raw id) is joined through the same hash."""
    rows = [openai_row(i) for i in (1, 2, 3)]
    for r in rows[:2]:
        r["request"]["metadata"]["episode_id"] = EMAIL
    rows[2]["request"]["metadata"]["episode_id"] = "ep-plain"
    jsonl(tmp_path / "logs" / "app.jsonl", rows)
    jsonl(tmp_path / "fb" / "episodes.jsonl", [{"target_id": EMAIL, "metric_name": "solved", "value": 1},
                                              {"target_id": "ep-plain", "metric_name": "solved", "value": 0}])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl"}],
                                     "feedback": [{"path": "fb/*.jsonl", "level": "episode"}]})
    m = harvest(recipe)
    assert EMAIL not in raw_text_of(tmp_path / RUN)
    got = by_id(recipe)
    hashed = got["req_1"]["episode_id"]
    assert hashed.startswith("episode-") and got["req_2"]["episode_id"] == hashed
    assert got["req_3"]["episode_id"] == "ep-plain"  # an id without PII stays as it came
    assert [got[f"req_{i}"]["feedback"] for i in (1, 2, 3)] == [{"solved": 1.0}, {"solved": 1.0}, {"solved": 0.0}]
    assert "email_address" in got["req_1"]["tags"]["pii_redacted"]
    assert m["counts"]["feedback"]["rows_unmatched"] == 0 and m["counts"]["feedback"]["rows_matched"] == 2


def test_torch_and_transformers_import_and_work_after_redaction(tmp_path):
    """pipeline.pii hides torch and transformers from sys.modules while presidio is imported: in a fresh process
    that has redacted (and built detectors from two threads at once), both still import and run a model."""
    import subprocess
    import sys

    code = """
import sys, threading
from pipeline.config.curate import PIIConfig
from pipeline.pii import scrub, detector
threads = [threading.Thread(target=detector, args=(PIIConfig(action=a),)) for a in ("redact", "mask")]
[t.start() for t in threads]; [t.join() for t in threads]
assert scrub("mail jane@example.com") == "mail <EMAIL>"
assert "torch" not in sys.modules and "transformers" not in sys.modules, "the window was not exercised"
import torch, transformers
cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
logits = transformers.GPT2LMHeadModel(cfg)(torch.tensor([[1, 2, 3]])).logits
assert tuple(logits.shape) == (1, 3, 16) and torch.isfinite(logits).all()
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


class LeakyTeacher:
    """An OpenAI-compatible teacher on loopback whose answers hold canaries (an e-mail in the text, a key in a
    tool call, both spelled out by the logprobs' tokens); it records the requests it gets."""

    def __init__(self):
        from aiohttp import web
        from loopback import LoopbackServer

        requests = self.requests = []

        class Server(LoopbackServer):
            async def handle(self, request):
                body = await request.json()
                requests.append(body)
                words = ["Write", "to", EMAIL, "with", KEY]
                return web.json_response({
                    "id": "chatcmpl-1", "object": "chat.completion", "model": "teacher-70b",
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": [
                        {"token": w, "logprob": -0.1, "bytes": list(w.encode()), "top_logprobs": []} for w in words]},
                        "message": {"role": "assistant", "content": " ".join(words), "tool_calls": [
                            {"id": "c1", "type": "function",
                             "function": {"name": "send", "arguments": json.dumps({"to": EMAIL, "key": KEY})}}]}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

        self.server = Server().start()
        self.url = self.server.url


def _regen_recipe(tmp_path: Path, url: str, **curate) -> Path:
    return write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}], "regenerate": {
        "endpoint": url, "model": "teacher-70b", "when": {"teacher_models": ["gpt-3.5*"]}, "top_logprobs": 2}},
        **curate)


def _old_teacher_row(i: int, ts: str = "2026-11-23T10:00:00Z", pii: bool = False) -> dict:
    row = pii_row(i, ts=ts) if pii else openai_row(i, ts=ts)
    row["response"] = {**row["response"], "model": "gpt-3.5-turbo-0125"}
    return row


def test_regenerated_answers_and_the_teacher_cache_hold_no_canary(tmp_path):
    """A teacher that echoes PII and keys: the prompts it gets are redacted, its answers are redacted before
    they are cached (logprobs of such an answer dropped, kinds tagged), and no file under runs/ -- the cache's
    SQLite file and WAL included -- holds a canary."""
    teacher = LeakyTeacher()
    try:
        jsonl(tmp_path / "logs" / "app.jsonl", [_old_teacher_row(1, pii=True), _old_teacher_row(2)])
        recipe = _regen_recipe(tmp_path, teacher.url)
        m = harvest(recipe)
    finally:
        teacher.server.stop()
    assert m["counts"]["regenerate"]["new_answers"] == 2
    assert [c for c in CANARIES if c in json.dumps(teacher.requests)] == []  # the prompts sent
    assert leaks(tmp_path / "runs") == []
    r = by_id(recipe)["req_2"]
    assert r["output"]["content"] == "Write to <EMAIL> with <SECRET>" and r["teacher"]["logprobs"] is None
    assert {"email_address", "openai_api_key"} <= set(r["tags"]["pii_redacted"].split(","))


def test_a_cache_from_before_is_redacted_and_stale_answers_are_pruned(tmp_path):
    """Night 1 cached the teacher's raw answers (nothing redacted, as before harvest redacted) and the cache holds
    an answer no record asks for any more. Night 2 (the default setting): the answers still asked for are redacted
    in place (same prompt, same key: no new call), the stale one is deleted, and the file holds no canary."""
    import sqlite3

    teacher = LeakyTeacher()
    try:
        log = jsonl(tmp_path / "logs" / "app.jsonl", [_old_teacher_row(1)])
        harvest(_regen_recipe(tmp_path, teacher.url, curate={"pii": {"action": "keep", "secrets": []}}))
        cache = tmp_path / "runs/t/cache/teacher/responses.sqlite3"
        db = sqlite3.connect(cache)
        db.execute("INSERT INTO responses VALUES ('stale', ?, 1.0, 0)", (json.dumps({"note": EMAIL}),))
        db.commit()
        db.close()
        assert leaks(tmp_path / "runs") != []  # the control: raw answers on disk
        jsonl(log, [openai_row(3, ts="2026-11-24T10:00:00Z")], mode="a")
        m = harvest(_regen_recipe(tmp_path, teacher.url))
    finally:
        teacher.server.stop()
    s = m["counts"]["regenerate"]
    assert (s["cached"], s["new_answers"], s["pruned"], len(teacher.requests)) == (1, 0, 1, 1)
    assert leaks(tmp_path / "runs") == []
    db = sqlite3.connect(cache)
    assert [k for (k,) in db.execute("SELECT key FROM responses")] != ["stale"]
    assert db.execute("SELECT count(*) FROM responses").fetchone()[0] == 1
    db.close()


def test_a_new_detector_version_reruns_harvest_with_no_new_logs(tmp_path, monkeypatch, capsys):
    """The detector's version is one of harvest's inputs: bumped, harvest reruns even though no log changed."""
    from pipeline import pii

    jsonl(tmp_path / "logs" / "app.jsonl", [pii_row(1)])
    recipe = write_recipe(tmp_path, {"sources": [{"path": "logs/*.jsonl", "name": "app"}]})
    harvest(recipe)
    assert cli(["harvest", str(recipe)]) == 0
    assert "harvest: unchanged" in capsys.readouterr().out  # the control
    monkeypatch.setattr("curation.harvest.stage.DETECTOR_VERSION", pii.DETECTOR_VERSION + 1)
    assert cli(["harvest", str(recipe)]) == 0
    assert "harvest: unchanged" not in capsys.readouterr().out


def test_an_output_masked_whole_loses_its_logprobs():
    """A teacher answer over curate.max_record_bytes is masked whole without detection; its logged tokens would
    still spell it out (PII included), so its logprobs go too, and only its."""
    from pipeline.pii import mask_long_texts
    from pipeline.record import from_table, to_table

    def rec(i: int, text: str) -> dict:
        tokens = [{"token": text[:5], "logprob": -0.1, "bytes": None, "top_logprobs": []}]
        return {"id": f"r{i}", "messages": [{"role": "user", "content": "hi"}],
                "output": {"role": "assistant", "content": text},
                "teacher": {"model": "gpt-4o", "logprobs": tokens}}

    table = to_table([rec(1, f"mail {EMAIL} " * 50), rec(2, "short answer")])
    assert all(r["teacher"]["logprobs"] for r in from_table(table))
    out = {r["id"]: r for r in from_table(mask_long_texts(table, 200))}
    assert set(out["r1"]["output"]["content"]) <= {"*", " "} and not out["r1"]["teacher"]["logprobs"]
    assert out["r2"]["output"]["content"] == "short answer" and out["r2"]["teacher"]["logprobs"]
