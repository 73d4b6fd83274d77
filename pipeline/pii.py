"""PII and secrets, found and redacted the same way wherever records are written: harvest redacts every record it
writes (so nothing under the run directory holds them raw) and curate applies the same operator (finding nothing new
in harvested text, but deciding drops by the kinds harvest tagged). Both read the recipe's ``curate.pii``.

Detection: presidio's offline recognizers (regex, checksums, phonenumbers; no spaCy model, no network)
plus secret patterns (API keys, cloud access keys, bearer tokens, JWTs, private keys, GitHub/Slack/Stripe tokens,
credentials in URLs and password assignments).

Cheap gates decide what looks at a text: each check runs only on texts with what it needs ('@' for e-mail, long
digit runs for phone, card, IBAN and SSN, dotted quads or hex colons for IP and MAC, key prefixes and words such
as 'bearer' for secrets). The gates are RE2 patterns that Arrow runs over a whole column, so clean text never
reaches Python, and the slow phonenumbers matcher sees only phone-like digit runs nothing else explained.
Overlapping findings are merged and replaced right to left.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns
from pipeline.config.curate import PII_ENTITIES, SECRET_KINDS, PIIConfig

SECRET_PATTERNS: dict[str, str] = {
    "anthropic_api_key": r"\bsk-ant-[A-Za-z0-9_\-]{20,}",
    "openai_api_key": r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",
    "aws_access_key": r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA)[A-Z0-9]{16}\b",
    "aws_secret_key": r"(?i)\baws[\w\-]{0,20}?(?:secret|sk)[\w\-]{0,20}\W{0,4}[A-Za-z0-9/+=]{40}\b",
    "github_token": r"\b(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{22,255})\b",
    "slack_token": r"\bxox[abposr]-[A-Za-z0-9\-]{10,}",
    "google_api_key": r"\bAIza[0-9A-Za-z_\-]{35}",
    "stripe_key": r"\b(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}",
    "bearer_token": r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]{16,}",
    "jwt": r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}",
    # a whole key block, or from its header to the end of the text when the block was cut off
    "private_key": r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
                   r"|[\s\S]*)",
    # user:password@ in a URL, or a signed URL's credential or signature (presigned S3/GCS links, SAS tokens;
    # a value of 8 characters or more: `?key=id` is no secret)
    "url_credentials": r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@'\"]+:[^\s@/'\"]+@"
                       r"|(?<=[?&])(?i:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)"
                       r"|signature|sig|access_token|token|api[_\-]?key|key)=[^&#\s\"'<>]{8,}",
    "password_assignment": r"(?i)\b(?:password|passwd|pwd|api[_\-]?key|secret[_\-]?key|access[_\-]?token|client[_\-]?"
                           r"secret)\b[\"']?\s*[:=]\s*[\"']?[^\s\"',;]{6,}",
}
SECRET_PLACEHOLDER = "<SECRET>"
# The detector's version, in harvest's redaction.json: bump it whenever a pattern, gate, recognizer or a field
# that is scanned changes, so that batches carried from earlier nights are scanned again under the new one.
DETECTOR_VERSION = 4  # 2: signed URL queries; message names, image URLs, response format, tag keys; 3: function;
# 4: episode ids
SECRET_WORDS = ("sk-", "sk_", "rk_", "pk_", "akia", "asia", "abia", "acca", "agpa", "aida", "aipa", "anpa", "anva",
                "aroa", "apka", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "aiza", "eyj", "bearer",
                "-----begin", "://", "password", "passwd", "pwd", "api_key", "api-key", "apikey", "secret",
                "token", "aws")
# Digit runs written like phone numbers (a leading + or 0, or groups split by spaces, dots, dashes, brackets);
# plain runs such as order numbers are not, and do not wake the (slow) phonenumbers matcher.
PHONE_LIKE = re.compile(r"(?<![\w#])(?:\+\s?\d[\d ().\-/]{5,22}\d|0\d[\d ().\-/]{4,20}\d|\(?\d{1,5}\)?(?:[ .\-/]"
                        r"\(?\d{1,5}\)?){1,5})(?![\w])")
# Numbers presidio's phonenumbers validation rejects (fictional 555 numbers, unknown regions) are still personal.
LENIENT_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?\(?\d{3}\)?[ .\-]?\d{3}[ .\-]?\d{4}(?!\w)"
    r"|(?<![\w+])\+\d{1,3}[ .\-]?\(?\d{1,4}\)?(?:[ .\-]?\d{2,4}){2,4}(?!\w)"
)
WORD_CHAR = re.compile(r"\w")
# What a text must contain before a check looks at it (a presidio recognizer call costs 20-60 us). Each gate is
# looser than the check's own patterns, and is RE2 syntax, so `_rewrite` runs them all over a column with Arrow.
GATES = {
    "secrets": "|".join(re.escape(w) for w in SECRET_WORDS),
    "digits": r"\d(?:[\s().+/\-]{0,3}\d){6}",
    "EMAIL_ADDRESS": r"@",
    "CREDIT_CARD": r"\d(?:[ \-]?\d){11,18}",
    "IBAN_CODE": r"[A-Za-z]{2}\d{2}(?:[ \-]?[A-Za-z0-9]){11,32}",
    "US_SSN": r"(?:^|\D)\d{3}[\- .]?\d{2}[\- .]?\d{4}(?:\D|$)",
    "IP_ADDRESS": r"(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}",
    "MAC_ADDRESS": r"(?:[0-9A-Fa-f]{2}[:\-]){5}[0-9A-Fa-f]{2}|(?:[0-9A-Fa-f]{4}\.){2}[0-9A-Fa-f]{4}",
    "CRYPTO": r"\b[A-Za-z0-9]{25}",
}
GATES["PHONE_NUMBER"] = GATES["digits"]
GATES["IP_ADDRESS"] += "|::"
_GATE_RE = {k: re.compile(v, re.IGNORECASE if k == "secrets" else 0) for k, v in GATES.items()}


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    kind: str  # presidio entity type or secret kind

    @property
    def is_secret(self) -> bool:
        return self.kind not in PII_ENTITIES


class Detector:
    """Finds PII and secrets in text with presidio's offline recognizers and the secret patterns."""

    def __init__(self, entities: tuple[str, ...], secrets: tuple[str, ...], phone_regions: tuple[str, ...],
                 min_score: float):
        self.min_score = min_score
        self.secrets = [(k, re.compile(SECRET_PATTERNS[k])) for k in SECRET_PATTERNS if k in secrets]
        # phone last: it runs only on digit runs that the other findings do not explain
        self.recognizers = {e: _recognizer(e, phone_regions) for e in sorted(entities, key=lambda e: e == "PHONE_NUMBER")}
        self.lenient_phone = "PHONE_NUMBER" in entities
        # any gate of an enabled check: texts matching none are never looked at in Python
        self.trigger = "|".join(f"(?:{GATES[k]})" for k in ["secrets", "digits", *self.recognizers])
        self._cache: dict[str, tuple[Finding, ...]] = {}

    def find(self, text: str, gates: set[str] | None = None) -> tuple[Finding, ...]:
        """Merged, non-overlapping findings in text order. `gates`: which GATES the text passes, when the caller
        already knows (computed for a whole column); else they are checked here."""
        if not text:
            return ()
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        if gates is None:
            gates = {k for k, g in _GATE_RE.items() if g.search(text)}
        found: list[Finding] = []
        if self.secrets and "secrets" in gates:
            for kind, pattern in self.secrets:
                found += [Finding(m.start(), m.end(), kind) for m in pattern.finditer(text)]
        if self.lenient_phone and "digits" in gates:
            found += [Finding(m.start(), m.end(), "PHONE_NUMBER") for m in LENIENT_PHONE.finditer(text)]
        for entity, rec in self.recognizers.items():
            if entity not in gates:
                continue
            if entity == "PHONE_NUMBER" and not any(
                    7 <= sum(c.isdigit() for c in m.group()) <= 15 and not _covered(m.span(), found)
                    for m in PHONE_LIKE.finditer(text)):
                continue  # phonenumbers is slow: only for phone-like digit runs nothing else explained
            found += [Finding(r.start, r.end, entity) for r in rec.analyze(text, [entity], None)
                      if r.score >= self.min_score]
        merged = _merge(found)
        if len(self._cache) > 20_000:
            self._cache.clear()
        self._cache[text] = merged
        return merged

    def gates(self, texts: pa.Array) -> list[set[str]]:
        """The GATES each text of a column passes (Arrow RE2, one pass per gate)."""
        names = ["secrets", "digits", *self.recognizers]
        hits = {k: pc.fill_null(pc.match_substring_regex(texts, GATES[k], ignore_case=k == "secrets"),
                                False).to_numpy(zero_copy_only=False) for k in names}
        return [{k for k in names if hits[k][i]} for i in range(len(texts))]


def _covered(span: tuple[int, int], found: list[Finding]) -> bool:
    return any(f.start <= span[0] and span[1] <= f.end for f in found)


def _merge(found: list[Finding]) -> tuple[Finding, ...]:
    """Overlapping findings become one span; a secret wins the label, then the longest finding."""
    out: list[Finding] = []
    for f in sorted(found, key=lambda f: (f.start, -f.end)):
        if out and f.start < out[-1].end:
            last = out[-1]
            best = last if (last.is_secret, last.end - last.start) >= (f.is_secret, f.end - f.start) else f
            out[-1] = Finding(last.start, max(last.end, f.end), best.kind)
        else:
            out.append(f)
    return tuple(out)


_IMPORT_LOCK = threading.Lock()


def _import_presidio() -> None:
    """Import presidio_analyzer without the NLP engines it never uses here: its package imports transformers and
    torch when they are installed (about 10 CPU-seconds and 500 MiB per process, paid by every harvest worker).
    Both read as absent during that import (presidio and spaCy test for them and go on); a later import of
    either works as usual. Already imported, they are left alone.

    Caveats: the window is process-wide. It is held under a lock (one window at a time, and only once), but a
    thread of this process that imports torch or transformers while it is open gets ImportError: build detectors
    (``detector``) before starting threads that need them. And spaCy's thinc, imported in the window, records
    ``thinc.compat.has_torch = False`` for the process: spaCy's torch-backed models do not work in a process that
    redacted (none is used here); torch and transformers themselves do."""
    global _presidio_imported
    with _IMPORT_LOCK:
        if _presidio_imported:
            return
        blocked = [m for m in ("torch", "transformers") if m not in sys.modules]
        for m in blocked:
            sys.modules[m] = None  # type: ignore[assignment]
        try:
            import presidio_analyzer.predefined_recognizers  # noqa: F401
        finally:
            for m in blocked:
                if sys.modules.get(m, 0) is None:
                    del sys.modules[m]
        _presidio_imported = True


_presidio_imported = False


def _recognizer(entity: str, phone_regions: tuple[str, ...]):
    _import_presidio()
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        CryptoRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        MacAddressRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )

    class OfflineEmailRecognizer(EmailRecognizer):
        """presidio's e-mail recognizer with the public-suffix check done from tldextract's bundled list (the
        stock one tries to download it); addresses on unknown suffixes keep the pattern's score."""

        def validate_result(self, pattern_text: str):
            return True if _tld_extract()(pattern_text.rsplit("@", 1)[-1]).suffix else None

    make = {
        "EMAIL_ADDRESS": OfflineEmailRecognizer,
        "PHONE_NUMBER": lambda: PhoneRecognizer(supported_regions=phone_regions),
        "CREDIT_CARD": CreditCardRecognizer,
        "IP_ADDRESS": IpRecognizer,
        "IBAN_CODE": IbanRecognizer,
        "US_SSN": UsSsnRecognizer,
        "CRYPTO": CryptoRecognizer,
        "MAC_ADDRESS": MacAddressRecognizer,
    }
    return make[entity]()


@lru_cache(maxsize=1)
def _tld_extract():
    import tldextract

    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def detector(cfg: PIIConfig) -> Detector:
    """One detector per process and config (building presidio's recognizers takes a moment)."""
    return _detector(tuple(cfg.entities), tuple(cfg.secrets), tuple(cfg.phone_regions), cfg.min_score)


@lru_cache(maxsize=8)
def _detector(entities: tuple[str, ...], secrets: tuple[str, ...], regions: tuple[str, ...], min_score: float):
    return Detector(entities, secrets, regions, min_score)


def _action(f: Finding, cfg: PIIConfig) -> str:
    return cfg.secrets_action if f.is_secret else cfg.action


def replace(text: str, findings: tuple[Finding, ...], cfg: PIIConfig) -> str:
    """Text with each finding redacted (placeholder) or masked (letters and digits to '*'), per the config."""
    for f in reversed(findings):
        action = _action(f, cfg)
        if action == "keep":
            continue
        if action == "mask":
            new = WORD_CHAR.sub("*", text[f.start:f.end])
        else:  # redact, and drop (the record is dropped, but its redacted text is what rejected.parquet holds)
            new = SECRET_PLACEHOLDER if f.is_secret else PII_ENTITIES[f.kind]
        text = text[: f.start] + new + text[f.end:]
    return text


def scrub(text: str, cfg: PIIConfig | None = None) -> str:
    """Text shown in reports: redacted of every default entity and secret kind (and the recipe's own), whatever
    the recipe's actions."""
    base = PIIConfig()
    cfg = PIIConfig(action="redact", secrets_action="redact", secrets=list(SECRET_KINDS),
                    entities=sorted(set(base.entities) | set(cfg.entities if cfg else [])),
                    phone_regions=cfg.phone_regions if cfg else base.phone_regions)
    return replace(text, detector(cfg).find(text), cfg)


def short_kind(kind: str) -> str:
    return kind.lower()


def _rewrite(values: pa.Array, rows: np.ndarray, det: Detector, cfg: PIIConfig,
             kinds: dict[int, set[str]]) -> pa.Array | None:
    """A string array with findings replaced, or None when nothing changed; records each row's finding kinds.
    Arrow's RE2 picks the texts that could hold a finding; only those are looked at in Python."""
    if len(values) == 0:
        return None
    hit = pc.fill_null(pc.match_substring_regex(values, det.trigger, ignore_case=True), False)
    idx = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
    if len(idx) == 0:
        return None
    subset = values.take(pa.array(idx))
    texts: list | None = None
    for j, text, gates in zip(idx, subset.to_pylist(), det.gates(subset), strict=True):
        found = tuple(f for f in det.find(text, gates) if _action(f, cfg) != "keep")
        if not found:
            continue
        kinds.setdefault(int(rows[j]), set()).update(f.kind for f in found)
        new = replace(text, found, cfg)
        if new != text:
            if texts is None:
                texts = values.to_pylist()
            texts[j] = new
    return pa.array(texts, values.type) if texts is not None else None


def episode_key(value: str, det: Detector, cfg: PIIConfig) -> tuple[str, tuple[Finding, ...]]:
    """An episode id as records keep it: as it came, or, when it holds PII or a secret (a client that names its
    sessions by e-mail), ``episode-`` and a hash of it, so that an episode's records (and the feedback that names
    it, mapped the same way) still join; and what was found."""
    found = tuple(f for f in det.find(value) if _action(f, cfg) != "keep")
    if not found:
        return value, ()
    return "episode-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:24], found


def _rewrite_episodes(batch: pa.Table, det: Detector, cfg: PIIConfig, kinds: dict[int, set[str]]) -> pa.Table:
    values = columns.column(batch, "episode_id")
    hit = pc.fill_null(pc.match_substring_regex(values, det.trigger, ignore_case=True), False)
    idx = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
    if len(idx) == 0:
        return batch
    texts = values.to_pylist()
    changed = False
    for j in idx:
        new, found = episode_key(texts[j], det, cfg)
        if found:
            kinds.setdefault(int(j), set()).update(f.kind for f in found)
            texts[j], changed = new, True
    return columns.set_column(batch, "episode_id", pa.array(texts, pa.string())) if changed else batch


TAG = "pii_redacted"  # tag holding the kinds found in a record, comma-separated (short_kind names)


def enabled(cfg: PIIConfig) -> bool:
    """Whether the config looks for anything at all."""
    return cfg.action != "keep" or bool(cfg.secrets)


def _rewrite_messages(batch: pa.Table, det: Detector, cfg: PIIConfig, kinds: dict[int, set[str]]) -> pa.Table:
    """Message texts, tool calls, names and image references (URLs: a presigned one carries a key and a
    signature in its query) rewritten."""
    flat, msg_rows, _ = columns.messages_flat(batch)
    children = {}
    for name in ("content", "tool_calls", "name"):
        new = _rewrite(columns.field(flat, name), msg_rows, det, cfg, kinds)
        if new is not None:
            children[name] = new
    if "images" in [f.name for f in flat.type]:
        new = _rewrite_images(columns.field(flat, "images"), msg_rows, det, cfg, kinds)
        if new is not None:
            children["images"] = new
    return columns.set_column(batch, "messages", columns.rebuild_message_list(batch, children)) if children else batch


def _rewrite_images(images: pa.Array, msg_rows: np.ndarray, det: Detector, cfg: PIIConfig,
                    kinds: dict[int, set[str]]) -> pa.Array | None:
    """A messages' images column (list of strings) with findings in its URLs and references replaced; data URIs
    (the image's bytes, base64) are not text and are left as they are. None when nothing changed."""
    lengths = pc.fill_null(pc.list_value_length(images), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    values = images.flatten()
    if len(values) == 0:
        return None
    is_data = pc.fill_null(pc.starts_with(values, "data:"), False)
    texts = pc.if_else(is_data, pa.nulls(len(values), values.type), values)
    new = _rewrite(texts, np.repeat(msg_rows, lengths), det, cfg, kinds)
    if new is None:
        return None
    offsets = np.zeros(len(images) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pc.if_else(is_data, values, new),
                                    type=images.type, mask=images.is_null())


def _rewrite_output(batch: pa.Table, det: Detector, cfg: PIIConfig, kinds: dict[int, set[str]]) -> pa.Table:
    out = columns.column(batch, "output")
    children = {}
    for name in ("content", "tool_calls"):
        new = _rewrite(columns.field(out, name), np.arange(batch.num_rows), det, cfg, kinds)
        if new is not None:
            children[name] = new
    return columns.set_column(batch, "output", columns.rebuild_struct(batch, "output", children)) if children else batch


def _rewrite_tags(batch: pa.Table, det: Detector, cfg: PIIConfig, kinds: dict[int, set[str]]) -> pa.Table:
    """Tag keys (logged metadata keys, which can be anything) and values rewritten."""
    n = batch.num_rows
    tags = columns.column(batch, "tags")
    entries, lengths = columns.map_entries(tags)
    rows = np.repeat(np.arange(n), lengths)
    key, value = columns.field(entries, "key"), columns.field(entries, "value")
    new_key, new_value = _rewrite(key, rows, det, cfg, kinds), _rewrite(value, rows, det, cfg, kinds)
    if new_key is None and new_value is None:
        return batch
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return columns.set_column(batch, "tags", pa.MapArray.from_arrays(
        pa.array(offsets, pa.int32()), key if new_key is None else new_key, value if new_value is None else new_value,
        type=tags.type, mask=tags.is_null()))


def _rewrite_teacher(batch: pa.Table, det: Detector, cfg: PIIConfig, kinds: dict[int, set[str]],
                     out_rows: set[int]) -> pa.Table:
    """Sampling parameters (stop sequences, a 'user' field) redacted; the logprobs of an output with findings
    cleared, since their tokens would spell the findings out."""
    n = batch.num_rows
    teacher = columns.column(batch, "teacher")
    children = {}
    names = [f.name for f in teacher.type]
    if "params" in names:
        new = _rewrite(columns.field(teacher, "params"), np.arange(n), det, cfg, kinds)
        if new is not None:
            children["params"] = new
    if children:
        batch = columns.set_column(batch, "teacher", columns.rebuild_struct(batch, "teacher", children))
    if out_rows:
        clear = np.zeros(n, dtype=bool)
        clear[list(out_rows)] = True
        batch = _clear_logprobs(batch, clear)
    return batch


def _clear_logprobs(batch: pa.Table, rows: np.ndarray) -> pa.Table:
    """The teacher logprobs of the rows marked in `rows` (a bool mask) set to null."""
    if "teacher" not in batch.column_names or not rows.any():
        return batch
    teacher = columns.column(batch, "teacher")
    if "logprobs" not in [f.name for f in teacher.type]:
        return batch
    lp = columns.field(teacher, "logprobs")
    new = pc.if_else(pa.array(rows), pa.nulls(len(rows), lp.type), lp)
    return columns.set_column(batch, "teacher", columns.rebuild_struct(batch, "teacher", {"logprobs": new}))


# every byte but ASCII whitespace to '*': one pass, one copy, the byte length kept (a multi-byte character becomes
# as many '*'); re.sub would build a list of every match first (gigabytes for a 50 MB text)
_MASK_BYTES = bytes(c if bytes([c]).isspace() else ord("*") for c in range(256))


def _mask_long(values: pa.Array, limit: int) -> pa.Array | None:
    """The array with every text over `limit` UTF-8 bytes masked whole (each non-space byte to '*', so its byte
    length stays the same); None when no text is that long. Masked with numpy in a copy of the array's data buffer:
    one copy, not the four a round trip through Python strings costs (a 50 MB text: 50 MB, not 200)."""
    if len(values) == 0:
        return None
    over = np.flatnonzero(pc.fill_null(pc.greater(pc.binary_length(values), limit), False).to_numpy(
        zero_copy_only=False))
    if len(over) == 0:
        return None
    lut = np.frombuffer(_MASK_BYTES, np.uint8)
    large = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    validity, offsets, data = values.buffers()
    pos = np.frombuffer(offsets, np.int64 if large else np.int32)[values.offset:values.offset + len(values) + 1]
    out = np.frombuffer(data, np.uint8).copy()  # the one copy; masked in place, a MiB at a time
    for i in over:
        for a in range(int(pos[i]), int(pos[i + 1]), 1 << 20):
            seg = out[a:min(a + (1 << 20), int(pos[i + 1]))]
            seg[:] = lut[seg]
    return pa.Array.from_buffers(values.type, len(values), [validity, offsets, pa.py_buffer(out)],
                                 offset=values.offset)


def mask_long_texts(batch: pa.Table, limit: int) -> pa.Table:
    """Texts of messages, tool calls, the output, tools and the error longer than `limit` bytes masked whole, before
    detection: finding PII in megabytes of text costs seconds per megabyte, and curate drops and blanks a record
    that holds such a text (curate.max_record_bytes) anyway; the byte length is kept, so it still does. Returns
    the table."""
    flat, _, _ = columns.messages_flat(batch)
    children = {n: m for n in ("content", "tool_calls") if (m := _mask_long(columns.field(flat, n), limit)) is not None}
    if children:
        batch = columns.set_column(batch, "messages", columns.rebuild_message_list(batch, children))
    out = columns.column(batch, "output")
    children = {n: m for n in ("content", "tool_calls") if (m := _mask_long(columns.field(out, n), limit)) is not None}
    if children:
        masked = np.zeros(batch.num_rows, dtype=bool)
        for n in children:  # rows whose output was masked: their logprobs would still spell the text out
            masked |= pc.fill_null(pc.greater(pc.binary_length(columns.field(out, n)), limit), False).to_numpy(
                zero_copy_only=False)
        batch = columns.set_column(batch, "output", columns.rebuild_struct(batch, "output", children))
        batch = _clear_logprobs(batch, masked)
    for name in ("error", "tools"):
        if name in batch.column_names and (m := _mask_long(columns.column(batch, name), limit)) is not None:
            batch = columns.set_column(batch, name, m)
    return batch


def redact_table(batch: pa.Table, cfg: PIIConfig) -> tuple[pa.Table, dict[int, set[str]]]:
    """Find PII and secrets in message contents, names, tool calls and image URLs, the output, the error text, tool
    definitions, the response format, the function name, the episode id (a hash of it: ``episode_key``), sampling parameters and tag keys and values, and redact or mask them per the config ('drop' redacts too: the caller
    drops). An output with findings loses its teacher logprobs. Returns the table and, per row with findings, the
    kinds found now; the tag pii_redacted holds them, merged with the kinds an earlier pass tagged, so redacting
    twice (harvest, then curate) gives the same table as once."""
    if not enabled(cfg) or batch.num_rows == 0:
        return batch, {}
    det = detector(cfg)
    kinds: dict[int, set[str]] = {}
    out_kinds: dict[int, set[str]] = {}
    batch = _rewrite_messages(batch, det, cfg, kinds)
    batch = _rewrite_output(batch, det, cfg, out_kinds)
    # an API error can echo a key; tool descriptions and a response format's schema can hold examples; a client
    # names the function (metadata): an e-mail there is as personal as in a message
    for name in ("error", "tools", "response_format", "function"):
        if name in batch.column_names:
            new = _rewrite(columns.column(batch, name), np.arange(batch.num_rows), det, cfg, kinds)
            if new is not None:
                batch = columns.set_column(batch, name, new)
    if "episode_id" in batch.column_names:
        batch = _rewrite_episodes(batch, det, cfg, kinds)
    if "tags" in batch.column_names:
        batch = _rewrite_tags(batch, det, cfg, kinds)
    for i, k in out_kinds.items():
        kinds.setdefault(i, set()).update(k)
    if "teacher" in batch.column_names:
        batch = _rewrite_teacher(batch, det, cfg, kinds, set(out_kinds))
    if kinds and "tags" in batch.column_names:
        before = columns.map_value(batch, "tags", TAG).to_pylist()
        batch = columns.add_tags(batch, {i: {TAG: ",".join(sorted(
            {short_kind(k) for k in ks} | set(filter(None, (before[i] or "").split(",")))))} for i, ks in kinds.items()})
    return batch, kinds


def tagged_kinds(batch: pa.Table) -> list[set[str]]:
    """The kinds each row's pii_redacted tag names (short_kind names), found by this or an earlier pass."""
    if "tags" not in batch.column_names:
        return [set() for _ in range(batch.num_rows)]
    return [set(filter(None, (v or "").split(","))) for v in columns.map_value(batch, "tags", TAG).to_pylist()]


def is_personal(short: str) -> bool:
    """Whether a short_kind name is a personal-data entity (else a secret kind)."""
    return short.upper() in PII_ENTITIES


@dataclass(frozen=True)
class Redaction:
    """What harvest does to every record before writing it: texts over ``max_text_bytes`` (the recipe's
    curate.max_record_bytes) masked whole, then PII and secrets redacted as ``cfg`` (curate.pii) says."""

    cfg: PIIConfig
    max_text_bytes: int

    def apply(self, batch: pa.Table) -> tuple[pa.Table, dict[int, set[str]]]:
        if batch.num_rows == 0:
            return batch, {}
        return redact_table(mask_long_texts(batch, self.max_text_bytes), self.cfg)

    def redact_json(self, value: Any) -> tuple[Any, set[str]]:
        """A JSON value (a teacher's answer, before it is cached) with every string redacted as records are:
        over ``max_text_bytes`` masked whole, else findings replaced per the config. Returns it and the
        short_kind names found. Object keys are left alone."""
        kinds: set[str] = set()
        det = detector(self.cfg)

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                if len(v) * 4 > self.max_text_bytes and len(v.encode()) > self.max_text_bytes:
                    return v.encode().translate(_MASK_BYTES).decode()
                found = tuple(f for f in det.find(v) if _action(f, self.cfg) != "keep")
                kinds.update(short_kind(f.kind) for f in found)
                return replace(v, found, self.cfg) if found else v
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            return v

        return walk(value), kinds

    def episodes(self, values: list[str]) -> dict[str, str]:
        """{episode id: as records keep it} for the ids ``episode_key`` changes (feedback that names an episode is
        joined by the name records keep)."""
        table = pa.table({"episode_id": pa.array(values, pa.string())})
        kept = _rewrite_episodes(table, detector(self.cfg), self.cfg, {}).column("episode_id").to_pylist()
        return {v: k for v, k in zip(values, kept, strict=True) if k != v}

    def stamp(self) -> dict:
        """What the setting is, to tell whether files were written under the same one."""
        return {"curate.pii": self.cfg.model_dump(mode="json"), "curate.max_record_bytes": self.max_text_bytes,
                "detector_version": DETECTOR_VERSION}
