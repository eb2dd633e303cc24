"""Ingest flow: Fashion-MNIST IDX files into Parquet shards in the store."""

from __future__ import annotations

from prefect import flow

from tasks.data.fashion_mnist import ingest_dataset
from tasks.settings import load_settings
from tasks.store.lake import Lake
from tasks.store.storage import open_store


@flow(name="ingest")
def ingest_flow(store: str | None = None, source: str | None = None) -> dict:
    """Write (or find) the dataset version for the source files; returns its version and URI."""
    settings = load_settings(store=store, data_source=source)
    manifest = ingest_dataset(settings.store, settings.data_source)
    dataset = Lake(open_store(settings.store, settings)).dataset(manifest["version"])
    return {
        "dataset_version": dataset.version,
        "manifest_uri": dataset.uri(dataset.MARKER),
        "rows": {s: manifest["splits"][s]["rows"] for s in manifest["splits"]},
        "verified": manifest["source"]["verified"],
        "skipped": manifest["skipped"],
    }
