"""Score flows: price a drop with any number of scorers, and find drops to price.

Where the scorers run, all through the same ledger in the store:

- ``score-drop`` runs ``scorers`` scorer tasks on its task runner: threads by
  default; ``score_flow.with_options(task_runner=DaskTaskRunner(...))`` (what
  ``vggprice score --workers N`` and ``--dask-address`` do) spreads them over the
  processes of a Dask cluster;
- with ``score_pool``, it instead fans out ``partitions`` flow runs of the
  ``score-partition`` deployment on that work pool (``cpu`` or ``gpu``) and waits
  for them; a partition is one scorer that claims whole shards until none is left.

In every case the drop is finished once, when every shard has its part.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.governance.registry import resolve_model
from tasks.reports import (
    drop_markdown,
    line_key,
    price_bands,
    price_histogram,
    publish_markdown,
    publish_table,
)
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.scoring.ledger import ScoreOptions
from tasks.scoring.runner import (
    Job,
    ScanIncomplete,
    drop_name_problem,
    one_line,
    scan_drops,
    score_drop,
)
from tasks.scoring.shard import work
from tasks.settings import load_settings
from tasks.store.claims import worker_name
from tasks.store.lake import DropSource, Lake, line_of
from tasks.store.storage import open_store

SCORE = ScoreOptions()  # the scoring defaults
PARTITION_DEPLOYMENT = "score-partition/score-partition-{pool}"


def _scorer(
    store: str, drop_id: str, model_version: str, source: list[str], options: dict, start: int
):
    run = Lake(open_store(store)).score_run(drop_id, model_version)
    drop = DropSource(open_store(source[0]), source[1], drop_id)
    return work(run, drop, ScoreOptions(**options), start)


@task(name="scorer", **TASK_RETRIES)
def scorer_task(
    store: str, drop_id: str, model_version: str, source: list[str], options: dict, start: int
) -> list[dict]:
    """One scorer: claims and prices whole shards until none is left unclaimed."""
    return _scorer(store, drop_id, model_version, source, options, start)


def _job_parameters(job: Job, options: ScoreOptions) -> dict:
    return {
        "store": job.run.store.uri,
        "drop_id": job.run.drop_id,
        "model_version": job.run.model_version,
        "source": [job.source.store.uri, job.source.prefix],
        "options": dataclasses.asdict(options),
    }


def scorers_as_tasks(count: int):
    """Scorer runner: ``count`` scorer tasks on the flow's task runner."""

    def run(job: Job, options: ScoreOptions) -> list[dict]:
        params = _job_parameters(job, options)
        futures = [scorer_task.submit(**params, start=i) for i in range(count)]
        return [facts for f in futures for facts in f.result()]

    return run


def scorers_on_pool(pool: str, partitions: int):
    """Scorer runner: ``partitions`` runs of the score-partition deployment on ``pool``,
    launched at once, waited for; a failed one fails the run with its message."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    def run(job: Job, options: ScoreOptions) -> list[dict]:
        params = _job_parameters(job, options)
        runs = [
            run_deployment(PARTITION_DEPLOYMENT.format(pool=pool), timeout=0,
                           parameters=params | {"start": i})
            for i in range(partitions)
        ]  # fmt: skip
        get_logger().info("launched %d score partitions on pool %r", partitions, pool)
        with get_client(sync_client=True) as client:
            while True:
                states = [client.read_flow_run(r.id).state for r in runs]
                if all(s is not None and s.is_final() for s in states):
                    break
                time.sleep(2)
        failed = [(r.name, s) for r, s in zip(runs, states, strict=True) if not s.is_completed()]
        if failed:
            name, state = failed[0]
            raise RuntimeError(
                f"score partition {name!r} on pool {pool!r} ended {state.type.value}: "
                f"{state.message}"
            )
        return []  # the shards' facts are in the store; the manifest gathers them

    return run


@flow(name="score-partition")
def score_partition_flow(
    store: str, drop_id: str, model_version: str, source: list[str], options: dict, start: int = 0
) -> dict:
    """One partition of a drop on a work pool: a scorer that claims whole shards."""
    scored = _scorer(store, drop_id, model_version, source, options, start)
    return {"scorer": worker_name(), "shards": len(scored)}


def publish_drop(lake: Lake, manifest: dict) -> None:
    """The drop-<id> artifacts: summary markdown and price bands by class."""
    n = manifest["counts"]["priced"] + manifest["counts"]["rejected"]
    seconds = manifest["timings"]["seconds"]
    model_version = manifest["model_version"]
    lineage = lake.model(model_version).lineage()
    line = line_of(lineage["dataset_version"])
    key = line_key(lake.uri, line, f"drop-{manifest['drop_id']}")
    run = lake.score_run(manifest["drop_id"], model_version)
    priced = run.prices(["price"])
    prices = priced["price"].to_numpy() if priced is not None else np.zeros(0)
    plots = {}
    if len(prices):
        png = price_histogram(prices)
        plots["price histogram"] = (png, run.write_plot("prices", png))
    speed = n / seconds if seconds else None
    publish_markdown(key, drop_markdown(manifest, speed, plots), f"drop scoring ({line})")
    scaling = lake.labels(lineage["dataset_version"], lineage["labels_version"]).scaling()
    if "rule" not in scaling:  # a catalog: no class means to band by
        return
    rule = scaling["rule"]
    publish_table(
        key + "-bands", price_bands(prices.tolist(), rule["means"]), "prices by class band"
    )


def _summary(manifest: dict) -> dict:
    keys = ("drop_id", "model_version", "counts", "rejections", "prices", "drift", "timings",
            "scorer_counts", "engines", "engine_reasons", "skipped")  # fmt: skip
    return {k: manifest[k] for k in keys if k in manifest}


@flow(name="score-drop", task_runner=ThreadPoolTaskRunner(max_workers=4))
def score_flow(
    drop: str,
    store: str | None = None,
    model: str | None = None,
    shard_size: int = SCORE.shard_size,
    max_pixels: int = SCORE.max_pixels,
    max_bytes: int = SCORE.max_bytes,
    max_rows_per_object: int = SCORE.max_rows_per_object,
    precision: str = SCORE.precision,
    engine: str = SCORE.engine,
    scorers: int = 2,
    score_pool: str | None = None,
    partitions: int = 2,
    claim_seconds: float = SCORE.claim_seconds,
    wait: bool = True,
    line: str | None = None,
    from_user: bool = False,
) -> dict:
    """Price every image of a drop exactly once with the champion of a model line (the
    store's only line when not named) or a pinned model. ``drop`` is a drop's folder
    name under drops/ (as events and scans name it); only ``from_user`` (what a person
    typed: ``vggprice score``) lets it be an s3:// URI or a directory."""
    lake = Lake(open_store(load_settings(store=store).store))
    options = ScoreOptions(shard_size=shard_size, max_pixels=max_pixels, max_bytes=max_bytes,
                           max_rows_per_object=max_rows_per_object, precision=precision,
                           engine=engine, claim_seconds=claim_seconds, wait=wait)  # fmt: skip
    runner = scorers_on_pool(score_pool, partitions) if score_pool else scorers_as_tasks(scorers)
    manifest = score_drop(lake, drop, model, options, run_scorers=runner, line=line,
                          from_user=from_user)  # fmt: skip
    if manifest["skipped"]:
        get_logger().info("drop %s was already priced by %s", drop, manifest["model_version"])
    else:
        publish_drop(lake, manifest)
    # Where the prices are: the parts (one row per image) and rejected.parquet.
    where = lake.score_run(manifest["drop_id"], manifest["model_version"]).uri()
    return _summary(manifest) | {"scores_uri": where}


@flow(name="score-new-drops")
def score_new_drops_flow(
    store: str | None = None,
    shard_size: int = SCORE.shard_size,
    score_pool: str | None = None,
    line: str | None = None,
    engine: str = SCORE.engine,
    precision: str = SCORE.precision,
) -> dict:
    """Score every drop that has no complete manifest for the champion of a model line
    (the store's only line when not named), or that has new files. One drop that fails
    never stops the others: the result names the folders that are not drops
    (``not_drops``) and the drops not priced (``failed``), and the run then fails with
    one line per drop (ScanIncomplete)."""
    uri = load_settings(store=store).store
    lake = Lake(open_store(uri))
    model_version = resolve_model(lake, None, line)
    scan = scan_drops(lake, model_version)
    log = get_logger()
    log.info(
        "%d drops to score with %s: %s", len(scan.todo), model_version, ", ".join(scan.todo) or "-"
    )
    results, failed = {}, dict(scan.failed)
    for d in scan.todo:
        try:
            results[d] = score_flow(drop=d, store=uri, shard_size=shard_size,
                                    score_pool=score_pool, model=model_version, engine=engine,
                                    precision=precision)  # fmt: skip
        except Exception as err:  # this drop's failure, in its own run: go on with the next
            failed[d] = one_line(err)
            log.error("drop %s not priced: %s", d, failed[d])
    line_name = line_of(lake.model(model_version).lineage()["dataset_version"])
    result = {
        "model_version": model_version,
        "line": line_name,
        "scored": {d: r["counts"] for d, r in results.items()},
        "scores_uri": {d: r["scores_uri"] for d, r in results.items()},
    }
    if scan.not_drops:
        result["not_drops"] = scan.not_drops
    if failed:
        result["failed"] = failed
        raise ScanIncomplete(result)
    if not scan.todo:
        skipped = "; ".join(f"{name} ({why})" for name, why in scan.not_drops.items())
        result["message"] = nothing_to_price(lake, model_version, line_name) + (
            f"; skipped, not drops: {skipped}" if skipped else "")  # fmt: skip
    return result


def nothing_to_price(lake: Lake, model_version: str, line: str) -> str:
    """One line for a scan that found nothing to price: which drops the model priced."""
    priced = [d for d in lake.drop_ids()
              if not drop_name_problem(d) and lake.drop(d).listing()[0]]  # fmt: skip
    if not priced:
        return (f"nothing to price: {lake.uri} has no drops with images (put them under "
                f"{lake.drop('<drop-id>').uri()})")  # fmt: skip
    shown = ", ".join(priced[:10]) + (f" and {len(priced) - 10} more" if len(priced) > 10 else "")
    return (f"nothing to price: every drop ({shown}) is already priced by {model_version} "
            f"(line {line})")  # fmt: skip
