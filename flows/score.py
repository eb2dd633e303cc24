"""Score flows: price a drop (its shards mapped as Prefect tasks) and find drops to price."""

from __future__ import annotations

import dataclasses
import sys

from prefect import flow, task, unmapped
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from tasks.images import DEFAULT_MAX_PIXELS
from tasks.lake import DropSource, Lake
from tasks.reports import artifact_key, drop_markdown, price_bands, publish_markdown, publish_table
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.scoring import (
    DropBusy,
    Job,
    ScoreOptions,
    drops_needing_scores,
    resolve_model,
    score_drop,
    score_shard,
)
from tasks.settings import load_settings
from tasks.storage import open_store


@task(name="score-shard", **TASK_RETRIES)
def score_shard_task(
    store_uri: str, drop_id: str, model_version: str, source: tuple[str, str], shard: str,
    keys: list[str], options: dict,
) -> dict:  # fmt: skip
    """Price one shard of a drop; the model is loaded once per worker process."""
    run = Lake(open_store(store_uri)).score_run(drop_id, model_version)
    drop = DropSource(open_store(source[0]), source[1], drop_id)
    return score_shard(run, drop, shard, keys, ScoreOptions(**options))


def run_shards_as_tasks(job: Job, options: ScoreOptions) -> None:
    """The shards as Prefect task runs on the flow's task runner (threads by default;
    another runner spreads them further), with a progress bar in a terminal."""
    shards = sorted(job.todo.items())
    futures = score_shard_task.map(
        unmapped(job.run.store.uri), unmapped(job.run.drop_id), unmapped(job.run.model_version),
        unmapped((job.source.store.uri, job.source.prefix)), [name for name, _ in shards],
        [keys for _, keys in shards], unmapped(dataclasses.asdict(options)),
    )  # fmt: skip
    bar = tqdm(total=len(futures), unit="shard", disable=not sys.stderr.isatty())
    for future in as_completed(futures):
        job.shard_facts.append(future.result())  # a failed shard fails the run
        bar.update()
    bar.close()


def publish_drop(lake: Lake, manifest: dict) -> None:
    """The drop-<id> artifacts: summary markdown and price bands by class."""
    n = manifest["counts"]["priced"] + manifest["counts"]["rejected"]
    seconds = manifest["timings"]["seconds"]
    key = artifact_key(f"drop-{manifest['drop_id']}")
    publish_markdown(key, drop_markdown(manifest, n / seconds if seconds else None), "drop scoring")
    mv = manifest["model_version"]
    lineage = lake.model(mv).lineage()
    means = lake.labels(lineage["dataset_version"], lineage["labels_version"]).scaling()["rule"]
    priced = lake.score_run(manifest["drop_id"], mv).read_tables(manifest["parts"], ["price"])
    prices = priced["price"].to_pylist() if priced is not None else []
    publish_table(key + "-bands", price_bands(prices, means["means"]), "prices by class band")


def _summary(manifest: dict) -> dict:
    keys = ("drop_id", "model_version", "counts", "rejections", "prices", "drift", "timings")
    return {k: manifest[k] for k in keys} | {"skipped": manifest["skipped"]}


@flow(name="score-drop", task_runner=ThreadPoolTaskRunner(max_workers=4))
def score_flow(
    drop: str,
    store: str | None = None,
    model: str | None = None,
    shard_size: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    precision: str = "auto",
) -> dict:
    """Price every image of a drop exactly once with the champion (or a pinned model)."""
    lake = Lake(open_store(load_settings(store=store).store))
    options = ScoreOptions(shard_size=shard_size, max_pixels=max_pixels, precision=precision)
    try:
        manifest = score_drop(lake, drop, model, options, run_shards=run_shards_as_tasks)
    except DropBusy as err:
        get_logger().warning("drop %s: %s; leaving it to that run", drop, err)
        return {"drop_id": drop, "busy": True, "skipped": True}
    if not manifest["skipped"]:
        publish_drop(lake, manifest)
    return _summary(manifest)


@flow(name="score-new-drops")
def score_new_drops_flow(store: str | None = None, shard_size: int = 1000) -> dict:
    """Score every drop that has no complete manifest for the champion (or new files)."""
    uri = load_settings(store=store).store
    lake = Lake(open_store(uri))
    mv = resolve_model(lake, None)
    drops = drops_needing_scores(lake, mv)
    get_logger().info("%d drops to score with %s: %s", len(drops), mv, ", ".join(drops) or "-")
    results = {d: score_flow(drop=d, store=uri, shard_size=shard_size) for d in drops}
    return {
        "model_version": mv,
        "scored": {
            d: r.get("counts", "busy: another run is scoring it") for d, r in results.items()
        },
    }
