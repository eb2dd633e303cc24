"""The retrain pipeline: ingest -> label -> train -> evaluate -> promote.

The train step runs in-process (the laptop default) or, with ``train_pool``, as
the ``train`` deployment on that work pool (GPU workers): the parent waits for
the child run and then reads the model from the store by its content-derived
version, never from Prefect's result storage, so the two may run on different
machines.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter
from prefect.client.schemas.filters import WorkPoolFilterName as PoolName
from prefect.deployments import run_deployment

from flows.evaluate import evaluate_flow, promote_flow
from flows.ingest import ingest_flow
from flows.label import label_flow
from flows.train import Extraction, train_flow
from tasks.data.prices import PriceRule
from tasks.governance.registry import MARGIN
from tasks.governance.tracking import credentials_to_environment
from tasks.model.train_settings import TrainSettings
from tasks.model.training import resolved, version_for, warm_resolved
from tasks.runtime import get_logger
from tasks.settings import load_settings
from tasks.store.lake import Lake
from tasks.store.storage import open_store


def train_deployment_on(pool: str) -> str:
    """The name ('train/<deployment>') of the train flow's deployment on a work pool."""
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])),
            work_pool_filter=WorkPoolFilter(name=PoolName(any_=[pool])),
        )
    if not found:
        raise ValueError(
            f"no deployment of the train flow on work pool {pool!r}: run 'vggprice deploy'"
        )
    return f"train/{found[0].name}"


def pool_precision(pool: str) -> str:
    """What ``precision=auto`` means for a training on ``pool``: ``mixed_float16`` on a
    gpu pool (its workers have GPUs, where a worker's own ``auto`` picks that too),
    ``float32`` on any other pool."""
    # The version must be known here, before the run (to skip a training that exists
    # without starting a GPU worker, and to find the model afterwards), but this machine
    # is not the one that trains: resolving ``auto`` on its own CPU would send a GPU
    # worker float32 or bfloat16. So the parent resolves ``auto`` for the pool and sends
    # the concrete value; the worker trains exactly that. A cpu pool's workers may be of
    # any CPU class, and only float32 is what every class would train alike, so
    # ``auto`` is float32 there; set precision=mixed_bfloat16 for AVX512-BF16/AMX workers.
    return "mixed_float16" if pool.startswith("gpu") else "float32"


def train_on_pool(
    pool: str, dataset_version: str, labels_version: str, store: str, settings: TrainSettings,
    mlflow_tracking_uri: str | None = None, extraction: Extraction | None = None,
) -> dict:  # fmt: skip
    """Run the train deployment on ``pool`` (unless the model exists), wait, and find
    the model in the store by its version. ``auto`` is resolved for the pool
    (``pool_precision``), and the run gets the resolved settings."""
    lake = Lake(open_store(store))
    settings = warm_resolved(lake, dataset_version, labels_version,
                             resolved(settings, auto_precision=pool_precision(pool)))  # fmt: skip
    model = lake.model(version_for(dataset_version, labels_version, settings))
    result = {"model_version": model.version, "settings": settings.model_dump()}
    if model.complete:
        return result | {"model_uri": model.file_uri(), "skipped": True, "pool": pool}
    run = run_deployment(
        train_deployment_on(pool),
        parameters={
            "dataset_version": dataset_version,
            "labels_version": labels_version,
            "store": store,
            "settings": settings.model_dump(),
        }
        | ({"mlflow_tracking_uri": mlflow_tracking_uri} if mlflow_tracking_uri else {})
        | ({"extraction": extraction.model_dump()} if extraction else {}),
        timeout=None,
        poll_interval=2,
    )
    if not run.state or not run.state.is_completed():
        state = run.state.type.value if run.state else "UNKNOWN"
        message = run.state.message if run.state else ""
        raise RuntimeError(f"train run {run.name!r} on pool {pool!r} ended {state}: {message}")
    if not model.complete:
        raise RuntimeError(
            f"train run {run.name!r} completed but wrote no {model.uri(model.MARKER)}"
        )
    return result | {"model_uri": model.file_uri(), "skipped": False, "pool": pool,
                     "flow_run_id": str(run.id)}  # fmt: skip


def train_evaluate_promote(
    store: str,
    dataset_version: str,
    labels_version: str,
    settings: TrainSettings,
    margin: float,
    train_pool: str | None,
    mlflow_tracking_uri: str | None = None,
    force: bool = False,
    extraction: Extraction | None = None,
) -> tuple[dict, dict, dict]:
    """The stages after the data: train (here, or on ``train_pool``; ``extraction``: who
    else extracts a catalog's frozen features, flows/train.py), evaluate, promote
    (``force``: past the gate, recorded as forced); each brings MLflow up to date when
    ``mlflow_tracking_uri`` is set (its credentials, if any, in the environment: never a
    parameter of the runs started here)."""
    uri = credentials_to_environment(mlflow_tracking_uri)
    if train_pool:
        trained = train_on_pool(train_pool, dataset_version, labels_version, store, settings, uri,
                                extraction)  # fmt: skip
    else:  # trains here: ``auto`` resolved on this machine, shown so in the run's parameters
        trained = train_flow(dataset_version=dataset_version, labels_version=labels_version,
                             store=store, settings=resolved(settings), mlflow_tracking_uri=uri,
                             extraction=extraction)  # fmt: skip
    mv = trained["model_version"]
    evaluated = evaluate_flow(model_version=mv, store=store, mlflow_tracking_uri=uri)
    decision = promote_flow(model_version=mv, store=store, margin=margin, force=force,
                            mlflow_tracking_uri=uri)  # fmt: skip
    return trained, evaluated, decision


@flow(name="retrain")
def retrain_flow(
    store: str | None = None,
    source: str | None = None,
    rule: PriceRule | None = None,
    seed: int = 0,
    settings: TrainSettings | None = None,
    margin: float = MARGIN,
    train_pool: str | None = None,
    force: bool = False,
    mlflow_tracking_uri: str | None = None,
) -> dict:
    """Run every stage in order; each stage skips when its inputs are unchanged.
    ``force`` promotes the model past the gate (recorded as forced). With
    ``mlflow_tracking_uri`` (or VGGPRICE_MLFLOW_TRACKING_URI) MLflow follows the lake."""
    configured = load_settings(store=store, mlflow_tracking_uri=mlflow_tracking_uri)
    store, tracking_uri = configured.store, configured.mlflow_tracking_uri
    settings = settings or TrainSettings()
    ingested = ingest_flow(store=store, source=source)
    dataset_version = ingested["dataset_version"]
    labelled = label_flow(dataset_version=dataset_version, store=store, rule=rule, seed=seed)
    labels_version = labelled["labels_version"]
    trained, evaluated, decision = train_evaluate_promote(store, dataset_version, labels_version, settings, margin,
                                                          train_pool, tracking_uri, force)  # fmt: skip
    skipped = [
        name
        for name, result in (
            ("ingest", ingested), ("label", labelled), ("train", trained), ("evaluate", evaluated),
        )
        if result.get("skipped")
    ]  # fmt: skip
    if skipped:
        get_logger().info("skipped (inputs unchanged): %s", ", ".join(skipped))
    else:
        get_logger().info("every stage ran: no earlier output matched these inputs")
    return {
        "ingest": ingested,
        "label": labelled,
        "train": trained,
        "evaluate": evaluated,
        "promote": {k: decision[k] for k in ("promoted", "reason")},
        "skipped": skipped,
    }
