"""Rows from a SQL table or query through SQLAlchemy (SQLite built in; PostgreSQL with the 'postgres' extra).

With a ``timestamp_column`` the watermark goes into the SQL (``WHERE ts >= :watermark ORDER BY ts``), so a nightly
run reads only new rows; the rows at exactly the watermark are read again and dropped by id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from curation.harvest.sources import MissingExtra
from pipeline.config.harvest import SQLLocation


class SourceError(ValueError):
    """A database source cannot be read (the message says which and why)."""


def _url(loc: SQLLocation) -> str:
    if loc.url is not None:
        return loc.url
    assert loc.url_env is not None
    url = os.environ.get(loc.url_env)
    if not url:
        raise ValueError(f"sql.url_env names the environment variable {loc.url_env}, which is not set; set it to "
                         "the database URL (e.g. postgresql+psycopg://user:password@host/db)")
    return url


def engine(loc: SQLLocation):
    """A SQLAlchemy engine for the location; a missing driver names the extra to install."""
    import sqlalchemy as sa

    url = _url(loc)
    try:
        return sa.create_engine(url)
    except ModuleNotFoundError as err:
        extra = "postgres" if url.startswith("postgres") else None
        hint = f"install the '{extra}' extra: pip install -c constraints.txt -e '.[{extra}]'" if extra else \
            "install the database driver SQLAlchemy names"
        raise MissingExtra(f"the database driver for {sa.engine.make_url(url).drivername} is missing ({err}); "
                          f"{hint}") from None
    except sa.exc.ArgumentError as err:
        raise ValueError(f"sql.url is not a SQLAlchemy URL: {err}") from None


def label(loc: SQLLocation) -> str:
    """How the rows' origin is named in records and quarantine lines ("<table>:<row>")."""
    return loc.table or "query"


def _base(loc: SQLLocation, quote) -> str:
    if loc.table is not None:
        return ".".join(quote(p) for p in loc.table.split("."))
    assert loc.query is not None
    return f"({loc.query.strip().rstrip(';')}) AS distill_q"


def _plain(v: Any) -> Any:
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, memoryview):
        return bytes(v)
    return v


def encode_watermark(v: Any) -> Any:
    """A timestamp column's value in JSON, keeping its type for the next query."""
    if isinstance(v, datetime):
        return {"datetime": v.isoformat()}
    if isinstance(v, date):
        return {"date": v.isoformat()}
    return _plain(v)


def decode_watermark(v: Any) -> Any:
    if isinstance(v, dict) and "datetime" in v:
        return datetime.fromisoformat(v["datetime"])
    if isinstance(v, dict) and "date" in v:
        return date.fromisoformat(v["date"])
    return v


def read_rows(loc: SQLLocation, since: Any = None, batch_rows: int = 10_000
              ) -> Iterator[tuple[list[int], list[dict[str, Any]], Any]]:
    """(row numbers, rows, max timestamp column value so far) in batches; only rows at or after ``since``."""
    import sqlalchemy as sa

    eng = engine(loc)
    try:
        q = eng.dialect.identifier_preparer.quote
        sql = f"SELECT * FROM {_base(loc, q)}"
        params: dict[str, Any] = {}
        if loc.timestamp_column:
            col = q(loc.timestamp_column)
            if since is not None:
                sql += f" WHERE {col} >= :watermark"
                params["watermark"] = decode_watermark(since)
            sql += f" ORDER BY {col}"
        row = 1
        top = None
        with eng.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=batch_rows).execute(sa.text(sql), params)
            for part in result.mappings().partitions(batch_rows):
                rows = [{k: _plain(v) for k, v in r.items()} for r in part]
                if loc.timestamp_column:
                    vals = [r.get(loc.timestamp_column) for r in rows if r.get(loc.timestamp_column) is not None]
                    if vals:
                        m = max(vals)
                        top = m if top is None or m > top else top
                yield list(range(row, row + len(rows))), rows, top
                row += len(rows)
    except sa.exc.SQLAlchemyError as err:
        raise SourceError(f"reading {label(loc)} from the database failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0]}") from None
    finally:
        eng.dispose()


def probe(loc: SQLLocation) -> str:
    """A cheap summary that changes when rows arrive: count and max of the timestamp column."""
    import sqlalchemy as sa

    eng = engine(loc)
    try:
        q = eng.dialect.identifier_preparer.quote
        top = f"MAX({q(loc.timestamp_column)})" if loc.timestamp_column else "NULL"
        with eng.connect() as conn:
            n, m = conn.execute(sa.text(f"SELECT COUNT(*), {top} FROM {_base(loc, q)}")).one()
        return f"{n}:{m}"
    except sa.exc.SQLAlchemyError as err:
        raise SourceError(f"harvest.sources: cannot reach {label(loc)} in the database ({type(err).__name__}: "
                          f"{str(err).splitlines()[0]}); check sql.url / sql.url_env and that the server is up") from None
    finally:
        eng.dispose()
