"""Hostile files in a drop and a churning local store: named pipes, links to nothing,
huge and extreme images, Parquet objects with too many rows, same-size rewrites that
keep the mtime, and entries that vanish while a folder is listed. Memory is measured
in a child process (tests/programs/peak.py), never time."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.data import images
from tasks.scoring.ledger import ScoreOptions
from tasks.scoring.runner import drops_needing_scores, locate_drop, score_drop
from tasks.scoring.shard import decode_object
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore, NotRegularFile, TooLarge, open_store
from tests.conftest import copy_lake

REPO = Path(__file__).resolve().parents[1]
MB = 1024  # peak.py reports kB


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _bmp(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="BMP")
    return buf.getvalue()


def garment(h: int = 28, w: int = 28, value: int = 220, channels: int = 0) -> np.ndarray:
    a = np.zeros((h, w, channels) if channels else (h, w), np.uint8)
    a[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = value
    return a


def peak(*args: str) -> dict:
    """Run tests/programs/peak.py; its outcome and peak memory above its baseline (kB)."""
    out = subprocess.run([sys.executable, "-m", "tests.programs.peak", *args], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {"above_kb": result["peak_kb"] - result["baseline_kb"]}


class PipeWatch:
    """Notices anyone opening a named pipe for reading: every half second it tries to
    open the write end without blocking, which only succeeds while a reader has it open;
    then it writes and closes, so a blocked reader is let go instead of hanging the test."""

    def __init__(self, fifo: Path):
        self.fifo, self.opened = fifo, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PipeWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody reads it
                continue
            self.opened += 1
            try:
                os.write(fd, b"let go")
            finally:
                os.close(fd)


@pytest.fixture
def local_lake(tiny_lake, tmp_path):
    """A local copy of the session's lake, its tiny model the champion."""
    return tiny_lake._replace(lake=copy_lake(tiny_lake.lake, str(tmp_path / "lake")))


def rows_parquet(n: int) -> bytes:
    table = pa.table({"image_id": [f"r{i}" for i in range(n)], "image": [_png(garment())] * n})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# --- a hostile drop finishes, every entry priced or rejected with its reason ------------


def test_hostile_drop_finishes_with_reasons(local_lake):
    lake, mv = local_lake.lake, local_lake.model_version
    drop = Path(lake.store.uri) / "drops" / "hostile"
    drop.mkdir(parents=True)
    (drop / "good.png").write_bytes(_png(garment()))
    (drop / "also-good.png").write_bytes(_png(garment(40, 30)))
    os.mkfifo(drop / "pipe.png")
    (drop / "dangling.png").symlink_to(drop / "no-such-file.png")
    (drop / "linked.png").symlink_to(drop / "good.png")  # a link to a file is followed
    with open(drop / "huge.png", "wb") as f:
        f.truncate(1 << 30)  # 1 GB, sparse: nothing on disk, and nothing must be read
    (drop / "rows.parquet").write_bytes(rows_parquet(5))
    (drop / "few.parquet").write_bytes(rows_parquet(2))
    options = ScoreOptions(shard_size=2, max_rows_per_object=4, claim_seconds=6)

    with PipeWatch(drop / "pipe.png") as watch:
        manifest = score_drop(lake, "hostile", mv, options)
    assert watch.opened == 0, "the named pipe was opened for reading"

    run = lake.score_run("hostile", mv)
    priced = sorted(run.prices(["key"])["key"].to_pylist())
    rejected = run.rejected()
    reasons = dict(zip(rejected["key"].to_pylist(), rejected["reason"].to_pylist(), strict=True))
    assert priced == ["also-good.png", "few.parquet#r0", "few.parquet#r1", "good.png",
                      "linked.png"]  # fmt: skip
    assert reasons == {
        "pipe.png": "not a regular file: a named pipe (FIFO)",
        "dangling.png": "not a regular file: a symbolic link to nothing",
        "huge.png": f"too large: {1 << 30} bytes > {50 * 1024 * 1024} (max_bytes)",
        "rows.parquet": "too many rows: 5 > 4 (max_rows_per_object)",
    }
    assert manifest["counts"] == {"listed": 8, "priced": 5, "rejected": 4}
    assert manifest["rejections"] == {"not a regular file": 2, "too large": 1, "too many rows": 1}
    again = score_drop(lake, "hostile", mv, options)
    assert again["skipped"] is True, "a finished hostile drop is finished"
    assert drops_needing_scores(lake, mv) == []


def test_pipes_and_devices_are_never_opened(tmp_path):
    store = LocalStore(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "zero").symlink_to("/dev/zero")  # would never end if read
    (tmp_path / "nowhere").symlink_to(tmp_path / "gone")
    with PipeWatch(tmp_path / "pipe") as watch:
        with pytest.raises(NotRegularFile, match="named pipe"):
            store.get_bytes("pipe")
        with pytest.raises(NotRegularFile, match="pipe"):
            store.sha256("pipe")
        with pytest.raises(NotRegularFile, match="pipe"):
            store.get_file("pipe", tmp_path / "copy")
    assert watch.opened == 0
    with pytest.raises(ValueError, match="resolves outside the store"):
        store.get_bytes("zero")  # a link out of the store is never followed for reading
    with pytest.raises(NotRegularFile, match="a symbolic link to nothing"):
        store.get_bytes("nowhere")
    assert store.keys() == [], "nothing of them is an object"
    irregular = {o.key: o.irregular for o in store.list(irregular=True)}
    assert irregular == {"pipe": "a named pipe (FIFO)", "zero": "a device behind a symbolic link",
                         "nowhere": "a symbolic link to nothing"}  # fmt: skip


# --- extreme images: rejected from the header or shrunk before padding ------------------


@pytest.mark.parametrize(
    ("shape", "mode", "size", "outcome"),
    [
        ((2000, 20000, 3), images.GRAY28, 28, "prepared (28, 28)"),
        ((2000, 20000, 3), images.RGB, 64, "prepared (64, 64, 3)"),
        ((666, 60000), images.GRAY28, 28, "rejected: too long: 60000x666"),
        ((666, 60000, 3), images.RGB, 64, "rejected: too long: 60000x666"),
        ((40, 2400), images.GRAY28, 28, "prepared (28, 28)"),  # a strip: any shape is priced
        ((10, 20000, 3), images.RGB, 64, "prepared (64, 64, 3)"),
    ],
    ids=[
        "20000x2000-gray28",
        "20000x2000-rgb",
        "60000x666-gray28",
        "60000x666-rgb",
        "strip",
        "20000x10-rgb",
    ],
)
def test_extreme_images_stay_within_memory(tmp_path, shape, mode, size, outcome):
    # Padding these to a square first took 3 GB (20000x2000) and would take ~11 GB
    # (60000x666): a decoded 20000x2000 RGB image is 120 MB, its square 1.2 GB.
    path = tmp_path / "wide.png"
    path.write_bytes(_png(garment(*shape[:2], channels=shape[2] if len(shape) > 2 else 0)))
    result = peak("decode", str(path), mode, str(size))
    assert result["outcome"].startswith(outcome), result
    assert result["above_kb"] < 300 * MB, result


def test_large_image_shrunk_keeps_its_content():
    """A garment 4000 px wide comes out as the same garment as its 1000 px version."""
    small = images.prepare(_png(garment(600, 1000)), images.GRAY28, 28)
    large = images.prepare(_png(garment(2400, 4000)), images.GRAY28, 28)
    assert np.abs(small.astype(int) - large.astype(int)).max() <= 8
    rgb = images.prepare(_png(garment(2400, 4000, channels=3)), images.RGB, 48)
    assert rgb.shape == (48, 48, 3) and rgb.max() >= 200


def test_small_images_keep_their_pixels():
    """Images up to WORK_SIDE take the path they always took: the padding of the whole
    image, resized once (the dataset's and the tests' images)."""
    a = garment(30, 90)
    padded = np.zeros((90, 90), np.uint8)
    padded[30:60] = a
    expected = np.asarray(Image.fromarray(padded).resize((28, 28), Image.Resampling.LANCZOS))
    assert np.array_equal(images.prepare(_png(a), images.GRAY28, 28), expected)
    own = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    own[0], own[-1], own[:, 0], own[:, -1] = 0, 0, 0, 0
    assert np.array_equal(images.prepare(_png(own)), own), "28x28 on dark: unchanged"


def test_huge_file_is_rejected_from_its_size_unread(tmp_path):
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(1 << 30)
    result = peak("read", str(tmp_path), "huge.png")
    assert result["outcome"] == f"rejected: too large: {1 << 30} bytes > 52428800 (max_bytes)"
    assert result["above_kb"] < 20 * MB, result
    (tmp_path / "small.png").write_bytes(_png(garment()))
    assert peak("read", str(tmp_path), "small.png")["outcome"].startswith("read ")


def test_s3_reads_have_limits_and_timeouts(s3_uri):
    store = open_store(s3_uri)
    config = store.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (10.0, 60.0)
    store.put_bytes("big.bin", b"\0" * 200_000)
    with pytest.raises(TooLarge, match="200000 bytes, over the limit of 1000") as err:
        store.get_bytes("big.bin", max_bytes=1000)
    assert (err.value.size, err.value.limit) == (200_000, 1000)
    assert len(store.get_bytes("big.bin", max_bytes=200_000)) == 200_000


def test_parquet_over_the_row_cap_is_rejected_whole():
    body = rows_parquet(6)
    calls = []

    def decode(data, limit):
        calls.append(len(data))
        return images.prepare(data, max_pixels=limit)

    out = list(decode_object("x.parquet", body, 1_000_000, decode, max_rows=5))
    assert out == [("x.parquet", None, "too many rows: 6 > 5 (max_rows_per_object)")]
    assert calls == [], "no image of it was decoded"
    out = list(decode_object("x.parquet", body, 1_000_000, decode, max_bytes=10))
    assert (
        len(out) == 1
        and out[0][2].startswith("too large: ")
        and out[0][2].endswith(" bytes uncompressed > 10 (max_bytes)")
    )
    assert len(list(decode_object("x.parquet", body, 1_000_000, decode, max_rows=6))) == 6


# --- local identity: a same-size rewrite that keeps the mtime is a new version ----------


def test_same_size_rewrite_keeping_mtime_is_priced_again(local_lake, tmp_path):
    lake, mv = local_lake.lake, local_lake.model_version
    drop = Path(lake.store.uri) / "drops" / "rewritten"
    drop.mkdir(parents=True)
    (drop / "a.bmp").write_bytes(_bmp(garment()))
    (drop / "b.bmp").write_bytes(_bmp(garment(value=90)))
    options = ScoreOptions(shard_size=2)
    first = score_drop(lake, "rewritten", mv, options)
    assert first["counts"]["priced"] == 2
    before = os.stat(drop / "a.bmp")

    new = tmp_path / "a.bmp"  # other pixels, the same byte size (BMP), the old mtime
    new.write_bytes(_bmp(255 - garment(value=40)))
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
    shutil.copy2(new, drop / "a.bmp")  # as `cp -p` or `rsync -a` would
    after = os.stat(drop / "a.bmp")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    assert drops_needing_scores(lake, mv) == ["rewritten"]
    second = score_drop(lake, "rewritten", mv, options)
    run = lake.score_run("rewritten", mv)
    plans = run.plans()
    assert len(plans) == 2 and [k for e in plans[2]["shards"].values() for k, _ in e] == ["a.bmp"]
    assert second["superseded_rows"] == 1 and second["counts"]["priced"] == 2
    assert score_drop(lake, "rewritten", mv, options)["skipped"] is True


def test_local_versions_are_stable_while_nothing_changes(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("x/claim.json", b'{"owner": "a"}')
    assert list(store.list()) == list(store.list()), "the listing's ETags do not drift"
    body, token = store.get_versioned("x/claim.json")
    assert store.get_versioned("x/claim.json")[1] == token
    assert store.put_if_match("x/claim.json", b'{"owner": "b"}', token) is True
    assert store.put_if_match("x/claim.json", b'{"owner": "c"}', token) is False


# --- listings that meet dangling links and entries vanishing under them -----------------


def test_listing_while_files_vanish(tmp_path):
    store = LocalStore(tmp_path)
    for i in range(5):
        store.put_bytes(f"_claims/stable-{i}.json", b"{}")
    churn = tmp_path / "_claims"
    stop, errors = threading.Event(), []

    def churner():
        n = 0
        while not stop.is_set():
            n += 1
            f, d = churn / f"churn-{n % 7}.json", churn / f"sub-{n % 3}"
            try:
                f.write_bytes(b"{}")
                d.mkdir(exist_ok=True)
                (d / "x.json").write_bytes(b"{}")
                f.unlink()
                (d / "x.json").unlink()
                d.rmdir()
            except OSError as err:  # pragma: no cover - the test's own writer failed
                errors.append(err)

    thread = threading.Thread(target=churner, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            keys = store.keys("_claims/")
            assert {f"_claims/stable-{i}.json" for i in range(5)} <= set(keys)
            store.keys("_claims/stable-")
            list(store.list("_claims/", irregular=True))
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_claims_read_while_other_scorers_take_and_release_them(tmp_path):
    run = Lake(LocalStore(tmp_path)).score_run("d", "m-x")
    for i in range(3):
        assert run.create_claim(f"stable-{i}", {"owner": "a", "claim": str(i)})
    stop, released = threading.Event(), [0]

    def other_scorer():
        n = 0
        while not stop.is_set():
            n += 1
            name = f"00000001-{n % 5:05d}"
            if run.create_claim(name, {"owner": "b", "claim": str(n)}):
                run.drop_claim(name)
                released[0] += 1

    thread = threading.Thread(target=other_scorer, daemon=True)
    thread.start()
    try:
        for _ in range(2000):
            held = run.claims()  # never ObjectNotFound for a claim released meanwhile
            assert {f"stable-{i}" for i in range(3)} <= set(held)
    finally:
        stop.set()
        thread.join()
    assert released[0] > 100, "the other scorer churned claims while they were read"


def test_drop_ids_and_listing_with_dangling_links(local_lake):
    lake, mv = local_lake.lake, local_lake.model_version
    drops = Path(lake.store.uri) / "drops"
    (drops / "d1").mkdir(parents=True)
    (drops / "d1" / "a.png").write_bytes(_png(garment()))
    (drops / "d1" / "gone.png").symlink_to(drops / "d1" / "nothing.png")
    (drops / "broken").symlink_to(drops / "no-such-drop")
    (drops / "elsewhere").symlink_to("/nonexistent/folder")
    assert lake.drop_ids() == ["d1"]
    listing, skipped = locate_drop(lake, "d1").listing()
    assert [(o.key, o.irregular) for o in listing] == [
        ("a.png", ""), ("gone.png", "a symbolic link to nothing")
    ] and skipped == 0  # fmt: skip
    assert drops_needing_scores(lake, mv) == ["d1"]
    manifest = score_drop(lake, "d1", mv, ScoreOptions(shard_size=2))
    assert manifest["counts"] == {"listed": 2, "priced": 1, "rejected": 1}
    assert drops_needing_scores(lake, mv) == []
