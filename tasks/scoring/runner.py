"""Bulk scoring of drops: every listed object priced or rejected exactly once, by any
number of scorers on any machines, through crashes and lost responses.

The store is the ledger and the work queue (``lake.ScoreRun``):

1. **Plan.** The drop is listed as (key, ETag) and every object not yet in a plan
   (or whose ETag changed since) goes into the next numbered plan, split into
   shards. A plan is created with a conditional write, so two scorers that list
   at once cannot both plan the same objects; the plan names its writer, so a
   create whose response was lost is recognised.
2. **Claim and score.** A scorer claims a shard with a conditional create, keeps
   the claim alive with heartbeats (every third of ``claim_seconds``), writes the
   shard's rejections and facts and, last, its ``part-<shard>.parquet``, then
   drops the claim. A claim whose heartbeat stopped (a crashed scorer) is taken
   over by compare-and-swap once it expires. A shard is done when its part
   exists; writing a part again gives the same rows, so a slow scorer that lost
   its claim cannot make duplicates.
3. **Finish.** When every shard has its part, one scorer (holding the finishing
   claim) moves rows that a later plan re-priced (an object overwritten in place)
   into ``superseded.parquet``, so the parts keep exactly one current row per key;
   then writes ``rejected.parquet`` and, last, ``_manifest.json`` with the counts
   and which scorer priced each shard.

One runner (``score_drop``) serves the CLI, the flows, the tests and the
benchmarks; where the scorers run (threads, Prefect tasks on Dask, flow runs on
a work pool) is a parameter. Every scorer runs the same ``work`` loop.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.images import DEFAULT_MAX_PIXELS, ImageRejected, pixel_shape, prepare
from tasks.model.export import get_model, predict_prices, preprocess_of
from tasks.runtime import get_logger, progress
from tasks.settings import load_settings
from tasks.store.lake import DropSource, Lake, NotInLake, ScoreRun
from tasks.store.storage import ObjectInfo, ObjectNotFound, open_store

_ROW = [("key", pa.string()), ("object", pa.string())]
_STAMP = [("model_version", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC"))]
PRICED_SCHEMA = pa.schema([*_ROW, ("price", pa.float64()), *_STAMP])
REJECTED_SCHEMA = pa.schema([*_ROW, ("reason", pa.string()), *_STAMP])
SUPERSEDED_SCHEMA = pa.schema(
    [*_ROW, ("shard", pa.string()), ("price", pa.float64()), ("reason", pa.string()), *_STAMP]
)
DRIFT_FRACTION = 0.2  # flag a drop when more than this share looks unlike training
MAX_PLAN_RACES = 50


@dataclass(frozen=True)
class ScoreOptions:
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "auto"
    batch_size: int = 256
    claim_seconds: float = 90.0  # a claim without a heartbeat for this long is taken over
    wait: bool = True  # wait for shards that live scorers hold; else stop and say so


class DropBusy(RuntimeError):
    """Live scorers hold every shard left and the run was told not to wait."""


class DropError(ValueError):
    """The drop does not exist or holds nothing to price; nothing was written."""


def scorer_name() -> str:
    """Who is scoring: host and process (and the worker, when named), as the manifest
    records it."""
    worker = load_settings().worker_name
    return f"{socket.gethostname()}:{os.getpid()}" + (f"@{worker}" if worker else "")


# --- where the drop is ------------------------------------------------------------


def locate_drop(lake: Lake, drop: str) -> DropSource:
    """A drop id in the store's drops/, or an explicit s3:// URI or directory (its id
    is derived from the whole URI, so two URIs with one last segment never collide)."""
    if "://" in drop or drop.startswith(("/", ".", "~")):
        uri = drop.rstrip("/")
        source = open_store(uri)
        name = uri.rsplit("/", 1)[-1] or "drop"
        return DropSource(
            source, "", f"{name}-{hashlib.sha256(source.uri.encode()).hexdigest()[:8]}"
        )
    drop_id = drop.strip("/")
    if not drop_id or "/" in drop_id:
        raise DropError(f"invalid drop id {drop!r}: use a single name or a URI")
    return lake.drop(drop_id)


def list_drop(lake: Lake, source: DropSource) -> tuple[list[ObjectInfo], int]:
    """The drop's objects, or DropError when it has none (nothing is written then)."""
    listing, skipped = source.listing()
    if listing:
        return listing, skipped
    where = source.store.uri_for(source.prefix.rstrip("/")) if source.prefix else source.store.uri
    if skipped:
        raise DropError(f"drop {source.drop_id} ({where}) is empty: {skipped} folder markers "
                        "or hidden files, no images")  # fmt: skip
    known = ", ".join(lake.drop_ids()[:10]) or "none"
    raise DropError(f"no such drop {source.drop_id!r} at {where} (drops in the store: {known})")


# --- planning -----------------------------------------------------------------------


def current_shards(plans: dict[int, dict]) -> dict[str, tuple[str, str]]:
    """object key -> (ETag, shard) of its latest plan."""
    current: dict[str, tuple[str, str]] = {}
    for n in sorted(plans):
        for shard, entries in plans[n]["shards"].items():
            for key, etag in entries:
                current[key] = (etag, shard)
    return current


def plan_work(run: ScoreRun, listing: list[ObjectInfo], shard_size: int) -> dict[int, dict]:
    """Put every object that no plan holds with its current ETag into a new plan;
    returns all plans. Plans are numbered and created with a conditional write: when
    another scorer created the number first, look again at what is left."""
    writer = uuid.uuid4().hex
    for _ in range(MAX_PLAN_RACES):
        plans = run.plans()
        current = current_shards(plans)
        new = [o for o in listing if current.get(o.key, ("", ""))[0] != o.etag]
        if not new:
            return plans
        number = max(plans, default=0) + 1
        shards = {
            run.shard_name(number, i // shard_size): [
                [o.key, o.etag] for o in new[i : i + shard_size]
            ]
            for i in range(0, len(new), shard_size)
        }
        plan = {"writer": writer, "shards": shards, "created_at": datetime.now(UTC).isoformat()}
        if run.create_plan(number, plan) or run.plan(number).get("writer") == writer:
            return plans | {number: plan}  # (the second: our create's answer was lost)
    raise RuntimeError(f"{run.uri()}: other scorers kept planning; run again")


def pending(run: ScoreRun, plans: dict[int, dict]) -> dict[str, list]:
    """Planned shards without a part: shard -> [[key, etag], ...]."""
    done = run.done_shards()
    return {
        shard: entries
        for n in sorted(plans)
        for shard, entries in plans[n]["shards"].items()
        if shard not in done
    }


# --- claims ---------------------------------------------------------------------------


def take_claim(run: ScoreRun, name: str, owner: str, seconds: float) -> str | None:
    """Claim ``name`` for ``owner``: the claim's id, or None while a live claim holds it."""
    claim_id = uuid.uuid4().hex
    body = {"owner": owner, "claim": claim_id, "expires": time.time() + seconds}
    if run.create_claim(name, body):
        return claim_id
    found = run.read_claim(name)
    if found is None:
        return None  # released just now: the shard was finished
    held, token = found
    if held["claim"] == claim_id:
        return claim_id  # our create was applied; only its answer was lost
    if held["expires"] > time.time():
        return None
    if run.replace_claim(name, body, token):
        get_logger().warning("%s: took over %s from %s (claim expired)", owner, name, held["owner"])
        return claim_id
    found = run.read_claim(name)
    return claim_id if found and found[0]["claim"] == claim_id else None


def renew_claim(run: ScoreRun, name: str, claim_id: str, seconds: float) -> bool:
    """Push the claim's expiry on, if it is still ours."""
    found = run.read_claim(name)
    if found is None or found[0]["claim"] != claim_id:
        return False
    held, token = found
    renewed = held | {"expires": time.time() + seconds}
    if run.replace_claim(name, renewed, token):
        return True
    found = run.read_claim(name)  # a lost answer, or a takeover
    return bool(found and found[0]["claim"] == claim_id)


class Heartbeat:
    """Renews this scorer's claims every third of their lifetime, in a thread."""

    def __init__(self, run: ScoreRun, seconds: float):
        self.run, self.seconds = run, seconds
        self.held: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def hold(self, name: str, claim_id: str) -> None:
        with self.lock:
            self.held[name] = claim_id

    def release(self, name: str) -> None:
        with self.lock:
            claim_id = self.held.pop(name, None)
        found = self.run.read_claim(name)
        if found is not None and found[0]["claim"] == claim_id:  # not one taken over since
            self.run.drop_claim(name)

    def _beat(self) -> None:
        while not self.stop.wait(self.seconds / 3):
            with self.lock:
                held = dict(self.held)
            for name, claim_id in held.items():
                try:
                    if not renew_claim(self.run, name, claim_id, self.seconds):
                        get_logger().warning("lost the claim on %s (another scorer took it)", name)
                except Exception as err:  # a missed beat is retried at the next one
                    get_logger().warning("heartbeat for %s failed: %s", name, err)


# --- one shard -------------------------------------------------------------------------


def decode_object(key: str, body: bytes, max_pixels: int, decode: Callable | None = None):
    """Yield (row key, pixels or None, reason) for one drop object; ``decode(bytes,
    max_pixels)`` prepares one image (default: the demo's gray 28x28). Whatever a
    decoder raises, one bad image is one row, never a crash."""
    decode = decode or (lambda data, limit: prepare(data, max_pixels=limit))

    def one(row: str, data: bytes):
        try:
            return row, decode(data, max_pixels), None
        except ImageRejected as err:
            return row, None, str(err)
        except Exception as err:
            return row, None, f"undecodable: {type(err).__name__}: {err}"

    if not key.lower().endswith(".parquet"):
        yield one(key, body)
        return
    try:
        table = pq.read_table(io.BytesIO(body), columns=["image_id", "image"])
    except Exception as err:  # any unreadable file is a rejection, never a crash
        yield key, None, f"unreadable Parquet: {type(err).__name__}: {err}"
        return
    for image_id, image in zip(
        table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True
    ):
        yield one(f"{key}#{image_id}", image or b"")


def _rows(schema: pa.Schema, rows: list[tuple], values, mv: str, now: datetime) -> pa.Table:
    """A part table: one row per (row key, object) with its value (price or reason)."""
    columns = {"key": [r for r, _ in rows], "object": [o for _, o in rows], schema.names[2]: values}
    columns |= {"model_version": [mv] * len(rows), "scored_at": [now] * len(rows)}
    return pa.table(columns, schema=schema)


def read_object(source: DropSource, key: str) -> tuple[bytes | None, str | None]:
    """(body, None), or (None, why it cannot be read) for a gone or unusable key."""
    try:
        return source.get_bytes(key), None
    except ObjectNotFound:
        return None, "gone: deleted after it was listed"
    except ValueError as err:  # keys with empty segments and the like
        return None, f"unusable key: {err}"


def score_shard(
    run: ScoreRun, source: DropSource, shard: str, entries: list, options: ScoreOptions,
    scorer: str,
) -> dict:  # fmt: skip
    """Price one shard; writes rejections and facts, then the part (the done marker)."""
    t0 = time.time()
    mv = run.model_version
    model, config, lock = get_model(Lake(run.store).model(mv), options.precision)
    mode, size = preprocess_of(config)  # exactly the preprocessing the model trained with

    def decode(data: bytes, limit: int) -> np.ndarray:
        return prepare(data, mode, size, limit)

    rows, pixels, rejected = [], [], []
    for key, _etag in entries:
        body, why = read_object(source, key)
        if body is None:
            rejected.append(((key, key), why))
            continue
        for row, px, reason in decode_object(key, body, options.max_pixels, decode):
            if px is None:
                rejected.append(((row, key), reason))
            else:
                rows.append((row, key))
                pixels.append(px)
    images = np.stack(pixels) if pixels else np.zeros((0, *pixel_shape(mode, size)), np.uint8)
    prices = predict_prices(model, images, options.batch_size, lock)
    now = datetime.now(UTC)
    stats = config.get("train_stats", {})
    means = images.reshape(len(images), -1).mean(axis=1) if len(images) else np.zeros(0)
    low, high = stats.get("pixel_mean_p01", -1), stats.get("pixel_mean_p99", 256)
    facts = {
        "shard": shard,
        "scorer": scorer,
        "started": t0,
        "listed": len(entries),
        "priced": len(rows),
        "rejected": len(rejected),
        "pixel_out_of_range": int(((means < low) | (means > high)).sum()),
        "pixel_mean_sum": float(means.sum()),
        "seconds": round(time.time() - t0, 3),
    }
    run.write_shard(
        shard,
        _rows(PRICED_SCHEMA, rows, prices, mv, now),
        _rows(REJECTED_SCHEMA, [r for r, _ in rejected], [why for _, why in rejected], mv, now),
        facts,
    )
    return facts


def work(
    run: ScoreRun, source: DropSource, options: ScoreOptions, start: int = 0,
    on_shard: Callable[[dict], None] | None = None,
) -> list[dict]:  # fmt: skip
    """One scorer: claim and score planned shards until none is left unclaimed; returns
    the facts of the shards it scored. ``start`` spreads scorers over the list."""
    scorer, log = scorer_name(), get_logger()
    todo = list(pending(run, run.plans()).items())
    todo = todo[start % len(todo) :] + todo[: start % len(todo)] if todo else []
    scored = []
    with Heartbeat(run, options.claim_seconds) as heartbeat:
        for shard, entries in todo:
            claim_id = take_claim(run, shard, scorer, options.claim_seconds)
            if claim_id is None:
                continue
            heartbeat.hold(shard, claim_id)
            try:
                if run.exists(run.part_name(shard)):
                    continue  # finished by another scorer since the list was read
                facts = score_shard(run, source, shard, entries, options, scorer)
                log.info("%s: shard %s priced %d, rejected %d (%.1f s)", scorer, shard,
                         facts["priced"], facts["rejected"], facts["seconds"])  # fmt: skip
                scored.append(facts)
                if on_shard is not None:
                    on_shard(facts)
            finally:
                heartbeat.release(shard)
    return scored


# --- finishing -----------------------------------------------------------------------


def _superseded(run: ScoreRun, plans: dict[int, dict]) -> dict[str, set[str]]:
    """shard -> object keys in it that a later plan re-priced."""
    current = current_shards(plans)
    stale: dict[str, set[str]] = {}
    for n in plans:
        for shard, entries in plans[n]["shards"].items():
            for key, _ in entries:
                if current[key][1] != shard:
                    stale.setdefault(shard, set()).add(key)
    return stale


def _move_superseded(run: ScoreRun, plans: dict[int, dict]) -> int:
    """Rows of re-priced objects out of their older shard, into superseded.parquet:
    afterwards the parts hold exactly one current row per key. The superseded rows are
    stored before any part is rewritten, and stored once per (key, shard): a finisher
    that crashed half-way and is run again loses and duplicates nothing."""
    moved, rewrites = [], []
    for shard, keys in sorted(_superseded(run, plans).items()):
        for table, write, value in (
            (run.part(shard), run.write_part, "price"),
            (run.shard_rejections(shard), run.write_shard_rejections, "reason"),
        ):
            stale = np.isin(np.asarray(table["object"].to_pylist(), dtype=object), list(keys))
            if not stale.any():
                continue
            old = table.filter(pa.array(stale))
            other = "reason" if value == "price" else "price"
            old = old.append_column("shard", pa.array([shard] * old.num_rows, pa.string()))
            old = old.append_column(
                other, pa.nulls(old.num_rows, SUPERSEDED_SCHEMA.field(other).type)
            )
            moved.append(old.select(SUPERSEDED_SCHEMA.names).cast(SUPERSEDED_SCHEMA))
            rewrites.append((write, shard, table.filter(pa.array(~stale))))
    if not moved:
        return 0
    earlier = run.superseded()
    rows = pa.concat_tables(([earlier] if earlier is not None else []) + moved)
    seen, keep = set(), []
    for pair in zip(rows["key"].to_pylist(), rows["shard"].to_pylist(), strict=True):
        keep.append(pair not in seen)
        seen.add(pair)
    run.write_superseded(rows.filter(pa.array(keep)))
    for write, shard, table in rewrites:
        write(shard, table)
    return sum(t.num_rows for t in moved)


def finish(
    run: ScoreRun, plans: dict[int, dict], listing: list[ObjectInfo], skipped: int, timings: dict
) -> dict | None:
    """The drop's outputs, once per plan generation: None while another scorer holds the
    finishing claim."""
    last = max(plans)
    manifest = run.manifest()
    if manifest is not None and manifest.get("last_plan") == last:
        return manifest | {"skipped": True}
    name = run.finish_name(last)
    claim_id = take_claim(run, name, scorer_name(), 600)
    if claim_id is None:
        return None
    try:
        moved = _move_superseded(run, plans)
        done = sorted(run.done_shards())
        rejected = pa.concat_tables(
            [REJECTED_SCHEMA.empty_table()] + [run.shard_rejections(s) for s in done]
        )
        run.write_rejected(rejected)
        manifest = summarise(run, plans, done, rejected, listing, skipped, moved)
        manifest |= {"timings": timings, "completed_at": datetime.now(UTC).isoformat()}
        run.write_manifest(manifest)
        return manifest | {"skipped": False}
    finally:
        run.drop_claim(name)


def summarise(run: ScoreRun, plans, done, rejected, listing, skipped, moved) -> dict:
    """The manifest's body: counts, reasons, price quantiles, drift, who scored what."""
    facts = run.shard_facts()
    priced = run.read_tables([run.part_name(s) for s in done], ["price"])
    prices = priced["price"].to_numpy() if priced is not None else np.zeros(0)
    stats = Lake(run.store).model(run.model_version).config().get("train_stats", {})
    n = len(prices)
    reasons = Counter(r.split(":")[0] for r in rejected["reason"].to_pylist())
    pixel_out = sum(facts[s]["pixel_out_of_range"] for s in done if s in facts)
    price_out = int(
        (
            (prices < stats.get("price_p01", -np.inf)) | (prices > stats.get("price_p99", np.inf))
        ).sum()
    )
    drift = {
        "pixel_out_of_range_fraction": pixel_out / n if n else 0.0,
        "price_out_of_range_fraction": price_out / n if n else 0.0,
        "pixel_mean": sum(facts[s]["pixel_mean_sum"] for s in done if s in facts) / n
        if n
        else None,
        "train_pixel_mean": stats.get("pixel_mean"),
        "price_mean": float(prices.mean()) if n else None,
        "train_price_mean": stats.get("price_mean"),
    }
    worst = max(drift["pixel_out_of_range_fraction"], drift["price_out_of_range_fraction"])
    # None: the model recorded no training statistics, so there is nothing to compare.
    drift["flagged"] = bool(worst > DRIFT_FRACTION) if stats else None
    quantiles = {f"p{p}": float(np.percentile(prices, p)) for p in (5, 25, 50, 75, 95)} if n else {}
    scorers = {s: facts[s]["scorer"] for s in done if s in facts}
    return {
        "drop_id": run.drop_id,
        "model_version": run.model_version,
        "counts": {"listed": len(listing), "priced": n, "rejected": rejected.num_rows},
        "skipped_keys": skipped,
        "superseded_rows": moved,
        "rejections": dict(reasons),
        "prices": {"quantiles": quantiles, "mean": float(prices.mean()) if n else None},
        "drift": drift,
        "listing": [[o.key, o.size, o.etag] for o in listing],
        "last_plan": max(plans),
        "parts": [run.part_name(s) for s in done],
        "scorers": scorers,
        "scorer_counts": dict(Counter(scorers.values())),
    }


# --- one whole run: the only scoring runner (CLI, flows, tests, benchmarks) -------------


class LineError(ValueError):
    """Which model line to score with is unknown or ambiguous (the message lists them)."""


def resolve_champion(lake: Lake, line: str | None) -> dict:
    """The champion of the line named, or of the store's only line; LineError when the
    line has none or several lines need a choice (the message lists them)."""
    if line:
        champion = lake.registry(line).champion()
        if champion is None:
            raise LineError(f"no model line {line!r} with a champion in {lake.uri} "
                            f"(lines: {', '.join(lake.lines()) or 'none'})")  # fmt: skip
        return champion
    champions = lake.champions()
    if len(champions) > 1:
        raise LineError(f"{lake.uri} holds several model lines ({', '.join(champions)}): "
                        "pass --line NAME")  # fmt: skip
    if not champions:
        raise NotInLake(f"no champion in {lake.uri}: train and promote a model (vggprice run)")
    return next(iter(champions.values()))


def resolve_model(lake: Lake, model_version: str | None, line: str | None = None) -> str:
    """A pinned model version, or the champion of the line (see resolve_champion)."""
    if model_version:
        lake.model(model_version).lineage()  # complete, or NotInLake listing the known
        return model_version
    return resolve_champion(lake, line)["model_version"]


@dataclass
class Job:
    """What the scorers of one run work on."""

    run: ScoreRun
    source: DropSource
    shards: dict[str, list]


# Runs scorers (each the ``work`` loop) somewhere, returns the facts of their shards.
ScorerRunner = Callable[[Job, ScoreOptions], list[dict]]


def run_scorers_in_threads(job: Job, options: ScoreOptions, scorers: int = 2) -> list[dict]:
    """The laptop default: two scorers as threads of this process, so one shard decodes
    while another predicts (predict holds the model's lock and uses every core)."""
    bar = progress(len(job.shards), f"drop {job.run.drop_id}", "shard")
    with bar, ThreadPoolExecutor(max_workers=scorers) as pool:
        futures = [pool.submit(work, job.run, job.source, options, i, lambda _: bar.update())
                   for i in range(scorers)]  # fmt: skip
        return [facts for f in futures for facts in f.result()]


def score_drop(
    lake: Lake,
    drop: str,
    model_version: str | None = None,
    options: ScoreOptions | None = None,
    run_scorers: ScorerRunner = run_scorers_in_threads,
    line: str | None = None,
) -> dict:
    """Price every image of a drop exactly once, joining any scorers already at it;
    returns the manifest (``skipped``: it was finished before this run)."""
    options = options or ScoreOptions()
    log = get_logger()
    mv = resolve_model(lake, model_version, line)
    source = locate_drop(lake, drop)
    listing, skipped = list_drop(lake, source)
    run = lake.score_run(source.drop_id, mv)
    t0 = time.time()
    plans = plan_work(run, listing, options.shard_size)
    todo = pending(run, plans)
    log.info("drop %s: %d objects listed (%d skipped), %d shards to score with %s",
             source.drop_id, len(listing), skipped, len(todo), mv)  # fmt: skip
    scored = 0
    while True:
        if todo:
            scored += len(run_scorers(Job(run, source, todo), options))
            todo = pending(run, plans)
        if not todo:
            timings = {"seconds": round(time.time() - t0, 3), "shards_scored_here": scored}
            manifest = finish(run, plans, listing, skipped, timings)
            if manifest is not None:
                return manifest
        held = {c["owner"] for n, c in run.claims().items() if n in todo or run.is_finish_name(n)}
        if not options.wait:
            left = f"{len(todo)} shards" if todo else "the finishing step"
            raise DropBusy(
                f"drop {source.drop_id}: {scored} shards priced here, {left} held by live "
                f"scorers ({', '.join(sorted(held)) or 'just released'}); run again later, "
                "or without --no-wait to wait for them"
            )
        time.sleep(min(options.claim_seconds / 3, 2.0))
        todo = pending(run, plans)


def drops_needing_scores(lake: Lake, mv: str) -> list[str]:
    """Drops with images and no complete manifest for this model, or with objects added
    or overwritten since it was written."""
    todo = []
    for drop_id in lake.drop_ids():
        listing, _ = lake.drop(drop_id).listing()
        if not listing:
            continue
        manifest = lake.score_run(drop_id, mv).manifest()
        scored = {k: etag for k, _, etag in (manifest or {}).get("listing", [])}
        if any(scored.get(o.key) != o.etag for o in listing):
            todo.append(drop_id)
    return todo
