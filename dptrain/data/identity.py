"""A dataset's identity: the key of its privacy budget (``accounting.reserve_run``).

``dataset_identity(cfg)`` is, in order of precedence:

* ``"id:" + data.id`` when the recipe declares ``data.id`` (trusted as given);
* ``data.source`` itself for a built-in (``"builtin:actg175"``);
* ``"sql-sha256:" + <digest of the query result>`` for a database (:func:`dptrain.data.sql.sql_identity`: the
  column names and rows, in any order; never the URL), the result this process last read for the query;
* ``"sha256:" + <hex digest of the source file's bytes>`` otherwise.

So a copy of the same file, at any path or under any name, is the same dataset and shares its budget.
Sharp edge: an *edited* file (one byte changed, rows appended, re-saved by another tool) hashes to a
new identity and so gets a fresh budget, although its records are mostly the same people; declare
``data.id`` to tie every version of a dataset to one budget. For an image manifest only the manifest
file is hashed, not the images it points to. A database's identity changes with any change of the query's result
(a new extract, another column selected): declare ``data.id`` to keep one budget.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dptrain.config import DataConfig
from dptrain.data.core import DataError
from dptrain.data.sql import is_sql_source, sql_identity

_CHUNK = 1 << 20


def dataset_identity(cfg: DataConfig) -> str:
    """The identity that keys ``cfg``'s dataset budget (see the module docstring)."""
    if cfg.id is not None:
        if not cfg.id.strip():
            raise DataError(f"data.id: {cfg.id!r} is empty; fix: declare a name for the dataset (e.g. "
                            "data.id: hospital-a-2024) or remove data.id to key the budget by the file's content")
        return "id:" + cfg.id
    if cfg.source.startswith("builtin:"):
        return cfg.source
    if is_sql_source(cfg):
        return sql_identity(cfg)
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "has no file"
        raise DataError(f"data.source: {cfg.source!r} {problem}, so its dataset identity (a content hash, which "
                        "keys the dataset budget) cannot be computed; fix: point data.source at the data file "
                        "or declare data.id")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()
