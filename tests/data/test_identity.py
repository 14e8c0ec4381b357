"""Dataset identity: the key of the dataset budget (a copy is the same dataset; an edit is a new one)."""

import hashlib

import pytest

from dptrain.config import DataConfig
from dptrain.data.identity import dataset_identity

CSV = b"age,label\n31,1\n47,0\n52,1\n"


def test_same_bytes_at_two_paths_is_one_dataset(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "copy" / "renamed.csv"
    b.parent.mkdir()
    a.write_bytes(CSV)
    b.write_bytes(CSV)
    ident = dataset_identity(DataConfig(source=str(a)))
    assert ident == dataset_identity(DataConfig(source=str(b))) == "sha256:" + hashlib.sha256(CSV).hexdigest()


def test_one_changed_byte_is_another_dataset(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_bytes(CSV)
    b.write_bytes(CSV.replace(b"47", b"48"))
    assert dataset_identity(DataConfig(source=str(a))) != dataset_identity(DataConfig(source=str(b)))


def test_large_file_is_hashed_whole(tmp_path):
    data = CSV + b"1,0\n" * 600_000  # several read chunks
    path = tmp_path / "big.csv"
    path.write_bytes(data)
    assert dataset_identity(DataConfig(source=str(path))) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_declared_id_wins(tmp_path):
    a, b = tmp_path / "v1.csv", tmp_path / "v2.csv"
    a.write_bytes(CSV)
    b.write_bytes(CSV + b"60,0\n")
    ids = {dataset_identity(DataConfig(source=str(p), id="hospital-a")) for p in (a, b)}
    assert ids == {"id:hospital-a"}
    assert dataset_identity(DataConfig(source="builtin:actg175", id="hospital-a")) == "id:hospital-a"
    assert dataset_identity(DataConfig(source=str(tmp_path / "missing.csv"), id="x")) == "id:x"


def test_builtin_passes_through():
    assert dataset_identity(DataConfig(source="builtin:actg175")) == "builtin:actg175"


@pytest.mark.parametrize("where", ["missing.csv", "folder"])
def test_missing_file_or_directory_is_refused_naming_the_field(tmp_path, where):
    (tmp_path / "folder").mkdir()
    source = str(tmp_path / where)
    with pytest.raises(ValueError, match="data.source") as err:
        dataset_identity(DataConfig(source=source))
    msg = str(err.value)
    assert source in msg and "data.id" in msg and "\n" not in msg


def test_empty_declared_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.id"):
        dataset_identity(DataConfig(source="builtin:actg175", id=" "))
