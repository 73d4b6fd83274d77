"""Property tests for the lenient and document reading paths (issue 13): lines with a byte order mark or raw control
characters, and ``.json`` files read as whole documents, still account for every row: rows in = rows with records +
rows quarantined, and every record fits the canonical schema."""

import json

import pyarrow.parquet as pq
from hypothesis import assume, given
from hypothesis import strategies as st
from test_import_properties import CONFIGS, NOW, SAMPLES, SETTINGS, json_values, mutated

from curation.harvest.chunks import Chunk, convert
from curation.harvest.importers.common import BOM, BadRecord, loads_fallback
from curation.harvest.importers.formats import IMPORTERS
from curation.harvest.sources import json_rows

controls = st.sampled_from(["\t", "\x01", "\x1f", "\r", "\x00", "\x0b"])


@st.composite
def damaged(draw, fmt):
    """A valid or mutated row as JSON text, with raw control characters put somewhere and maybe a BOM in front."""
    text = json.dumps(draw(st.one_of(st.sampled_from(SAMPLES[fmt]), mutated(fmt))))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(controls) + text[i:]
    raw = text.encode()
    return BOM + raw if draw(st.booleans()) else raw


def _accounts(res, rows: int, out) -> None:
    assert res.lines == rows
    assert res.quarantined == len(res.quarantine) and res.lines >= res.quarantined
    not_calls = sum(n for k, n in res.notes.items() if k.startswith("not_calls:"))  # whole rows of no teacher call
    assert res.records == res.lines - res.quarantined - not_calls + res.extra_choices
    assert res.notes["lenient_json"] <= res.lines - res.quarantined
    if res.records:
        assert pq.read_table(out).num_rows == res.records
    else:
        assert not out.exists()


@SETTINGS
@given(st.sampled_from(sorted(IMPORTERS)), st.data())
def test_lines_with_boms_and_control_characters_account_for_every_line(tmp_path_factory, fmt, data):
    lines = data.draw(st.lists(damaged(fmt), min_size=1, max_size=10))
    blob = b"\n".join(x.replace(b"\n", b" ") for x in lines) + b"\n"
    out = tmp_path_factory.mktemp("chunk") / "part.parquet"
    res = convert(Chunk(CONFIGS[fmt], "f.jsonl", "f.jsonl", blob, 1, NOW, str(out)))
    _accounts(res, sum(1 for x in blob.split(b"\n") if x.strip()), out)


@SETTINGS
@given(st.sampled_from(sorted(IMPORTERS)), st.data())
def test_json_documents_account_for_every_row(tmp_path_factory, fmt, data):
    rows = data.draw(st.lists(st.one_of(st.sampled_from(SAMPLES[fmt]), mutated(fmt), json_values), max_size=8))
    shape = data.draw(st.sampled_from(["array", "object", "lines", "damaged"]))
    try:
        json.dumps(rows, allow_nan=False)
    except ValueError:
        assume(False)  # Infinity is not JSON: such a document is rightly read as (bad) lines
    if shape == "array":
        blob = json.dumps(rows, indent=data.draw(st.sampled_from([None, 1, 2]))).encode()
    elif shape == "object":
        rows = [rows[0]] if rows and isinstance(rows[0], dict) else [{}]
        blob = json.dumps(rows[0], indent=2).encode()
    elif shape == "lines":
        blob = b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"
    else:
        blob = b"\n".join(data.draw(st.lists(damaged(fmt), max_size=6)))
    numbers, parsed = json_rows(blob)
    assert len(numbers) == len(parsed)
    if shape in ("array", "object"):
        assert len(parsed) == len(rows)
    if not parsed:
        return
    out = tmp_path_factory.mktemp("doc") / "part.parquet"
    res = convert(Chunk(CONFIGS[fmt], "f.json", "f.json", parsed, numbers, NOW, str(out)))
    _accounts(res, len(parsed), out)


@SETTINGS
@given(st.binary(max_size=60), st.booleans())
def test_the_fallback_reads_or_gives_a_reason(raw, bom):
    raw = BOM + raw if bom else raw
    try:
        value, _ = loads_fallback(raw, ValueError("refused: line 1"))
    except BadRecord as err:
        assert str(err).startswith("invalid JSON: ")
    else:
        json.dumps(value)  # what it reads is plain JSON data
