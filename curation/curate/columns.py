"""Arrow helpers for batches of canonical records: the texts operators read, and rebuilding the columns they
rewrite, without turning rows into Python dicts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import (  # noqa: F401  (shared with harvest's redaction; curate's callers import them here)
    add_tags,
    column,
    field,
    map_entries,
    map_value,
    messages_flat,
    rebuild_message_list,
    rebuild_struct,
    set_column,
)


def join_by_row(values: pa.Array, rows: np.ndarray, n: int, sep: str = "\n") -> pa.Array:
    """Strings grouped by row (rows sorted ascending) and joined with sep; rows without any give ''."""
    counts = np.bincount(rows, minlength=n).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pc.fill_null(values, ""))
    return pc.binary_join(lists, sep)


def user_texts(table: pa.Table) -> pa.Array:
    """The user turns of each record joined with newlines (what dedup, splits and the language filter read)."""
    flat, rows, _ = messages_flat(table)
    is_user = pc.fill_null(pc.equal(field(flat, "role"), "user"), False)
    return join_by_row(pc.filter(field(flat, "content"), is_user), rows[is_user.to_numpy(zero_copy_only=False)],
                       table.num_rows)


SYSTEM_ROLES = ("system", "developer")


def prompt_parts(table: pa.Table) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Per record, joined with newlines: (its user turns; its system and developer turns; the turns after the
    system prompt: user turns, earlier answers, the tool calls made (name and arguments, not their ids, which
    differ on every call) and the tools' results). The last is what dedup reads: the two steps of a tool loop
    share their user turns, not the tool's result; a record of user turns alone gives its user turns. One pass
    over the flattened messages."""
    flat, rows, _ = messages_flat(table)
    role = field(flat, "role")
    content = pc.fill_null(field(flat, "content"), "")
    is_user = pc.fill_null(pc.equal(role, "user"), False)
    is_system = pc.fill_null(pc.is_in(role, pa.array(SYSTEM_ROLES)), False)
    n = table.num_rows

    def joined(mask: pa.Array, values: pa.Array) -> pa.Array:
        return join_by_row(pc.filter(values, mask), rows[mask.to_numpy(zero_copy_only=False)], n)

    calls = field(flat, "tool_calls")
    spoken = content
    if calls.null_count < len(calls):  # a tool call's name and arguments after the message's text
        texts = content.to_pylist()
        for i in np.flatnonzero(pc.is_valid(calls).to_numpy(zero_copy_only=False)):
            raw = calls[int(i)].as_py()
            if raw:
                texts[i] = "\n".join(filter(None, [texts[i], *_call_texts(raw)]))
        spoken = pa.array(texts, pa.string())
    return joined(is_user, content), joined(is_system, content), joined(pc.invert(is_system), spoken)


def prompts_of(table: pa.Table, text: str = "text", prompt: str = "prompt") -> pa.Array:
    """The prompt texts of a reduce table (``prompt_parts``' last): ``prompt`` where set, else the user turns."""
    return pc.coalesce(table.column(prompt).combine_chunks(), table.column(text).combine_chunks())


def _call_texts(raw: str) -> list[str]:
    """'name(arguments)' per tool call of a message's tool_calls JSON (the raw text if it is not a list)."""
    try:
        calls = json.loads(raw)
    except (ValueError, RecursionError):
        return [raw]
    if not isinstance(calls, list):
        return [raw]
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        out.append(f"{fn.get('name')}({fn.get('arguments')})" if isinstance(fn, dict) else json.dumps(c))
    return out


def output_texts(table: pa.Table) -> pa.Array:
    """The teacher output's text per record ('' when there is none)."""
    return pc.fill_null(field(column(table, "output"), "content"), "")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table with exactly the schema's columns, in order: missing ones (older files) become nulls."""
    if table.schema == schema:
        return table
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    table = table.select(schema.names)
    return table if table.schema == schema else table.cast(schema)


def runs(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, stop, value) of each run of equal values in a boolean mask: slices instead of copies."""
    if len(mask) == 0:
        return []
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    starts = np.r_[0, edges]
    stops = np.r_[edges, len(mask)]
    return [(int(a), int(b), bool(mask[a])) for a, b in zip(starts, stops, strict=True)]


def codes(table: pa.Table, name: str) -> tuple[np.ndarray, list[Any]]:
    """(an integer code per row, -1 for null; the value of each code) of a column: cheaper than Python values."""
    enc = column(table, name).dictionary_encode()
    return pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False), enc.dictionary.to_pylist()


def equals(table: pa.Table, name: str, value: Any) -> np.ndarray:
    """Boolean mask of rows where a column equals a value (null: False)."""
    return pc.fill_null(pc.equal(column(table, name), value), False).to_numpy(zero_copy_only=False)


def pick(table: pa.Table, name: str, rows) -> list[Any]:
    """Python values of a column at some rows."""
    return table.column(name).take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()


# datasets has no Arrow map type: the datasets executor carries maps as lists of key/value structs (the same
# physical layout) and turns them back.

def maps_to_lists(table: pa.Table) -> pa.Table:
    for i, f in enumerate(table.schema):
        if pa.types.is_map(f.type):
            lt = pa.list_(pa.struct([("key", f.type.key_type), ("value", f.type.item_type)]))
            table = table.set_column(i, pa.field(f.name, lt), table.column(i).cast(lt))
    return table


def lists_to_maps(table: pa.Table, schema: pa.Schema) -> pa.Table:
    for i, f in enumerate(table.schema):
        target = schema.field(f.name).type if f.name in schema.names else None
        if target is not None and pa.types.is_map(target) and not pa.types.is_map(f.type):
            arr = table.column(i).combine_chunks()
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
            offsets = np.zeros(len(arr) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            flat = arr.flatten()
            mapped = pa.MapArray.from_arrays(pa.array(offsets, pa.int32()), field(flat, "key"), field(flat, "value"),
                                             type=target, mask=arr.is_null())
            table = table.set_column(i, pa.field(f.name, target), mapped)
    return table
