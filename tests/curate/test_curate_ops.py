"""Per-record curation operators on Arrow batches: PII and secrets, teacher-side problems, structured outputs,
language and length, and the map half of the chain that strings them together."""

import json

import numpy as np
import orjson
import pyarrow as pa
import pytest
from curate_helpers import batch, plan, rec

from curation.curate import columns, filters
from curation.curate.chain import map_batch
from curation.curate.filters import Plan
from curation.curate.pii import detector, pii
from pipeline.config.curate import CurateConfig, FeedbackFilter, PIIConfig
from pipeline.config.train import StudentConfig
from pipeline.recipe import RecipeError, parse_recipe
from pipeline.record import from_table, message

# One of each kind the issue names, each unique so a leak is unmistakable.
FINDINGS = {
    "EMAIL_ADDRESS": "mira.quell77@zorbex-mail.com",
    "PHONE_NUMBER": "+1 415-555-0199",
    "CREDIT_CARD": "4539 1488 0343 6467",
    "IP_ADDRESS": "203.0.113.77",
    "IBAN_CODE": "GB82WEST12345698765432",
    "openai_api_key": "sk-proj-Zq8vN3kLm2Xw9Rt5Yp1Hs6Dj4Gf7Ba0C",
    "aws_access_key": "AKIAZQ7X2W9V4T1R8P6M",
    "github_token": "ghp_Zq8vN3kLm2Xw9Rt5Yp1Hs6Dj4Gf7Ba0CxYzW",
    "bearer_token": "Bearer vN3kLm2Xw9Rt5Yp1Hs6Dj4Gf7",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtaXJhIn0.Zq8vN3kLm2Xw9Rt5Yp1Hs6Dj4",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAzq8vN3kLm2Xw9Rt5\n-----END RSA PRIVATE KEY-----",
}


def test_detector_finds_every_kind_and_leaves_clean_text_alone():
    det = detector(PIIConfig())
    for kind, value in FINDINGS.items():
        found = det.find(f"please note: {value} thanks")
        assert [f.kind for f in found] == [kind], (kind, found)
        f = found[0]
        assert value in f"please note: {value} thanks"[f.start:f.end] or kind == "bearer_token"
    for clean in ["Where is my order? Tracking has not moved in 3 days.", "Reset my password, the link is broken.",
                  "The Echo Speaker ships in 4 business days.", '{"intent": "refund", "priority": "high"}']:
        assert det.find(clean) == ()


def test_pii_redacts_everywhere_masks_or_drops():
    secret, email = FINDINGS["openai_api_key"], FINDINGS["EMAIL_ADDRESS"]
    call = [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"email": email})}}]
    r = rec(0, user=f"my key is {secret}, mail {email}", out=f"I will write to {email}", system=f"ops: {email}",
            error=None, tags={"user_email": email, "plan": "pro"},
            teacher={"model": "m", "provider": "p", "params": json.dumps({"stop": [email]}),
                     "logprobs": [{"token": "mira", "logprob": -0.1, "top": []}]})
    r["messages"].append(message("assistant", None, tool_calls=call))
    out, reasons = pii(batch(r, rec(1, user="nothing to see")), plan())
    assert reasons == [None, None]
    got = from_table(out)[0]
    blob = json.dumps(got, default=str)
    assert email not in blob and secret not in blob
    assert got["messages"][1]["content"] == "my key is <SECRET>, mail <EMAIL>"
    assert got["output"]["content"] == "I will write to <EMAIL>"
    assert got["messages"][0]["content"] == "ops: <EMAIL>"
    assert json.loads(json.loads(got["messages"][2]["tool_calls"])[0]["function"]["arguments"]) == {"email": "<EMAIL>"}
    assert got["tags"]["user_email"] == "<EMAIL>" and got["tags"]["plan"] == "pro"
    assert got["teacher"]["logprobs"] is None  # its tokens would spell the e-mail address out
    assert got["tags"]["pii_redacted"] == "email_address,openai_api_key"
    assert from_table(out)[1]["messages"][0]["content"] == "nothing to see"

    masked, _ = pii(batch(rec(0, user=f"mail {email} now")), plan(pii="mask"))
    assert from_table(masked)[0]["messages"][0]["content"] == "mail ****.*******@******-****.*** now"

    dropped, reasons = pii(batch(rec(0, user=f"mail {email}"), rec(1, user="hi")), plan(pii="drop"))
    assert reasons == ["contains email_address", None]
    assert email not in json.dumps(from_table(dropped), default=str)  # rejected rows are redacted too

    kept, reasons = pii(batch(rec(0, user=f"mail {email}, key {secret}")), plan(pii="keep"))
    assert reasons == [None] and from_table(kept)[0]["messages"][0]["content"] == f"mail {email}, key <SECRET>"
    _, reasons = pii(batch(rec(0, user=f"key {secret}")), plan(pii={"secrets_action": "drop"}))
    assert reasons == ["contains secrets: openai_api_key"]


def test_teacher_side_problems_are_dropped_with_reasons():
    p = plan(feedback=FeedbackFilter(metric="thumbs_up", min_value=0.5))
    _, r = filters.http_error(batch(rec(0), rec(1, status_code=503, error="overloaded"), rec(2, out=None)), p)
    assert r == [None, "HTTP 503: overloaded", "no output in the response"]
    _, r = filters.empty_output(batch(rec(0), rec(1, out="  ")), p)
    assert r == [None, "empty output"]
    cut = rec(1, finish_reason=None, usage={"input_tokens": 9, "output_tokens": 60},
              teacher={"model": "m", "provider": "p", "params": '{"max_tokens": 60}', "logprobs": None})
    not_cut = {**cut, "usage": {"input_tokens": 9, "output_tokens": 59}}
    _, r = filters.truncated_output(batch(rec(0, finish_reason="length"), cut, not_cut), p)
    assert r[0] == "output cut off (finish_reason=length)" and "= max_tokens" in r[1] and r[2] is None
    _, r = filters.error_text(batch(rec(0, out="Traceback (most recent call last):\n  File x"),
                                    rec(1, out="<!DOCTYPE html><title>502 Bad Gateway</title>"),
                                    rec(2, out='{"error": {"message": "rate limited"}}'),
                                    rec(3, out="An error occurred while processing your request."),
                                    rec(4, out="The error on your bill is fixed: you were charged twice.")), p)
    assert all(r[:4]) and r[4] is None
    _, r = filters.feedback(batch(rec(0, feedback={"thumbs_up": 0.0}), rec(1, feedback={"thumbs_up": 1.0}), rec(2)), p)
    assert r == ["thumbs_up=0 < 0.5", None, None]


REFUSALS = ["I'm sorry, but I can't help with that request.", "Sorry, but I cannot assist with this.",
            "I am unable to provide that information.", "As an AI language model, I cannot browse the web.",
            "I apologize, but I won't be able to do that.", "Unfortunately, I can't share internal documents."]
ANSWERS = ["I'm sorry to hear your order is late! It ships tomorrow.", "Sure, here is the refund form.",
           "We can't wait for you to try the new Echo Speaker!", '{"intent": "refund"}']


def test_refusals_are_dropped_or_labelled_per_recipe():
    records = [rec(i, out=t) for i, t in enumerate(REFUSALS + ANSWERS)]
    _, r = filters.refusal(batch(*records), plan())
    assert all(r[: len(REFUSALS)]) and not any(r[len(REFUSALS):])
    out, r = filters.refusal(batch(*records), plan(drop_refusals=False))
    assert not any(r)
    tags = [t.get("refusal") for t in (x["tags"] for x in from_table(out))]
    assert tags == ["true"] * len(REFUSALS) + [None] * len(ANSWERS)
    _, r = filters.refusal(batch(rec(0, out="Per policy we do not ship to PO boxes.")),
                           plan(refusal_patterns=[r"per policy we do not"]))
    assert r[0]


TRIAGE = {"type": "object", "properties": {"intent": {"enum": ["refund", "shipping_delay"]},
                                           "priority": {"enum": ["low", "high"]}},
          "required": ["intent", "priority"], "additionalProperties": False}


def test_structured_outputs_are_validated_against_recipe_and_logged_schemas(tmp_path):
    rf = json.dumps({"type": "json_schema", "json_schema": {"name": "t", "schema": TRIAGE}})
    records = [
        rec(0, out='{"intent": "refund", "priority": "low"}', response_format=rf),
        rec(1, out='{"intent": "rfund", "priority": "low"}', response_format=rf),
        rec(2, out='{"intent": "refund"', response_format=rf),
        rec(3, out='[1, 2]', response_format='{"type": "json_object"}'),
        rec(4, out="plain text is fine without a schema"),
    ]
    _, r = filters.json_schema(batch(*records), plan())
    assert r[0] is None and r[4] is None
    assert r[1].startswith("output does not match the schema: intent: 'rfund' is not one of")
    assert r[2].startswith("output is not valid JSON")
    assert "not an object" in r[3]
    # A schema from the recipe (inline or a file) takes precedence over the logged one.
    path = tmp_path / "faq.json"
    path.write_text(json.dumps({"type": "object", "required": ["answer"]}))
    p = filters.plan_for(CurateConfig(json_schema={"schemas": {"faq": str(path)}}))
    _, r = filters.json_schema(batch(rec(0, function="faq", out='{"answer": "yes"}'),
                                     rec(1, function="faq", out='{"reply": "yes"}')), p)
    assert r[0] is None and "'answer' is a required property" in r[1]
    # Tool calls must name a logged tool and match its parameter schema.
    tools = json.dumps([{"type": "function", "function": {"name": "refund", "parameters": {
        "type": "object", "properties": {"order": {"type": "integer"}}, "required": ["order"]}}}])

    def call(name, args):
        return rec(0, out=None, tools=tools) | {"output": message("assistant", None, tool_calls=[
            {"id": "c", "type": "function", "function": {"name": name, "arguments": args}}])}

    _, r = filters.json_schema(batch(call("refund", '{"order": 7}'), call("refund", '{"order": "7"}'),
                                     call("cancel", "{}"), call("refund", "{order: 7")), plan())
    assert r[0] is None and "'7' is not of type 'integer'" in r[1]
    assert "unknown tool 'cancel'" in r[2] and "not valid JSON" in r[3]


def test_recipe_schemas_and_names_are_checked_before_any_work():
    with pytest.raises(RecipeError, match="curate.json_schema.schemas"):
        parse_recipe({**_recipe(), "curate": {"json_schema": {"schemas": {"f": {"type": "objekt"}}}}})
    with pytest.raises(RecipeError, match="curate.pii.entities"):
        parse_recipe({**_recipe(), "curate": {"pii": {"entities": ["EMAIL"]}}})
    with pytest.raises(RecipeError, match="curate.language.allowed"):
        parse_recipe({**_recipe(), "curate": {"language": {"allowed": ["english"]}}})
    with pytest.raises(RecipeError, match="curate.refusal_patterns"):
        parse_recipe({**_recipe(), "curate": {"refusal_patterns": ["(unclosed"]}})
    assert parse_recipe({**_recipe(), "curate": {"pii": "mask"}}).curate.pii.action == "mask"


def _recipe():
    from conftest import BASE_RECIPE

    return json.loads(json.dumps(BASE_RECIPE))


def test_language_filter_needs_confidence_to_drop():
    texts = {
        "es": "Quiero que me devuelvan el dinero del pedido, el paquete llegó roto y nadie me responde.",
        "de": "Mein Router funktioniert seit gestern nicht mehr und der Kundendienst antwortet nicht.",
        "en": "My router stopped working yesterday and customer service does not answer my emails.",
        "short": "merci",
        "short_en": "Is the Orbit in stock?",
    }
    p = plan(language={"allowed": ["en"], "min_confidence": 0.7})
    out, r = filters.language(batch(*[rec(i, user=t) for i, t in enumerate(texts.values())]), p)
    got = dict(zip(texts, r, strict=True))
    assert got["es"].startswith("language es") and got["de"].startswith("language de")
    assert got["en"] is None and got["short"] is None and got["short_en"] is None
    labels = [x["tags"].get("language") for x in from_table(out)]
    assert labels[2] == "en" and labels[3] == "uncertain"
    _, r = filters.language(batch(rec(0, user=texts["es"])), plan(language={"allowed": ["en", "es"]}))
    assert r == [None]


def test_lengths_in_the_student_tokens_or_a_documented_approximation(tmp_path):
    from training.train.chat_template import train_tokenizer

    tok = train_tokenizer(["hello there general kenobi", "where is my order", "refund please"] * 50, 300)
    tok.save_pretrained(tmp_path / "student")
    long_user = "where is my order " * 40
    records = batch(rec(0, user="where is my order", out="refund please"), rec(1, user=long_user, out="ok"))
    cfg = CurateConfig(lengths={"max_input_tokens": 60})
    student = StudentConfig(checkpoint=str(tmp_path / "student"))
    p = Plan(cfg, student)
    inputs, outputs = filters.token_counts(records, p)
    want_in = len(tok("where is my order", add_special_tokens=False)["input_ids"])
    _, overhead = filters.student_tokenizer(student)
    assert overhead > 0 and inputs[0] == want_in + overhead
    assert outputs[0] == len(tok("refund please", add_special_tokens=False)["input_ids"]) + overhead
    _, r = filters.length(records, p)
    assert r[0] is None and r[1].startswith(f"input {inputs[1]} tokens > max_input_tokens 60")
    assert "student tokenizer" in filters.length_mode(p)
    # A student built from config has no tokenizer yet: bytes / chars_per_token, and the report says so.
    approx = Plan(cfg, StudentConfig(from_config={"hidden_size": 32, "num_layers": 1, "num_heads": 2}))
    inputs, _ = filters.token_counts(records, approx)
    assert inputs[0] == np.ceil(len("where is my order") / 3.0) + 4
    assert filters.length_mode(approx).startswith("approximation")


def test_map_batch_keeps_input_order_and_accounts_for_every_row():
    records = [rec(0), rec(1, status_code=500, error="boom"), rec(2, out=""),
               rec(3, out="I'm sorry, but I can't help with that."), rec(4, user="mail a.b@zorbex-mail.com"),
               rec(5, feedback={"thumbs_up": 0.0})]
    p = plan(feedback=FeedbackFilter(metric="thumbs_up"))
    whole = map_batch(batch(*records), p)
    assert whole.num_rows == len(records)
    kept = whole.filter(pa.compute.is_null(whole.column("_rejected_by")))
    rej = whole.filter(pa.compute.is_valid(whole.column("_rejected_by")))
    assert kept.column("id").to_pylist() == ["r0", "r4"]
    assert rej.column("id").to_pylist() == ["r1", "r2", "r3", "r5"]
    assert rej.column("_rejected_by").to_pylist() == ["http_error", "empty_output", "refusal", "feedback"]
    assert columns.user_texts(kept).to_pylist()[1] == "mail <EMAIL>"
    assert kept.column("_text").to_pylist() == ["hello", "mail <EMAIL>"]
    assert set(kept.column("_split").to_pylist()) <= {"train", "val", "test"}
    # the split key is the input key of each record's user turns, so splits stay where earlier runs put them
    from curation.curate.chain import assign_split, input_key
    from pipeline.chat import user_text

    for r, split in zip(from_table(kept), kept.column("_split").to_pylist(), strict=True):
        assert assign_split(input_key(r["function"], user_text(r["messages"])), p.cfg.split) == split
    stats = orjson.loads(whole.column("_stats")[0].as_py())
    assert stats["rows"] == 6 and stats["ops"]["http_error"][:2] == [6, 1]
    # Cutting the data differently gives the same rows (what lets every executor agree).
    halves = [map_batch(batch(*records[:3]), p), map_batch(batch(*records[3:]), p)]
    ids = [t.filter(pa.compute.is_null(t.column("_rejected_by"))).column("id").to_pylist() for t in halves]
    assert sum(ids, []) == ["r0", "r4"]


def test_missing_extras_name_the_extra_to_install(monkeypatch, tmp_path):
    import sys

    from curation.curate import executors
    from curation.curate.semantic import load_embedder
    from pipeline.config.curate import Executor, SemanticDedup

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"needs the 'ray' extra"):
        list(executors.run_map("ray", [tmp_path / "x.parquet"], pa.schema([]), plan(), Executor(kind="ray"), tmp_path))
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r"needs the 'semantic' extra"):
        load_embedder(SemanticDedup())


def test_odd_records_are_handled_not_crashed_on():
    weird = [
        rec(0, messages=None),
        rec(1, function=None),
        rec(2, out=None, status_code=None),
        rec(3, response_format="{not json", out='{"a": 1}'),
        rec(4, output=message("assistant", None, tool_calls=None)),
        rec(5, tools="[]", output=message("assistant", "x")) | {"output": {**message("assistant", None),
                                                                           "tool_calls": "{broken"}},
        rec(6, timestamp=None, id=None, feedback=None, tags=None, teacher=None, usage=None),
    ]
    p = plan(feedback=FeedbackFilter(metric="thumbs_up"), lengths={"max_total_tokens": 50},
             language={"allowed": ["en"]})
    out = map_batch(batch(*weird), p)
    assert out.num_rows == len(weird)
    reasons = dict(zip(out.column("id").to_pylist(), out.column("_reason").to_pylist(), strict=True))
    assert reasons["r2"] == "no output in the response" and reasons["r4"] == "empty output"
    assert reasons["r5"].startswith("tool calls are not valid JSON")
    kept = out.filter(pa.compute.is_null(out.column("_rejected_by")))
    from curation.curate.dedup import exact_dedup, near_dedup, rank
    from curation.curate.index import REDUCE_SCHEMA
    from pipeline.config.curate import NearDedup

    compact = kept.select(["_uid", "id", "source", "function", "_split", "_key", "_text", "_prompt", "_score", "timestamp",
                           "_bands"])
    compact = compact.rename_columns(REDUCE_SCHEMA.names[:-1]).append_column(
        "emb", pa.nulls(kept.num_rows, pa.binary())).cast(REDUCE_SCHEMA)
    alive = np.ones(compact.num_rows, dtype=bool)
    exact_dedup(compact, alive, rank(compact))
    near_dedup(compact, alive, rank(compact), NearDedup())


def test_report_examples_are_scrubbed_whatever_the_recipe_keeps():
    from curation.curate.audit import Audit

    audit = Audit(PIIConfig(action="keep", secrets=[]))
    audit.rejected(pa.table({"id": ["r1"], "source": ["x:1"], "rejected_by": ["refusal"],
                             "reason": ["refusal: 'write to mira.quell77@zorbex-mail.com, key sk-proj-Zq8vN3kLm2Xw9Rt5Yp1Hs6'"]}))
    example = audit.report()["refusal"]["examples"][0]
    assert example == {"id": "r1", "source": "x:1", "reason": "refusal: 'write to <EMAIL>, key <SECRET>'"}
