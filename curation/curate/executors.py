"""Where the per-record half of the chain runs: in this process, on all local cores with `datasets`, or on Ray
Data. Each executor yields ``curation.curate.chain.map_batch``'s output batches in input order, so the stage writes
the same files whichever ran. The global half (dedup, decontamination, balance) then runs in the stage's process on
the compact columns the map half added.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.curate.chain import map_batch, output_schema
from curation.curate.columns import conform, lists_to_maps, maps_to_lists
from curation.curate.filters import Plan
from pipeline.config.curate import Executor

KINDS = ("inprocess", "datasets", "ray")


def choose(cfg: Executor, n_records: int) -> str:
    """The executor a run uses: the recipe's, or for 'auto' datasets on big inputs with several cores."""
    if cfg.kind != "auto":
        return cfg.kind
    cores = cfg.num_proc or os.cpu_count() or 1
    return "datasets" if n_records >= cfg.auto_min_records and cores > 1 else "inprocess"


def count_rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def run_map(kind: str, files: list[Path], schema: pa.Schema, plan: Plan, cfg: Executor, tmp: Path,
            advance: Callable[[int], None] = lambda n: None) -> Iterator[pa.Table]:
    """map_batch over every record of the files, in order, on the chosen executor."""
    if not files:
        return iter(())
    if kind == "inprocess":
        return _inprocess(files, schema, plan, cfg, advance)
    if kind == "datasets":
        return _datasets(files, schema, plan, cfg, tmp, advance)
    if kind == "ray":
        return _ray(files, schema, plan, cfg, advance)
    raise ValueError(f"unknown executor {kind!r}; use one of {', '.join(KINDS)}")


def _batches(files: list[Path], schema: pa.Schema, batch_size: int) -> Iterator[pa.Table]:
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            yield conform(pa.Table.from_batches([b]), schema)


def _inprocess(files, schema, plan, cfg, advance) -> Iterator[pa.Table]:
    for t in _batches(files, schema, cfg.batch_size):
        out = map_batch(t, plan, schema)
        advance(t.num_rows)
        yield out


# --- datasets: Dataset.map over Arrow batches on num_proc processes ----------------------------------------------

def _datasets_fn(batch: pa.Table, plan: Plan, schema: pa.Schema) -> pa.Table:
    return maps_to_lists(map_batch(lists_to_maps(batch, schema), plan, schema))


def _datasets(files, schema, plan, cfg, tmp: Path, advance) -> Iterator[pa.Table]:
    import datasets

    from curation.curate.pii import detector

    detector(plan.cfg.pii)  # build presidio's recognizers once; forked workers inherit them
    src = tmp / "datasets-input.arrow"
    with pa.OSFile(str(src), "wb") as sink:
        writer = None
        for t in _batches(files, schema, cfg.batch_size):
            t = maps_to_lists(t)
            if writer is None:
                writer = pa.ipc.new_stream(sink, t.schema)
            writer.write_table(t)
        writer.close()
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_file(str(src))
        out_schema = maps_to_lists(output_schema(schema).empty_table()).schema
        features = datasets.Features.from_arrow_schema(out_schema)
        nproc = min(cfg.num_proc or os.cpu_count() or 1, max(1, ds.num_rows // 256))
        out = ds.with_format("arrow").map(
            _datasets_fn, fn_kwargs={"plan": plan, "schema": schema}, batched=True, batch_size=cfg.batch_size,
            num_proc=nproc if nproc > 1 else None, features=features, load_from_cache_file=False,
            cache_file_name=str(tmp / "datasets-map.arrow"), desc="curate", new_fingerprint="curate-map",
        )
        target = output_schema(schema)
        # Stream the cache files the workers wrote (in shard order) with plain reads rather than through the
        # dataset's memory map, so the resident memory of this process does not grow with the data.
        for cache in out.cache_files:
            with pa.OSFile(cache["filename"]) as f:
                for batch in pa.ipc.open_stream(f):
                    t = lists_to_maps(pa.Table.from_batches([batch]), target)
                    advance(t.num_rows)
                    yield t
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# --- Ray Data: map_batches on a local or remote Ray cluster --------------------------------------------------------

def _ray_fn(batch: pa.Table, plan: Plan, schema: pa.Schema) -> pa.Table:
    return map_batch(batch, plan, schema)


def _ray(files, schema, plan, cfg, advance) -> Iterator[pa.Table]:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(
            "curate.executor.kind 'ray' needs the 'ray' extra: pip install -c constraints.txt -e '.[ray]'"
        ) from None
    import logging

    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.WARNING)
    started = False
    if not ray.is_initialized():
        kwargs = {"address": cfg.ray_address} if cfg.ray_address else {"num_cpus": cfg.num_proc or os.cpu_count()}
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kwargs)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ds = ray.data.read_parquet([str(f) for f in files], schema=schema)
        out = ds.map_batches(_ray_fn, fn_kwargs={"plan": plan, "schema": schema}, batch_format="pyarrow",
                             batch_size=cfg.batch_size, zero_copy_batch=True)
        target = output_schema(schema)
        for t in out.iter_batches(batch_format="pyarrow", batch_size=None):
            t = t if isinstance(t, pa.Table) else pa.Table.from_batches([t])
            t = conform(t, target)
            advance(t.num_rows)
            yield t
    finally:
        data_logger.setLevel(level)
        if started:
            ray.shutdown()
