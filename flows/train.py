"""Train flow: the VGG16 price model for a dataset and labels version."""

from __future__ import annotations

from prefect import flow

from tasks.governance.tracking import record_model
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train_model
from tasks.settings import load_settings
from tasks.store.lake import Lake
from tasks.store.storage import open_store


@flow(name="train")
def train_flow(
    dataset_version: str,
    labels_version: str,
    store: str | None = None,
    settings: TrainSettings | None = None,
    mlflow_tracking_uri: str | None = None,
) -> dict:
    """Train (or find) the model version for these inputs; returns its version, URI and
    the settings it was made with, resolved (no ``auto`` left). With MLflow tracking on
    (the parameter or VGGPRICE_MLFLOW_TRACKING_URI), the model's run is brought up to date."""
    configured = load_settings(store=store, mlflow_tracking_uri=mlflow_tracking_uri)
    uri = configured.store
    result = train_model(uri, dataset_version, labels_version, settings or TrainSettings())
    lake = Lake(open_store(uri))
    model = lake.model(result["model_version"])
    record_model(configured.mlflow_tracking_uri, lake, model.version)
    return {
        "model_version": model.version,
        "model_uri": model.file_uri(),
        "skipped": result["skipped"],
        "settings": result["settings"],
        "features": result.get("features"),
        "images_per_second": result.get("images_per_second"),
        "winner": result.get("winner"),  # another attempt published this version first
    }
