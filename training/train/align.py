"""Sparse distillation targets from a teacher's logged top-k logprobs, for a student with the teacher's tokenizer
or with another one.

A logged answer is a list of teacher tokens, each with its text (and, in OpenAI's format, its UTF-8 ``bytes``), its
logprob and its ``top`` alternatives. The student tokenizes the same answer its own way. Both tokenizations spell
the same bytes, so they are lined up by byte offsets:

- **Same tokenizer** (every logged token is one student token and together they spell the student's tokens): each
  answer token gets the teacher's top-k (student id, logprob) pairs as logged; alternatives the student cannot
  write as one token fall into the loss's 'rest' bucket. These are the targets distill has always built.
- **Another tokenizer**: a student token gets a target where it *starts* at a teacher token boundary. Each
  alternative logged there gives its probability to the student token that begins it (its exact byte match in the
  student's vocabulary, else the first token the student writes for its text); alternatives that map to the same
  student token add up. The student token actually in the answer gets the probability of the teacher tokens that
  spell it (the chain rule: the product of their logged probabilities, as TRL's GOLD merges probabilities over an
  aligned span), a lower bound of the teacher's probability of starting with those bytes. Mass that no student
  token takes stays in the 'rest' bucket. A student token that starts inside a teacher token keeps plain
  cross-entropy: what follows a partial teacher token is not in the logs (the alternatives at that point are
  conditioned on the whole teacher token), so any target there would be invented. ULD's sorted-probability
  matching would give those positions a target, but one that ignores which token is which; DSKD's projections
  need the teacher's hidden states, which an API never returns.

Every answer token that gets no target is counted with its reason (see ``TOKEN_REASONS``), and so is every record.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

IGNORE = -100

# why an answer token got no soft target
NO_LOGPROBS = "no teacher logprobs on the record"
NOT_SPELLED = "the logged tokens do not spell the answer the student is trained on"
INSIDE = "the student token starts inside a teacher token (boundaries do not meet)"
BEYOND = "past the end of the logged tokens"
END_OF_TURN = "end-of-turn token (not in the teacher's logs)"
EARLIER_TURN = "an earlier assistant turn (the logs cover the final answer)"
LEAD = "the space a SentencePiece student puts before the first word (not in the teacher's logs)"
TOKEN_REASONS = (NO_LOGPROBS, NOT_SPELLED, INSIDE, BEYOND, END_OF_TURN, EARLIER_TURN, LEAD)
# why a whole record got no soft target (besides NO_LOGPROBS / NOT_SPELLED)
CUT_AWAY = "max_length cut the final answer away (the logs cover only it)"
SOFT = "soft target"


@dataclass
class Targets:
    """Per position of one example: the teacher's (student id, logprob) targets ([] for none), which method built
    them ('same_tokenizer', 'aligned' or None), the record-level reason when none could be built, and the answer
    tokens counted by outcome (``SOFT`` or a reason from ``TOKEN_REASONS``)."""

    ids: list[list[int]]
    logprobs: list[list[float]]
    method: str | None = None
    reason: str | None = None
    tokens: Counter = field(default_factory=Counter)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character that stands for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in type(backend.decoder).__name__ + repr(backend.decoder)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def student_bytes(tokenizer) -> list[bytes | None]:
    """The UTF-8 bytes each student token id stands for (None for special tokens), cached on the tokenizer.
    Byte-level BPE tokens are mapped through GPT-2's alphabet; SentencePiece pieces read '▁' as a space and
    '<0xNN>' as a byte; anything else is decoded on its own."""
    cached = getattr(tokenizer, "_distill_token_bytes", None)
    if cached is not None:
        return cached
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    decoder = _byte_decoder() if _is_byte_level(tokenizer) else None
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif decoder is not None and all(c in decoder for c in piece):
            out.append(bytes(decoder[c] for c in piece))
        elif m := _BYTE_TOKEN.fullmatch(piece):
            out.append(bytes([int(m.group(1), 16)]))
        elif decoder is None and "\u2581" in piece:
            out.append(piece.replace("\u2581", " ").encode())
        else:
            out.append(tokenizer.decode([i]).encode())
    tokenizer._distill_token_bytes = out
    return out


def logged_bytes(entry: dict[str, Any]) -> bytes | None:
    """A logged token's bytes: its ``bytes`` (a list of ints as OpenAI sends it, or bytes as stored) or else its
    text as UTF-8; None when the text is lossy (a replacement character stands for bytes that were not kept)."""
    raw = entry.get("bytes")
    if raw is not None:
        return bytes(raw)
    text = entry.get("token") or ""
    return None if "\ufffd" in text else text.encode()


def final_turn(labels: list[int]) -> tuple[int, int]:
    """[start, end) of the last run of labelled positions: the final assistant turn."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    return start, end


def _single_id(tokenizer, text: str, cache: dict) -> int | None:
    """The student's id for a teacher token given as text, if the student has exactly one token for it."""
    key = ("one", text)
    if key not in cache:
        ids = tokenizer.encode(text, add_special_tokens=False)
        cache[key] = ids[0] if len(ids) == 1 else None
    return cache[key]


def same_tokenizer_targets(tokenizer, ids: list[int], labels: list[int], logprobs: list[dict[str, Any]], top_k: int,
                           cache: dict) -> tuple[list[list[int]], list[list[float]], str | None]:
    """Per position, the teacher's top-k (student ids, logprobs) when the logs are in the student's own tokens;
    else empty targets and the reason. Alternatives the student cannot write as one token are left out."""
    empty_ids: list[list[int]] = [[] for _ in ids]
    empty_lps: list[list[float]] = [[] for _ in ids]
    start, end = final_turn(labels)
    teacher_ids = [_single_id(tokenizer, t["token"], cache) for t in logprobs]
    if None in teacher_ids:
        return empty_ids, empty_lps, "a logged token is not one student token (different tokenizer)"
    n = min(len(teacher_ids), end - start)
    if n == 0 or ids[start:start + n] != teacher_ids[:n]:
        return empty_ids, empty_lps, "logged tokens do not spell the output as the student tokenizes it"
    out_ids, out_lps = empty_ids, empty_lps
    for j in range(n):
        tok = logprobs[j]
        alts: dict[int, float] = {}
        for alt in tok.get("top") or []:
            i = _single_id(tokenizer, alt["token"], cache)
            if i is not None and i not in alts:
                alts[i] = float(alt["logprob"])
        alts.setdefault(teacher_ids[j], float(tok["logprob"]))  # the chosen token is always a target
        best = sorted(alts.items(), key=lambda kv: -kv[1])[:top_k]
        out_ids[start + j] = [i for i, _ in best]
        out_lps[start + j] = [lp for _, lp in best]
    return out_ids, out_lps, None


def _first_student_token(tokenizer, raw: bytes, table: list[bytes | None], cache: dict) -> int | None:
    """The student token that begins a teacher alternative: the one whose bytes are exactly the alternative's,
    else the first token of the student's encoding of its text (None for bytes that are not whole UTF-8)."""
    key = ("first", raw)
    if key not in cache:
        exact = cache.get("by_bytes")
        if exact is None:
            exact = cache["by_bytes"] = {b: i for i, b in reversed(list(enumerate(table))) if b}
        hit = exact.get(raw)
        if hit is None:
            try:
                enc = tokenizer.encode(raw.decode(), add_special_tokens=False)
            except UnicodeDecodeError:
                enc = []
            hit = enc[0] if enc and table[enc[0]] and raw.startswith(table[enc[0]]) else None
        cache[key] = hit
    return cache[key]


def _student_spans(ids: list[int], start: int, end: int, table: list[bytes | None]) -> tuple[list[tuple], bytes]:
    """(position, first byte, end byte) of the answer's student tokens up to the first special token, and the bytes
    they spell."""
    spans, off = [], 0
    for p in range(start, end):
        b = table[ids[p]] if 0 <= ids[p] < len(table) else None
        if b is None:
            break
        spans.append((p, off, off + len(b)))
        off += len(b)
    return spans, b"".join(table[ids[p]] for p, _, _ in spans)


def prepends_space(tokenizer) -> bool:
    """Whether the student's tokenizer writes a space of its own before the first word (SentencePiece, or a
    Metaspace pre-tokenizer/'▁' prepending normalizer); byte-level BPE spells only the text's own spaces."""
    if getattr(tokenizer, "_distill_prepends_space", None) is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            found = hasattr(tokenizer, "sp_model")
        else:
            parts = repr(backend.pre_tokenizer) + repr(backend.normalizer)
            found = "Metaspace" in parts or "Prepend" in parts
        tokenizer._distill_prepends_space = found
    return tokenizer._distill_prepends_space


def _line_up(student: bytes, teacher: bytes, may_lead: bool) -> int | None:
    """How many bytes the student's spelling has in front of the teacher's: 0; 1 for the space a tokenizer that
    prepends one puts before the first word (only when ``may_lead``); or minus the teacher's leading whitespace
    when the student's text lacks it (a chat template that trims the answer). None when they spell different
    answers."""
    stripped = len(teacher) - len(teacher.lstrip())
    for lead in (0, 1, -stripped):
        if (lead == 1 and not (may_lead and student[:1] == b" ")) or (lead < 0 and student[:1].isspace()):
            continue
        s, t = student[max(lead, 0):], teacher[max(-lead, 0):]
        n = min(len(s), len(t))
        if n and s[:n] == t[:n]:
            return lead
    return None


def _add(buckets: dict[int, float], i: int, lp: float) -> None:
    buckets[i] = lp if i not in buckets else float(max(buckets[i], lp) + math.log1p(math.exp(-abs(buckets[i] - lp))))


def _position_target(tokenizer, chosen: int, stop: int, i: int, teacher: list[tuple], table, top_k: int,
                     cache: dict, prefix: bytes = b"") -> tuple[list[int], list[float]]:
    """The target of the student token ``chosen`` that starts where teacher token i starts and ends at byte
    ``stop``: the chain-rule probability of the teacher tokens that spell it, plus the alternatives logged at i
    mapped to the student tokens that begin them (``prefix`` + their bytes: the space a SentencePiece student
    writes before the first word is part of its first token)."""
    raw_i, lp, ends, alts = teacher[i]
    k = i
    while ends < stop and k + 1 < len(teacher):  # the student token spans several teacher tokens
        k += 1
        lp += teacher[k][1]
        ends = teacher[k][2]
    buckets: dict[int, float] = {chosen: lp}
    for alt in alts:
        raw = logged_bytes(alt)
        if raw is None or raw == raw_i:  # lossy text, or the chosen token itself (already counted)
            continue
        w = _first_student_token(tokenizer, prefix + raw, table, cache)
        if w is not None:
            _add(buckets, w, float(alt["logprob"]))
    best = sorted(buckets.items(), key=lambda kv: -kv[1])[:top_k]
    return [w for w, _ in best], [v for _, v in best]


def _teacher_tokens(logprobs: list[dict[str, Any]]) -> tuple[list[tuple], bytes] | None:
    """(bytes, logprob, end byte, alternatives) per logged token and the bytes they spell; None if one is lossy."""
    out, off = [], 0
    for t in logprobs:
        raw = logged_bytes(t)
        if raw is None:
            return None
        off += len(raw)
        out.append((raw, float(t["logprob"]), off, t.get("top") or ()))
    return out, b"".join(x[0] for x in out)


def aligned_targets(tokenizer, ids: list[int], labels: list[int], logprobs: list[dict[str, Any]], top_k: int,
                    cache: dict) -> Targets:
    """Targets for a student whose tokenizer is not the teacher's, lined up by byte offsets (module docstring)."""
    out = Targets([[] for _ in ids], [[] for _ in ids], method="aligned")
    start, end = final_turn(labels)
    table = student_bytes(tokenizer)
    spans, spelled = _student_spans(ids, start, end, table)
    logged = _teacher_tokens(logprobs)
    lead = None if logged is None else _line_up(spelled, logged[1], prepends_space(tokenizer))
    if lead is None:
        out.method, out.reason = None, NOT_SPELLED
        out.tokens[NOT_SPELLED] += len(spans)
        out.tokens[END_OF_TURN] += end - start - len(spans)
        return out
    teacher, text = logged
    starts = {0: 0, **{t[2]: n + 1 for n, t in enumerate(teacher[:-1])}}
    for p, a0, b in spans:
        a, b = max(a0 - lead, 0), b - lead
        if b <= 0:  # the student's own leading space, alone: the teacher never wrote it
            out.tokens[LEAD] += 1
        elif b > len(text):
            out.tokens[BEYOND] += 1
        elif a not in starts:
            out.tokens[INSIDE] += 1
        else:
            prefix = b" " if lead > 0 and a0 == 0 else b""
            out.ids[p], out.logprobs[p] = _position_target(tokenizer, ids[p], b, starts[a], teacher, table,
                                                           top_k, cache, prefix)
            out.tokens[SOFT] += 1
    out.tokens[END_OF_TURN] += end - start - len(spans)
    return out


def logs_in_student_tokens(tokenizer, ids: list[int], labels: list[int], logprobs: list[dict[str, Any]] | None,
                           cache: dict) -> bool | None:
    """Whether a record's logs read as the student's own tokens (the same-tokenizer path takes them); None when
    it has no logs. ``choose_method`` decides from these once per dataset."""
    if not logprobs:
        return None
    return same_tokenizer_targets(tokenizer, ids, labels, logprobs, 1, cache)[2] is None


def choose_method(votes: list[bool | None]) -> str:
    """One method for a whole dataset, so that one recipe never mixes two kinds of target: 'same_tokenizer' when
    most records with logs read as the student's own tokens (the teacher shares its tokenizer; records it cannot
    take, such as a split multi-byte character, are lined up by bytes as before), else 'aligned' for all."""
    cast = [v for v in votes if v is not None]
    return "same_tokenizer" if cast and 2 * sum(cast) > len(cast) else "aligned"


def record_targets(tokenizer, ids: list[int], labels: list[int], logprobs: list[dict[str, Any]] | None, top_k: int,
                   cache: dict, method: str = "same_tokenizer", final_kept: bool = True) -> Targets:
    """Sparse targets for one tokenized example. ``method`` 'same_tokenizer': the id path when the logs are in the
    student's tokens, else byte-offset alignment; 'aligned': byte-offset alignment always (see
    ``choose_method``). ``final_kept`` False: truncation cut the final answer away, so the last labelled turn is
    an earlier one and gets nothing. Assistant tokens outside the final turn are counted too."""
    start, end = final_turn(labels)
    earlier = sum(x != IGNORE for x in labels[:start])
    if not logprobs:
        out = Targets([[] for _ in ids], [[] for _ in ids], reason=NO_LOGPROBS)
        out.tokens[NO_LOGPROBS] += end - start
    elif not final_kept:
        out = Targets([[] for _ in ids], [[] for _ in ids], reason=CUT_AWAY)
        earlier += end - start
    else:
        t_ids, t_lps, why = (same_tokenizer_targets(tokenizer, ids, labels, logprobs, top_k, cache)
                             if method == "same_tokenizer" else ([], [], method))
        if why is None:
            out = Targets(t_ids, t_lps, method="same_tokenizer")
            table = student_bytes(tokenizer)
            for p in range(start, end):
                out.tokens[SOFT if t_ids[p] else END_OF_TURN if table[ids[p]] is None else BEYOND] += 1
        else:
            out = aligned_targets(tokenizer, ids, labels, logprobs, top_k, cache)
    if earlier:
        out.tokens[EARLIER_TURN] += earlier
    return out
