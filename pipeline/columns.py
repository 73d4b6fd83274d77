"""Arrow helpers for tables of canonical records that both harvest and curate need (harvest redacts PII with
``pipeline.pii``; curate's operators use these through ``curation.curate.columns``): read a column or a struct
child, flatten the messages, and rebuild the columns an operator rewrote, without turning rows into dicts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def column(table: pa.Table, name: str) -> pa.Array:
    """One column as a single contiguous array."""
    return table.column(name).combine_chunks()


def field(struct: pa.Array, name: str) -> pa.Array:
    """A struct child that is null wherever the struct is null."""
    return pc.struct_field(struct, name)


def messages_flat(table: pa.Table) -> tuple[pa.Array, np.ndarray, pa.Array]:
    """(flattened messages, the row of each message, list offsets as int32 starting at 0)."""
    msgs = column(table, "messages")
    lengths = pc.fill_null(pc.list_value_length(msgs), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    offsets = np.zeros(len(msgs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = msgs.flatten()
    rows = np.repeat(np.arange(len(msgs), dtype=np.int64), lengths)
    return flat, rows, pa.array(offsets, pa.int32())


def rebuild_message_list(table: pa.Table, children: dict[str, pa.Array]) -> pa.Array:
    """The messages column with some children of the flattened message structs replaced."""
    msgs = column(table, "messages")
    flat, _, offsets = messages_flat(table)
    struct_type = msgs.type.value_type
    arrays = [children.get(f.name, field(flat, f.name)) for f in struct_type]
    values = pa.StructArray.from_arrays(arrays, fields=list(struct_type), mask=flat.is_null())
    return pa.ListArray.from_arrays(offsets, values, mask=msgs.is_null(), type=msgs.type)


def rebuild_struct(table: pa.Table, name: str, children: dict[str, pa.Array]) -> pa.Array:
    """A struct column with some children replaced."""
    struct = column(table, name)
    arrays = [children.get(f.name, field(struct, f.name)) for f in struct.type]
    return pa.StructArray.from_arrays(arrays, fields=list(struct.type), mask=struct.is_null())


def set_column(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), array.cast(table.schema.field(i).type))


def add_tags(table: pa.Table, updates: dict[int, dict[str, str]]) -> pa.Table:
    """Set tags (key -> value) on some rows."""
    if not updates or "tags" not in table.column_names:
        return table
    tags = column(table, "tags")
    rows: list[Any] = tags.to_pylist()
    for i, kv in updates.items():
        current = dict(rows[i] or [])
        current.update(kv)
        rows[i] = list(current.items())
    return set_column(table, "tags", pa.array(rows, type=tags.type))


def map_entries(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(flattened key/value structs, entries per row) of a map array (slicing-safe)."""
    lt = pa.list_(pa.struct([("key", arr.type.key_type), ("value", arr.type.item_type)]))
    as_list = arr.cast(lt)
    lengths = pc.fill_null(pc.list_value_length(as_list), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    return as_list.flatten(), lengths


def map_value(table: pa.Table, name: str, key: str) -> pa.Array:
    """The value of one key of a map column per row (null where absent)."""
    arr = column(table, name)
    return pc.map_lookup(arr, pa.scalar(key, arr.type.key_type), "first")
