"""The retrain pipeline: ingest -> label -> train -> evaluate -> promote."""

from __future__ import annotations

from prefect import flow

from flows.evaluate import evaluate_flow, promote_flow
from flows.ingest import ingest_flow
from flows.label import label_flow
from flows.train import train_flow
from tasks.labels import PriceRule
from tasks.model import TrainSettings


@flow(name="retrain")
def retrain_flow(
    store: str | None = None,
    source: str | None = None,
    rule: PriceRule | None = None,
    seed: int = 0,
    settings: TrainSettings | None = None,
    margin: float = 0.01,
) -> dict:
    """Run every stage in order; each stage skips when its inputs are unchanged."""
    ingested = ingest_flow(store=store, source=source)
    labelled = label_flow(
        dataset_version=ingested["dataset_version"], store=store, rule=rule, seed=seed
    )
    trained = train_flow(
        dataset_version=ingested["dataset_version"],
        labels_version=labelled["labels_version"],
        store=store,
        settings=settings,
    )
    evaluated = evaluate_flow(model_version=trained["model_version"], store=store)
    decision = promote_flow(model_version=trained["model_version"], store=store, margin=margin)
    return {
        "ingest": ingested,
        "label": labelled,
        "train": trained,
        "evaluate": evaluated,
        "promote": {k: decision[k] for k in ("promoted", "reason")},
    }
