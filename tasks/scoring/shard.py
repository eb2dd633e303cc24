"""One shard's work: read each object, decode it by the model's own preprocessing, price
the images in batches, and write the attempt's rejections and facts and, last, the
shard's ``part-<shard>.parquet`` (its completion marker) by a conditional create: a late
attempt loses, says so, and its rows are not counted. ``work`` is the loop every scorer
runs, wherever it runs: claim a shard, score it, release it, until none is left; it
gives a shard up (and releases it) when the claim is lost or lapsed, or when the shard
runs past its bound (``ScoreOptions.shard_base_seconds`` and
``shard_seconds_per_object``), checked between objects and before writing.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.images import ImageRejected, pixel_shape, prepare
from tasks.model.export import preprocess_of
from tasks.runtime import get_logger
from tasks.scoring.engines import get_engine
from tasks.scoring.ledger import ScoreOptions, pending
from tasks.store.claims import ClaimWatch, Lease, ShardGivenUp, work_in_turn, worker_name
from tasks.store.lake import DropSource, Lake, ScoreRun
from tasks.store.storage import NotRegularFile, ObjectNotFound, TooLarge

_ROW = [("key", pa.string()), ("object", pa.string())]


_STAMP = [("model_version", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC"))]


# which engine and precision priced the row (tasks/scoring/engines.py)
_ENGINE = [("engine", pa.string()), ("precision", pa.string())]


PRICED_SCHEMA = pa.schema([*_ROW, ("price", pa.float64()), *_STAMP, *_ENGINE])


REJECTED_SCHEMA = pa.schema([*_ROW, ("reason", pa.string()), *_STAMP])


def decode_object(
    key: str, body: bytes, max_pixels: int, decode: Callable | None = None, *,
    max_rows: int | None = None, max_bytes: int | None = None,
):  # fmt: skip
    """Yield (row key, pixels or None, reason) for one drop object; ``decode(bytes,
    max_pixels)`` prepares one image (default: the demo's gray 28x28). Whatever a
    decoder raises, one bad image is one row, never a crash. A Parquet object with more
    than ``max_rows`` rows, or more than ``max_bytes`` once uncompressed, is rejected
    whole from its footer, before any image is read."""
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
        parquet = pq.ParquetFile(io.BytesIO(body))
        rows, meta = parquet.metadata.num_rows, parquet.metadata
        unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if max_rows is not None and rows > max_rows:
            yield key, None, f"too many rows: {rows} > {max_rows} (max_rows_per_object)"
            return
        if max_bytes is not None and unpacked > max_bytes:
            yield key, None, f"too large: {unpacked} bytes uncompressed > {max_bytes} (max_bytes)"
            return
        table = parquet.read(columns=["image_id", "image"])
    except Exception as err:  # any unreadable file is a rejection, never a crash
        yield key, None, f"unreadable Parquet: {type(err).__name__}: {err}"
        return
    for image_id, image in zip(
        table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True
    ):
        yield one(f"{key}#{image_id}", image or b"")


def _rows(
    schema: pa.Schema, rows: list[tuple], values, mv: str, now: datetime, stamp: dict | None = None
) -> pa.Table:
    """A part table: one row per (row key, object) with its value (price or reason)
    and ``stamp``'s columns (engine, precision)."""
    columns = {"key": [r for r, _ in rows], "object": [o for _, o in rows], schema.names[2]: values}
    columns |= {"model_version": [mv] * len(rows), "scored_at": [now] * len(rows)}
    columns |= {name: [value] * len(rows) for name, value in (stamp or {}).items()}
    return pa.table(columns, schema=schema)


def read_object(
    source: DropSource, key: str, max_bytes: int | None = None
) -> tuple[bytes | None, str | None]:
    """(body, None), or (None, why it cannot be read) for a gone or unusable key, a local
    entry that is not a file (never opened: a named pipe would block) or an object over
    ``max_bytes`` (from its size, before any byte is read)."""
    try:
        return source.get_bytes(key, max_bytes), None
    except ObjectNotFound:
        return None, "gone: deleted after it was listed"
    except TooLarge as err:
        return None, f"too large: {err.size} bytes > {err.limit} (max_bytes)"
    except NotRegularFile as err:
        return None, f"not a regular file: {err.what}"
    except ValueError as err:  # keys with empty segments and the like
        return None, f"unusable key: {err}"


def score_shard(
    run: ScoreRun, source: DropSource, shard: str, entries: list, options: ScoreOptions,
    scorer: str, lease: Lease | None = None,
) -> dict | None:  # fmt: skip
    """Price one shard; writes this attempt's rejections and facts, then the part (the
    done marker) by a conditional create. The facts, or None when another attempt's
    part was there first. Raises ShardGivenUp when the lease is lost or lapsed, or the
    shard runs past its bound (checked between objects and before writing)."""
    t0 = time.time()
    attempt = lease.claim_id if lease is not None else uuid.uuid4().hex
    mv = run.model_version
    engine = get_engine(Lake(run.store).model(mv), options)
    config = engine.config
    mode, size = preprocess_of(config)  # exactly the preprocessing the model trained with
    clock = lease.clock if lease is not None else time.monotonic
    started = clock()  # the bound counts from a loaded model

    def check(images: int) -> None:
        if lease is not None:
            lease.check()
        bound = options.shard_base_seconds + options.shard_seconds_per_object * max(
            len(entries), images
        )
        if (spent := clock() - started) > bound:
            raise ShardGivenUp(f"shard {shard} ran past its bound: {spent:.1f} s > {bound:g} s "
                               f"for {len(entries)} objects, {images} images so far")  # fmt: skip

    def decode(data: bytes, limit: int) -> np.ndarray:
        return prepare(data, mode, size, limit)

    rows, pixels, rejected = [], [], []
    for key, _etag in entries:
        check(len(rows) + len(rejected))
        body, why = read_object(source, key, options.max_bytes)
        if body is None:
            rejected.append(((key, key), why))
            continue
        limits = {"max_rows": options.max_rows_per_object, "max_bytes": options.max_bytes}
        for row, px, reason in decode_object(key, body, options.max_pixels, decode, **limits):
            if px is None:
                rejected.append(((row, key), reason))
            else:
                rows.append((row, key))
                pixels.append(px)
    check(len(rows) + len(rejected))
    images = np.stack(pixels) if pixels else np.zeros((0, *pixel_shape(mode, size)), np.uint8)
    prices = engine.predict(images, options.batch_size)
    now = datetime.now(UTC)
    stats = config.get("train_stats", {})
    means = images.reshape(len(images), -1).mean(axis=1) if len(images) else np.zeros(0)
    low, high = stats.get("pixel_mean_p01", -1), stats.get("pixel_mean_p99", 256)
    facts = {
        "shard": shard,
        "scorer": scorer,
        "attempt": attempt,
        "started": t0,
        "listed": len(entries),
        "priced": len(rows),
        "rejected": len(rejected),
        "pixel_out_of_range": int(((means < low) | (means > high)).sum()),
        "pixel_mean_sum": float(means.sum()),
        "seconds": round(time.time() - t0, 3),
        "engine": engine.engine,
        "precision": engine.precision,
        "engine_reason": engine.reason,
    }
    check(len(rows) + len(rejected))
    won = run.write_shard(
        shard,
        attempt,
        _rows(
            PRICED_SCHEMA,
            rows,
            prices,
            mv,
            now,
            {"engine": engine.engine, "precision": engine.precision},
        ),  # fmt: skip
        _rows(REJECTED_SCHEMA, [r for r, _ in rejected], [why for _, why in rejected], mv, now),
        facts,
    )
    if not won:
        get_logger().warning("%s: refused the late part of shard %s: another attempt wrote it "
                             "first; these %d rows are not counted", scorer, shard,
                             len(rows) + len(rejected))  # fmt: skip
        return None
    return facts


def work(
    run: ScoreRun, source: DropSource, options: ScoreOptions, start: int = 0,
    on_shard: Callable[[dict], None] | None = None, watch: ClaimWatch | None = None,
) -> list[dict]:  # fmt: skip
    """One scorer: claim and score planned shards until none is left unclaimed; returns
    the facts of the shards it scored. ``start`` spreads scorers over the list;
    ``watch`` holds what this process saw of other claims and its clock (the seam for
    tests; default: the process's, on time.monotonic)."""
    scorer, log = worker_name(), get_logger()
    todo = pending(run, run.plans())
    scored = []

    def one(shard: str, lease: Lease) -> None:
        facts = score_shard(run, source, shard, todo[shard], options, scorer, lease)
        if facts is None:
            return
        log.info("%s: shard %s priced %d, rejected %d (%.1f s)", scorer, shard,
                 facts["priced"], facts["rejected"], facts["seconds"])  # fmt: skip
        scored.append(facts)
        if on_shard is not None:
            on_shard(facts)

    work_in_turn(run, list(todo), scorer, options.claim_seconds,
                 lambda s: run.exists(run.part_name(s)), one, start, watch)  # fmt: skip
    return scored
