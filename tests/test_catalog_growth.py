"""Catalogs that grow: images decoded once per content, splits stable per image, a price
change that touches no pixel, an ingest killed midway that keeps what it wrote, and a
line retrained night after night with a fair gate every time."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.catalog import ingest_catalog
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore, open_store
from tests.catalog_data import csv_text, garments, write_catalog

REPO = Path(__file__).resolve().parents[1]


class Catalog:
    """A tinted catalog on disk (or copied to a bucket) and its prices CSV."""

    def __init__(self, root: Path, n: int, store_uri: str | None = None):
        self.root, self.dir = root, root / "photos"
        images, labels = garments(n, seed=5)
        self.rows = write_catalog(self.dir, images, labels)
        self.s3 = store_uri if store_uri and store_uri.startswith("s3://") else None
        self.sync()

    @property
    def source(self) -> str:
        return f"s3://{self.s3.split('/')[2]}/photos/" if self.s3 else str(self.dir)

    @property
    def prices(self) -> str:
        return f"s3://{self.s3.split('/')[2]}/prices.csv" if self.s3 else str(self.root / "p.csv")

    def sync(self) -> None:
        text = csv_text(self.rows)
        (self.root / "p.csv").write_text(text)
        if self.s3:
            bucket = self.s3.split("/")[2]
            files = open_store(f"s3://{bucket}/photos")
            for key in [o.key for o in files.list()]:
                if not (self.dir / key).exists():
                    files.delete(key)
            for path in self.dir.rglob("*"):
                if path.is_file():
                    files.put_bytes(path.relative_to(self.dir).as_posix(), path.read_bytes())
            open_store(f"s3://{bucket}").put_bytes("prices.csv", text.encode())

    def add(self, n: int, seed: int) -> list[str]:
        images, labels = garments(n, seed=seed)
        new = write_catalog(self.root / "new", images, labels, seed=seed)
        keys = []
        for row in new:
            key = f"new{seed}/{row['image']}"
            (self.dir / key).parent.mkdir(parents=True, exist_ok=True)
            (self.root / "new" / row["image"]).rename(self.dir / key)
            self.rows.append(row | {"image": key})
            keys.append(key)
        self.sync()
        return keys

    def reprice(self, n: int) -> list[str]:
        for row in self.rows[:n]:
            row["price"] = f"{float(row['price']) + 25:.2f}"
        self.sync()
        return [r["image"] for r in self.rows[:n]]

    def remove(self, n: int) -> list[str]:
        gone, self.rows = self.rows[-n:], self.rows[:-n]
        for row in gone:
            (self.dir / row["image"]).unlink()
        self.sync()
        return [r["image"] for r in gone]


def rows_of(lake: Lake, dv: str) -> dict[str, list]:
    dataset = lake.catalog(dv)
    return {s: dataset.read_split(s).to_pylist() for s in ("train", "test")}


def test_grown_catalog_decodes_only_what_changed_and_equals_a_fresh_build(store_uri, tmp_path):
    catalog = Catalog(tmp_path, 48, store_uri)
    lake = Lake(open_store(store_uri))
    # pool_min=1: decoded on a process pool, small as the catalog is
    first = ingest_catalog(
        lake, catalog.source, catalog.prices, "shop", workers=2, shard_rows=16, pool_min=1
    )
    assert (first["decoded"], first["reused"]) == (48, 0)
    old_dv = first["dataset_version"]
    old_test = set(lake.catalog(old_dv).split_ids("test"))
    assert 0 < len(old_test) < 48

    removed = catalog.remove(3)
    added = catalog.add(5, seed=11)
    grown = ingest_catalog(lake, catalog.source, catalog.prices, "shop", workers=2,
                           shard_rows=16)  # fmt: skip
    assert (grown["decoded"], grown["reused"]) == (5, 45), "only the new photos are decoded"
    new = lake.catalog(grown["dataset_version"])
    new_ids = set(new.split_ids("train")) | set(new.split_ids("test"))
    assert set(added) <= new_ids and not set(removed) & new_ids
    assert set(removed) <= set(lake.catalog(old_dv).split_ids("train")) | old_test, (
        "a removed image is still in the old version"
    )
    assert old_test - set(removed) <= set(new.split_ids("test")), "old images keep their split"
    # The old shards are shared, not rewritten: the new version names them.
    assert set(lake.catalog(old_dv).manifest()["pixel_shards"]) <= set(
        new.manifest()["pixel_shards"]
    ) | set(lake.catalog(old_dv).manifest()["pixel_shards"])

    fresh = Lake(LocalStore(tmp_path / "fresh"))
    scratch = ingest_catalog(fresh, catalog.source, catalog.prices, "shop", workers=1)
    assert scratch["dataset_version"] == grown["dataset_version"]
    assert scratch["labels_version"] == grown["labels_version"]
    assert rows_of(fresh, scratch["dataset_version"]) == rows_of(lake, grown["dataset_version"])
    assert fresh.labels(scratch["dataset_version"], scratch["labels_version"]).prices() == (
        lake.labels(grown["dataset_version"], grown["labels_version"]).prices()
    )

    again = ingest_catalog(lake, catalog.source, catalog.prices, "shop")
    assert again["skipped"] and (again["decoded"], again["reused"]) == (0, 50)


def test_a_price_change_alone_makes_new_labels_and_decodes_nothing(tmp_path):
    catalog = Catalog(tmp_path, 30)
    lake = Lake(LocalStore(tmp_path / "lake"))
    first = ingest_catalog(lake, catalog.source, catalog.prices, "shop", workers=1)
    changed = catalog.reprice(2)
    second = ingest_catalog(lake, catalog.source, catalog.prices, "shop", workers=1)
    assert second["dataset_version"] == first["dataset_version"]
    assert second["labels_version"] != first["labels_version"] and not second["skipped"]
    assert (second["decoded"], second["reused"]) == (0, 30)
    before = lake.labels(first["dataset_version"], first["labels_version"]).prices().to_pylist()
    after = lake.labels(second["dataset_version"], second["labels_version"]).prices().to_pylist()
    moved = {a["image_id"] for a, b in zip(before, after, strict=True) if a["price"] != b["price"]}
    assert moved == set(changed)


def test_touching_a_file_rehashes_it_but_decodes_nothing_new(tmp_path):
    catalog = Catalog(tmp_path, 20)
    lake = Lake(LocalStore(tmp_path / "lake"))
    first = ingest_catalog(lake, catalog.source, catalog.prices, "shop", workers=1)
    path = catalog.dir / catalog.rows[0]["image"]
    os.utime(path, ns=(time.time_ns(), time.time_ns()))  # same bytes, new identity
    # a rewrite with other pixels: a new content id
    other = catalog.dir / catalog.rows[1]["image"]
    with Image.open(other) as im:
        pixels = np.asarray(im.convert("RGB")).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(other, format=im.format or "PNG")
    second = ingest_catalog(lake, catalog.source, catalog.prices, "shop", workers=1)
    assert second["reused"] == 18 and second["decoded"] == 2
    assert second["dataset_version"] != first["dataset_version"]
    shards = lake.catalog(second["dataset_version"]).manifest()["pixel_shards"]
    written = [s for s in shards if s not in lake.catalog(first["dataset_version"])
               .manifest()["pixel_shards"]]  # fmt: skip
    assert len(written) == 1 and len(lake.catalog_pixels("shop").shard(written[0])["ids"]) == 1, (
        "the touched file's content was already stored: only the changed one is new"
    )


def _noise_catalog(root: Path, n: int) -> tuple[str, str]:
    """Large noisy photos (slow to decode: a kill lands mid-ingest) and their prices."""
    rng = np.random.default_rng(0)
    (root / "big").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(
            root / "big" / f"{i:03d}.png", compress_level=1
        )
        rows.append({"image": f"{i:03d}.png", "price": f"{10 + i}"})
    (root / "p.csv").write_text(csv_text(rows))
    return str(root / "big"), str(root / "p.csv")


def test_a_killed_ingest_keeps_its_shards_and_the_rerun_finishes_once(tmp_path):
    from tasks.data.catalog import CHUNK

    # More than two chunks of decode work: a chunk's shards are written as it is done, so
    # the kill lands while a later chunk decodes, however fast the machine.
    n = 2 * CHUNK + 12
    source, prices = _noise_catalog(tmp_path, n)
    store = tmp_path / "lake"
    lake = Lake(LocalStore(store))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.programs.ingest", str(store), source, prices, "big",
         "6", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pixels = lake.catalog_pixels("big")
    deadline = time.monotonic() + 300
    while len(pixels.shards()) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = len(pixels.shards())
    assert 2 <= written < -(-n // 6), "killed mid-ingest, with some shards written"
    assert lake.catalog_versions("big") == [], "nothing half-written is a version"

    out = ingest_catalog(lake, source, prices, "big", shard_rows=6, workers=1)
    assert out["reused"] >= 6 * written and out["decoded"] == n - out["reused"]
    fresh = Lake(LocalStore(tmp_path / "fresh"))
    scratch = ingest_catalog(fresh, source, prices, "big", shard_rows=6, workers=2, pool_min=1)
    assert scratch["dataset_version"] == out["dataset_version"]
    assert rows_of(fresh, scratch["dataset_version"]) == rows_of(lake, out["dataset_version"])
    ids = [i for s in pixels.shards() for i in pixels.shard(s)["ids"]]
    assert len(ids) == len(set(ids)) == n, "every image stored exactly once"


def _gate_facts(lake: Lake, decision: dict) -> tuple[set[str], set[str], int, int]:
    """(the challenger's test ids, the champion's train ids, n scored for each side)."""
    c = lake.model(decision["challenger"]["model_version"]).lineage()
    m = lake.model(decision["champion"]["model_version"]).lineage()
    test = set(lake.catalog(c["dataset_version"]).split_ids("test"))
    train = set(lake.catalog(m["dataset_version"]).split_ids("train"))
    return test, train, decision["challenger"]["metrics"]["n"], decision["champion"]["metrics"]["n"]


@pytest.mark.usefixtures("prefect_server")
def test_nightly_retrains_each_end_in_a_fair_recorded_decision(tmp_path):
    from flows.catalog import catalog_flow
    from tasks.model.train_settings import TrainSettings
    from tests.conftest import TINY

    catalog = Catalog(tmp_path, 60)
    store = str(tmp_path / "lake")
    lake = Lake(LocalStore(store))
    settings = TrainSettings(**TINY | {"preprocess": "rgb", "warm_start": "champion"})

    def night(**kw) -> dict:
        champion = lake.registry("shop").champion()
        out = catalog_flow(source=catalog.source, prices=catalog.prices, name="shop",
                           store=store, settings=settings, **kw)  # fmt: skip
        warm = out["train"]["warm_start"]
        if champion is None:
            assert warm is None, "no champion yet: the first night trains from the start"
        else:  # each night starts from the champion of that moment
            assert warm["parent"] == champion["model_version"]
        return out

    first = night(force=True)
    assert first["promote"]["promoted"]
    nights = []
    catalog.add(6, seed=21)
    nights.append(night())
    assert nights[-1]["train"]["warm_start"]["changed"] > 0, "new train images were fit"
    catalog.reprice(5)
    nights.append(night())
    assert nights[-1]["ingest"]["counts"]["decoded"] == 0
    assert nights[-1]["train"]["features"]["hit"], "a price change recomputes no feature"
    catalog.remove(4)
    nights.append(night())
    decisions = lake.registry("shop").decisions()
    assert len(decisions) == 4, "a decision is recorded for every retrain"
    for d in decisions[1:]:
        test, champion_train, n_challenger, n_champion = _gate_facts(lake, d)
        assert d["champion"] is not None and not test & champion_train
        assert n_challenger == n_champion == len(test), "both scored on the same images"
    unchanged = catalog_flow(source=catalog.source, prices=catalog.prices, name="shop",
                             store=store, settings=settings)  # fmt: skip
    assert set(unchanged["skipped"]) == {"ingest", "train", "evaluate"}, "nothing retrained"

    # A split column that moves some of the champion's train images to test: they are
    # left out for both models.
    champion_dv = lake.model(lake.registry("shop").champion()["model_version"]).lineage()[
        "dataset_version"
    ]
    moved = sorted(lake.catalog(champion_dv).split_ids("train"))[:4]
    test_now = set(lake.catalog(nights[-1]["ingest"]["dataset_version"]).split_ids("test"))
    for row in catalog.rows:
        row["split"] = "test" if row["image"] in moved or row["image"] in test_now else "train"
    catalog.sync()
    night()
    last = lake.registry("shop").decisions()[-1]
    test, champion_train, n_challenger, n_champion = _gate_facts(lake, last)
    assert set(moved) <= test and set(moved) <= champion_train
    assert n_challenger == n_champion == len(test - champion_train) == len(test) - 4
    assert last["champion"]["metrics"]["images"]["leave_out_train_of"] == champion_dv


def _features_of(lake: Lake, result: dict, views: int, tmp: Path) -> tuple[np.ndarray, ...]:
    """A trained model's cached features: train images (every view) and test (view 0),
    in image_id order."""
    from tasks.data.loading import load_data

    dv, lv = result["lineage"]["dataset_version"], result["lineage"]["labels_version"]
    data = load_data(lake, dv, lv, {"train": None, "test": None}, 0, pixels=False)
    where = {r["image_id"]: (r["shard"], r["row"]) for r in lake.catalog(dv).index().to_pylist()}
    cache = lake.shard_features(result["features"]["key"])
    tmp.mkdir()

    def gather(ids: list[str], n: int) -> np.ndarray:
        return np.stack([cache.open(where[i][0], str(tmp))[:n, where[i][1]] for i in ids], 1)

    return gather(data.train.ids, views), gather(data.test.ids, 1)[0]


def test_grown_catalog_extracts_features_only_for_its_new_images(tmp_path):
    from tasks.model.train_settings import TrainSettings
    from tasks.model.training import train
    from tests.conftest import TINY

    # float32: bf16 sums differ with a batch's make-up by more than float16's rounding
    settings = TrainSettings(**TINY | {"preprocess": "rgb", "views": 3, "precision": "float32"})
    catalog = Catalog(tmp_path, 40)
    lake = Lake(LocalStore(tmp_path / "lake"))

    def build(target: Lake, **kw) -> dict:
        out = ingest_catalog(target, catalog.source, catalog.prices, "shop", workers=1, **kw)
        trained = train(target, out["dataset_version"], out["labels_version"], settings)
        if "lineage" not in trained:
            trained["lineage"] = target.model(trained["model_version"]).lineage()
        return trained

    first = build(lake, shard_rows=16)
    assert (first["features"]["extracted_shards"], first["features"]["extracted_images"]) == (3, 40)
    catalog.add(6, seed=31)
    grown = build(lake, shard_rows=16)
    assert (grown["features"]["extracted_shards"], grown["features"]["extracted_images"]) == (1, 6)
    assert grown["features"]["key"] == first["features"]["key"], "one cache for the line"

    fresh = Lake(LocalStore(tmp_path / "fresh"))
    scratch = build(fresh, shard_rows=20)  # other shards: the features must not care
    assert scratch["model_version"] == grown["model_version"]
    a_train, a_test = _features_of(lake, grown, 3, tmp_path / "a")
    b_train, b_test = _features_of(fresh, scratch, 3, tmp_path / "b")
    assert a_train.shape == b_train.shape == (3, a_train.shape[1], *a_train.shape[2:])
    span = float(np.abs(a_train.astype(np.float32)).max())
    np.testing.assert_allclose(a_train.astype(np.float32), b_train.astype(np.float32),
                               rtol=2e-3, atol=1e-3 * span)  # fmt: skip
    np.testing.assert_allclose(a_test.astype(np.float32), b_test.astype(np.float32),
                               rtol=2e-3, atol=1e-3 * span)  # fmt: skip
    assert not np.array_equal(a_train[0], a_train[2]), "view 2 is shifted"


def _extracted(lake: Lake) -> list[str]:
    """The feature shards stored (their arrays: each one's marker)."""
    return [k for k in lake.store.keys("features/") if k.endswith(".npy")
            and not k.endswith(".means.npy")]  # fmt: skip


def _train_child(lake_dir: Path, out: dict, settings: dict, **env: str) -> subprocess.Popen:
    import json

    return subprocess.Popen(
        [sys.executable, "-m", "tests.programs.train", str(lake_dir),
         out["dataset_version"], out["labels_version"], json.dumps(settings)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ | env,
    )  # fmt: skip


def test_a_killed_extraction_keeps_its_shards_and_the_rerun_extracts_the_rest(
    tmp_path, monkeypatch
):
    from tasks.model.train_settings import TrainSettings
    from tasks.model.training import resolved, train
    from tests.conftest import TINY

    catalog = Catalog(tmp_path, 120)
    lake = Lake(LocalStore(tmp_path / "lake"))
    out = ingest_catalog(lake, catalog.source, catalog.prices, "shop", workers=1, shard_rows=8)
    n_shards = len(lake.catalog(out["dataset_version"]).manifest()["pixel_shards"])
    # input 64 and 4 views: slow enough that the kill lands between shards
    settings = TINY | {"preprocess": "rgb", "input_size": 64, "views": 4}
    monkeypatch.setenv("VGGPRICE_EXTRACT_CLAIM_SECONDS", "2")  # the dead one's claim lapses
    child = _train_child(tmp_path / "lake", out, settings)
    deadline = time.monotonic() + 300
    while len(_extracted(lake)) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    done = len(_extracted(lake))
    assert 2 <= done < n_shards, "killed mid-extraction"
    held = lake.shard_features(lake.store.keys("features/")[0].split("/")[1]).claims()
    assert len(held) <= 1, "the dead extractor held at most the shard it was on"
    result = train(lake, out["dataset_version"], out["labels_version"], TrainSettings(**settings))
    assert result["features"]["extracted_shards"] == n_shards - done
    assert result["features"]["extracted_here"] == n_shards - done, "the dead claim taken over"
    assert len(_extracted(lake)) == n_shards, "each shard's features stored once"
    assert not lake.shard_features(result["features"]["key"]).claims(), "every claim released"
    assert lake.model(result["model_version"]).complete
    assert resolved(TrainSettings(**settings)).extraction_engine in ("keras", "openvino")


def test_two_trainings_at_once_extract_each_feature_shard_once(tmp_path):
    """Two trainings of the same line at once (a nightly run beside a manual one): the
    extractors claim shards from one another through the ledger, so every shard is
    computed once, and both finish with the same model."""
    import json

    from tests.conftest import TINY

    catalog = Catalog(tmp_path, 120)
    lake = Lake(LocalStore(tmp_path / "lake"))
    out = ingest_catalog(lake, catalog.source, catalog.prices, "shop", workers=1, shard_rows=8)
    n_shards = len(lake.catalog(out["dataset_version"]).manifest()["pixel_shards"])
    settings = TINY | {"preprocess": "rgb", "input_size": 64, "views": 4}
    one_core = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
                "OMP_NUM_THREADS": "1"}  # fmt: skip
    children = [_train_child(tmp_path / "lake", out, settings, **one_core) for _ in range(2)]
    results = [child.communicate() for child in children]
    for child, (_, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err[-4000:]
    facts = [json.loads(stdout.splitlines()[-2]) for stdout, _ in results]
    versions = {stdout.split()[-1] for stdout, _ in results}
    assert len(versions) == 1, "one model version for one set of inputs"
    assert sum(f["extracted_here"] for f in facts) == n_shards, f"each shard once: {facts}"
    assert not any("stored by another extractor first" in err for _, err in results)
    assert len(_extracted(lake)) == n_shards
    assert not lake.shard_features(facts[0]["key"]).claims(), "every claim released"


def test_a_shard_stream_holds_a_few_shards_whatever_the_catalog_size(tmp_path):
    """Peak memory of streaming a split, traced (numpy reports its allocations), against
    a budget from the shard size, for 8 and for 40 shards: the same."""
    import tracemalloc

    from tasks.model.features import ShardStream

    rows, views, feature = 64, 3, (2, 2, 512)
    shard_bytes = rows * int(np.prod(feature)) * 2  # one view of one shard, float16
    rng = np.random.default_rng(0)

    def peak(n_shards: int) -> tuple[int, int]:
        lake = Lake(LocalStore(tmp_path / f"lake{n_shards}"))
        cache = lake.shard_features("ft-test")
        at = []
        for s in range(n_shards):
            name = f"px-{s:04d}"
            cache.write(name, rng.standard_normal((views, rows, *feature)).astype(np.float16),
                        np.zeros(rows))  # fmt: skip
            at += [(name, r) for r in range(rows)]
        y = rng.random(len(at)).astype(np.float32)
        (tmp_path / f"copies{n_shards}").mkdir()
        stream = ShardStream(cache, at, y, views, str(tmp_path / f"copies{n_shards}"))
        tracemalloc.start()
        seen = 0
        for x, _ in stream.batches(32, seed=1, epoch=2, shuffle=True):
            seen += len(x)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seen == len(at)
        return top, n_shards * views * shard_bytes

    small, _ = peak(8)  # two windows: the carry between windows is there too
    large, total = peak(40)
    # a window of four shards' rows (one view) at most five times over: the parts, their
    # concatenation, the shuffled copy, the rows carried joined to the next window's
    budget = 5 * 4 * shard_bytes
    assert large <= budget, f"{large} bytes traced, budget {budget} (8 shards: {small})"
    assert large < total / 5 and large <= 1.25 * small + shard_bytes


def test_run_workers_extracts_the_features_in_dask_processes(tmp_path):
    """`vggprice run --source ... --workers 2`: two Dask worker processes extract the
    catalog's features through the ledger before the training, each shard once; the
    features are those the training would have made itself, and the model the same."""
    import json

    from tasks.model.train_settings import TrainSettings
    from tasks.model.training import train
    from tests.conftest import TINY, prefect_home

    catalog = Catalog(tmp_path, 120)
    fields = TINY | {"preprocess": "rgb", "views": 2, "precision": "float32"}
    sets = [a for k, v in fields.items() for a in ("--set", f"{k}={v}")]
    store = tmp_path / "lake"
    # ingested first in shards of 8 (the command's own ingest finds the version)
    ingest_catalog(Lake(LocalStore(store)), catalog.source, catalog.prices, "shop", workers=1,
                   shard_rows=8)  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--source", catalog.source, "--prices",
         catalog.prices, "--name", "shop", "--workers", "2", "--force", "--json",
         "--store", str(store), *sets],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "prefect")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    trained = json.loads(out.stdout)["train"]
    lake = Lake(LocalStore(store))
    n_shards = len(_extracted(lake))
    extracted = trained["extracted"]
    assert extracted["missing_shards"] == n_shards > 1, extracted
    assert extracted["processes"]["stored"] == n_shards, "each shard once, by the processes"
    assert len(extracted["processes"]["by_extractor"]) == 2, "two extractor processes"
    assert trained["features"]["extracted_here"] == 0, "the training found every shard stored"

    fresh = Lake(LocalStore(tmp_path / "fresh"))
    made = ingest_catalog(fresh, catalog.source, catalog.prices, "shop", workers=1, shard_rows=8)
    here = train(fresh, made["dataset_version"], made["labels_version"], TrainSettings(**fields))
    assert here["model_version"] == trained["model_version"], "the same inputs, the same model"
    assert here["features"]["extracted_here"] == n_shards
    for key in _extracted(lake):
        ours = np.load(io.BytesIO(lake.store.get_bytes(key))).astype(np.float32)
        theirs = np.load(io.BytesIO(fresh.store.get_bytes(key))).astype(np.float32)
        np.testing.assert_allclose(ours, theirs, rtol=2e-3, atol=1e-3 * float(np.abs(ours).max()))
