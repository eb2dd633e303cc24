"""Score flows: price a drop (shards mapped in parallel) and find drops to price."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from prefect import flow, task, unmapped
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from tasks.images import DEFAULT_MAX_PIXELS
from tasks.reports import artifact_key, drop_markdown, price_bands, publish_markdown, publish_table
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.scoring import (
    DropBusy,
    ScoreOptions,
    drops_needing_scores,
    finalize,
    prepare,
    read_parts,
    release_lease,
    resolve_model,
    score_shard,
)
from tasks.settings import load_settings
from tasks.storage import model_prefix, open_store


@task(name="score-shard", **TASK_RETRIES)
def score_shard_task(
    store_uri: str, source_uri: str, prefix: str, base: str, shard: str, keys: list[str],
    mv: str, options: dict,
) -> dict:  # fmt: skip
    """Price one shard of a drop; the model is loaded once per worker process."""
    return score_shard(
        open_store(source_uri), prefix, open_store(store_uri), base, shard, keys, mv,
        ScoreOptions(**options),
    )  # fmt: skip


def publish_drop(store, manifest: dict, seconds: float) -> None:
    """The drop-<id> artifacts: summary markdown and price bands by class."""
    from tasks.labels import read_scaling

    n = manifest["counts"]["priced"] + manifest["counts"]["rejected"]
    key = artifact_key(f"drop-{manifest['drop_id']}")
    publish_markdown(key, drop_markdown(manifest, n / seconds if seconds else None), "drop scoring")
    lineage = store.get_json(model_prefix(manifest["model_version"]) + "lineage.json")
    means = read_scaling(store, lineage["dataset_version"], lineage["labels_version"])["rule"][
        "means"
    ]
    priced = read_parts(store, manifest["parts"], ["price"])
    prices = priced["price"].to_pylist() if priced is not None else []
    publish_table(key + "-bands", price_bands(prices, means), "predicted prices by class band")


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
    uri = load_settings(store=store).store
    s = open_store(uri)
    mv = resolve_model(s, model)
    options = ScoreOptions(shard_size=shard_size, max_pixels=max_pixels, precision=precision)
    owner = f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"
    t0 = time.time()
    log = get_logger()
    try:
        job = prepare(s, drop, mv, options, owner)
    except DropBusy as err:
        log.warning("drop %s: %s; leaving it to that run", drop, err)
        return {"drop_id": drop, "model_version": mv, "busy": True, "skipped": True}
    try:
        if job["nothing_to_do"]:
            log.info("drop %s is already scored by %s: nothing to do", job["drop_id"], mv)
            return _summary(s.get_json(job["base"] + "_manifest.json"), skipped=True)
        log.info(
            "drop %s: %d objects listed, %d new, %d unfinished shards to redo, %d shards to score",
            job["drop_id"], len(job["listing"]), job["new_keys"], job["redo_shards"],
            len(job["todo"]),
        )  # fmt: skip
        shards = sorted(job["todo"].items())
        futures = score_shard_task.map(
            unmapped(uri), unmapped(job["source_uri"]), unmapped(job["prefix"]),
            unmapped(job["base"]), [name for name, _ in shards], [keys for _, keys in shards],
            unmapped(mv), unmapped(dataclasses.asdict(options)),
        )  # fmt: skip
        bar = tqdm(total=len(futures), unit="shard", disable=not sys.stderr.isatty())
        for future in as_completed(futures):
            future.result()  # a failed shard fails the run; finished shards stay done
            bar.update()
        bar.close()
        seconds = time.time() - t0
        run = {"seconds": round(seconds, 3), "shards_scored": len(shards)}
        manifest = finalize(s, job["base"], job["drop_id"], mv, job["listing"], run)
        publish_drop(s, manifest, seconds)
        return _summary(manifest, skipped=False)
    finally:
        release_lease(s, job["base"], job["lease"], owner)


def _summary(manifest: dict, skipped: bool) -> dict:
    keys = ("drop_id", "model_version", "counts", "rejections", "prices", "drift", "timings")
    return {k: manifest[k] for k in keys} | {"skipped": skipped}


@flow(name="score-new-drops")
def score_new_drops_flow(store: str | None = None, shard_size: int = 1000) -> dict:
    """Score every drop that has no complete manifest for the champion (or new files)."""
    uri = load_settings(store=store).store
    s = open_store(uri)
    mv = resolve_model(s, None)
    drops = drops_needing_scores(s, mv)
    get_logger().info("%d drops to score with %s: %s", len(drops), mv, ", ".join(drops) or "-")
    results = {d: score_flow(drop=d, store=uri, shard_size=shard_size) for d in drops}
    return {
        "model_version": mv,
        "scored": {
            d: r.get("counts", "busy: another run is scoring it") for d, r in results.items()
        },
    }
