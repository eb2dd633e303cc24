"""The store, against a local directory and a real S3 endpoint over HTTP."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks.store.storage import LocalStore, ObjectNotFound, S3Store, open_store, validate_key


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", ".", "a\\b", "a\x00b"]
)
def test_bad_keys_are_value_errors(key, tmp_path):
    with pytest.raises(ValueError, match="invalid key"):
        validate_key(key)
    store = LocalStore(tmp_path / "lake")
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    assert not any(tmp_path.rglob("x")), "nothing written anywhere"


def test_good_keys_pass():
    assert validate_key("models/v1/model.keras") == "models/v1/model.keras"


def test_symlink_escape_is_refused(tmp_path):
    root = tmp_path / "lake"
    root.mkdir()
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside the store"):
        LocalStore(root).put_bytes("out/evil", b"x")
    assert not (tmp_path / "evil").exists()


def test_roundtrip_list_delete(store_uri):
    store = open_store(store_uri)
    store.put_bytes("a/b/one.bin", b"1")
    store.put_json("a/two.json", {"x": [1, 2]})
    store.put_bytes("b/three", b"333")
    assert store.get_bytes("a/b/one.bin") == b"1"
    assert store.get_json("a/two.json") == {"x": [1, 2]}
    assert store.exists("b/three") and not store.exists("b/four")
    assert store.keys("a/") == ["a/b/one.bin", "a/two.json"]
    assert store.keys("a/t") == ["a/two.json"]
    assert [o.size for o in store.list("b/")] == [3]
    store.put_bytes("b/three", b"4444")  # overwrite
    assert store.get_bytes("b/three") == b"4444"
    store.delete("b/three")
    assert not store.exists("b/three")
    with pytest.raises(ObjectNotFound, match="b/three"):
        store.get_bytes("b/three")
    assert store.keys("nothing/") == []


def test_files_roundtrip_and_multipart(tmp_path, s3_uri):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * 1024 * 1024))
    bucket, _, prefix = s3_uri[5:].partition("/")
    store = S3Store(
        bucket,
        prefix,
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        multipart_threshold=5 * 1024 * 1024,
    )
    store.put_file("blobs/big.bin", src)
    (info,) = store.list("blobs/")
    assert info.size == src.stat().st_size
    assert "-" in info.etag, "an S3 multipart upload has an ETag like <md5>-<parts>"
    store.get_file("blobs/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_local_put_file_and_missing_get_file(tmp_path):
    store = LocalStore(tmp_path / "lake")
    src = tmp_path / "f.txt"
    src.write_text("hello")
    store.put_file("x/f.txt", src)
    store.get_file("x/f.txt", tmp_path / "out" / "f.txt")
    assert (tmp_path / "out" / "f.txt").read_text() == "hello"
    with pytest.raises(ObjectNotFound):
        store.get_file("x/none", tmp_path / "out" / "none")
    assert not (tmp_path / "out" / "none").exists()


def test_listing_more_than_1000_keys(store_uri):
    store = open_store(store_uri)
    keys = [f"many/k{i:05d}" for i in range(1234)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b"."), keys))
    store.put_bytes("manyother/x", b".")
    assert store.keys("many/") == keys


def test_put_if_absent(store_uri):
    store = open_store(store_uri)
    assert store.put_if_absent("lease/a", b"first") is True
    assert store.put_if_absent("lease/a", b"second") is False
    assert store.get_bytes("lease/a") == b"first"


def test_local_write_is_atomic_and_hides_temp_files(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "lake")
    store.put_bytes("d/obj", b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes("d/obj", b"new-but-broken")
    monkeypatch.undo()
    assert store.get_bytes("d/obj") == b"old", "a failed write leaves the old object whole"
    assert store.keys("d/") == ["d/obj"]
    assert [p.name for p in (tmp_path / "lake" / "d").iterdir()] == ["obj"], "no temp left behind"


def test_s3_store_uri_and_bad_uris(tmp_path):
    with pytest.raises(ValueError, match="unsupported store URI"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///x")
    assert open_store(str(tmp_path)).uri == str(tmp_path.resolve())
