"""Bulk scoring of drops: every listed object priced or rejected exactly once.

Layout under ``scores/<drop-id>/<model-version>/``:

- ``_plans/<plan>.json``: the shards (lists of keys) a run set out to score,
  written before any of them is scored;
- ``_rejected/part-<shard>.parquet`` and ``_shards/<shard>.json``: a shard's
  rejections and facts, then ``part-<shard>.parquet`` (its prices), written
  last: a shard is done when its part exists;
- ``rejected.parquet`` (all rejections) and ``_manifest.json`` (counts, model,
  timings, drift), written last by the finishing step.

One runner (``score_drop``) serves the CLI, the flows, the tests and the
benchmarks; where its shards run is a parameter. A re-run reads the plans: shards without a part are redone, keys in no plan
(files added since) go into a new plan, and if there is neither the run says so
and does nothing. Runs on one drop exclude each other with a lease taken by a
conditional write (``If-None-Match: *`` on S3, a hard link locally): leases are
numbered objects under ``_leases/`` and whoever creates the next number holds
it, so two runs can never both score, and a crashed run's lease expires.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.images import DEFAULT_MAX_PIXELS, ImageRejected, to_pixels
from tasks.inference import get_model, predict_prices
from tasks.lake import DropSource, Lake, NotInLake, ScoreRun
from tasks.runtime import get_logger
from tasks.storage import ObjectInfo, ObjectNotFound, open_store

PRICED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("price", pa.float64()),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("reason", pa.string()),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
DRIFT_FRACTION = 0.2  # flag a drop when more than this share looks unlike training


@dataclass(frozen=True)
class ScoreOptions:
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "auto"
    batch_size: int = 256
    lease_seconds: int = 3600


class DropBusy(RuntimeError):
    """Another run holds this drop's lease."""


# --- where the drop is ------------------------------------------------------------


def locate_drop(lake: Lake, drop: str) -> DropSource:
    """A drop id in the store's drops/, or an explicit s3:// URI or directory."""
    if "://" in drop or drop.startswith(("/", ".", "~")):
        uri = drop.rstrip("/")
        return DropSource(open_store(uri), "", uri.rsplit("/", 1)[-1])
    drop_id = drop.strip("/")
    if not drop_id or "/" in drop_id:
        raise ValueError(f"invalid drop id {drop!r}: use a single name or a URI")
    return lake.drop(drop_id)


# --- the lease ---------------------------------------------------------------------


def acquire_lease(run: ScoreRun, owner: str, seconds: int) -> int:
    """Take the drop's lease or raise DropBusy; returns the lease number held."""
    leases = run.leases()
    number = leases[-1][0] if leases else 0
    if leases:
        last = run.get_json(leases[-1][1])
        if last["state"] == "held" and last["expires"] > time.time():
            raise DropBusy(f"{last['owner']} is scoring this drop (lease {number})")
    body = {"state": "held", "owner": owner, "expires": time.time() + seconds}
    if not run.try_lease(number + 1, body):
        raise DropBusy("another run took the lease at the same moment")
    return number + 1


def release_lease(run: ScoreRun, number: int, owner: str) -> None:
    run.try_lease(number + 1, {"state": "free", "owner": owner, "expires": 0})


# --- planning -----------------------------------------------------------------------


def plan_work(run: ScoreRun, listing: list[ObjectInfo], shard_size: int) -> dict:
    """Shards still to score: unfinished ones from earlier plans, plus new keys."""
    plans = run.plans()
    done = set(run.done_shards())
    covered = {key for keys in plans.values() for key in keys}
    todo = {name: keys for name, keys in plans.items() if name not in done}
    redo = len(todo)
    new = [o.key for o in listing if o.key not in covered]
    if new:
        plan_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        shards = {
            f"{plan_id}-{i // shard_size:05d}": new[i : i + shard_size]
            for i in range(0, len(new), shard_size)
        }
        run.write_plan(plan_id, shards)
        todo.update(shards)
    return {"todo": todo, "new": len(new), "redo": redo}


# --- one shard -------------------------------------------------------------------------


def decode_object(key: str, body: bytes, max_pixels: int):
    """Yield (row key, pixels or None, reason) for one drop object."""
    if key.lower().endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(body), columns=["image_id", "image"])
        except Exception as err:  # any unreadable file is a rejection, never a crash
            yield key, None, f"unreadable Parquet: {type(err).__name__}: {err}"
            return
        for image_id, image in zip(
            table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True
        ):
            row = f"{key}#{image_id}"
            try:
                yield row, to_pixels(image or b"", max_pixels), None
            except ImageRejected as err:
                yield row, None, str(err)
        return
    try:
        yield key, to_pixels(body, max_pixels), None
    except ImageRejected as err:
        yield key, None, str(err)


def _rows(schema: pa.Schema, keys: list, values, mv: str, now: datetime) -> pa.Table:
    """A part table: one row per key with its value (price or reason), model and time."""
    columns = {"key": keys, schema.names[1]: values}
    columns |= {"model_version": [mv] * len(keys), "scored_at": [now] * len(keys)}
    return pa.table(columns, schema=schema)


def score_shard(
    run: ScoreRun, source: DropSource, shard: str, keys: list[str], options: ScoreOptions
) -> dict:
    """Price one shard; writes rejections and facts, then the part (the done marker)."""
    t0 = time.time()
    mv = run.model_version
    model, config, lock = get_model(Lake(run.store).model(mv), options.precision)
    rows, pixels, rejected = [], [], []
    for key in keys:
        try:
            body = source.get_bytes(key)
        except ObjectNotFound:
            rejected.append((key, "gone: deleted after it was listed"))
            continue
        for row, px, reason in decode_object(key, body, options.max_pixels):
            if px is None:
                rejected.append((row, reason))
            else:
                rows.append(row)
                pixels.append(px)
    images = np.stack(pixels) if pixels else np.zeros((0, 28, 28), np.uint8)
    prices = predict_prices(model, images, options.batch_size, lock)
    now = datetime.now(UTC)
    stats = config.get("train_stats", {})
    means = images.reshape(len(images), -1).mean(axis=1) if len(images) else np.zeros(0)
    facts = {
        "shard": shard,
        "listed": len(keys),
        "priced": len(rows),
        "rejected": len(rejected),
        "reasons": dict(Counter(r.split(":")[0] for _, r in rejected)),
        "pixel_out_of_range": int(
            (
                (means < stats.get("pixel_mean_p01", -1))
                | (means > stats.get("pixel_mean_p99", 256))
            ).sum()
        ),
        "pixel_mean_sum": float(means.sum()),
        "seconds": round(time.time() - t0, 3),
    }
    run.write_shard(
        shard,
        _rows(PRICED_SCHEMA, rows, prices, mv, now),
        _rows(REJECTED_SCHEMA, [k for k, _ in rejected], [r for _, r in rejected], mv, now),
        facts,
    )
    return facts


# --- finishing -----------------------------------------------------------------------


def finalize(run: ScoreRun, listing: list[ObjectInfo], timings: dict) -> dict:
    """rejected.parquet and _manifest.json (last) from every finished shard."""
    rejected = run.shard_rejections()
    if rejected is None:
        rejected = REJECTED_SCHEMA.empty_table()
    run.write_rejected(rejected)
    shards = run.shard_facts()
    parts = run.part_names()
    priced = run.read_tables(parts, ["price"])
    prices = priced["price"].to_numpy() if priced is not None else np.zeros(0)
    stats = Lake(run.store).model(run.model_version).config().get("train_stats", {})
    n = len(prices)
    reasons = Counter()
    for s in shards:
        reasons.update(s["reasons"])
    pixel_out = sum(s["pixel_out_of_range"] for s in shards)
    price_out = int(
        (
            (prices < stats.get("price_p01", -np.inf)) | (prices > stats.get("price_p99", np.inf))
        ).sum()
    )
    drift = {
        "pixel_out_of_range_fraction": pixel_out / n if n else 0.0,
        "price_out_of_range_fraction": price_out / n if n else 0.0,
        "pixel_mean": sum(s["pixel_mean_sum"] for s in shards) / n if n else None,
        "train_pixel_mean": stats.get("pixel_mean"),
        "price_mean": float(prices.mean()) if n else None,
        "train_price_mean": stats.get("price_mean"),
    }
    worst = max(drift["pixel_out_of_range_fraction"], drift["price_out_of_range_fraction"])
    # None: the model recorded no training statistics, so there is nothing to compare.
    drift["flagged"] = bool(worst > DRIFT_FRACTION) if stats else None
    pct = (5, 25, 50, 75, 95)
    quantiles = {f"p{p}": float(np.percentile(prices, p)) for p in pct} if n else {}
    manifest = {
        "drop_id": run.drop_id,
        "model_version": run.model_version,
        "counts": {"listed": len(listing), "priced": n, "rejected": rejected.num_rows},
        "rejections": dict(reasons),
        "prices": {
            "quantiles": quantiles,
            "mean": float(prices.mean()) if n else None,
        },
        "drift": drift,
        "listing": [[o.key, o.size, o.etag] for o in listing],
        "parts": parts,
        "timings": timings,
        "completed_at": datetime.now(UTC).isoformat(),
    }
    run.write_manifest(manifest)
    if not listing:
        get_logger().warning(
            "drop %s has no files: nothing to price (empty manifest written)", run.drop_id
        )
    return manifest


# --- one whole run: the only scoring runner (CLI, flows, tests, benchmarks) -------------


def resolve_model(lake: Lake, model_version: str | None) -> str:
    if model_version:
        lake.model(model_version).lineage()  # complete, or NotInLake listing the known
        return model_version
    champion = lake.registry().champion()
    if champion is None:
        raise NotInLake(f"no champion in {lake.uri}: train and promote a model, or pass --model")
    return champion["model_version"]


@dataclass
class Job:
    """One run's work on a drop: what was listed, and the shards it still has to score."""

    run: ScoreRun
    source: DropSource
    listing: list[ObjectInfo]
    todo: dict[str, list[str]]
    new_keys: int
    redo_shards: int
    owner: str
    lease: int = 0
    shard_facts: list[dict] = field(default_factory=list)


ShardRunner = Callable[[Job, ScoreOptions], None]


def run_shards_in_threads(job: Job, options: ScoreOptions) -> None:
    """The laptop default: two threads, so one shard decodes while another predicts
    (predict holds the model's lock and uses every core)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(score_shard, job.run, job.source, shard, keys, options)
            for shard, keys in sorted(job.todo.items())
        ]
        job.shard_facts = [f.result() for f in futures]


def score_drop(
    lake: Lake,
    drop: str,
    model_version: str | None = None,
    options: ScoreOptions | None = None,
    run_shards: ShardRunner = run_shards_in_threads,
) -> dict:
    """Price every image of a drop exactly once; ``run_shards`` decides where the
    shards run (threads here; Prefect tasks in the score flow)."""
    options = options or ScoreOptions()
    log = get_logger()
    mv = resolve_model(lake, model_version)
    source = locate_drop(lake, drop)
    run = lake.score_run(source.drop_id, mv)
    owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    t0 = time.time()
    lease = acquire_lease(run, owner, options.lease_seconds)
    try:
        listing = source.listing()
        plan = plan_work(run, listing, options.shard_size)
        if not plan["todo"] and run.complete:
            log.info("drop %s already scored by %s: nothing to do", source.drop_id, mv)
            return run.manifest() | {"skipped": True}
        job = Job(run, source, listing, plan["todo"], plan["new"], plan["redo"], owner, lease)
        log.info(
            "drop %s: %d objects listed, %d new, %d unfinished shards to redo, %d shards to score",
            source.drop_id, len(listing), job.new_keys, job.redo_shards, len(job.todo),
        )  # fmt: skip
        run_shards(job, options)
        timings = {"seconds": round(time.time() - t0, 3), "shards_scored": len(job.todo)}
        return finalize(run, listing, timings) | {"skipped": False}
    finally:
        release_lease(run, lease, owner)


def drops_needing_scores(lake: Lake, mv: str) -> list[str]:
    """Drops with no complete manifest for this model, or with files added since."""
    todo = []
    for drop_id in lake.drop_ids():
        manifest = lake.score_run(drop_id, mv).manifest()
        if manifest is None:
            todo.append(drop_id)
            continue
        listed = {k for k, _, _ in manifest["listing"]}
        if any(o.key not in listed for o in lake.drop(drop_id).listing()):
            todo.append(drop_id)
    return todo
