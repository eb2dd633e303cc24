"""Evaluate and promote flows: metrics of a model version, and the champion gate."""

from __future__ import annotations

from prefect import flow

from tasks.governance.evaluation import evaluate_model
from tasks.governance.registry import MARGIN, promote_model
from tasks.settings import load_settings


@flow(name="evaluate")
def evaluate_flow(
    model_version: str,
    store: str | None = None,
    labels_version: str | None = None,
    mlflow_tracking_uri: str | None = None,
) -> dict:
    """Score the test split; write metrics.json, plots and the report artifact (and, with
    MLflow tracking on, the metrics to the model's run, linked from the report)."""
    s = load_settings(store=store, mlflow_tracking_uri=mlflow_tracking_uri)
    metrics = evaluate_model(s.store, model_version, labels_version, s.mlflow_tracking_uri)
    return {k: v for k, v in metrics.items() if k != "per_class"}


@flow(name="promote")
def promote_flow(
    model_version: str,
    store: str | None = None,
    margin: float = MARGIN,
    force: bool = False,
    mlflow_tracking_uri: str | None = None,
) -> dict:
    """Make the model the champion if it beats the one in service; record the decision
    (and, with MLflow tracking on, set the registry's aliases to match)."""
    s = load_settings(store=store, mlflow_tracking_uri=mlflow_tracking_uri)
    return promote_model(s.store, model_version, margin, force, s.mlflow_tracking_uri)
