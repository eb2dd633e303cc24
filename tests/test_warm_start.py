"""A warm start: a catalog line's next model starts from a parent's top and fits the
images that changed since it, plus a seeded sample of the rest."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data.catalog import ingest_catalog
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore
from tests.conftest import TINY
from tests.test_catalog_growth import Catalog

SETTINGS = TINY | {"preprocess": "rgb", "precision": "float32", "batch_size": 8}


def _ingest(lake: Lake, catalog: Catalog) -> tuple[str, str]:
    out = ingest_catalog(lake, catalog.source, catalog.prices, "shop", workers=1)
    return out["dataset_version"], out["labels_version"]


def _prices(lake: Lake, mv: str, dv: str, lv: str) -> np.ndarray:
    """The stored model's prices for the version's test images."""
    from tasks.data.loading import iter_pixels, load_data
    from tasks.model.export import load_stored_model, predict_prices

    data = load_data(lake, dv, lv, {"test": None}, 0, pixels=False)
    net, out = load_stored_model(lake.model(mv)), np.zeros(len(data.test.ids))
    for positions, pixels in iter_pixels(lake, dv, data.test.ids, "rgb", 32):
        out[positions] = predict_prices(net, pixels)
    return out


def test_a_warm_start_fits_what_changed_from_the_parents_top(tmp_path):
    from tasks.model.train_settings import TrainSettings
    from tasks.model.training import train

    catalog = Catalog(tmp_path, 60)
    lake = Lake(LocalStore(tmp_path / "lake"))
    dv1, lv1 = _ingest(lake, catalog)
    first = train(lake, dv1, lv1, TrainSettings(**SETTINGS))
    parent = first["model_version"]
    assert first["warm_start"] is None and first["fit_images"] == first["train_images"]

    added = catalog.add(6, seed=41)
    repriced = catalog.reprice(3)
    catalog.rows[-1]["price"] = "900.00"  # a new top price: the scaling moves
    catalog.sync()
    dv2, lv2 = _ingest(lake, catalog)
    train_ids = set(lake.catalog(dv2).split_ids("train"))
    changed = len(train_ids & set(added + repriced))
    assert changed > 0
    assert lake.labels(dv2, lv2).scaling()["max"] != lake.labels(dv1, lv1).scaling()["max"]

    # A learning rate too small to move a weight: the warm model is its parent, rescaled.
    still = TrainSettings(**SETTINGS | {"warm_start": parent, "learning_rate": 1e-12})
    warm = train(lake, dv2, lv2, still)
    replayed = min(len(train_ids) - changed, max(4 * changed, 8 - changed))
    assert warm["warm_start"] == {"parent": parent, "changed": changed, "replayed": replayed}
    assert warm["fit_images"] == changed + replayed < len(train_ids)
    assert lake.model(warm["model_version"]).config()["settings"]["warm_start"] == parent
    np.testing.assert_allclose(_prices(lake, warm["model_version"], dv2, lv2),
                               _prices(lake, parent, dv2, lv2), rtol=1e-4, atol=1e-3)  # fmt: skip

    cold = train(lake, dv2, lv2, TrainSettings(**SETTINGS | {"learning_rate": 1e-12}))
    assert cold["model_version"] != warm["model_version"], "the parent is in the version"
    assert cold["fit_images"] == len(train_ids)
    assert not np.allclose(_prices(lake, cold["model_version"], dv2, lv2),
                           _prices(lake, parent, dv2, lv2), atol=1.0)  # fmt: skip

    again = train(lake, dv2, lv2, still)
    assert again["skipped"] and again["model_version"] == warm["model_version"]


def test_warm_start_champion_follows_the_line_and_an_unchanged_source_retrains_nothing(tmp_path):
    from tasks.governance.registry import promote
    from tasks.model.train_settings import TrainSettings
    from tasks.model.training import train, warm_resolved

    catalog = Catalog(tmp_path, 50)
    lake = Lake(LocalStore(tmp_path / "lake"))
    dv1, lv1 = _ingest(lake, catalog)
    settings = TrainSettings(**SETTINGS | {"warm_start": "champion"})
    assert warm_resolved(lake, dv1, lv1, settings).warm_start == "off", "no champion yet"
    first = train(lake, dv1, lv1, settings)
    assert first["warm_start"] is None
    promote(lake, first["model_version"], force=True)

    again = train(lake, dv1, lv1, settings)
    assert again["skipped"], "the champion's own inputs: the same version, nothing retrained"
    catalog.add(5, seed=43)
    dv2, lv2 = _ingest(lake, catalog)
    assert warm_resolved(lake, dv2, lv2, settings).warm_start == first["model_version"]
    grown = train(lake, dv2, lv2, settings)
    assert grown["warm_start"]["parent"] == first["model_version"]

    other_head = TrainSettings(**SETTINGS | {"warm_start": "champion", "head_units": 8})
    assert warm_resolved(lake, dv2, lv2, other_head).warm_start == "off"
    named = TrainSettings(**SETTINGS | {"warm_start": first["model_version"], "head_units": 8})
    with pytest.raises(ValueError, match="head of 256 units, this training 8"):
        warm_resolved(lake, dv2, lv2, named)
    with pytest.raises(ValueError, match="pattern"):
        TrainSettings(warm_start="last")
