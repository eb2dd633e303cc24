"""Ingest and label flows under a real Prefect server, on both store backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main
from flows.ingest import ingest_flow
from flows.label import label_flow
from tasks.data.prices import PriceRule
from tasks.store.lake import Lake
from tasks.store.storage import open_store

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_ingest_and_label_flows(store_uri, idx_source):
    first = ingest_flow(store=store_uri, source=str(idx_source))
    assert first["rows"] == {"train": 60, "test": 20} and first["skipped"] is False
    store = open_store(store_uri)
    before = {o.key: o.etag for o in store.list()}

    again = ingest_flow(store=store_uri, source=str(idx_source))
    assert again["dataset_version"] == first["dataset_version"] and again["skipped"] is True
    assert {o.key: o.etag for o in store.list()} == before, "a re-run rewrites nothing"

    v = first["dataset_version"]
    labelled = label_flow(dataset_version=v, store=store_uri, seed=3)
    labels = Lake(store).labels(v, labelled["labels_version"])
    prices = labels.prices().to_pandas()
    assert len(prices) == 80 and set(prices["split"]) == {"train", "test"}
    train = prices[prices["split"] == "train"]
    scaling = labels.scaling()
    assert scaling["min"] == train["price"].min() and scaling["max"] == train["price"].max()
    body = store.get_bytes(f"labels/{v}/{labelled['labels_version']}/prices.parquet")

    relabel = label_flow(dataset_version=v, store=store_uri, seed=3)
    assert relabel["skipped"] is True
    # Same inputs in another store give byte-identical output.
    other = open_store(store_uri + "-copy")
    ingest_flow(store=store_uri + "-copy", source=str(idx_source))
    label_flow(dataset_version=v, store=store_uri + "-copy", seed=3)
    assert other.get_bytes(f"labels/{v}/{labelled['labels_version']}/prices.parquet") == body

    custom = label_flow(dataset_version=v, store=store_uri, seed=3, rule=PriceRule(sigma=0))
    assert custom["labels_version"] != labelled["labels_version"]
    p = Lake(store).labels(v, custom["labels_version"]).prices().to_pandas()
    means = np.array(PriceRule().means)
    assert np.allclose(p["price"], means[p["label"]])


def test_label_unknown_dataset_is_clear(store_uri):
    with pytest.raises(Exception, match="no such dataset version"):
        label_flow(dataset_version="fm-nope", store=store_uri)


def test_cli_run_json_and_errors(tmp_path, idx_source, capsys):
    store = str(tmp_path / "lake")
    quick = ["--quick", "--set", "epochs=1", "--set", "freeze=15", "--set", "views=1"]
    assert (
        main(["run", "--store", store, "--source", str(idx_source), "--json", "--force", *quick])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["label"]["dataset_version"] == result["ingest"]["dataset_version"]
    assert result["label"]["labels_version"].startswith("px-")
    assert result["promote"]["promoted"] is True
    assert main(["champion", "--store", store, "--json"]) == 0
    champion = json.loads(capsys.readouterr().out)
    assert champion["model_version"] == result["train"]["model_version"]
    assert champion["metrics"]["rmse"] == result["evaluate"]["rmse"]

    assert main(["train", "x", "y", "--store", store, "--set", "epochs=zero"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("vggprice: error: epochs: Input should be a valid integer")

    assert (
        main(["label", result["ingest"]["dataset_version"], "--store", store, "--means", "1,2,3"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "vggprice: error: means: Value error, price rule needs 10 class means, got 3"

    assert main(["ingest", "--store", store, "--source", str(tmp_path / "nope")]) == 2
    assert "missing train-images-idx3-ubyte.gz" in capsys.readouterr().err.splitlines()[-1]
