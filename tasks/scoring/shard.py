"""One shard's work: read each object, decode it by the model's own preprocessing, price
the images in batches, and write the shard's rejections, facts and, last, its
``part-<shard>.parquet`` (the shard's completion marker). ``work`` is the loop every
scorer runs, wherever it runs: claim a shard, score it, release it, until none is left.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.images import ImageRejected, pixel_shape, prepare
from tasks.model.export import get_model, predict_prices, preprocess_of
from tasks.runtime import get_logger
from tasks.scoring.ledger import Heartbeat, ScoreOptions, pending, scorer_name, take_claim
from tasks.store.lake import DropSource, Lake, ScoreRun
from tasks.store.storage import NotRegularFile, ObjectNotFound, TooLarge

_ROW = [("key", pa.string()), ("object", pa.string())]


_STAMP = [("model_version", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC"))]


PRICED_SCHEMA = pa.schema([*_ROW, ("price", pa.float64()), *_STAMP])


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


def _rows(schema: pa.Schema, rows: list[tuple], values, mv: str, now: datetime) -> pa.Table:
    """A part table: one row per (row key, object) with its value (price or reason)."""
    columns = {"key": [r for r, _ in rows], "object": [o for _, o in rows], schema.names[2]: values}
    columns |= {"model_version": [mv] * len(rows), "scored_at": [now] * len(rows)}
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
