"""Evaluate and promote flows: metrics of a model version, and the champion gate."""

from __future__ import annotations

from prefect import flow

from tasks.governance.evaluation import evaluate_model
from tasks.governance.registry import MARGIN, promote_model
from tasks.runtime import get_logger
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
    (and, with MLflow tracking on, set the registry's aliases to match). The champion's
    int8 engine (and bf16 verdict) are made here too (``engines`` in the result)."""
    s = load_settings(store=store, mlflow_tracking_uri=mlflow_tracking_uri)
    decision = promote_model(s.store, model_version, margin, force, s.mlflow_tracking_uri)
    if s.engines_at_promotion and (
        decision["promoted"] or decision["reason"] == "already the champion"
    ):
        decision["engines"] = champion_engines(s.store, model_version)
    return decision


def champion_engines(store_uri: str, model_version: str) -> dict | str:
    """The champion's int8 engine and bf16 verdict, made on this worker so that its first
    drop is priced at their speed; a failure logs one line and never blocks the promotion."""
    try:
        from tasks.governance.engine_gates import make_engines
        from tasks.scoring.ledger import ScoreOptions
        from tasks.store.lake import Lake
        from tasks.store.storage import open_store

        return make_engines(Lake(open_store(store_uri)).model(model_version), ScoreOptions())
    except Exception as err:  # the promotion stands; scorers run float32 or bf16 meanwhile
        get_logger().warning("model %s: its engines were not made at promotion (%s: %s)",
                             model_version, type(err).__name__, err)  # fmt: skip
        return f"not made: {type(err).__name__}: {err}"
