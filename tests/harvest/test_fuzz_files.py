"""Harvest under generated damaged files: several hundred log files made from well-formed rows and then broken
(truncated or corrupted gzip, bzip2 and xz streams, a zstd file, random bytes, byte order marks, lines in other
encodings, NUL bytes, huge and torn lines, broken Parquet), all read by one real `distill harvest` process. It
must finish (no traceback, no hang, bounded memory) and account for every line of every file: a record, a
quarantine line naming the file and line, or one 'file damaged' entry naming the file and the line it stopped at."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from harvest_helpers import in_tmp, openai_row, write_recipe  # noqa: F401

N_FILES = 360
SEED = 14
ROOT = Path(__file__).resolve().parents[2]


def _lines(rng: random.Random, f: int, n: int) -> list[bytes]:
    """n well-formed log lines with ids unique to file f (so no record is a duplicate of another)."""
    return [json.dumps(openai_row(0, id=f"f{f}_{i}", ts=f"2026-11-23T10:{i % 60:02d}:00Z")).encode()
            for i in range(n)]


def _corrupt(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        data[i] = rng.randrange(256)
    return bytes(data)


def _damage_text(rng: random.Random, lines: list[bytes]) -> bytes:
    """A plain JSON-lines file with some lines made hostile."""
    lines = list(lines)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        kind = rng.randrange(9)
        if kind == 0:
            lines[i] = b"\xef\xbb\xbf" + lines[i]  # a byte order mark
        elif kind == 1:
            lines[i] = lines[i].decode().replace("Question", "Quéstion").encode("latin-1")  # another encoding
        elif kind == 2:
            lines[i] = lines[i].decode().encode("utf-16")
        elif kind == 3:
            lines[i] = lines[i][: rng.randrange(1, len(lines[i]))]  # torn
        elif kind == 4:
            lines[i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))  # random bytes
        elif kind == 5:
            lines[i] = lines[i].replace(b"Answer", b"Ans\x00wer")
        elif kind == 6:
            lines[i] = lines[i].replace(b'"Question', b'"' + b"Q" * rng.choice([100_000, 3_000_000]))  # huge line
        elif kind == 7:
            lines[i] = lines[i] + b"\r"  # CRLF
        else:
            lines[i] = b"[1, 2, 3]"  # JSON, but not an object
    return b"\n".join(lines) + (b"\n" if rng.random() < 0.8 else b"")


def readable_lines(gz: bytes) -> int:
    """How many whole lines the readable prefix of a truncated gzip stream holds (what a decoder can give)."""
    return zlib.decompressobj(wbits=31).decompress(gz).count(b"\n")


def make_files(folder: Path, n: int = N_FILES, seed: int = SEED) -> tuple[dict[str, int], dict[str, int]]:
    """Write n damaged files; returns {file name: lines it holds when read whole} for the plain ones, and
    {file name: whole lines before the cut} for the truncated gzip ones."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    plain: dict[str, int] = {}
    prefix: dict[str, int] = {}
    for f in range(n):
        lines = _lines(rng, f, rng.randint(1, 12))
        kind = rng.randrange(10)
        if kind <= 2:  # plain JSON lines, hostile lines inside
            data = _damage_text(rng, lines)
            name = f"f{f:04d}.jsonl"
            plain[name] = len(data.split(b"\n")) - (1 if data.endswith(b"\n") else 0)
        elif kind == 3:
            whole = gzip.compress(b"\n".join(lines) + b"\n")
            data, name = whole[: rng.randrange(len(whole))], f"f{f:04d}.jsonl.gz"  # truncated gzip
            prefix[name] = readable_lines(data)
        elif kind == 4:
            data, name = _corrupt(rng, gzip.compress(b"\n".join(lines) + b"\n")), f"f{f:04d}.jsonl.gz"
        elif kind == 5:
            comp = rng.choice([(bz2.compress, "bz2"), (lzma.compress, "xz")])
            whole = comp[0](b"\n".join(lines) + b"\n")
            data = whole[: rng.randrange(len(whole))] if rng.random() < 0.5 else _corrupt(rng, whole)
            name = f"f{f:04d}.jsonl.{comp[1]}"
        elif kind == 6:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000)))
            name = f"f{f:04d}.{rng.choice(['jsonl', 'jsonl.gz', 'jsonl.bz2', 'jsonl.xz', 'parquet', 'json'])}"
        elif kind == 7:
            buf = pa.BufferOutputStream()
            pq.write_table(pa.table({"x": [1, 2]}), buf)
            raw = buf.getvalue().to_pybytes()
            data, name = raw[: rng.randrange(len(raw))], f"f{f:04d}.parquet"  # broken Parquet
        elif kind == 8:
            data, name = gzip.compress(b"\xef\xbb\xbf" + b"\n".join(lines)), f"f{f:04d}.jsonl.gz"  # BOM, no last \n
        else:
            data, name = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n", f"f{f:04d}.jsonl"
            plain[name] = len(lines)
        (folder / name).write_bytes(data)
    (folder / "z.jsonl.zst").write_bytes(b"(\xb5/\xfd" + bytes(40))  # zstd magic, then garbage
    return plain, prefix


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-files")
    plain, prefix = make_files(root / "logs")
    recipe = write_recipe(root, {"sources": [{"path": "logs/*", "name": "fuzz"}], "workers": 1})
    t0 = time.perf_counter()
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would count the pytest process this one was forked from
    code = ("import re, sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "harvest", str(recipe)], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    return root, (plain, prefix), proc, time.perf_counter() - t0


def test_harvest_finishes_without_traceback_in_bounded_memory(fuzzed):
    root, _, proc, seconds = fuzzed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    rss_mib = int(re.search(r"MAXRSS (\d+)", proc.stdout).group(1)) / 1024
    assert rss_mib < 1500, rss_mib  # the 3 MB lines included
    assert seconds < 90


def test_every_line_of_every_file_is_accounted_for(fuzzed):
    root, (plain, _), _, _ = fuzzed
    run = root / "runs" / "t" / "harvest"
    m = json.loads((run / "manifest.json").read_text())["counts"]
    assert m["lines"] == m["records"] + m["quarantined"] + m["skipped_old"] + m["duplicates"] - m["extra_choices"]
    quarantine = [json.loads(x) for x in (run / "quarantine.jsonl").read_text().splitlines()]
    for q in quarantine:  # each names its file and line, with a reason that is not a traceback
        assert q["file"].rsplit("/", 1)[-1] in {p.name for p in (root / "logs").iterdir()}, q
        assert isinstance(q["line"], int) and q["line"] >= 1 and q["reason"] and "Traceback" not in q["reason"], q
    records = [r for f in run.glob("records-*.parquet") for r in pq.read_table(f, columns=["source"]).to_pylist()]
    seen: dict[str, set[int]] = {}
    for r in records:
        name, line = r["source"].rsplit(":", 1)
        seen.setdefault(name, set()).add(int(line))
    for q in quarantine:
        seen.setdefault(q["file"].rsplit("/", 1)[-1], set()).add(q["line"])
    damaged = {q["file"].rsplit("/", 1)[-1] for q in quarantine if q["reason"].startswith("file damaged")}
    for h in m["held_back_partial_line"]:  # a plain file's last line without a newline waits for the next night
        name = h["file"].rsplit("/", 1)[-1]
        data = (root / "logs" / name).read_bytes()
        seen.setdefault(name, set()).add(data.count(b"\n") + 1)
        assert not data.endswith(b"\n") and h["bytes"] > 0
    logs = sorted(p.name for p in (root / "logs").iterdir())
    assert all(name in seen for name in logs), [n for n in logs if n not in seen]  # no file silently skipped
    for name, n in plain.items():  # a plain file: every non-blank line, one by one
        if name not in damaged:
            blank = {i + 1 for i, x in enumerate((root / "logs" / name).read_bytes().split(b"\n")) if not x.strip()}
            assert seen[name] | blank >= set(range(1, n + 1)), (name, sorted(set(range(1, n + 1)) - seen[name]))


def test_clear_reasons_for_encodings_and_compression(fuzzed):
    root, _, _, _ = fuzzed
    reasons = [json.loads(x)["reason"] for x in (root / "runs/t/harvest/quarantine.jsonl").read_text().splitlines()]
    joined = "\n".join(reasons)
    assert "file damaged" in joined and "z.jsonl.zst" in (root / "runs/t/harvest/quarantine.jsonl").read_text()
    assert all(len(r) < 600 for r in reasons)


def test_the_readable_prefix_of_a_truncated_gzip_is_harvested(fuzzed):
    """A truncated .gz is not just one 'file damaged' entry: every whole line before the cut is a record."""
    root, (_, prefix), _, _ = fuzzed
    run = root / "runs" / "t" / "harvest"
    got: dict[str, set[int]] = {}
    for f in run.glob("records-*.parquet"):
        for r in pq.read_table(f, columns=["source"]).to_pylist():
            name, line = r["source"].rsplit(":", 1)
            got.setdefault(name, set()).add(int(line))
    assert sum(prefix.values()) >= 20, prefix  # enough truncated files with whole lines to mean something
    missing = {name: n for name, n in prefix.items() if not got.get(name, set()) >= set(range(1, n + 1))}
    assert missing == {}, missing
