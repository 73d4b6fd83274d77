"""Per-record curation operators. Each is a function of an Arrow batch of canonical records and the plan:
``op(batch, plan) -> (batch, reasons)``, returning the batch (possibly rewritten: redacted, labelled) and per row
``None`` to keep it or the reason it is dropped. They look at one record at a time, so any executor may cut the
data into batches as it likes (``curation.curate.chain`` runs them; ``curation.curate.executors`` spreads the
batches).

``PER_RECORD`` at the end is the chain: every operator, in the order it runs, with the recipe setting that turns it
on. The JSON Schema checks the ``json_schema`` operator uses are in ``curation.curate.json_schema``.

Checks across records (dedup, decontamination, balance) are in ``curation.curate.dedup``,
``curation.curate.decontaminate`` and ``curation.curate.balance``: they need every record at once
(``curation.curate.stage.GLOBAL`` runs them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from curation.curate import columns
from curation.curate.json_schema import check_output, check_tool_calls, response_format, validator
from curation.curate.pii import pii
from pipeline.config.curate import CurateConfig
from pipeline.config.train import StudentConfig

Reasons = list[str | None]

# Refusals: the start of the output (where models put them), and a few phrases anywhere in it.
REFUSAL = re.compile(
    r"^\W*(?:(?:i'?m|i am|we'?re|we are)\s+(?:really\s+|so\s+|very\s+)?sorry,?\s+(?:but\s+)?(?:i|we)\s+"
    r"(?:can(?:'|no)?t|cannot|won'?t|will not|am\s+(?:not\s+able|unable)|'m\s+(?:not\s+able|unable)|"
    r"(?:am|'m)\s+not\s+(?:allowed|permitted))"
    r"|sorry,?\s+(?:but\s+)?(?:i|we)\s+(?:can(?:'|no)?t|cannot|won'?t|am\s+unable|'m\s+unable)"
    r"|(?:i|we)\s+(?:can(?:'|no)?t|cannot|won'?t|will not|am unable to|'m unable to|am not able to|'m not able to)\s+"
    r"(?:help|assist|provide|comply|do that|fulfil|fulfill|answer|share|discuss|engage|create|generate|support)"
    r"|(?:i|we)\s+(?:must|have to)\s+(?:decline|refuse)"
    r"|i'?m afraid (?:i|we) (?:can(?:'|no)?t|cannot|won'?t)"
    r"|(?:i\s+)?apologi[sz]e,?\s+but\s+(?:i|we)\s+(?:can(?:'|no)?t|cannot|won'?t|am unable|'m unable|am not able)"
    r"|unfortunately,?\s+(?:i|we)\s+(?:can(?:'|no)?t|cannot|won'?t|am unable|'m unable|am not able))"
    r"|\bas an ai(?: language model| assistant| model)?,? i (?:can(?:'|no)?t|cannot|don'?t|do not|am not|'m not)",
    re.IGNORECASE,
)
REFUSAL_WINDOW = 300
# Error messages logged as if they were answers (status 200 from a proxy, an SDK's error string, an HTML page).
ERROR_TEXT = re.compile(
    r"^\s*(?:traceback \(most recent call last\)|(?:error|exception)\s*[:\]]|\[error\]|<!doctype html|<html"
    r"|internal server error|bad gateway|service unavailable|gateway time-?out|upstream (?:connect error|request "
    r"timeout)|request timed out|rate limit (?:exceeded|reached)|too many requests|an (?:unexpected |internal )?"
    r"error (?:occurred|has occurred)|the server had an error|model (?:is )?overloaded|\{\s*\"error\"\s*:)",
    re.IGNORECASE,
)


@dataclass
class Plan:
    """What the per-record operators need: the curate config, schema texts from files, the student's tokenizer."""

    cfg: CurateConfig
    student: StudentConfig | None = None
    schemas: dict[str, str] = field(default_factory=dict)  # function -> JSON schema text (inline or read from file)


def plan_for(cfg: CurateConfig, student: StudentConfig | None = None) -> Plan:
    """A plan with the recipe's schema files read (relative paths against the working directory)."""
    from pathlib import Path

    schemas = {}
    for function, schema in cfg.json_schema.schemas.items():
        if isinstance(schema, str):
            path = Path(schema)
            if not path.is_file():
                raise FileNotFoundError(f"curate.json_schema.schemas.{function}: schema file {path} not found")
            try:
                loaded = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as err:
                raise ValueError(f"curate.json_schema.schemas.{function}: {path} is not valid JSON: {err}") from None
            schema = loaded
        validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode())  # fails early on a bad schema
        schemas[function] = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
    return Plan(cfg, student, schemas)


def _strings(arr: pa.Array) -> list[str | None]:
    return arr.to_pylist()


TEXT_COLUMNS = ("tools", "response_format", "error")  # top-level text columns a record may carry besides messages


def record_bytes(batch: pa.Table) -> np.ndarray:
    """UTF-8 bytes of each record's texts: message contents and tool calls, the output's, tools, response format
    and error (measured on the Arrow buffers, before any per-record work)."""
    n = batch.num_rows

    def size(arr: pa.Array) -> np.ndarray:
        return pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)

    flat, rows, _ = columns.messages_flat(batch)
    total = np.zeros(n, dtype=np.int64)
    for name in ("content", "tool_calls"):
        if name in flat.type.names and len(flat):
            total += np.bincount(rows, weights=size(columns.field(flat, name)), minlength=n).astype(np.int64)
    if "images" in flat.type.names and len(flat):  # data URIs can be large
        imgs = columns.field(flat, "images")
        per_msg = np.bincount(pc.list_parent_indices(imgs).to_numpy(), weights=size(pc.list_flatten(imgs)),
                              minlength=len(flat))
        total += np.bincount(rows, weights=per_msg, minlength=n).astype(np.int64)
    out = columns.column(batch, "output")
    for name in ("content", "tool_calls"):
        if name in out.type.names:
            total += size(columns.field(out, name))
    for name in TEXT_COLUMNS:
        if name in batch.column_names and pa.types.is_string(batch.schema.field(name).type):
            total += size(columns.column(batch, name))
    return total


def record_size(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Drop records whose texts exceed curate.max_record_bytes, before any other work, and blank their texts so
    that nothing after this (PII, dedup, rejected.parquet) holds or scans them."""
    sizes = record_bytes(batch)
    over = sizes > plan.cfg.max_record_bytes
    if not over.any():
        return batch, [None] * batch.num_rows
    marker = pa.scalar(f"[removed by curate: the record's texts exceed curate.max_record_bytes "
                       f"({plan.cfg.max_record_bytes:,})]")
    flat, rows, _ = columns.messages_flat(batch)
    blank = pa.array(over[rows]) if len(flat) else pa.array([], pa.bool_())
    children = {name: pc.if_else(blank, marker if name == "content" else pa.scalar(None, pa.string()),
                                 columns.field(flat, name))
                for name in ("content", "tool_calls") if name in flat.type.names}
    if "images" in flat.type.names:
        imgs = columns.field(flat, "images")
        children["images"] = pc.if_else(blank, pa.scalar(None, imgs.type), imgs)
    batch = columns.set_column(batch, "messages", columns.rebuild_message_list(batch, children))
    out = columns.column(batch, "output")
    children = {name: pc.if_else(pa.array(over), marker if name == "content" else pa.scalar(None, pa.string()),
                                 columns.field(out, name))
                for name in ("content", "tool_calls") if name in out.type.names}
    batch = columns.set_column(batch, "output", columns.rebuild_struct(batch, "output", children))
    for name in TEXT_COLUMNS:
        if name in batch.column_names and pa.types.is_string(batch.schema.field(name).type):
            batch = columns.set_column(batch, name, pc.if_else(pa.array(over), pa.scalar(None, pa.string()),
                                                               columns.column(batch, name)))
    return batch, [f"record texts are {b:,} bytes, over curate.max_record_bytes ({plan.cfg.max_record_bytes:,})"
                   if o else None for b, o in zip(sizes.tolist(), over.tolist(), strict=True)]


def image_counts(batch: pa.Table) -> np.ndarray:
    """Image parts per record: the messages' and the output's ``images`` (absent in files harvested before they were
    kept, which read as none), or the ``has_images`` tag that older harvests set where they dropped them."""
    n = batch.num_rows
    counts = np.zeros(n, dtype=np.int64)
    flat, rows, _ = columns.messages_flat(batch)
    if "images" in flat.type.names and len(flat):
        per_msg = pc.fill_null(pc.list_value_length(columns.field(flat, "images")), 0).to_numpy(zero_copy_only=False)
        counts += np.bincount(rows, weights=per_msg, minlength=n).astype(np.int64)
    out = columns.column(batch, "output")
    if "images" in out.type.names:
        counts += pc.fill_null(pc.list_value_length(columns.field(out, "images")), 0).to_numpy(zero_copy_only=False)
    if "tags" in batch.column_names:
        tagged = columns.map_value(batch, "tags", "has_images").to_pylist()
        for i, t in enumerate(tagged):
            if t is not None and t.isdigit() and int(t) > counts[i]:
                counts[i] = int(t)
    return counts


def images(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Drop records with image parts: the student is text-only (curate.drop_images). The reason gives the count,
    never the images' URLs (which may carry tokens)."""
    counts = image_counts(batch)
    return batch, [f"has {c} image part{'s' if c != 1 else ''}; the student is text-only" if c else None
                   for c in counts.tolist()]


def http_error(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Drop calls that failed: HTTP status >= 400, an error body, or no output at all."""
    status = pc.fill_null(columns.column(batch, "status_code"), 200).to_numpy(zero_copy_only=False)
    error = columns.column(batch, "error")
    has_error = pc.fill_null(pc.greater(pc.utf8_length(error), 0), False).to_numpy(zero_copy_only=False)
    no_output = columns.column(batch, "output").is_null().to_numpy(zero_copy_only=False)
    bad = (status >= 400) | has_error | no_output
    reasons: Reasons = [None] * batch.num_rows
    if bad.any():
        errors = _strings(error)
        for i in np.flatnonzero(bad):
            if status[i] >= 400 or has_error[i]:
                reasons[i] = f"HTTP {status[i]}: {(errors[i] or 'error')[:160]}"
            else:
                reasons[i] = "no output in the response"
    return batch, reasons


def empty_output(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Drop teacher outputs that are empty (no text and no tool calls)."""
    out = columns.column(batch, "output")
    text = pc.utf8_trim_whitespace(pc.fill_null(columns.field(out, "content"), ""))
    calls = pc.fill_null(columns.field(out, "tool_calls"), "")
    empty = pc.and_(pc.equal(pc.utf8_length(text), 0), pc.less_equal(pc.utf8_length(calls), 2))
    return batch, ["empty output" if e else None for e in empty.to_pylist()]


def _max_tokens(params: str | None) -> int | None:
    if not params:
        return None
    try:
        p = orjson.loads(params)
    except orjson.JSONDecodeError:
        return None
    v = p.get("max_completion_tokens") or p.get("max_tokens") or p.get("max_output_tokens") if isinstance(p, dict) else None
    return v if isinstance(v, int) and v > 0 else None


def truncated_output(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Drop outputs the teacher stopped because of its length limit: finish_reason 'length', or (when the log has
    no finish reason) as many output tokens as the request's max_tokens."""
    finish = _strings(columns.column(batch, "finish_reason"))
    reasons: Reasons = [None] * batch.num_rows
    params = out_tokens = None
    for i, f in enumerate(finish):
        if f == "length":
            reasons[i] = "output cut off (finish_reason=length)"
        elif f is None:
            if params is None:
                params = _strings(columns.field(columns.column(batch, "teacher"), "params"))
                out_tokens = _strings(columns.field(columns.column(batch, "usage"), "output_tokens"))
            limit = _max_tokens(params[i])
            if limit and out_tokens[i] is not None and out_tokens[i] >= limit:
                reasons[i] = f"output cut off ({out_tokens[i]} output tokens = max_tokens)"
    return batch, reasons


def _matches(texts: pa.Array, pattern: re.Pattern) -> np.ndarray:
    """Rows whose text the pattern matches (searching): Arrow's RE2 over the whole column when the pattern is
    RE2 syntax, Python's re otherwise (lookbehinds and the like in a recipe's patterns)."""
    try:
        hit = pc.match_substring_regex(texts, pattern.pattern, ignore_case=bool(pattern.flags & re.IGNORECASE))
        return pc.fill_null(hit, False).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        return np.array([bool(t) and pattern.search(t) is not None for t in texts.to_pylist()], dtype=bool)


def _values(arr: pa.Array, rows: np.ndarray) -> list:
    return arr.take(pa.array(rows, pa.int64())).to_pylist()


def error_text(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Drop outputs that are error messages logged as answers (tracebacks, HTML error pages, 'Internal Server
    Error', JSON error bodies)."""
    head = pc.utf8_slice_codeunits(columns.output_texts(batch), 0, 200)
    hit = np.flatnonzero(_matches(head, ERROR_TEXT))
    reasons: Reasons = [None] * batch.num_rows
    for i, t in zip(hit, _values(head, hit), strict=True):
        reasons[i] = f"error text as output: {t[:80]!r}"
    return batch, reasons


@lru_cache(maxsize=8)
def _refusal_patterns(extra: tuple[str, ...]) -> list[re.Pattern]:
    return [REFUSAL, *(re.compile(p, re.IGNORECASE) for p in extra)]


def refusal(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Teacher refusals: dropped when the recipe says so, else labelled (tag refusal=true)."""
    head = pc.utf8_slice_codeunits(columns.output_texts(batch), 0, REFUSAL_WINDOW)
    hit = np.zeros(batch.num_rows, dtype=bool)
    for p in _refusal_patterns(tuple(plan.cfg.refusal_patterns)):
        hit |= _matches(head, p)
    rows = np.flatnonzero(hit)
    reasons: Reasons = [None] * batch.num_rows
    if plan.cfg.drop_refusals:
        for i, t in zip(rows, _values(head, rows), strict=True):
            reasons[i] = f"refusal: {t[:60]!r}"
        return batch, reasons
    return columns.add_tags(batch, {int(i): {"refusal": "true"} for i in rows}), reasons


def feedback(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Drop records whose feedback metric is on the wrong side of the threshold; missing feedback is kept."""
    fb = plan.cfg.feedback
    assert fb is not None
    values = columns.map_value(batch, "feedback", fb.metric).to_pylist()
    reasons: Reasons = [None] * batch.num_rows
    for i, v in enumerate(values):
        if v is not None and (v < fb.min_value if fb.higher_is_better else v > fb.min_value):
            reasons[i] = f"{fb.metric}={v:g} {'<' if fb.higher_is_better else '>'} {fb.min_value:g}"
    return batch, reasons


def json_schema(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Structured outputs: JSON outputs must be valid against the recipe's schema for the function or the logged
    response_format; tool calls must name a logged tool and match its parameter schema."""
    cfg = plan.cfg.json_schema
    n = batch.num_rows
    functions = _strings(columns.column(batch, "function"))
    formats = _strings(columns.column(batch, "response_format")) if "response_format" in batch.column_names else [None] * n
    out = columns.column(batch, "output")
    texts = _strings(pc.fill_null(columns.field(out, "content"), ""))
    calls = _strings(columns.field(out, "tool_calls"))
    tools = _strings(columns.column(batch, "tools")) if "tools" in batch.column_names else [None] * n
    reasons: Reasons = [None] * n
    for i in range(n):
        kind, schema = "", plan.schemas.get(functions[i])
        if schema is not None:
            kind = "json_schema"
        elif cfg.use_response_format and formats[i]:
            kind, schema = response_format(formats[i])
        if kind and not (calls[i] and not texts[i].strip()):
            reasons[i] = check_output(kind, schema, texts[i])
            if reasons[i]:
                continue
        if cfg.tool_calls and calls[i]:
            reasons[i] = check_tool_calls(calls[i], tools[i])
    return batch, reasons


def language_codes(cfg) -> tuple[str, ...]:
    """The languages lingua chooses among (at least two)."""
    codes = tuple(sorted(set(cfg.candidates) | set(cfg.allowed)))
    return codes if len(codes) > 1 else tuple(sorted({*codes, "en", "es"}))


@lru_cache(maxsize=4)
def language_detector(codes: tuple[str, ...]):
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper())) for c in codes]
    return LanguageDetectorBuilder.from_languages(*langs).build()


def language(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Keep user turns in the allowed languages. A record is dropped only when lingua is at least min_confidence
    sure of a language that is not allowed; shorter or unclear texts are kept and labelled 'uncertain'."""
    cfg = plan.cfg.language
    assert cfg is not None
    det = language_detector(language_codes(cfg))
    allowed = set(cfg.allowed)
    texts = _strings(columns.user_texts(batch))
    reasons: Reasons = [None] * batch.num_rows
    labels: dict[int, dict[str, str]] = {}
    for i, t in enumerate(texts):
        t = t.strip()
        if len(t) < cfg.min_chars:
            labels[i] = {"language": "uncertain"}
            continue
        values = det.compute_language_confidence_values(t)
        if not values:
            labels[i] = {"language": "uncertain"}
            continue
        top = values[0]
        code = top.language.iso_code_639_1.name.lower()
        if top.value < cfg.min_confidence:
            labels[i] = {"language": "uncertain"}
        elif code in allowed:
            labels[i] = {"language": code}
        else:
            reasons[i] = f"language {code} ({top.value:.2f}) not in {sorted(allowed)}"
    return columns.add_tags(batch, labels), reasons


def student_tokenizer(student: StudentConfig):
    """(tokenizer, tokens each chat message adds beyond its content) for a checkpoint student; offline if
    HF_HUB_OFFLINE is set, remote code only when the recipe allows it."""
    return _load_tokenizer(student.checkpoint, student.revision, student.trust_remote_code)


@lru_cache(maxsize=4)
def _load_tokenizer(checkpoint: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint, revision=revision, trust_remote_code=trust_remote_code)
    overhead = 0
    if getattr(tok, "chat_template", None):
        probe = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]
        try:
            ids = tok.apply_chat_template(probe, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            content = sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) for m in probe)
            overhead = max(0, math.ceil((len(ids) - content) / len(probe)))
        except Exception:  # noqa: BLE001 - a template that cannot render a probe: count content only
            overhead = 0
    return tok, overhead


def length_mode(plan: Plan) -> str:
    """How lengths are counted, for the report."""
    student = plan.student
    if student is not None and student.checkpoint:
        return f"student tokenizer ({student.checkpoint})"
    return (f"approximation: the student is built from config and its tokenizer is trained later by the train "
            f"stage, so tokens = UTF-8 bytes / {plan.cfg.lengths.chars_per_token:g} + 4 per message")


def token_counts(batch: pa.Table, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(input tokens, output tokens) per record in the student's tokens (or the documented approximation)."""
    n = batch.num_rows
    flat, rows, _ = columns.messages_flat(batch)
    out = columns.column(batch, "output")
    msg_text = pc.binary_join_element_wise(pc.fill_null(columns.field(flat, "content"), ""),
                                           pc.fill_null(columns.field(flat, "tool_calls"), ""), "")
    out_text = pc.binary_join_element_wise(pc.fill_null(columns.field(out, "content"), ""),
                                           pc.fill_null(columns.field(out, "tool_calls"), ""), "")
    student = plan.student
    if student is not None and student.checkpoint:
        tok, overhead = student_tokenizer(student)

        def count(arr: pa.Array) -> np.ndarray:
            texts = arr.to_pylist()
            if not texts:
                return np.zeros(0, dtype=np.int64)
            return np.array([len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    else:
        overhead = 4
        cpt = plan.cfg.lengths.chars_per_token

        def count(arr: pa.Array) -> np.ndarray:
            return np.ceil(pc.binary_length(arr).to_numpy(zero_copy_only=False) / cpt).astype(np.int64)

    per_msg = count(msg_text) + overhead
    inputs = np.bincount(rows, weights=per_msg, minlength=n).astype(np.int64)
    outputs = count(out_text) + overhead
    return inputs, outputs


def length(batch: pa.Table, plan: Plan) -> tuple[pa.Table, Reasons]:
    """Drop records longer than the recipe's limits, counted in the student's tokens."""
    lim = plan.cfg.lengths
    inputs, outputs = token_counts(batch, plan)
    reasons: Reasons = [None] * batch.num_rows
    for i in range(batch.num_rows):
        if lim.max_input_tokens is not None and inputs[i] > lim.max_input_tokens:
            reasons[i] = f"input {inputs[i]} tokens > max_input_tokens {lim.max_input_tokens}"
        elif lim.max_output_tokens is not None and outputs[i] > lim.max_output_tokens:
            reasons[i] = f"output {outputs[i]} tokens > max_output_tokens {lim.max_output_tokens}"
        elif lim.max_total_tokens is not None and inputs[i] + outputs[i] > lim.max_total_tokens:
            reasons[i] = f"{inputs[i] + outputs[i]} tokens > max_total_tokens {lim.max_total_tokens}"
    return batch, reasons


@dataclass(frozen=True)
class Op:
    """One block of a chain: its name (in rejected_by and report.json), its function, and whether a recipe turns
    it on (always, by default)."""

    name: str
    fn: Callable
    when: Callable[[CurateConfig], bool] = lambda cfg: True


# The per-record chain, in the order it runs. PII comes first so that every later operator, every reason and
# rejected.parquet see redacted text; cheap checks come before costly ones.
PER_RECORD: tuple[Op, ...] = (
    Op("record_size", record_size),  # first: a huge record is measured on its buffers, then blanked
    Op("pii", pii),
    Op("images", images, when=lambda cfg: cfg.drop_images),
    Op("http_error", http_error, when=lambda cfg: cfg.drop_http_errors),
    Op("empty_output", empty_output, when=lambda cfg: cfg.drop_empty_outputs),
    Op("truncated_output", truncated_output, when=lambda cfg: cfg.drop_truncated_outputs),
    Op("error_text", error_text, when=lambda cfg: cfg.drop_error_texts),
    Op("refusal", refusal),  # labels refusals even when they are kept
    Op("feedback", feedback, when=lambda cfg: cfg.feedback is not None),
    Op("json_schema", json_schema, when=lambda cfg: bool(cfg.json_schema.schemas or cfg.json_schema.use_response_format
                                                         or cfg.json_schema.tool_calls)),
    Op("language", language, when=lambda cfg: cfg.language is not None),
    Op("length", length, when=lambda cfg: cfg.lengths.enabled),
)


def operators(cfg: CurateConfig) -> list[Op]:
    """The per-record operators a recipe turns on, in the order they run."""
    return [op for op in PER_RECORD if op.when(cfg)]
