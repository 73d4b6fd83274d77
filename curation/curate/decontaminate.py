"""Decontamination: train and val records whose user turns share word n-grams with the test split, with an
external eval set or with the golden set (``evaluate.golden``) leave the training data (datatrove/open-instruct
style: user turns only, exact n-gram match).

Runs in the global half of the chain, after dedup, over the same compact table. Tokens are lower-cased words;
n-grams are hashed from dictionary-encoded token ids within one call, so the match relation does not depend on
hash values. A text shorter than n words counts as one n-gram of all its words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.curate import columns
from pipeline.config.curate import Decontamination

PRIME = np.uint64(1099511628211)  # words: over their bytes
NGRAM_PRIME = np.uint64(0x9E3779B97F4A7C15)  # n-grams: over their words' hashes
PUNCTUATION = ".,;:!?¡¿()[]{}<>\"'`´‘’“”«»#*/\\|-–—_~^&%$@+=…"
TEXT_FIELDS = ("prompt", "question", "input", "text", "query", "instruction")


CHUNK = 100_000  # texts whose n-grams are in memory at once


def word_hashes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(a 64-bit hash per word, the row of each word): words are lower-cased, split at whitespace and stripped of
    surrounding punctuation by Arrow. A word of up to 8 UTF-8 bytes is its bytes read as one integer (one strided
    read per word from the Arrow buffer); a longer one a polynomial over its bytes. Stable across calls, so chunks
    and nights compare alike."""
    words = pc.utf8_split_whitespace(pc.utf8_lower(pc.fill_null(texts, "")))
    rows = pc.list_parent_indices(words).to_numpy(zero_copy_only=False)
    flat = pc.utf8_trim(pc.list_flatten(words), characters=PUNCTUATION)
    keep = pc.greater(pc.binary_length(flat), 0)
    flat = flat.filter(keep).cast(pa.large_string())
    rows = rows[keep.to_numpy(zero_copy_only=False)]
    if len(flat) == 0:
        return np.zeros(0, dtype=np.uint64), rows
    raw = np.frombuffer(flat.buffers()[1], dtype=np.int64, count=len(flat) + 1, offset=flat.offset * 8)
    body = np.frombuffer(flat.buffers()[2], dtype=np.uint8)[raw[0]:raw[-1]]
    data = np.concatenate([body, np.zeros(8, dtype=np.uint8)])
    start, lens = raw[:-1] - raw[0], np.diff(raw)
    eight = np.ndarray(shape=(len(body),), dtype=">u8", buffer=data, strides=(1,))  # 8 bytes from any offset

    def part(pos: np.ndarray, n: np.ndarray) -> np.ndarray:  # the first n (1..8) bytes at pos, as an integer
        return eight[pos].astype(np.uint64) >> (np.uint64(8) * (np.uint64(8) - n.astype(np.uint64)))

    out = part(start, np.minimum(lens, 8))
    long = np.flatnonzero(lens > 8)  # longer words: their 8-byte parts folded in (up to 64 bytes), top bit set
    h = out[long]
    with np.errstate(over="ignore"):
        for k in range(1, 8):
            rest = lens[long] - 8 * k
            more = rest > 0
            if not more.any():
                break
            h[more] = h[more] * PRIME + part(start[long][more] + 8 * k, np.minimum(rest[more], 8))
    out[long] = h | np.uint64(1 << 63)
    return out, rows


def ngram_hashes(texts: list[str] | pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint64 n-gram hashes, row offsets) of lower-cased word n-grams; a text shorter than n words is one
    n-gram of all its words; texts without words have none."""
    texts = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
    ids, rows = word_hashes(texts)
    lens = np.bincount(rows, minlength=len(texts)).astype(np.int64)
    # rows laid out with n-1 zeros between them, so a window never reads the next row's words
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lens + n - 1, out=starts[1:])
    seq = np.zeros(int(starts[-1]) + n, dtype=np.uint64)
    seq[starts[:-1][rows] + (np.arange(len(ids)) - np.repeat(np.cumsum(lens) - lens, lens))] = ids
    counts = np.where(lens == 0, 0, np.maximum(lens - n + 1, 1))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    local = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], counts)
    pos = np.repeat(starts[:-1], counts) + local
    m = len(seq) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h *= NGRAM_PRIME
            h += seq[j: j + m]
    return h[pos], offsets


def golden_references(records: list[dict]) -> list[tuple[str, str]]:
    """(user turns, 'golden set <file>') of every golden record (``curation.harvest.golden.load_golden``): they
    count as contamination like the test split."""
    return [("\n".join(m["content"] or "" for m in r["messages"] if m["role"] == "user"),
             f"golden set {(r.get('tags') or {}).get('golden_file', '')}".rstrip()) for r in records]


def load_external(paths: list[str]) -> list[tuple[str, str]]:
    """(text, 'external eval set <file name>') for every prompt of the external eval sets."""
    out: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"curate.decontaminate.external: eval set {path} not found")
        name = f"external eval set {path.name}"
        if path.suffix == ".txt":
            out += [(line, name) for line in path.read_text().splitlines() if line.strip()]
            continue
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        elif path.suffix in (".jsonl", ".json"):
            rows = []
            for i, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(orjson.loads(line))
                except orjson.JSONDecodeError as err:
                    raise ValueError(f"curate.decontaminate.external: {path} line {i} is not JSON: {err}") from None
        else:
            raise ValueError(f"curate.decontaminate.external: {path} must be .jsonl, .parquet or .txt")
        for i, row in enumerate(rows, start=1):
            text = _row_text(row)
            if text is None:
                raise ValueError(f"curate.decontaminate.external: {path} row {i} has no 'messages' and none of the "
                                 f"fields {', '.join(TEXT_FIELDS)}")
            out.append((text, name))
    return out


def _row_text(row) -> str | None:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return None
    msgs = row.get("messages")
    if isinstance(msgs, list):
        return "\n".join(m.get("content") or "" for m in msgs if isinstance(m, dict) and m.get("role") == "user")
    for f in TEXT_FIELDS:
        if isinstance(row.get(f), str):
            return row[f]
    return None


def decontaminate(table: pa.Table, alive: np.ndarray, cfg: Decontamination,
                  external: list[tuple[str, str]]) -> dict[int, str]:
    """Train/val rows (alive) whose n-gram overlap with test rows (alive) or the external sets reaches
    min_overlap -> reason naming the test record or eval file. The reference n-grams are sorted once; train and
    val rows are checked in chunks, so memory stays bounded."""
    test = np.flatnonzero(alive & columns.equals(table, "split", "test"))
    targets = np.flatnonzero(alive & (columns.equals(table, "split", "train") | columns.equals(table, "split", "val")))
    if len(targets) == 0 or (len(test) == 0 and not external):
        return {}
    text = columns.column(table, "text")
    refs = pa.concat_arrays([text.take(pa.array(test)), pa.array([t for t, _ in external], pa.string())])
    ref_h, owner = [], []
    for s in range(0, len(refs), CHUNK):
        h, off = ngram_hashes(refs.slice(s, CHUNK), cfg.ngram)
        ref_h.append(h)
        owner.append(s + np.repeat(np.arange(len(off) - 1), np.diff(off)))
    ref_h, owner = np.concatenate(ref_h), np.concatenate(owner)
    if len(ref_h) == 0:
        return {}
    order = np.argsort(ref_h, kind="stable")
    ref_sorted, owner_sorted = ref_h[order], owner[order]
    out: dict[int, str] = {}
    for s in range(0, len(targets), CHUNK):
        chunk = targets[s:s + CHUNK]
        h, off = ngram_hashes(text.take(pa.array(chunk)), cfg.ngram)
        order = np.argsort(h)  # sorted queries make the binary searches cache-friendly (about 10x faster)
        pos = np.empty(len(h), dtype=np.int64)
        pos[order] = np.minimum(np.searchsorted(ref_sorted, h[order]), len(ref_sorted) - 1)
        hit = ref_sorted[pos] == h
        counts = np.diff(off)
        hits = np.bincount(np.repeat(np.arange(len(chunk)), counts), weights=hit, minlength=len(chunk))
        share = np.divide(hits, counts, out=np.zeros(len(chunk)), where=counts > 0)
        bad = np.flatnonzero((counts > 0) & (share >= cfg.min_overlap))
        owners = [int(owner_sorted[pos[int(off[k]) + int(np.argmax(hit[off[k]:off[k + 1]]))]]) for k in bad]
        test_ids = columns.pick(table, "id", [test[o] for o in owners if o < len(test)])
        names = iter(test_ids)
        for k, o in zip(bad, owners, strict=True):
            who = f"test record {next(names)}" if o < len(test) else external[o - len(test)][1]
            out[int(chunk[k])] = f"{int(hits[k])} of {int(counts[k])} {cfg.ngram}-grams of the user turns occur in {who}"
    return out
