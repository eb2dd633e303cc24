"""Train flow: the VGG16 price model for a dataset and labels version.

A catalog's frozen features can be extracted by more than the training process
(``Extraction``): by ``workers`` processes on the training's machine first (a Dask
LocalCluster running the ``extract-features`` subflow, one extractor task per process),
and by ``partitions`` runs of the ``extract-partition-<pool>`` deployment on a work pool,
launched without waiting: the training extracts beside them and waits only for the
shards they hold. Every extractor shares the feature shards through the ledger's claims,
as scorers share a drop, so each shard is computed once."""

from __future__ import annotations

import os
from typing import Literal

from prefect import flow, task
from pydantic import BaseModel, Field

from tasks.governance.tracking import record_model
from tasks.model.train_settings import TrainSettings
from tasks.model.training import (
    extract_features,
    features_missing,
    resolved,
    train_model,
    warm_resolved,
)
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.settings import load_settings
from tasks.store.lake import Lake
from tasks.store.storage import open_store

EXTRACT_DEPLOYMENT = "extract-features/extract-partition-{pool}"


class Extraction(BaseModel):
    """Who extracts a catalog's missing frozen features besides the training process."""

    workers: int = Field(0, ge=0, description="processes on the training's machine, first")
    pool: Literal["cpu", "gpu"] | None = Field(
        None, description="the pool role (prefect.yaml) whose workers run the partitions"
    )
    partitions: int = Field(2, ge=1, description="extract-partition runs on the pool")


@task(name="extractor", **TASK_RETRIES)
def extractor_task(
    store: str, dataset_version: str, labels_version: str, settings: dict, start: int
) -> dict:
    """One extractor: claims and extracts feature shards until none is left unclaimed."""
    lake = Lake(open_store(store))
    return extract_features(lake, dataset_version, labels_version, TrainSettings(**settings),
                            start)  # fmt: skip


@flow(name="extract-features")
def extract_features_flow(
    dataset_version: str,
    labels_version: str,
    store: str | None = None,
    settings: TrainSettings | None = None,
    extractors: int = 1,
    start: int = 0,
) -> dict:
    """``extractors`` extractor tasks on this flow's task runner (threads by default; a
    Dask cluster's processes for ``Extraction.workers``; one per run on a pool); each
    feature shard is computed once, by whichever extractor claims it. ``settings``: the
    training's, resolved (its precision and engine name the features)."""
    store = load_settings(store=store).store
    settings = resolved(settings or TrainSettings())
    futures = [
        extractor_task.submit(
            store, dataset_version, labels_version, settings.model_dump(), start + i
        )
        for i in range(extractors)
    ]
    done = [f.result() for f in futures]
    by_extractor = {d["extractor"]: len(d["stored"]) for d in done}
    get_logger().info("frozen features: %d shards stored by %d extractors (%s)",
                      sum(by_extractor.values()), len(done),
                      ", ".join(f"{k}: {v}" for k, v in by_extractor.items()))  # fmt: skip
    return {"stored": sum(by_extractor.values()), "by_extractor": by_extractor}


def _extract_in_processes(
    uri: str, dataset_version: str, labels_version: str, settings: TrainSettings, workers: int
) -> dict:
    """The extract-features subflow on a LocalCluster of ``workers`` processes (one
    thread each, the cores shared between them)."""
    from prefect_dask import DaskTaskRunner

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // workers))
    env = {"TF_NUM_INTRAOP_THREADS": threads, "OMP_NUM_THREADS": threads}
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                            "processes": True, "env": env})  # fmt: skip
    return extract_features_flow.with_options(task_runner=runner)(
        dataset_version=dataset_version, labels_version=labels_version, store=uri,
        settings=settings, extractors=workers,
    )  # fmt: skip


def _extract_on_pool(
    uri: str, dataset_version: str, labels_version: str, settings: TrainSettings, pool: str,
    partitions: int,
) -> dict:  # fmt: skip
    """Launch ``partitions`` extract-partition runs on ``pool`` and return at once: a
    partition that starts after the shards are done finds nothing to do."""
    from prefect.deployments import run_deployment

    params = {"dataset_version": dataset_version, "labels_version": labels_version,
              "store": uri, "settings": settings.model_dump(), "extractors": 1}  # fmt: skip
    runs = [
        run_deployment(EXTRACT_DEPLOYMENT.format(pool=pool), timeout=0,
                       parameters=params | {"start": i + 1})
        for i in range(partitions)
    ]  # fmt: skip
    return {"pool": pool, "flow_runs": [str(r.id) for r in runs]}


def extract_beside(
    uri: str, dataset_version: str, labels_version: str, settings: TrainSettings,
    extraction: Extraction,
) -> dict | None:  # fmt: skip
    """What ``extraction`` starts before the training, when feature shards are missing."""
    if not extraction.workers and not extraction.pool:
        return None
    missing = features_missing(Lake(open_store(uri)), dataset_version, labels_version, settings)
    if not missing:
        return None
    log, out = get_logger(), {"missing_shards": missing}
    if extraction.pool:
        out["partitions"] = _extract_on_pool(uri, dataset_version, labels_version, settings,
                                             extraction.pool, extraction.partitions)  # fmt: skip
        log.info("frozen features: %d shards missing; launched %d extract partitions on pool "
                 "%r", missing, extraction.partitions, extraction.pool)  # fmt: skip
    if extraction.workers:
        log.info("frozen features: %d shards missing; extracting in %d processes", missing,
                 extraction.workers)  # fmt: skip
        out["processes"] = _extract_in_processes(uri, dataset_version, labels_version, settings,
                                                 extraction.workers)  # fmt: skip
    return out


@flow(name="train")
def train_flow(
    dataset_version: str,
    labels_version: str,
    store: str | None = None,
    settings: TrainSettings | None = None,
    mlflow_tracking_uri: str | None = None,
    extraction: Extraction | None = None,
) -> dict:
    """Train (or find) the model version for these inputs; returns its version, URI and
    the settings it was made with, resolved (no ``auto`` left). With MLflow tracking on
    (the parameter or VGGPRICE_MLFLOW_TRACKING_URI), the model's run is brought up to date.
    ``extraction``: who else extracts a catalog's missing frozen features (the module)."""
    configured = load_settings(store=store, mlflow_tracking_uri=mlflow_tracking_uri)
    uri = configured.store
    settings = warm_resolved(Lake(open_store(uri)), dataset_version, labels_version,
                             settings or TrainSettings())  # fmt: skip
    extracted = extract_beside(uri, dataset_version, labels_version, settings,
                               extraction or Extraction())  # fmt: skip
    result = train_model(uri, dataset_version, labels_version, settings)
    lake = Lake(open_store(uri))
    model = lake.model(result["model_version"])
    record_model(configured.mlflow_tracking_uri, lake, model.version)
    return {
        "model_version": model.version,
        "model_uri": model.file_uri(),
        "skipped": result["skipped"],
        "settings": result["settings"],
        "features": result.get("features"),
        "extracted": extracted,
        "warm_start": result.get("warm_start"),  # the parent, images changed and replayed
        "images_per_second": result.get("images_per_second"),
        "winner": result.get("winner"),  # another attempt published this version first
    }
