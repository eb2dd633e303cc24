"""Training and evaluation data: pixels, prices and scaled targets of a dataset and
labels version, shared by training and evaluation (neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.data.images import GRAY28, SIZE, prepare_batch
from tasks.store.lake import Lake


@dataclass
class Split:
    ids: list[str]
    images: np.ndarray  # uint8 (n, 28, 28) gray, or (n, s, s, 3) RGB
    classes: np.ndarray  # int64 class ids (a catalog's category index, or 0)
    price: np.ndarray  # float64, price units
    y: np.ndarray  # float32, min-max scaled price


@dataclass
class Data:
    dataset_version: str
    labels_version: str
    scaling: dict
    train_prices: np.ndarray  # every price of the labels' train split (not just a subset)
    train: Split | None = None
    test: Split | None = None


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded random subset, in row order (all rows without a limit)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def load_data(
    lake: Lake,
    dataset_version: str,
    labels_version: str,
    limits: dict[str, int | None],
    seed: int,
    mode: str = GRAY28,
    size: int = SIZE,
    leave_out: frozenset[str] = frozenset(),
) -> Data:
    """The splits named in ``limits`` (split -> row limit or None), seeded subsets, each
    image prepared as the model of this preprocessing ``mode`` and ``size`` takes it;
    images named in ``leave_out`` are dropped before the subset is drawn."""
    labels = lake.labels(dataset_version, labels_version)
    scaling = labels.scaling()
    prices = labels.prices()
    price_of = dict(zip(prices["image_id"].to_pylist(), prices["price"].to_pylist(), strict=True))
    is_train = np.asarray(prices["split"].to_pylist()) == "train"
    data = Data(dataset_version, labels_version, scaling, prices["price"].to_numpy()[is_train])
    span = scaling["max"] - scaling["min"]
    for split, limit in limits.items():
        table = lake.dataset(dataset_version).read_split(split)
        if leave_out:
            keep = [i for i, k in enumerate(table["image_id"].to_pylist()) if k not in leave_out]
            table = table.take(keep)
        table = table.take(subset_indices(table.num_rows, limit, seed))
        ids = table["image_id"].to_pylist()
        price = np.array([price_of[i] for i in ids], dtype=np.float64)
        setattr(
            data,
            split,
            Split(
                ids=ids,
                images=prepare_batch(table["image"].to_pylist(), mode, size),
                classes=table["label"].to_numpy().astype(np.int64),
                price=price,
                y=((price - scaling["min"]) / span).astype(np.float32),
            ),
        )
    return data


def train_stats(images: np.ndarray, prices: np.ndarray) -> dict:
    """What training data looked like, for the drift signal when scoring drops."""
    means = images.reshape(len(images), -1).mean(axis=1)
    p = np.percentile
    return {
        "pixel_mean_p01": float(p(means, 1)),
        "pixel_mean_p99": float(p(means, 99)),
        "pixel_mean": float(means.mean()),
        "price_p01": float(p(prices, 1)),
        "price_p99": float(p(prices, 99)),
        "price_mean": float(prices.mean()),
    }
