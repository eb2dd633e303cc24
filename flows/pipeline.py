"""The retrain pipeline: ingest -> label (-> train -> evaluate -> promote)."""

from __future__ import annotations

from prefect import flow

from flows.ingest import ingest_flow
from flows.label import label_flow
from tasks.labels import PriceRule


@flow(name="retrain")
def retrain_flow(
    store: str | None = None,
    source: str | None = None,
    rule: PriceRule | None = None,
    seed: int = 0,
) -> dict:
    """Run every stage in order; each stage skips when its inputs are unchanged."""
    ingested = ingest_flow(store=store, source=source)
    labelled = label_flow(
        dataset_version=ingested["dataset_version"], store=store, rule=rule, seed=seed
    )
    return {"ingest": ingested, "label": labelled}
