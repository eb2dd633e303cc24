"""Synthetic prices: price = round(Normal(mean[class], sigma), 2), per image, by seed."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from prefect import task
from pydantic import BaseModel, Field, field_validator

from tasks.data.fashion_mnist import N_CLASSES
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.store import lake
from tasks.store.lake import Lake

DEFAULT_MEANS = (45.0, 57.0, 85.0, 99.0, 125.0, 27.0, 180.0, 152.0, 225.0, 33.0)
PRICES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.int8()),
        ("price", pa.float64()),
    ]
)


class PriceRule(BaseModel):
    """Class means (10 of them) and the noise sigma around each."""

    means: list[float] = Field(default_factory=lambda: list(DEFAULT_MEANS))
    sigma: float = 3.0

    @field_validator("means")
    @classmethod
    def _ten_finite_means(cls, v: list[float]) -> list[float]:
        if len(v) != N_CLASSES:
            raise ValueError(f"price rule needs {N_CLASSES} class means, got {len(v)}")
        if not all(math.isfinite(m) for m in v):
            raise ValueError(f"price rule means must be finite numbers, got {v}")
        return v

    @field_validator("sigma")
    @classmethod
    def _sigma_ok(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"price rule sigma must be a finite number >= 0, got {v}")
        return v


def labels_version(dataset_version: str, rule: PriceRule, seed: int) -> str:
    return lake.labels_version(dataset_version, rule.model_dump(), seed)


def draw_prices(labels: np.ndarray, rule: PriceRule, seed: int) -> np.ndarray:
    """Vectorised: one normal draw per row, in row order, rounded to cents."""
    rng = np.random.default_rng(seed)
    means = np.asarray(rule.means, dtype=np.float64)[labels.astype(np.int64)]
    return np.round(rng.normal(means, rule.sigma), 2)


def price_table(ids: list[str], splits: list[str], labels: np.ndarray, prices: np.ndarray):
    return pa.table(
        {
            "image_id": ids,
            "split": splits,
            "label": labels.astype(np.int8),
            "price": prices,
        },
        schema=PRICES_SCHEMA,
    )


def fit_scaling(prices: np.ndarray, splits: np.ndarray) -> dict:
    """Min-max scaling fit on the train split only (the tutorial leaked the test split)."""
    train = prices[splits == "train"]
    if train.size == 0:
        raise ValueError("no train rows to fit the price scaling on")
    lo, hi = float(train.min()), float(train.max())
    return {"kind": "minmax", "fit_on": "train", "rows": int(train.size), "min": lo, "max": hi}


def make_labels(lake: Lake, dataset_version: str, rule: PriceRule, seed: int) -> dict:
    """Write prices.parquet then scaling.json (the completion marker). Idempotent."""
    labels = lake.labels(dataset_version, labels_version(dataset_version, rule, seed))
    log = get_logger()
    if labels.complete:
        log.info("labels %s already in %s; nothing rewritten", labels.version, lake.uri)
        return {"labels_version": labels.version, "scaling": labels.scaling(), "skipped": True}

    dataset = lake.dataset(dataset_version)
    parts = {s: dataset.read_split(s, ["image_id", "label"]) for s in ("train", "test")}
    ids = parts["train"]["image_id"].to_pylist() + parts["test"]["image_id"].to_pylist()
    labels_arr = np.concatenate([parts[s]["label"].to_numpy() for s in ("train", "test")])
    splits = np.array(["train"] * parts["train"].num_rows + ["test"] * parts["test"].num_rows)
    prices = draw_prices(labels_arr, rule, seed)
    scaling = fit_scaling(prices, splits) | {
        "rule": rule.model_dump(),
        "seed": seed,
        "dataset_version": dataset_version,
    }
    labels.write(price_table(ids, splits.tolist(), labels_arr, prices), scaling)
    log.info(
        "labels %s: %d prices, train range %.2f..%.2f",
        labels.version,
        len(prices),
        scaling["min"],
        scaling["max"],
    )
    return {"labels_version": labels.version, "scaling": scaling, "skipped": False}


# --- Prefect task wrapper --------------------------------------------------------


@task(name="label-prices", **TASK_RETRIES)
def label_prices(store_uri: str, dataset_version: str, rule: PriceRule, seed: int) -> dict:
    """Draw the prices for a dataset version and write them with their scaling."""
    from tasks.store.storage import open_store

    return make_labels(Lake(open_store(store_uri)), dataset_version, rule, seed)
