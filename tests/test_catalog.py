"""Your own catalog: a tinted colour catalog with bad rows and bad files, through ingest,
training, evaluation, promotion and scoring, beside the demo line in one store."""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from flows.catalog import catalog_flow
from flows.cli import main
from flows.score import score_flow
from tasks.data.catalog import CatalogError, ingest_catalog
from tasks.data.images import GRAY28, RGB, ImageRejected, pixel_shape, prepare
from tasks.data.loading import load_data
from tasks.governance.registry import LineError, resolve_model
from tasks.model.export import cached_model_file, load_stored_model, predict_prices, preprocess_of
from tasks.model.train_settings import TrainSettings
from tasks.reports import GARMENTS, line_key, store_tag
from tasks.store.lake import Lake, NotInLake
from tasks.store.storage import LocalStore, open_store
from tests.catalog_data import csv_text, encode, garments, tint, write_catalog
from tests.catalog_data import tinted as tinted_rows
from tests.conftest import TINY, copy_lake

TINY_RGB = TINY | {"preprocess": "rgb"}
N_BAD_ROWS = 5  # a missing image, a negative price, a text price, an image priced twice


def make_catalog(directory: Path, n: int = 60) -> tuple[Path, str]:
    """Images (PNG and JPEG, in folders), two undecodable files and a hidden one, and a
    prices CSV whose last rows are bad; returns (images dir, CSV text)."""
    images, labels = garments(n, seed=3)
    rows = write_catalog(directory, images, labels)
    (directory / "red" / "broken.png").write_bytes(encode(tint(images[0], "red"), "PNG")[:60])
    (directory / "notes.jpg").write_text("not an image")
    (directory / ".DS_Store").write_bytes(b"\0\1")
    (directory / "extra").mkdir()
    for name in ("neg.png", "text.png"):
        (directory / "extra" / name).write_bytes(encode(tint(images[1], "blue"), "PNG"))
    good = rows + [
        {"image": "red/broken.png", "price": "50", "category": GARMENTS[0]},
        {"image": "notes.jpg", "price": "50", "category": GARMENTS[0]},
    ]
    bad = [
        {"image": "nope.png", "price": "10", "category": GARMENTS[0]},
        {"image": "extra/neg.png", "price": "-5", "category": GARMENTS[1]},
        {"image": "extra/text.png", "price": "cheap", "category": GARMENTS[1]},
        dict(rows[2]),  # priced twice: both rows are bad
    ]
    return directory, csv_text(good + bad)


class CatalogFiles(NamedTuple):
    source: str  # the images directory
    prices: str  # the prices CSV


@pytest.fixture
def catalog_files(tmp_path) -> CatalogFiles:
    directory, text = make_catalog(tmp_path / "photos")
    prices = tmp_path / "prices.csv"
    prices.write_text(text)
    return CatalogFiles(source=str(directory), prices=str(prices))


def test_bad_rows_fail_in_one_line_and_write_nothing(catalog_files, tmp_path, capsys):
    source, prices = catalog_files
    lake = Lake(LocalStore(tmp_path / "lake"))
    with pytest.raises(CatalogError) as err:
        ingest_catalog(lake, source, prices, "shoes")
    message = str(err.value)
    assert f"{N_BAD_ROWS} bad rows" in message and "--skip-bad-rows" in message
    assert "priced 2 times" in message and "\n" not in message
    assert lake.store.keys() == [], "nothing is written when the table has bad rows"

    assert main(["run", "--source", source, "--prices", prices, "--name", "shoes",
                 "--store", str(tmp_path / "lake")]) == 2  # fmt: skip
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("vggprice: error: ") and "5 bad rows" in out[0]

    columns = tmp_path / "cols.csv"
    columns.write_text("img,cost\na.png,1\n")
    with pytest.raises(CatalogError, match=r"missing columns image, price \(found: img, cost"):
        ingest_catalog(lake, source, str(columns), "shoes")
    with pytest.raises(ValueError, match="invalid catalog name"):
        ingest_catalog(lake, source, prices, "Shoes/x")
    assert lake.store.keys() == []


def test_skip_bad_rows_records_them_and_rejects_bad_files(catalog_files, tmp_path):
    source, prices = catalog_files
    lake = Lake(LocalStore(tmp_path / "lake"))
    first = ingest_catalog(lake, source, prices, "shoes", skip_bad_rows=True)
    dataset = lake.catalog(first["dataset_version"])
    counts = first["manifest"]["counts"]
    assert first["skipped_rows"] == N_BAD_ROWS and counts["rejected_images"] == 2
    labels = lake.labels(first["dataset_version"], first["labels_version"])
    skipped = labels.skipped().to_pylist()
    assert {r["image"] for r in skipped} >= {"nope.png", "extra/neg.png", "extra/text.png"}
    reasons = " ".join(r["reason"] for r in skipped)
    assert "no such image" in reasons and "negative price" in reasons
    assert "not a number" in reasons and "priced 2 times" in reasons
    rejected = {r["image"]: r["reason"] for r in dataset.rejected().to_pylist()}
    assert set(rejected) == {"red/broken.png", "notes.jpg"}
    # Stored images: RGB PNGs; the split is by key; scaling fit on train only.
    train = dataset.read_split("train")
    im = Image.open(io.BytesIO(train["image"][0].as_py()))
    assert im.format == "PNG" and im.mode == "RGB"
    table = labels.prices().to_pandas()
    assert set(table["split"]) == {"train", "test"}
    assert labels.scaling()["min"] == table[table.split == "train"].price.min()
    assert labels.scaling()["categories"] == sorted(set(table["category"]))
    again = ingest_catalog(lake, source, prices, "shoes", skip_bad_rows=True)
    assert again["skipped"] and again["dataset_version"] == first["dataset_version"]
    assert lake.dataset_versions() == [first["dataset_version"]]


def test_rgb_preparation_keeps_colour_and_fits_a_square():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :, 2] = 200  # blue
    out = prepare(encode(wide, "PNG"), RGB, 32)
    assert out.shape == (32, 32, 3) and out[16, 16, 2] > 150 and out[16, 16, 0] < 30
    assert prepare(encode(wide, "PNG"), GRAY28, 32).shape == (28, 28)
    assert pixel_shape(RGB, 40) == (40, 40, 3) and pixel_shape(GRAY28, 48) == (28, 28)
    with pytest.raises(ImageRejected):
        prepare(b"nope", RGB, 32)


def _drop_images(directory: Path) -> list[bytes]:
    """RGB JPEGs and PNGs of other sizes and modes, as a shop's new photos are."""
    rng = np.random.default_rng(7)
    out = []
    for i, (w, h) in enumerate([(60, 40), (33, 90), (28, 28), (128, 128)]):
        rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        out.append(encode(rgb, "JPEG" if i % 2 else "PNG"))
    rgba = Image.fromarray(rng.integers(0, 255, (50, 50, 4), dtype=np.uint8), "RGBA")
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    return out + [buf.getvalue()]


@pytest.mark.own_process
@pytest.mark.usefixtures("prefect_server")
def test_catalog_pipeline_beside_the_demo(store_uri, tiny_lake, catalog_files, tmp_path):
    demo_lake, _, _, demo_mv = tiny_lake
    lake = copy_lake(demo_lake, store_uri)
    source, prices = catalog_files
    if store_uri.startswith("s3://"):  # the catalog in the bucket too
        bucket = store_uri.split("/")[2]
        files = open_store(f"s3://{bucket}/photos")
        for path in Path(source).rglob("*"):
            if path.is_file():
                files.put_bytes(path.relative_to(source).as_posix(), path.read_bytes())
        open_store(f"s3://{bucket}").put_bytes("prices.csv", Path(prices).read_bytes())
        source, prices = f"s3://{bucket}/photos/", f"s3://{bucket}/prices.csv"

    result = catalog_flow(source=source, prices=prices, name="shoes", store=store_uri,
                          settings=TrainSettings(**TINY_RGB), skip_bad_rows=True, force=True)  # fmt: skip
    mv = result["train"]["model_version"]
    assert result["promote"]["promoted"] and result["line"] == "shoes"
    assert lake.lines() == ["demo", "shoes"]
    assert lake.registry("shoes").champion()["model_version"] == mv
    assert lake.registry().champion()["model_version"] == demo_mv, "the demo line is untouched"
    assert lake.registry("shoes").decisions()[0]["line"] == "shoes"

    model = lake.model(mv)
    config = model.config()
    assert preprocess_of(config) == ("rgb", 32) and config["input"]["shape"] == [32, 32, 3]
    import keras

    stored = keras.models.load_model(cached_model_file(model), safe_mode=True)
    assert tuple(stored.input_shape) == (None, 32, 32, 3)
    metrics = model.evaluation().metrics()
    assert metrics["grouped_by"] == "category" and metrics["baseline_rmse"] > 0
    assert metrics["per_group"] and {g["group"] for g in metrics["per_group"]} <= set(GARMENTS)

    # A drop of new photos plus each line's own test images (for parity).
    dv = model.lineage()["dataset_version"]
    test_pngs = lake.dataset(dv).read_split("test")
    demo_lineage = lake.model(demo_mv).lineage()
    demo_pngs = lake.dataset(demo_lineage["dataset_version"]).read_split("test")
    drop = lake.drop("new")
    for i, body in enumerate(_drop_images(tmp_path)):
        drop.store.put_bytes(drop.prefix + f"photo-{i}.{'jpg' if i % 2 else 'png'}", body)
    for prefix, table in (("cat", test_pngs), ("demo", demo_pngs)):
        for image_id, body in zip(table["image_id"].to_pylist(), table["image"].to_pylist(),
                                  strict=True):  # fmt: skip
            drop.store.put_bytes(drop.prefix + f"{prefix}/{image_id.replace('/', '_')}.png", body)

    with pytest.raises(LineError, match=r"several model lines \(demo, shoes\)"):
        resolve_model(lake, None)
    with pytest.raises(LineError, match=r"no model line 'boots'.*lines: demo, shoes"):
        resolve_model(lake, None, "boots")

    for line, model_version, prefix in (("shoes", mv, "cat"), ("demo", demo_mv, "demo")):
        out = score_flow(
            drop="new", store=store_uri, line=line, engine="keras", precision="float32"
        )  # parity with the evaluation's Keras
        assert out["model_version"] == model_version
        assert out["counts"]["rejected"] == 0 and out["counts"]["priced"] == out["counts"]["listed"]
        priced = lake.score_run("new", model_version).prices().to_pylist()
        by_key = {r["key"]: r["price"] for r in priced}
        # Parity: the drop's prices of the training data's own test images are the
        # evaluation's predictions of them (one preprocessing per mode).
        m = lake.model(model_version)
        lineage = m.lineage()
        data = load_data(lake, lineage["dataset_version"], lineage["labels_version"],
                         {"test": None}, 0, *preprocess_of(m.config()))  # fmt: skip
        expected = predict_prices(load_stored_model(m), data.test.images)
        got = [by_key[f"{prefix}/{i.replace('/', '_')}.png"] for i in data.test.ids]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

    from tests.test_training import artifacts_by_key

    keys = set(artifacts_by_key())
    named = {line_key(store_uri, "shoes", n) for n in (f"eval-{mv}", "champion", "drop-new")}
    assert named <= keys and all(k.startswith(store_tag(store_uri) + "-shoes-") for k in named)

    # Unchanged inputs: every stage skips, the champion stays.
    again = catalog_flow(source=source, prices=prices, name="shoes", store=store_uri,
                         settings=TrainSettings(**TINY_RGB), skip_bad_rows=True)  # fmt: skip
    assert again["skipped"] == ["ingest", "train", "evaluate"]
    assert again["promote"]["reason"] == "already the champion"


@pytest.mark.usefixtures("prefect_server")
def test_cli_catalog_run_and_lines(catalog_files, tiny_lake, tmp_path, capsys):
    store = str(tmp_path / "lake")
    lake = copy_lake(tiny_lake.lake, store)
    source, prices = catalog_files
    assert main(["run", "--source", source, "--prices", prices, "--name", "bags", "--quick",
                 "--set", "freeze=15", "--set", "views=1", "--set", "epochs=1",
                 "--skip-bad-rows", "--force", "--store", store]) == 0  # fmt: skip
    champion = lake.registry("bags").champion()
    assert lake.model(champion["model_version"]).config()["settings"]["preprocess"] == "rgb"
    drop = lake.drop("d1")
    for i, body in enumerate(_drop_images(tmp_path)):
        drop.store.put_bytes(drop.prefix + f"p{i}.png", body)
    capsys.readouterr()
    assert main(["score", "d1", "--store", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "several model lines (demo, bags): pass --line NAME" in err[0]
    assert lake.store.keys("scores/") == [], "nothing written"
    assert main(["score", "d1", "--line", "bags", "--store", store, "--json"]) == 0
    assert lake.score_run("d1", champion["model_version"]).manifest()["counts"]["priced"] == 5
    assert main(["champion", "--line", "bags", "--store", store]) == 0
    assert main(["run", "--prices", prices, "--name", "bags", "--store", store]) == 2
    assert "needs --source" in capsys.readouterr().err


def test_demo_store_without_lines_keeps_working(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    assert lake.lines() == ["demo"]
    assert resolve_model(lake, None) == tiny_lake.model_version
    empty = Lake(LocalStore(tmp_path / "empty"))
    with pytest.raises(NotInLake, match="no champion"):
        resolve_model(empty, None)


def test_parquet_images_parquet_prices_and_a_split_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = garments(24, seed=5)
    rows = list(tinted_rows(images, labels, 0))
    pq.write_table(pa.table({"image_id": [f"sku-{i}" for i in range(len(rows))],
                             "image": [body for _, body, _, _ in rows]}),
                   tmp_path / "photos.parquet")  # fmt: skip
    split = ["test" if i % 4 == 0 else "train" for i in range(len(rows))]
    pq.write_table(pa.table({"image": [f"sku-{i}" for i in range(len(rows))],
                             "price": [p for _, _, p, _ in rows], "split": split}),
                   tmp_path / "prices.parquet")  # fmt: skip
    lake = Lake(LocalStore(tmp_path / "lake"))
    out = ingest_catalog(lake, str(tmp_path / "photos.parquet"), str(tmp_path / "prices.parquet"),
                         "parquet_shop")  # fmt: skip
    manifest = out["manifest"]
    assert manifest["splits"]["test"]["rows"] == 6 and manifest["categories"] == []
    assert manifest["rules"]["split"] == "column"
    table = lake.labels(out["dataset_version"], out["labels_version"]).prices().to_pandas()
    assert dict(zip(table.image_id, table.split, strict=True)) == {
        f"sku-{i}": s for i, s in enumerate(split)
    }
    # The same table with a bad split value is a bad row.
    bad = tmp_path / "bad.csv"
    bad.write_text("image,price,split\nsku-0,1,validation\nsku-1,2,train\n")
    with pytest.raises(CatalogError, match=r"1 bad row \(row 1: split 'validation'"):
        ingest_catalog(lake, str(tmp_path / "photos.parquet"), str(bad), "parquet_shop")


def test_catalog_metrics_per_decile_without_categories():
    from tasks.data.loading import Split
    from tasks.governance.evaluation import catalog_metrics

    rng = np.random.default_rng(0)
    train = rng.uniform(0, 100, 500)
    true = rng.uniform(0, 100, 200)
    pred = true + rng.normal(0, 5, 200)
    test = Split(ids=[], images=np.zeros(0), classes=np.zeros(200, int), price=true, y=true / 100)
    m = catalog_metrics(test, pred, {"min": 0, "max": 100}, 50.0, train)
    assert m["grouped_by"] == "price decile" and len(m["per_group"]) == 10
    assert sum(g["count"] for g in m["per_group"]) == 200
    assert m["rmse"] < m["baseline_rmse"] and m["baseline_price"] == 50.0
