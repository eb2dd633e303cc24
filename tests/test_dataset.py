"""IDX parsing and ingest: strict validation, nothing written on bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from tasks.data.fashion_mnist import (
    DatasetError,
    find_source,
    ingest,
    parse_idx_images,
    parse_idx_labels,
)
from tasks.data.images import to_pixels_batch
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore
from tests.conftest import idx_images, idx_labels


def test_parse_valid_idx(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    got = parse_idx_images(tmp_path / "i.gz", gzip.compress(idx_images(images)))
    assert got.shape == (2, 3, 4) and (got == images).all()
    labels = np.array([3, 9, 0])
    assert parse_idx_labels(tmp_path / "l", idx_labels(labels)).tolist() == [3, 9, 0]


@pytest.mark.parametrize(
    "blob,match",
    [
        (gzip.compress(idx_images(np.zeros((5, 28, 28))))[:-30], "truncated or corrupt gzip"),
        (gzip.compress(idx_images(np.zeros((5, 28, 28)), magic=0x0801)), "wrong magic number"),
        (gzip.compress(idx_images(np.zeros((5, 28, 28)))[:-1]), "header says"),
        (gzip.compress(b"\x00\x00\x08"), "too short"),
        (b"", "empty file"),
    ],
)
def test_broken_images_name_file_and_problem(tmp_path, blob, match):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with pytest.raises(DatasetError, match=match) as err:
        parse_idx_images(path, blob)
    assert str(path) in str(err.value)


def test_label_out_of_range(tmp_path):
    with pytest.raises(DatasetError, match="label 12 outside"):
        parse_idx_labels(tmp_path / "l", idx_labels(np.array([1, 12])))


def _corrupt(source, name, data):
    (source / name).write_bytes(data)


@pytest.mark.parametrize(
    "name,data,match",
    [
        ("t10k-images-idx3-ubyte.gz", b"\x1f\x8b\x08\x00garbage", "t10k-images.*corrupt gzip"),
        (
            "train-labels-idx1-ubyte.gz",
            gzip.compress(idx_labels(np.arange(7) % 10)),
            "train-images.*60 images but .*train-labels.* has 7 labels",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            gzip.compress(idx_labels(np.arange(60) % 10, magic=3)),
            "train-labels.*wrong magic",
        ),
    ],
)
def test_bad_source_leaves_nothing(tmp_path, idx_source, name, data, match):
    _corrupt(idx_source, name, data)
    store = LocalStore(tmp_path / "lake")
    with pytest.raises(DatasetError, match=match):
        ingest(Lake(store), find_source(idx_source))
    assert store.keys() == [], "no shard and no manifest on bad input"


def test_explicit_source_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="missing train-images"):
        find_source(tmp_path)


def test_ingest_roundtrip_and_unverified(tmp_path, idx_source):
    store = LocalStore(tmp_path / "lake")
    source = find_source(idx_source)
    assert source.verified is False  # generated files are not the published ones
    manifest = ingest(Lake(store), source, shard_rows=25)
    assert manifest["splits"]["train"]["rows"] == 60
    assert len(manifest["splits"]["train"]["shards"]) == 3
    assert manifest["source"]["verified"] is False
    train = Lake(store).dataset(manifest["version"]).read_split("train")
    assert train.column_names == ["image_id", "label", "image"]
    assert train["image_id"][0].as_py() == "train-00000"
    pixels = to_pixels_batch(train["image"].to_pylist())
    from tasks.data.fashion_mnist import read_split

    raw, labels = read_split(idx_source, "train")
    assert (pixels == raw).all(), "PNG in the shards is lossless"
    assert train["label"].to_numpy().tolist() == labels.tolist()


def test_version_depends_on_content(tmp_path):
    from tasks.data.fashion_mnist import dataset_version
    from tests.conftest import write_idx_source

    a = dataset_version(find_source(write_idx_source(tmp_path / "a", seed=1)))
    b = dataset_version(find_source(write_idx_source(tmp_path / "b", seed=1)))
    c = dataset_version(find_source(write_idx_source(tmp_path / "c", seed=2)))
    assert a == b != c
