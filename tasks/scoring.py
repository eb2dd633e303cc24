"""Bulk scoring of drops: every listed object priced or rejected exactly once.

Layout under ``scores/<drop-id>/<model-version>/``:

- ``_plans/<plan>.json``: the shards (lists of keys) a run set out to score,
  written before any of them is scored;
- ``_rejected/part-<shard>.parquet`` and ``_shards/<shard>.json``: a shard's
  rejections and facts, then ``part-<shard>.parquet`` (its prices), written
  last: a shard is done when its part exists;
- ``rejected.parquet`` (all rejections) and ``_manifest.json`` (counts, model,
  timings, drift), written last by the finishing step.

A re-run reads the plans: shards without a part are redone, keys in no plan
(files added since) go into a new plan, and if there is neither the run says so
and does nothing. Runs on one drop exclude each other with a lease taken by a
conditional write (``If-None-Match: *`` on S3, a hard link locally): leases are
numbered objects under ``_leases/`` and whoever creates the next number holds
it, so two runs can never both score, and a crashed run's lease expires.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.images import DEFAULT_MAX_PIXELS, ImageRejected, to_pixels
from tasks.runtime import get_logger
from tasks.settings import default_cache_dir
from tasks.storage import (
    DROPS_PREFIX,
    ObjectNotFound,
    Store,
    drop_prefix,
    model_prefix,
    open_store,
    scores_prefix,
)

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


def locate_drop(drop: str, store: Store) -> tuple[str, str, str]:
    """(URI of the store to read from, prefix in it, drop id) for a drop id in the
    store's drops/ or an explicit s3:// URI or directory."""
    if "://" in drop or drop.startswith(("/", ".", "~")):
        uri = drop.rstrip("/")
        return uri, "", uri.rsplit("/", 1)[-1]
    drop_id = drop.strip("/")
    if not drop_id or "/" in drop_id:
        raise ValueError(f"invalid drop id {drop!r}: use a single name or a URI")
    return store.uri, drop_prefix(drop_id), drop_id


def list_drop(source: Store, prefix: str) -> list[dict]:
    """The drop's objects once, as (key, size, etag); keys relative to the drop."""
    return [
        {"key": o.key[len(prefix) :], "size": o.size, "etag": o.etag}
        for o in source.list(prefix)
        if not o.key[len(prefix) :].rsplit("/", 1)[-1].startswith(".")
    ]


def list_drop_ids(store: Store) -> list[str]:
    return sorted({k[len(DROPS_PREFIX) :].split("/", 1)[0] for k in store.keys(DROPS_PREFIX)})


# --- the lease ---------------------------------------------------------------------


def acquire_lease(store: Store, base: str, owner: str, seconds: int) -> int:
    """Take the drop's lease or raise DropBusy; returns the lease number held."""
    keys = store.keys(base + "_leases/")
    gen = int(keys[-1].rsplit("/", 1)[-1].split(".")[0]) if keys else 0
    if keys:
        last = store.get_json(keys[-1])
        if last["state"] == "held" and last["expires"] > time.time():
            raise DropBusy(f"{last['owner']} is scoring this drop (lease {gen})")
    body = json.dumps({"state": "held", "owner": owner, "expires": time.time() + seconds})
    if not store.put_if_absent(f"{base}_leases/{gen + 1:08d}.json", body.encode()):
        raise DropBusy("another run took the lease at the same moment")
    return gen + 1


def release_lease(store: Store, base: str, gen: int, owner: str) -> None:
    body = json.dumps({"state": "free", "owner": owner, "expires": 0})
    store.put_if_absent(f"{base}_leases/{gen + 1:08d}.json", body.encode())


# --- planning -----------------------------------------------------------------------


def plan_work(store: Store, base: str, listing: list[dict], shard_size: int) -> dict:
    """Shards still to score: unfinished ones from earlier plans, plus new keys."""
    plans = {}
    for key in store.keys(base + "_plans/"):
        plans.update(store.get_json(key)["shards"])
    done = {k[len(base) + 5 : -8] for k in store.keys(base + "part-")}
    covered = {key for keys in plans.values() for key in keys}
    todo = {name: keys for name, keys in plans.items() if name not in done}
    redo = len(todo)
    new = [o["key"] for o in listing if o["key"] not in covered]
    if new:
        plan_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        shards = {
            f"{plan_id}-{i // shard_size:05d}": new[i : i + shard_size]
            for i in range(0, len(new), shard_size)
        }
        store.put_json(base + f"_plans/{plan_id}.json", {"shards": shards})
        todo.update(shards)
    return {"todo": todo, "new": len(new), "redo": redo}


# --- the model, once per worker process ------------------------------------------------

_MODELS: dict[tuple, tuple] = {}
_MODELS_LOCK = threading.Lock()


def get_model(store: Store, mv: str, precision: str = "auto") -> tuple:
    """(model, config, predict lock), loaded once per process and model version."""
    from tasks.model import load_inference_model

    key = (store.uri, mv, precision)
    with _MODELS_LOCK:
        if key not in _MODELS:
            config = store.get_json(model_prefix(mv) + "config.json")
            local = default_cache_dir() / "models" / mv / "model.keras"
            if not local.is_file():
                store.get_file(model_prefix(mv) + "model.keras", local)
            model = load_inference_model(local, config, precision)
            _MODELS[key] = (model, config, threading.Lock())
        return _MODELS[key]


def predict(model, lock: threading.Lock, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Prices for uint8 (n, 28, 28); one predict at a time per model, all cores each."""
    n = len(pixels)
    if n == 0:
        return np.zeros(0)
    # Pad to whole batches: one traced shape, no retracing for every ragged shard end.
    padded = np.zeros(
        ((n + batch_size - 1) // batch_size * batch_size, *pixels.shape[1:]), np.uint8
    )
    padded[:n] = pixels
    with lock:
        out = model.predict(padded[..., None], batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=np.float64).reshape(-1)[:n]


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


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _rows_parquet(schema: pa.Schema, keys: list, values, mv: str, now: datetime) -> bytes:
    """A part file: one row per key with its value (price or reason), model and time."""
    columns = {"key": keys, schema.names[1]: values}
    columns |= {"model_version": [mv] * len(keys), "scored_at": [now] * len(keys)}
    return _parquet(pa.table(columns, schema=schema))


def score_shard(
    source: Store,
    prefix: str,
    out: Store,
    base: str,
    shard: str,
    keys: list[str],
    mv: str,
    options: ScoreOptions,
) -> dict:
    """Price one shard; writes rejections and facts, then the part (the done marker)."""
    t0 = time.time()
    model, config, lock = get_model(out, mv, options.precision)
    rows, pixels, rejected = [], [], []
    for key in keys:
        try:
            body = source.get_bytes(prefix + key)
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
    prices = predict(model, lock, images, options.batch_size)
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
    out.put_bytes(
        base + f"_rejected/part-{shard}.parquet",
        _rows_parquet(REJECTED_SCHEMA, [k for k, _ in rejected], [r for _, r in rejected], mv, now),
    )
    out.put_json(base + f"_shards/{shard}.json", facts)
    out.put_bytes(
        base + f"part-{shard}.parquet", _rows_parquet(PRICED_SCHEMA, rows, prices, mv, now)
    )
    return facts


# --- finishing -----------------------------------------------------------------------


def read_parts(store: Store, keys: list[str], columns: list[str] | None = None) -> pa.Table | None:
    tables = [pq.read_table(io.BytesIO(store.get_bytes(k)), columns=columns) for k in keys]
    return pa.concat_tables(tables) if tables else None


def finalize(
    store: Store, base: str, drop_id: str, mv: str, listing: list[dict], run: dict
) -> dict:
    """rejected.parquet and _manifest.json (last) from every finished shard."""
    rejected = read_parts(store, store.keys(base + "_rejected/"))
    if rejected is None:
        rejected = REJECTED_SCHEMA.empty_table()
    store.put_bytes(base + "rejected.parquet", _parquet(rejected))
    shards = [store.get_json(k) for k in store.keys(base + "_shards/")]
    parts = store.keys(base + "part-")
    priced = read_parts(store, parts, ["price"])
    prices = priced["price"].to_numpy() if priced is not None else np.zeros(0)
    config = store.get_json(model_prefix(mv) + "config.json")
    stats = config.get("train_stats", {})
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
        "drop_id": drop_id,
        "model_version": mv,
        "counts": {"listed": len(listing), "priced": n, "rejected": rejected.num_rows},
        "rejections": dict(reasons),
        "prices": {
            "quantiles": quantiles,
            "mean": float(prices.mean()) if n else None,
        },
        "drift": drift,
        "listing": [[o["key"], o["size"], o["etag"]] for o in listing],
        "parts": parts,
        "timings": run,
        "completed_at": datetime.now(UTC).isoformat(),
    }
    store.put_json(base + "_manifest.json", manifest)
    if not listing:
        get_logger().warning(
            "drop %s has no files: nothing to price (empty manifest written)", drop_id
        )
    return manifest


# --- one whole run, in-process ----------------------------------------------------------


def resolve_model(store: Store, model_version: str | None) -> str:
    if model_version:
        if not store.exists(model_prefix(model_version) + "lineage.json"):
            raise ObjectNotFound(
                f"{store.uri_for(model_prefix(model_version) + 'lineage.json')}: no such model"
            )
        return model_version
    from tasks.registry import read_champion

    champion = read_champion(store)
    if champion is None:
        raise ValueError(f"no champion in {store.uri}: train and promote a model, or pass --model")
    return champion["model_version"]


def prepare(store: Store, drop: str, mv: str, options: ScoreOptions, owner: str) -> dict:
    """Take the lease, list the drop once, plan the shards."""
    source_uri, prefix, drop_id = locate_drop(drop, store)
    base = scores_prefix(drop_id, mv)
    gen = acquire_lease(store, base, owner, options.lease_seconds)
    try:
        listing = list_drop(open_store(source_uri), prefix)
        plan = plan_work(store, base, listing, options.shard_size)
    except BaseException:
        release_lease(store, base, gen, owner)
        raise
    finished = not plan["todo"] and store.exists(base + "_manifest.json")
    return {
        "drop_id": drop_id,
        "base": base,
        "prefix": prefix,
        "source_uri": source_uri,
        "listing": listing,
        "todo": plan["todo"],
        "new_keys": plan["new"],
        "redo_shards": plan["redo"],
        "lease": gen,
        "nothing_to_do": finished,
    }


def score_drop(
    store: Store,
    drop: str,
    model_version: str | None = None,
    options: ScoreOptions | None = None,
) -> dict:
    """Plain, sequential scoring of one drop (the flow maps shards in parallel instead)."""
    options = options or ScoreOptions()
    mv = resolve_model(store, model_version)
    owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    t0 = time.time()
    job = prepare(store, drop, mv, options, owner)
    try:
        if job["nothing_to_do"]:
            get_logger().info("drop %s already scored by %s: nothing to do", job["drop_id"], mv)
            return store.get_json(job["base"] + "_manifest.json") | {"skipped": True}
        source = open_store(job["source_uri"])
        # Two threads: one shard decodes while another predicts (predict holds a lock).
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [
                pool.submit(
                    score_shard, source, job["prefix"], store, job["base"], shard, keys, mv, options
                )
                for shard, keys in sorted(job["todo"].items())
            ]
            for future in futures:
                future.result()
        run = {"seconds": round(time.time() - t0, 3), "shards_scored": len(job["todo"])}
        return finalize(store, job["base"], job["drop_id"], mv, job["listing"], run) | {
            "skipped": False
        }
    finally:
        release_lease(store, job["base"], job["lease"], owner)


def drops_needing_scores(store: Store, mv: str) -> list[str]:
    """Drops with no complete manifest for this model, or with files added since."""
    todo = []
    for drop_id in list_drop_ids(store):
        base = scores_prefix(drop_id, mv)
        try:
            manifest = store.get_json(base + "_manifest.json")
        except ObjectNotFound:
            todo.append(drop_id)
            continue
        listed = {k for k, _, _ in manifest["listing"]}
        if any(o["key"] not in listed for o in list_drop(store, drop_prefix(drop_id))):
            todo.append(drop_id)
    return todo
