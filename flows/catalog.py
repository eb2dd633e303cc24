"""The catalog pipeline: your images and prices -> ingest -> train -> evaluate -> promote,
in the catalog's own model line (its champion and decisions apart from the demo's)."""

from __future__ import annotations

from prefect import flow

from flows.pipeline import train_evaluate_promote
from flows.train import Extraction
from tasks.data.catalog import ingest_catalog_task
from tasks.governance.registry import MARGIN
from tasks.model.train_settings import CATALOG_DEFAULTS, TrainSettings
from tasks.runtime import get_logger
from tasks.settings import load_settings


def catalog_settings(**fields: object) -> TrainSettings:
    """A catalog's training settings: CATALOG_DEFAULTS unless told otherwise."""
    return TrainSettings(**(CATALOG_DEFAULTS | fields))


@flow(name="catalog")
def catalog_flow(
    source: str,
    prices: str,
    name: str,
    store: str | None = None,
    settings: TrainSettings | None = None,
    margin: float = MARGIN,
    skip_bad_rows: bool = False,
    train_pool: str | None = None,
    force: bool = False,
    mlflow_tracking_uri: str | None = None,
    extraction: Extraction | None = None,
) -> dict:
    """Ingest a catalog (images + prices table), train its model, evaluate and promote it
    in the line ``name``; each stage skips when its inputs are unchanged. ``force``
    promotes the model past the gate (recorded as forced). With ``mlflow_tracking_uri``
    (or VGGPRICE_MLFLOW_TRACKING_URI) MLflow follows the lake. ``extraction``: who else
    extracts the frozen features (processes, partitions on a pool: flows/train.py)."""
    configured = load_settings(store=store, mlflow_tracking_uri=mlflow_tracking_uri)
    store, tracking_uri = configured.store, configured.mlflow_tracking_uri
    settings = settings or catalog_settings()
    ingested = ingest_catalog_task(store, source, prices, name, skip_bad_rows)
    dataset_version, labels_version = ingested["dataset_version"], ingested["labels_version"]
    trained, evaluated, decision = train_evaluate_promote(store, dataset_version, labels_version, settings, margin,
                                                          train_pool, tracking_uri, force,
                                                          extraction)  # fmt: skip
    stages = (("ingest", ingested), ("train", trained), ("evaluate", evaluated))
    skipped = [n for n, result in stages if result.get("skipped")]
    if skipped:
        get_logger().info("skipped (inputs unchanged): %s", ", ".join(skipped))
    counts = ingested["manifest"]["counts"] | {
        k: ingested[k] for k in ("decoded", "reused", "skipped_rows")
    }
    return {
        "line": name,
        "ingest": {
            "dataset_version": dataset_version,
            "labels_version": labels_version,
            "counts": counts,
        },
        "train": trained,
        "evaluate": evaluated,
        "promote": {k: decision[k] for k in ("promoted", "reason")},
        "skipped": skipped,
    }
