"""Tables from a database (issue 18): data.source a SQLAlchemy URL with data.query, read-only, encoded exactly as
the same table in a CSV file, keyed by the content of the query result, refused in one line when unusable."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dptrain.cli import main
from dptrain.config import DataConfig, RecipeError, load_recipe, parse_recipe
from dptrain.data import DataError, load_data
from dptrain.data.identity import dataset_identity
from dptrain.run import train

duckdb = pytest.importorskip("duckdb")
pytest.importorskip("sqlalchemy")
pytest.importorskip("duckdb_engine")

QUERY = "SELECT age, chol, smoker, sex, outcome FROM cohort ORDER BY rid"
RECIPE = """\
name: sql
data:
  source: {source}
{query}  label: outcome
  positive_label: "yes"
  numeric: {{age: [18, 100], chol: [100, 600]}}
  categorical: {{smoker: [never, former, current]}}
  missing: {{chol: indicator, smoker: category}}
  sensitive: [sex]
model: {{hidden: [4]}}
privacy: {{noise_multiplier: 1.0, dataset_size: 240}}
training: {{epochs: 1, batch_size: 32}}
"""


def _messy(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """A small messy extract: missing numbers and categories, a text label, a sensitive attribute."""
    rng = np.random.default_rng(seed)
    f = pd.DataFrame({
        "rid": np.arange(n),
        "age": rng.integers(18, 95, n).astype(float),
        "chol": rng.normal(240, 50, n).round(),
        "smoker": rng.choice(["never", "former", "current"], n).astype(object),
        "sex": rng.choice(["F", "M"], n),
        "outcome": rng.choice(["yes", "no"], n),
    })
    f.loc[rng.random(n) < 0.25, "chol"] = np.nan
    f.loc[rng.random(n) < 0.15, "smoker"] = None
    return f


def _write(frame: pd.DataFrame, folder: Path) -> dict[str, str]:
    """The same table as a CSV file, a SQLite file and a DuckDB file; the sources to read each."""
    frame.drop(columns="rid").to_csv(folder / "cohort.csv", index=False)
    with sqlite3.connect(folder / "cohort.db") as con:
        frame.to_sql("cohort", con, index=False)
    con.close()
    con = duckdb.connect(str(folder / "cohort.duckdb"))
    con.register("frame", frame)
    con.execute("CREATE TABLE cohort AS SELECT * FROM frame")
    con.close()
    return {"csv": str(folder / "cohort.csv"), "sqlite": f"sqlite:///{folder / 'cohort.db'}",
            "duckdb": f"duckdb:///{folder / 'cohort.duckdb'}"}


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    return _write(_messy(), tmp_path)


def _cfg(source: str, query: str | None = QUERY, **kw) -> DataConfig:
    data = {"source": source, "query": query, "label": "outcome", "positive_label": "yes",
            "numeric": {"age": [18, 100], "chol": [100, 600]}, "categorical": {"smoker": ["never", "former", "current"]},
            "missing": {"chol": "indicator", "smoker": "category"}, "sensitive": ["sex"], **kw}
    return DataConfig.model_validate({k: v for k, v in data.items() if v is not None})


def _recipe(tmp_path: Path, source: str, query: str | None, name: str = "recipe") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(source=json.dumps(source), query=f"  query: {json.dumps(query)}\n" if query else ""))
    return path


# ---------------------------------------------------------------- the same data as the CSV


@pytest.mark.parametrize("kind", ["sqlite", "duckdb"])
def test_database_table_encodes_exactly_as_the_csv(sources, kind):
    want = load_data(_cfg(sources["csv"], query=None))
    got = load_data(_cfg(sources[kind]))
    for name in ("x_train", "y_train", "units_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert got.feature_names == want.feature_names and got.classes == want.classes
    assert "chol_missing" in got.feature_names and "smoker=missing" in got.feature_names
    pd.testing.assert_frame_equal(got.sensitive_test, want.sensitive_test)
    assert got.preprocessing.pop("query") == QUERY and got.preprocessing.pop("reader").startswith("pandas.read_sql")
    assert got.preprocessing.pop("source") == sources[kind] and want.preprocessing.pop("source") == sources["csv"]
    assert got.preprocessing == want.preprocessing  # the same declared record, rule by rule


def test_a_database_recipe_trains_the_same_model_as_the_csv(sources, tmp_path):
    """Recipe lines only; the same secret seed and declared size: the same weights, bit for bit."""
    runs = {}
    for kind, query in (("csv", None), ("sqlite", QUERY)):
        recipe = load_recipe(_recipe(tmp_path, sources[kind], query, kind))
        runs[kind] = train(recipe, tmp_path / kind, dp_seed=7, progress=False)
    release = {k: tmp_path / k / "release" for k in runs}
    assert (release["sqlite"] / "model.safetensors").read_bytes() == (release["csv"] / "model.safetensors").read_bytes()
    spec = {k: json.loads((release[k] / "model.json").read_text()) for k in runs}
    assert spec["sqlite"]["input"] == spec["csv"]["input"] and spec["sqlite"]["classes"] == ["outcome!=yes", "outcome=yes"]
    data = runs["sqlite"].record["data"]
    assert data["dataset_id"].startswith("sql-sha256:") and data["preprocessing"]["query"] == QUERY
    assert load_recipe(release["sqlite"] / "config.yaml").data.query == QUERY  # the recipe, query included
    assert main(["predict", str(tmp_path / "sqlite"), "--data", sources["csv"], "--out", str(tmp_path / "s.csv")]) == 0


# ---------------------------------------------------------------- dataset identity


def test_identity_is_the_content_of_the_result_not_the_url(sources, tmp_path):
    ident = dataset_identity(_cfg(sources["sqlite"]))
    assert ident.startswith("sql-sha256:") and "cohort" not in ident
    assert dataset_identity(_cfg(sources["duckdb"])) == ident  # the same rows in another database
    reordered = QUERY.replace("ORDER BY rid", "ORDER BY sex, age DESC")
    assert dataset_identity(_cfg(sources["sqlite"], query=reordered)) == ident  # row order is not content
    fewer = QUERY.replace("ORDER BY", "WHERE rid > 0 ORDER BY")
    assert dataset_identity(_cfg(sources["sqlite"], query=fewer)) != ident
    edited = _messy()
    edited.loc[3, "age"] += 1
    (tmp_path / "edited").mkdir()
    other = _write(edited, tmp_path / "edited")
    assert dataset_identity(_cfg(other["sqlite"])) != ident  # one value changed: another dataset
    assert dataset_identity(_cfg(sources["sqlite"], id="hospital-a-2024")) == "id:hospital-a-2024"


def test_identity_is_of_the_data_the_run_read(sources, tmp_path):
    """Budgets are keyed by the rows trained on: a database changed after the read does not change the key."""
    cfg = _cfg(sources["sqlite"])
    load_data(cfg)
    ident = dataset_identity(cfg)
    with sqlite3.connect(sources["sqlite"].removeprefix("sqlite:///")) as con:
        con.execute("DELETE FROM cohort WHERE rid < 10")
    con.close()
    assert dataset_identity(cfg) == ident
    load_data(cfg)  # a new read: the new rows
    assert dataset_identity(cfg) != ident


# ---------------------------------------------------------------- read-only


def test_databases_are_opened_read_only(sources, tmp_path):
    db = Path(sources["sqlite"].removeprefix("sqlite:///"))
    before = db.read_bytes()
    for query in ("DELETE FROM cohort WHERE rid < 5 RETURNING rid -- ORDER BY",
                  f"ATTACH '{tmp_path / 'other.db'}' AS o -- ORDER BY"):
        with pytest.raises(DataError, match=r"^data\.query: the database 'sqlite:///.*' refused the query"):
            load_data(_cfg(sources["sqlite"], query=query))
    assert db.read_bytes() == before and not (tmp_path / "other.db").exists()
    copy = f"COPY (SELECT 1 AS x) TO '{tmp_path / 'out.csv'}' -- ORDER BY"
    with pytest.raises(DataError, match="refused the query"):
        load_data(_cfg(sources["duckdb"], query=copy))
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("kind", ["sqlite", "duckdb"])
def test_a_missing_database_file_is_refused_never_created(tmp_path, kind):
    path = tmp_path / f"nope.{kind}"
    with pytest.raises(DataError) as info:
        load_data(_cfg(f"{kind}:///{path}"))
    msg = str(info.value)
    assert msg.startswith(f"data.source: '{kind}:///{path}' has no file") and "never creates one" in msg
    assert not path.exists()
    with pytest.raises(DataError, match="names no database file"):
        load_data(_cfg(f"{kind}://"))


# ---------------------------------------------------------------- one clear line for bad input


def test_query_errors_show_the_databases_message_in_one_line(sources):
    with pytest.raises(DataError) as info:
        load_data(_cfg(sources["sqlite"], query="SELEC age FROM cohort ORDER BY rid"))
    msg = str(info.value)
    assert msg.startswith("data.query: ") and 'near "SELEC": syntax error' in msg and "\n" not in msg
    with pytest.raises(DataError, match=r'Referenced column "nope" not found') as info:
        load_data(_cfg(sources["duckdb"], query="SELECT nope FROM cohort ORDER BY rid"))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="returned no records"):
        load_data(_cfg(sources["sqlite"], query=QUERY.replace("ORDER BY", "WHERE rid < 0 ORDER BY")))
    with pytest.raises(DataError, match=r"duplicate column names \['age'\]"):
        load_data(_cfg(sources["sqlite"], query="SELECT age, age, outcome FROM cohort ORDER BY rid"))


def test_a_value_error_of_the_database_quotes_no_record(sources):
    with pytest.raises(DataError) as info:  # DuckDB's message would quote the value it could not convert
        load_data(_cfg(sources["duckdb"], query="SELECT CAST(sex AS INTEGER) AS age FROM cohort ORDER BY rid"))
    msg = str(info.value)
    assert "ConversionException" in msg and "not shown" in msg and "'F'" not in msg and "'M'" not in msg
    with pytest.raises(DataError) as info:  # ... and so would an invalid-input error
        load_data(_cfg(sources["duckdb"], query="SELECT strptime(smoker, '%Y') AS age FROM cohort ORDER BY rid"))
    msg = str(info.value)
    assert "InvalidInputException" in msg and not any(w in msg for w in ("never", "former", "current"))


@pytest.mark.parametrize("data, words", [
    ({"source": "CSV", "query": QUERY}, ["data.query: set, but data.source", "is not a database URL", "remove data.query"]),
    ({"source": "sqlite:///x.db"}, ["data.query: missing for the database source 'sqlite:///x.db'", "add data.query"]),
    ({"source": "sqlite:///x.db", "query": "  "}, ["data.query: empty"]),
    ({"source": "mysql://me@db/cohort", "query": QUERY}, ["kind 'mysql'", "sqlite:///PATH, duckdb:///PATH"]),
    ({"source": "sqlite:///x.db", "query": "SELECT * FROM cohort"}, ["no ORDER BY", "data.privacy_unit"]),
])
def test_recipe_refuses_a_query_without_a_database_and_vice_versa(sources, data, words):
    data = {**data, "source": sources["csv"] if data["source"] == "CSV" else data["source"]}
    with pytest.raises(RecipeError) as info:
        parse_recipe({"data": {"label": "outcome", **data}, "privacy": {"epsilon": 1}})
    msg = str(info.value)
    assert all(w in msg for w in words), msg
    assert "\n" not in msg
    # with a privacy unit the split is by unit id, so row order does not matter
    parse_recipe({"data": {"source": "sqlite:///x.db", "query": "SELECT * FROM t", "privacy_unit": "pid"},
                  "privacy": {"epsilon": 1}})


@pytest.mark.parametrize("url", ["postgresql://alice:Hunter2-secret@db.example:5432/cohort",
                                 "postgresql://alice@db.example/cohort?password=Hunter2-secret",
                                 "postgresql+psycopg2://alice:Hunter2@secret@db.example/cohort"])
def test_a_password_in_the_url_is_refused_and_masked(tmp_path, capsys, url):
    recipe = _recipe(tmp_path, url, QUERY)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("dptrain: error: ") and err.strip().count("\n") == 0 and "Traceback" not in err
    assert "holds a password" in err and "***" in err and "PGPASSWORD" in err
    assert "Hunter2" not in err and "secret" not in err and "Hunter2" not in captured.out
    assert not (tmp_path / "run").exists()
    assert "Hunter2" not in DataConfig.masked_url(f"could not connect to {url} (timeout)")


def test_cli_reports_a_bad_query_in_one_line_and_writes_nothing(sources, tmp_path, capsys):
    recipe = _recipe(tmp_path, sources["sqlite"], "SELECT age FROM nowhere ORDER BY 1")
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dptrain: error: data.query: ") and "no such table: nowhere" in err
    assert err.strip().count("\n") == 0 and not (tmp_path / "run").exists()


def test_a_missing_driver_names_the_extra(sources, monkeypatch):
    import sqlalchemy.dialects

    def no_plugin(name):
        raise sqlalchemy.exc.NoSuchModuleError(f"Can't load plugin: sqlalchemy.dialects:{name}")

    monkeypatch.setattr(sqlalchemy.dialects.registry, "load", no_plugin)
    with pytest.raises(DataError, match=r"no SQLAlchemy driver for 'duckdb'.*pip install 'dptrain\[sql\]'"):
        load_data(_cfg(sources["duckdb"]))
    with pytest.raises(DataError, match=r"postgresql.*psycopg"):
        load_data(_cfg("postgresql://alice@localhost:1/cohort"))
