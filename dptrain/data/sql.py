"""Tables from a database: ``data.source`` a SQLAlchemy URL, ``data.query`` the SELECT whose result is the table.

``load_sql_table(cfg)`` runs ``cfg.query`` with :func:`pandas.read_sql` through SQLAlchemy and hands the frame to
the CSV loader (:func:`~dptrain.data.tabular.load_tabular`), so labels, declared bounds and categories, missing
rules, sensitive attributes, the privacy unit, the split and the preprocessing record work unchanged.
``sql_identity(cfg)`` is the dataset identity (the key of its budget, see :mod:`dptrain.data.identity`).

Guarantees
----------
* Read-only: SQLite files are opened with ``mode=ro`` and ``PRAGMA query_only`` (no ATTACH), DuckDB files with
  ``read_only`` and no file-system access (no COPY TO, ATTACH or extension installs), PostgreSQL in a read-only
  transaction. A missing file is refused: no empty database is ever created.
* The identity is ``"sql-sha256:" + SHA-256`` of the query *result* (column names and every value, rows in any
  order), never of the URL: the same rows are the same dataset whatever the database, path or row order.
* Errors are one line (field, value, fix). A URL is shown with its password masked (recipes refuse passwords:
  :class:`~dptrain.config.DataConfig`). The database's message (first line) is shown for syntax, catalog and
  connection errors (they quote the query, table and column names), never for value errors (conversions, invalid
  input: they may quote a record), whose class alone is named.

Sharp edges
-----------
* The result is encoded as the database types it: SQLite has no booleans (a pandas ``True`` written with
  ``to_sql`` reads back as ``1``), so declare such a category as ``[1, 0]`` or store text ``True`` / ``False``.
* The database must hold the same rows on every run of a sweep (a changed extract is a new identity and a new
  split); declare ``data.id`` to keep one budget across extracts or queries of the same patients.
* Without ``data.privacy_unit`` the split is by row position: recipes must ``ORDER BY`` (checked on the text).
* The frame reaches :func:`~dptrain.data.tabular.load_tabular` as its ``frame`` argument.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pandas as pd

from dptrain.config import DataConfig
from dptrain.data.core import TabularData, _error, _few

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

EXTRA = "pip install 'dptrain[sql]'"
DRIVERS = {"sqlite": "Python's sqlite3", "duckdb": "duckdb and duckdb-engine", "postgresql": "psycopg or psycopg2"}
# DuckDB errors whose message names only the query, tables, columns or files (an invalid-input or conversion
# error may quote a value of a record)
_DUCKDB_SHOWN = {"ParserException", "CatalogException", "BinderException", "PermissionException", "IOException",
                 "ConnectionException", "NotImplementedException"}
_DIGESTS: dict[tuple[str, str], str] = {}  # (source, query) -> digest of the last result read in this process


def is_sql_source(cfg: DataConfig) -> bool:
    """True when ``cfg.source`` is a database URL (read with ``cfg.query``)."""
    return DataConfig.is_database_url(cfg.source)


def _shown(cfg: DataConfig) -> str:
    return repr(DataConfig.masked_url(cfg.source))


def _one_line(text: str) -> str:
    """The first non-empty line of a database message, passwords masked, at most 300 characters."""
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "no message")
    line = DataConfig.masked_url(line)
    return line if len(line) <= 300 else line[:297] + "..."


def _database_file(cfg: DataConfig, url: Any) -> Path:
    """The existing database file of a SQLite / DuckDB URL; refuses an in-memory or missing database."""
    name = url.database or ""
    if name in ("", ":memory:"):
        raise _error("data.source", f"{_shown(cfg)} names no database file", f"give the file: "
                     f"{url.get_backend_name()}:///relative/path.db or {url.get_backend_name()}:////absolute/path.db")
    path = Path(name).expanduser()
    if not path.is_file():
        problem = "is a directory, not a database file" if path.is_dir() else "has no file"
        raise _error("data.source", f"{_shown(cfg)} {problem} (at {str(path)!r})",
                     "check the path (three slashes: relative to the working directory, four: absolute); "
                     "dptrain opens databases read-only and never creates one")
    return path.resolve()


def _engine(cfg: DataConfig) -> tuple[Engine, dict[str, Any]]:
    """A read-only SQLAlchemy engine for ``cfg.source`` and the connection's execution options."""
    try:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool
    except ImportError:
        raise _error("data.source", f"reading the database {_shown(cfg)} needs SQLAlchemy, which is not installed",
                     EXTRA) from None
    try:
        url = sa.engine.make_url(cfg.source)
    except Exception:  # noqa: BLE001 - a malformed URL: its text may hold anything, never echo the parser
        raise _error("data.source", f"{_shown(cfg)} is not a valid database URL",
                     "write sqlite:///PATH, duckdb:///PATH or postgresql://USER@HOST:PORT/DB") from None
    kind = url.get_backend_name()
    if kind == "sqlite":
        path = _database_file(cfg, url)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, check_same_thread=False)
            if hasattr(conn, "setlimit"):  # Python 3.11+: no ATTACH (query_only blocks writes anyway)
                conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            conn.execute("PRAGMA query_only = ON")
            return conn

        return sa.create_engine("sqlite://", creator=connect, poolclass=NullPool), {}
    try:
        if kind == "duckdb":
            path = _database_file(cfg, url)
            return sa.create_engine(url.set(database=str(path)), poolclass=NullPool, connect_args={
                "read_only": True, "config": {"enable_external_access": False}}), {}
        return sa.create_engine(url, poolclass=NullPool), {"postgresql_readonly": True}
    except ImportError as err:
        fix = EXTRA if kind == "duckdb" else "pip install 'psycopg[binary]' (or psycopg2-binary for postgresql+psycopg2://)"
        raise _error("data.source", f"{_shown(cfg)} needs the {kind} driver ({DRIVERS.get(kind, kind)}; "
                     f"{type(err).__name__}: {_one_line(err)})", fix) from None
    except sa.exc.NoSuchModuleError:
        raise _error("data.source", f"{_shown(cfg)}: no SQLAlchemy driver for {url.drivername!r} is installed",
                     EXTRA if kind == "duckdb" else "use postgresql:// with psycopg installed") from None


def _query_error(cfg: DataConfig, exc: BaseException) -> Exception:
    """One line for a failed query: the database's message, unless it may quote a record."""
    import sqlalchemy as sa

    if isinstance(exc, sa.exc.ResourceClosedError):
        return _error("data.query", "the statement returns no table", "give a SELECT query")
    orig = getattr(exc, "orig", None) or exc
    duckdb_hidden = type(orig).__module__.lstrip("_").startswith("duckdb") and type(orig).__name__ not in _DUCKDB_SHOWN
    if (isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError) or not isinstance(exc, sa.exc.DBAPIError)
            or duckdb_hidden):
        said = f"{type(orig).__name__}; the database's message is not shown, as it may quote the data"
    else:
        said = f"{type(orig).__name__}: {_one_line(orig)}"
    return _error("data.query", f"the database {_shown(cfg)} refused the query ({said})",
                  "check the query against the database (run it in its own client first)")


def read_query(cfg: DataConfig) -> pd.DataFrame:
    """The result of ``cfg.query`` on ``cfg.source``, read-only, as a DataFrame (SQL NULL -> missing).

    Refuses (:class:`DataError`, one line): no driver, a missing database file, a failed query, a result
    without records, duplicate column names. Records the result's digest for :func:`sql_identity`."""
    import sqlalchemy as sa

    engine, options = _engine(cfg)
    try:
        with engine.connect() as conn:
            # no_parameters: the query goes to the driver as written ('%' is no placeholder, ':x' no bind)
            frame = pd.read_sql(cfg.query, conn.execution_options(no_parameters=True, **options))
    except sa.exc.SQLAlchemyError as exc:
        raise _query_error(cfg, exc) from None
    except Exception as exc:  # noqa: BLE001 - a driver's own exception type: its message is not shown
        raise _query_error(cfg, exc) from None
    finally:
        engine.dispose()
    names = [str(c) for c in frame.columns]
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise _error("data.query", f"the result has duplicate column names {_few(dup)}",
                     "give every selected column a unique name (SELECT a.x AS x_a, b.x AS x_b ...)")
    if len(frame) == 0:
        raise _error("data.query", f"the query on {_shown(cfg)} returned no records",
                     "check the query (its table and WHERE clause) against the database")
    frame.columns = names
    _DIGESTS[(cfg.source, str(cfg.query))] = content_digest(frame)
    return frame


def content_digest(frame: pd.DataFrame) -> str:
    """SHA-256 (hex) of a table's content: the sorted column names, then the rows, each written as its values
    (``str``; missing as NUL) in column-name order, sorted. Independent of row and column order."""
    cols = sorted(map(str, frame.columns))
    table = frame.set_axis(list(map(str, frame.columns)), axis=1)[cols]
    text = table.astype(str).where(table.notna(), "\x00")
    rows = text[cols[0]].str.cat([text[c] for c in cols[1:]], sep="\x1f") if cols else pd.Series([], dtype=str)
    digest = hashlib.sha256(json.dumps(cols).encode())
    for row in sorted(rows.tolist()):
        digest.update(row.encode("utf-8", "surrogatepass") + b"\x1e")
    return digest.hexdigest()


def sql_identity(cfg: DataConfig) -> str:
    """``"sql-sha256:" + content_digest`` of the query result: the one this process last read for
    (source, query) -- the data the run trained on -- or a fresh read."""
    key = (cfg.source, str(cfg.query))
    if key not in _DIGESTS:
        read_query(cfg)
    return "sql-sha256:" + _DIGESTS[key]


def load_sql_table(cfg: DataConfig, *, seed: int | None = None) -> TabularData:
    """Read ``cfg.query`` (:func:`read_query`) and encode, validate and split it exactly as the CSV loader does;
    ``preprocessing`` adds the query and the reader."""
    import dptrain.data.tabular as tabular

    data = tabular.load_tabular(cfg, seed=seed, frame=read_query(cfg))
    data.preprocessing.update(query=cfg.query, reader="pandas.read_sql through SQLAlchemy, read-only")
    return data


__all__ = ["content_digest", "is_sql_source", "load_sql_table", "read_query", "sql_identity"]
