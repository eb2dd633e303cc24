"""The real 70,000 Fashion-MNIST images, when the Debian package is installed."""

from __future__ import annotations

import pytest

from tasks.data.fashion_mnist import DEBIAN_DIR, FILES, find_source, ingest
from tasks.data.prices import PriceRule, make_labels
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not all((DEBIAN_DIR / n).is_file() for n in FILES),
        reason="apt-get install dataset-fashion-mnist to run this (scripts/bootstrap does)",
    ),
]


def test_real_fashion_mnist(tmp_path):
    source = find_source(DEBIAN_DIR)
    assert source.verified, "the Debian files match the published SHA-256"
    store = Lake(LocalStore(tmp_path / "lake"))
    manifest = ingest(store, source)
    assert manifest["splits"]["train"]["rows"] == 60_000
    assert manifest["splits"]["test"]["rows"] == 10_000
    assert manifest["splits"]["train"]["label_counts"] == [6000] * 10
    labels = make_labels(store, manifest["version"], PriceRule(), seed=0)
    prices = store.labels(manifest["version"], labels["labels_version"]).prices().to_pandas()
    assert len(prices) == 70_000
    by_class = prices.groupby("label")["price"].mean()
    assert all(abs(by_class[c] - PriceRule().means[c]) < 0.2 for c in range(10))
