"""Training and evaluation data: pixels, prices and scaled targets of a dataset and
labels version, shared by training and evaluation (neither imports the other)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tasks.data.images import GRAY28, SIZE, prepare_batch
from tasks.store.lake import Lake


@dataclass
class Split:
    ids: list[str]
    images: np.ndarray | None  # uint8 (n, 28, 28) gray, or (n, s, s, 3) RGB; None: not read
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


def subset_rank(image_id: str) -> int:
    """Where an image comes in every subset of its split: a hash of its key, so a
    subset of N is the N images of lowest rank, the same for every seed and every
    version that holds them (the demo stores each split in this order, so a subset is
    its first pixel shards and the frozen features of no other shard are computed)."""
    return int.from_bytes(hashlib.sha256(f"subset:{image_id}".encode()).digest()[:8], "big")


def subset_indices(ids: list[str], limit: int | None) -> np.ndarray:
    """The rows of the ``limit`` lowest-ranked images (``subset_rank``), in row order;
    all rows without a limit."""
    if limit is None or limit >= len(ids):
        return np.arange(len(ids))
    return np.sort(np.argsort([subset_rank(i) for i in ids], kind="stable")[:limit])


def load_data(
    lake: Lake,
    dataset_version: str,
    labels_version: str,
    limits: dict[str, int | None],
    seed: int,
    mode: str = GRAY28,
    size: int = SIZE,
    leave_out: frozenset[str] = frozenset(),
    pixels: bool = True,
) -> Data:
    """The splits named in ``limits`` (split -> row limit or None; ``subset_indices``),
    each image prepared as the model of this preprocessing ``mode`` and ``size`` takes
    it; images named in ``leave_out`` are dropped before the subset is drawn. Without
    ``pixels``, ids, classes and prices only (``iter_pixels`` streams the images).
    ``seed`` is kept for callers; subsets no longer depend on it."""
    labels = lake.labels(dataset_version, labels_version)
    scaling = labels.scaling()
    prices = labels.prices()
    price_of = dict(zip(prices["image_id"].to_pylist(), prices["price"].to_pylist(), strict=True))
    is_train = np.asarray(prices["split"].to_pylist()) == "train"
    data = Data(dataset_version, labels_version, scaling, prices["price"].to_numpy()[is_train])
    span = scaling["max"] - scaling["min"]
    dataset = lake.dataset(dataset_version)
    for split, limit in limits.items():
        table = dataset.read_split(split, ["image_id", "label"])
        if leave_out:
            keep = [i for i, k in enumerate(table["image_id"].to_pylist()) if k not in leave_out]
            table = table.take(keep)
        table = table.take(subset_indices(table["image_id"].to_pylist(), limit))
        ids = table["image_id"].to_pylist()
        price = np.array([price_of[i] for i in ids], dtype=np.float64)
        setattr(
            data,
            split,
            Split(
                ids=ids,
                images=prepare_batch(dataset.images(ids).to_pylist(), mode, size)
                if pixels
                else None,
                classes=table["label"].to_numpy().astype(np.int64),
                price=price,
                y=((price - scaling["min"]) / span).astype(np.float32),
            ),
        )
    return data


def group_by_shard(at: list[tuple[str, int]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """shard -> (positions in ``at``, rows in the shard)."""
    found: dict[str, tuple[list[int], list[int]]] = {}
    for i, (s, r) in enumerate(at):
        found.setdefault(s, ([], []))[0].append(i)
        found[s][1].append(r)
    return {s: (np.asarray(i), np.asarray(r)) for s, (i, r) in found.items()}


def iter_pixels(
    lake: Lake, dataset_version: str, ids: list[str], mode: str, size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions in ``ids``, their prepared images) of a dataset stored by content, one
    pixel shard at a time: memory holds one shard, whatever the dataset's size."""
    dataset = lake.dataset(dataset_version)
    where = dataset.locations()
    by_shard = group_by_shard([where[key] for key in ids])
    pixels = dataset.pixels()
    for shard in sorted(by_shard):
        positions, rows = by_shard[shard]
        blobs = pixels.images([shard] * len(rows), rows.tolist()).to_pylist()
        yield positions, prepare_batch(blobs, mode, size)


def pixel_means(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).mean(axis=1)


def train_stats(images: np.ndarray | None, prices: np.ndarray, means: np.ndarray | None = None
                ) -> dict:  # fmt: skip
    """What training data looked like, for the drift signal when scoring drops (from the
    images, or their per-image pixel means)."""
    means = pixel_means(images) if means is None else means
    p = np.percentile
    return {
        "pixel_mean_p01": float(p(means, 1)),
        "pixel_mean_p99": float(p(means, 99)),
        "pixel_mean": float(means.mean()),
        "price_p01": float(p(prices, 1)),
        "price_p99": float(p(prices, 99)),
        "price_mean": float(prices.mean()),
    }
