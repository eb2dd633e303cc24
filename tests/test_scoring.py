"""Bulk scoring of drops against both store backends: formats, bad files, exactly once."""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.score import score_flow, score_new_drops_flow
from tasks.data.images import ImageRejected, to_pixels
from tasks.data.loading import load_data
from tasks.model.export import cached_model_file
from tasks.scoring.ledger import DropBusy, DropError, ScoreOptions, pending, plan_work
from tasks.scoring.runner import locate_drop, score_drop
from tasks.scoring.shard import score_shard
from tasks.settings import load_settings
from tasks.store.claims import take_claim, worker_name
from tasks.store.lake import Lake
from tests.conftest import TinyLake, copy_lake

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
def scored_store(store_uri, tiny_lake) -> TinyLake:
    """A store of its own with the session's tiny model as champion: the session's
    versions, with the copy as `lake`."""
    return tiny_lake._replace(lake=copy_lake(tiny_lake.lake, store_uri))


def read_parts(lake: Lake, drop_id: str, mv: str, columns=None):
    run = lake.score_run(drop_id, mv)
    return run.prices(columns)


def put_drop(lake, drop_id: str, files: dict[str, bytes]) -> None:
    for name, body in files.items():
        lake.store.put_bytes(f"drops/{drop_id}/{name}", body)


def outputs(lake, drop_id: str, mv: str) -> tuple[list[str], dict[str, str]]:
    priced = read_parts(lake, drop_id, mv)
    rejected = lake.score_run(drop_id, mv).rejected()
    keys = priced["key"].to_pylist() if priced is not None else []
    return keys, dict(zip(rejected["key"].to_pylist(), rejected["reason"].to_pylist(), strict=True))


@pytest.mark.usefixtures("prefect_server")
def test_score_drop_formats_bad_files_and_reruns(scored_store):
    lake, mv = scored_store.lake, scored_store.model_version
    store = lake.store
    good, bad = good_files(), bad_files()
    put_drop(
        lake, "d1", good | {k: v for k, (v, _) in bad.items()} | {"batch.parquet": parquet_drop()}
    )
    result = score_flow("d1", store=store.uri, shard_size=5, max_pixels=LIMIT)
    priced, rejected = outputs(lake, "d1", mv)
    expected_priced = set(good) | {"batch.parquet#a", "batch.parquet#c"}
    assert sorted(priced) == sorted(expected_priced), "each good image priced exactly once"
    assert set(rejected) == set(bad) | {"batch.parquet#b"}
    for key, (_, reason) in bad.items():
        assert reason in rejected[key], (key, rejected[key])
    assert result["counts"] == {"listed": 19, "priced": 14, "rejected": 7}
    prices = read_parts(lake, "d1", mv)["price"].to_numpy()
    assert np.isfinite(prices).all()
    manifest = store.get_json(f"scores/d1/{mv}/_manifest.json")
    assert manifest["counts"] == result["counts"] and "flagged" in manifest["drift"]

    again = score_flow("d1", store=store.uri, shard_size=5, max_pixels=LIMIT)
    assert again["skipped"] is True and again["counts"] == result["counts"]

    parts_before = {o.key: o.etag for o in store.list(f"scores/d1/{mv}/part-")}
    put_drop(lake, "d1", {"late.png": good["gray.png"]})
    third = score_flow("d1", store=store.uri, shard_size=5, max_pixels=LIMIT)
    assert third["counts"] == {"listed": 20, "priced": 15, "rejected": 7}
    parts_after = {o.key: o.etag for o in store.list(f"scores/d1/{mv}/part-")}
    assert parts_before.items() <= parts_after.items(), "finished shards untouched"
    (new_part,) = set(parts_after) - set(parts_before)
    new = lake.score_run("d1", mv).read_tables([new_part[len(f"scores/d1/{mv}/") :]])
    assert new["key"].to_pylist() == ["late.png"]
    priced, _ = outputs(lake, "d1", mv)
    assert len(priced) == len(set(priced)) == 15


def test_crashed_scorer_costs_one_claim_lifetime(scored_store):
    """A scorer that died holding a claim: a run that may not wait says who holds it;
    one that waits takes the shard over once it has seen the claim unchanged for a
    lifetime, and redoes nothing."""
    lake, mv = scored_store.lake, scored_store.model_version
    files = {f"img-{i:02d}.png": _save(Image.fromarray(garment()), "PNG") for i in range(12)}
    put_drop(lake, "d2", files)
    options = ScoreOptions(shard_size=4, claim_seconds=3)
    run, source = lake.score_run("d2", mv), locate_drop(lake, "d2")
    plans = plan_work(run, source.listing()[0], options.shard_size)
    first, second, _ = sorted(pending(run, plans).items())
    score_shard(run, source, first[0], first[1], options, "dead-host:1")
    assert take_claim(run, second[0], "dead-host:1", options.claim_seconds)
    # ... and that scorer dies here: one shard done, one claimed, no manifest.
    etag = {o.key: o.etag for o in lake.store.list(run.prefix + "part-")}
    # (a lifetime of its own longer than this run: it must not wait the dead claim out)
    no_wait = ScoreOptions(shard_size=4, claim_seconds=60, wait=False)
    with pytest.raises(DropBusy, match=r"1 shards priced here, 1 shards held .*\(dead-host:1\)"):
        score_drop(lake, "d2", options=no_wait)  # it prices the free shard, then stops
    assert run.manifest() is None
    result = score_drop(lake, "d2", options=options)
    assert result["timings"]["shards_scored_here"] == 1, "the shard taken over"
    assert {o.key: o.etag for o in lake.store.list(run.prefix + "part-")}.items() >= etag.items()
    priced, rejected = outputs(lake, "d2", mv)
    assert sorted(priced) == sorted(files) and rejected == {}
    assert set(result["scorers"].values()) == {"dead-host:1", worker_name()}


def test_concurrent_runs_make_no_duplicates(tiny_lake, tmp_path):
    # Local store only: moto's server checks a conditional write and then writes,
    # without a lock, so racing creates on it are not atomic as they are on S3.
    lake, mv = copy_lake(tiny_lake.lake, str(tmp_path / "lake")), tiny_lake.model_version
    files = {f"img-{i:02d}.png": _save(Image.fromarray(garment()), "PNG") for i in range(16)}
    put_drop(lake, "d3", files)
    barrier, results = threading.Barrier(3), []

    def run():
        barrier.wait()
        results.append(score_drop(lake, "d3", options=ScoreOptions(shard_size=4)))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r["counts"]["priced"] == 16 for r in results)
    assert sum(not r["skipped"] for r in results) == 1, "finished once"
    priced, _ = outputs(lake, "d3", mv)
    assert sorted(priced) == sorted(files), "every key exactly once"


def test_parquet_drop_of_the_datasets_own_shards(scored_store):
    lake, dv = scored_store.lake, scored_store.dataset_version
    dataset = lake.dataset(dv)
    shard = dataset.manifest()["splits"]["test"]["shards"][0]["name"]
    put_drop(lake, "d4", {"test.parquet": dataset.get_bytes(shard)})
    result = score_drop(lake, "d4")
    assert result["counts"] == {"listed": 1, "priced": 20, "rejected": 0}
    # Pixels like the training data's; (a 1-epoch model's prices may well not be).
    assert result["drift"]["pixel_out_of_range_fraction"] <= 0.2, result["drift"]
    black = {f"black-{i}.png": _save(Image.new("L", (28, 28)), "PNG") for i in range(10)}
    put_drop(lake, "d5", black)
    drift = score_drop(lake, "d5")["drift"]
    assert drift["pixel_out_of_range_fraction"] == 1.0 and drift["flagged"] is True


def test_missing_or_empty_drop_and_bad_model_write_nothing(scored_store, tmp_path):
    lake, mv = scored_store.lake, scored_store.model_version
    before = lake.store.keys()
    with pytest.raises(DropError, match="no such drop 'nothing-here'"):
        score_drop(lake, "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DropError, match="no such drop"):
        score_drop(lake, str(tmp_path / "empty"), from_user=True)
    lake.store.put_bytes("drops/hidden/.DS_Store", b"x")
    with pytest.raises(DropError, match="is empty: 1 folder markers or hidden files"):
        score_drop(lake, "hidden")
    with pytest.raises(FileNotFoundError, match=f"no such .complete. model version .known: {mv}"):
        score_drop(lake, "hidden", model_version="m-nope")
    with pytest.raises(ValueError, match="invalid drop id"):
        score_drop(lake, "a/b")
    assert lake.store.keys() == sorted([*before, "drops/hidden/.DS_Store"]), "nothing written"


@pytest.mark.usefixtures("prefect_server")
def test_score_new_drops(scored_store):
    lake = scored_store.lake
    put_drop(lake, "new-1", {"a.png": _save(Image.fromarray(garment()), "PNG")})
    put_drop(lake, "new-2", {"b.png": _save(Image.fromarray(garment()), "PNG")})
    result = score_new_drops_flow(store=lake.uri)
    assert set(result["scored"]) == {"new-1", "new-2"}
    assert score_new_drops_flow(store=lake.uri)["scored"] == {}


def test_preprocessing_parity_training_and_scoring(tiny_lake):
    from tasks.scoring.shard import decode_object

    lake, dv, lv, _ = tiny_lake
    trained = load_data(lake, dv, lv, {"test": None}, 0).test.images
    blobs = lake.dataset(dv).read_split("test")["image"].to_pylist()
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


def test_model_cache_is_keyed_by_store_and_content(tiny_lake, tmp_path):
    """Two stores that hold the same model version with different bytes never share a
    cached file; the cache lives under VGGPRICE_CACHE_DIR."""
    source, _, _, mv = tiny_lake
    a = copy_lake(source, str(tmp_path / "a"))
    b = copy_lake(source, str(tmp_path / "b"))
    model_b = b.model(mv)
    files_b = model_b.files()  # the published attempt's files
    body = bytearray(files_b.get_bytes(model_b.FILE))
    body[-200:] = bytes(200)  # other bytes under the same version (here: a broken zip)
    files_b.put_bytes(model_b.FILE, bytes(body))
    path_a = cached_model_file(a.model(mv))
    assert load_settings().cache_dir in path_a.parents
    assert path_a.read_bytes() == source.model(mv).files().get_bytes(model_b.FILE)
    with pytest.raises(RuntimeError, match="does not match lineage.json"):
        cached_model_file(model_b)
    assert path_a.read_bytes() == a.model(mv).files().get_bytes(model_b.FILE), "a's untouched"


def test_bomb_is_refused_before_decoding():
    big = _save(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(ImageRejected, match="exceeds the limit"):
        to_pixels(big, max_pixels=LIMIT)
