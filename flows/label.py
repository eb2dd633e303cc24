"""Label flow: synthetic prices for a dataset version, with train-only scaling."""

from __future__ import annotations

from prefect import flow

from tasks.data.prices import PriceRule, label_prices
from tasks.settings import load_settings
from tasks.store.lake import Lake
from tasks.store.storage import open_store


@flow(name="label")
def label_flow(
    dataset_version: str,
    store: str | None = None,
    rule: PriceRule | None = None,
    seed: int = 0,
) -> dict:
    """Write (or find) prices.parquet and scaling.json; returns the labels version and URIs."""
    settings = load_settings(store=store)
    result = label_prices(settings.store, dataset_version, rule or PriceRule(), seed)
    labels = Lake(open_store(settings.store, settings)).labels(
        dataset_version, result["labels_version"]
    )
    return {
        "dataset_version": dataset_version,
        "labels_version": labels.version,
        "prices_uri": labels.uri(labels.PRICES),
        "scaling_uri": labels.uri(labels.MARKER),
        "scaling": {k: result["scaling"][k] for k in ("min", "max", "fit_on")},
        "skipped": result["skipped"],
    }
