"""Bulk scoring of drops against both store backends: formats, bad files, exactly once."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.score import score_flow, score_new_drops_flow
from tasks.dataset import find_source, ingest, load_split
from tasks.images import ImageRejected, to_pixels
from tasks.labels import PriceRule, make_labels
from tasks.model import TrainSettings
from tasks.registry import promote
from tasks.scoring import (
    DropBusy,
    ScoreOptions,
    prepare,
    read_parts,
    score_drop,
    score_shard,
)
from tasks.storage import open_store
from tasks.training import load_data, train

TINY = TrainSettings(weights="none", freeze=15, input_size=32, epochs=1, views=1)
LIMIT = 1_000_000


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def garment(size=(28, 28), light_on_dark=True) -> np.ndarray:
    a = np.zeros(size[::-1], np.uint8)
    h, w = a.shape
    a[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = 220
    return a if light_on_dark else 255 - a


def good_files() -> dict[str, bytes]:
    g = Image.fromarray(garment())
    rgb = Image.fromarray(np.stack([garment((60, 40))] * 3, axis=-1))
    rgba = Image.fromarray(np.dstack([garment((30, 30))] * 3 + [np.full((30, 30), 255, np.uint8)]))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 when shown
    frames = [Image.fromarray(garment()), Image.fromarray(255 - garment())]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    tif = io.BytesIO()
    frames[0].save(tif, format="TIFF", save_all=True, append_images=frames[1:])
    return {
        "gray.png": _save(g, "PNG"),
        "rgb.png": _save(rgb, "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "palette.png": _save(g.convert("P"), "PNG"),
        "sixteen.png": _save(Image.fromarray(garment().astype(np.uint16) * 257), "PNG"),
        "photo-on-white.jpg": _save(Image.fromarray(garment((50, 80), False)), "JPEG"),
        "exif.jpg": _save(rgb, "JPEG", exif=exif),
        "img.bmp": _save(g, "BMP"),
        "anim.gif": gif.getvalue(),
        "pages.tiff": tif.getvalue(),
        "img.webp": _save(rgb, "WEBP"),
        "sub/dir/nested.png": _save(g, "PNG"),
    }


def bad_files() -> dict[str, tuple[bytes, str]]:
    png = _save(Image.fromarray(garment((200, 200))), "PNG")
    bomb = _save(Image.new("L", (1500, 1000)), "PNG")
    junk_parquet = b"PAR1 this is not parquet"
    return {
        "empty.png": (b"", "empty file"),
        "truncated.png": (png[: len(png) // 2], "truncated or corrupt PNG"),
        "text.jpg": (b"hello, I am not a JPEG", "not an image"),
        "bomb.png": (bomb, "decompression bomb"),
        "odd.ppm": (_save(Image.fromarray(garment()), "PPM"), "unsupported format PPM"),
        "broken.parquet": (junk_parquet, "unreadable Parquet"),
    }


def parquet_drop() -> bytes:
    images = [
        _save(Image.fromarray(garment()), "PNG"),
        b"not an image",
        _save(Image.fromarray(garment()), "PNG"),
    ]
    table = pa.table({"image_id": ["a", "b", "c"], "image": images})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.fixture
def scored_store(store_uri, idx_source):
    store = open_store(store_uri)
    dv = ingest(store, find_source(idx_source), shard_rows=30)["version"]
    lv = make_labels(store, dv, PriceRule(), seed=0)["labels_version"]
    mv = train(store, dv, lv, TINY)["model_version"]
    promote(store, mv)
    return store, mv, dv, lv


def put_drop(store, drop_id: str, files: dict[str, bytes]) -> None:
    for name, body in files.items():
        store.put_bytes(f"drops/{drop_id}/{name}", body)


def outputs(store, drop_id: str, mv: str) -> tuple[list[str], dict[str, str]]:
    base = f"scores/{drop_id}/{mv}/"
    priced = read_parts(store, store.keys(base + "part-"))
    rejected = pq.read_table(io.BytesIO(store.get_bytes(base + "rejected.parquet")))
    keys = priced["key"].to_pylist() if priced is not None else []
    return keys, dict(zip(rejected["key"].to_pylist(), rejected["reason"].to_pylist(), strict=True))


@pytest.mark.usefixtures("prefect_server")
def test_score_drop_formats_bad_files_and_reruns(scored_store):
    store, mv, *_ = scored_store
    good, bad = good_files(), bad_files()
    put_drop(
        store, "d1", good | {k: v for k, (v, _) in bad.items()} | {"batch.parquet": parquet_drop()}
    )
    result = score_flow("d1", store=store.uri, shard_size=5, max_pixels=LIMIT)
    priced, rejected = outputs(store, "d1", mv)
    expected_priced = set(good) | {"batch.parquet#a", "batch.parquet#c"}
    assert sorted(priced) == sorted(expected_priced), "each good image priced exactly once"
    assert set(rejected) == set(bad) | {"batch.parquet#b"}
    for key, (_, reason) in bad.items():
        assert reason in rejected[key], (key, rejected[key])
    assert result["counts"] == {"listed": 19, "priced": 14, "rejected": 7}
    prices = read_parts(store, store.keys(f"scores/d1/{mv}/part-"))["price"].to_numpy()
    assert np.isfinite(prices).all()
    manifest = store.get_json(f"scores/d1/{mv}/_manifest.json")
    assert manifest["counts"] == result["counts"] and "flagged" in manifest["drift"]

    again = score_flow("d1", store=store.uri, shard_size=5, max_pixels=LIMIT)
    assert again["skipped"] is True and again["counts"] == result["counts"]

    parts_before = {o.key: o.etag for o in store.list(f"scores/d1/{mv}/part-")}
    put_drop(store, "d1", {"late.png": good["gray.png"]})
    third = score_flow("d1", store=store.uri, shard_size=5, max_pixels=LIMIT)
    assert third["counts"] == {"listed": 20, "priced": 15, "rejected": 7}
    parts_after = {o.key: o.etag for o in store.list(f"scores/d1/{mv}/part-")}
    assert parts_before.items() <= parts_after.items(), "finished shards untouched"
    (new_part,) = set(parts_after) - set(parts_before)
    assert read_parts(store, [new_part])["key"].to_pylist() == ["late.png"]
    priced, _ = outputs(store, "d1", mv)
    assert len(priced) == len(set(priced)) == 15


def test_resume_after_crash_redoes_only_missing_shards(scored_store):
    store, mv, *_ = scored_store
    files = {f"img-{i:02d}.png": _save(Image.fromarray(garment()), "PNG") for i in range(12)}
    put_drop(store, "d2", files)
    options = ScoreOptions(shard_size=4, lease_seconds=6)
    job = prepare(store, "d2", mv, options, owner="crashing-run")
    first, keys = sorted(job["todo"].items())[0]
    score_shard(store, job["prefix"], store, job["base"], first, keys, mv, options)
    # ... and the worker dies here: no other shard, no manifest, the lease never released.
    etag = {o.key: o.etag for o in store.list(job["base"] + "part-")}
    with pytest.raises(DropBusy):
        score_drop(store, "d2", options=options)
    (lease,) = store.keys(job["base"] + "_leases/")
    time.sleep(max(0.0, store.get_json(lease)["expires"] - time.time()) + 0.1)  # it expires
    result = score_drop(store, "d2", options=options)
    assert result["timings"]["shards_scored"] == 2, "only the two unfinished shards"
    assert {o.key: o.etag for o in store.list(job["base"] + "part-")}.items() >= etag.items()
    priced, rejected = outputs(store, "d2", mv)
    assert sorted(priced) == sorted(files) and rejected == {}


def test_concurrent_runs_make_no_duplicates(scored_store):
    store, mv, *_ = scored_store
    files = {f"img-{i:02d}.png": _save(Image.fromarray(garment()), "PNG") for i in range(16)}
    put_drop(store, "d3", files)
    barrier, results = threading.Barrier(2), []

    def run():
        barrier.wait()
        try:
            results.append(score_drop(store, "d3", options=ScoreOptions(shard_size=4)))
        except DropBusy as err:
            results.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(isinstance(r, dict) for r in results)
    priced, _ = outputs(store, "d3", mv)
    assert sorted(priced) == sorted(files), "every key exactly once"


def test_parquet_drop_of_the_datasets_own_shards(scored_store):
    store, mv, dv, _ = scored_store
    manifest = store.get_json(f"datasets/fashion-mnist/{dv}/manifest.json")
    shard = manifest["splits"]["test"]["shards"][0]["key"]
    put_drop(store, "d4", {"test.parquet": store.get_bytes(shard)})
    result = score_drop(store, "d4")
    assert result["counts"] == {"listed": 1, "priced": 20, "rejected": 0}
    # Pixels like the training data's; (a 1-epoch model's prices may well not be).
    assert result["drift"]["pixel_out_of_range_fraction"] <= 0.2, result["drift"]
    black = {f"black-{i}.png": _save(Image.new("L", (28, 28)), "PNG") for i in range(10)}
    put_drop(store, "d5", black)
    drift = score_drop(store, "d5")["drift"]
    assert drift["pixel_out_of_range_fraction"] == 1.0 and drift["flagged"] is True


def test_empty_drop_and_bad_model(scored_store):
    store, mv, *_ = scored_store
    result = score_drop(store, "nothing-here")
    assert result["counts"] == {"listed": 0, "priced": 0, "rejected": 0}
    assert store.exists(f"scores/nothing-here/{mv}/_manifest.json")
    with pytest.raises(FileNotFoundError, match="no such model"):
        score_drop(store, "nothing-here", model_version="m-nope")
    with pytest.raises(ValueError, match="invalid drop id"):
        score_drop(store, "a/b")


@pytest.mark.usefixtures("prefect_server")
def test_score_new_drops(scored_store):
    store, mv, *_ = scored_store
    put_drop(store, "new-1", {"a.png": _save(Image.fromarray(garment()), "PNG")})
    put_drop(store, "new-2", {"b.png": _save(Image.fromarray(garment()), "PNG")})
    result = score_new_drops_flow(store=store.uri)
    assert set(result["scored"]) == {"new-1", "new-2"}
    assert score_new_drops_flow(store=store.uri)["scored"] == {}


def test_preprocessing_parity_training_and_scoring(tmp_path, idx_source):
    from tasks.scoring import decode_object

    store = open_store(str(tmp_path / "lake"))
    dv = ingest(store, find_source(idx_source))["version"]
    lv = make_labels(store, dv, PriceRule(), seed=0)["labels_version"]
    trained = load_data(store, dv, lv, TINY, ("test",))["test"]["images"]
    shard = load_split(store, dv, "test")
    blobs = shard["image"].to_pylist()
    scored = np.stack([px for _, px, _ in decode_object("x.png", blobs[0], LIMIT)] +
                      [to_pixels(b) for b in blobs[1:]])  # fmt: skip
    assert (scored == trained).all(), "training and scoring see the same pixels"
    # The same garment as RGB, and as a dark-on-white photo, gives the same array.
    img = trained[0]
    assert (to_pixels(_save(Image.fromarray(np.stack([img] * 3, -1)), "PNG")) == img).all()
    assert (to_pixels(_save(Image.fromarray(255 - garment()), "PNG")) == garment()).all()
    # A larger image is fitted into the square without distortion.
    wide = to_pixels(_save(Image.fromarray(garment((56, 28))), "PNG"))
    assert wide.shape == (28, 28) and wide[:7].max() == 0 and wide[-7:].max() == 0


def test_bomb_is_refused_before_decoding():
    big = _save(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(ImageRejected, match="exceeds the limit"):
        to_pixels(big, max_pixels=LIMIT)
