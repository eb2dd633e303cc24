"""Your own catalog: a folder (or s3:// prefix, or Parquet file) of images and a table
of prices into a dataset version and a labels version, at the cost of what changed.

- **Images** are listed (any depth; folder markers and hidden names skipped) and
  every priced one is decoded with the scoring rules (``tasks.data.images``), kept in
  RGB with its longest side at most ``images.MAX_SIDE`` and stored as PNG in the
  catalog's pixel shards, by content id (``tasks.data.sources``). An image whose
  content is already in a shard is never decoded again; new ones are decoded on every
  core (``workers`` processes, a bounded window of chunks in flight) and written in
  shards as they fill, so a killed ingest keeps what it wrote. An undecodable file is a
  row of ``rejected.parquet``.
- **Prices** (CSV or Parquet) need ``image`` (the key relative to the source, or the
  Parquet file's ``image_id``) and ``price``; ``category`` and ``split`` (``train``
  / ``test``) are optional. The table is checked as a whole before anything is
  written: a price that is not a finite number >= 0, an image that does not exist,
  an image priced twice or a split that is not train/test is a bad row; bad rows
  fail the run with one line (``CatalogError``) unless ``skip_bad_rows``, which
  records them in the labels' ``skipped_rows.parquet``.
- **Split:** the ``split`` column, else stable per image: a hash of its key
  (``SPLIT_SEED``) sends ``TEST_FRACTION`` of the keys to test, so adding images never
  moves an old one between splits and a line's models are compared on images neither
  trained on.
- **Versions:** the dataset version hashes the images it holds (key, content id, split,
  category), the size rules and ``lake.CATALOG_FORMAT``; the prices are the labels
  version's alone, so a price change makes new labels on the same dataset (no image
  decoded, no frozen feature recomputed). Labels are the table's prices, min-max scaled
  on the train split only.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks import __version__
from tasks.data.images import MAX_SIDE
from tasks.data.prices import fit_scaling
from tasks.data.sources import CatalogError, ImageSource, decode_chunk, open_source, parent_of
from tasks.runtime import TASK_RETRIES, get_logger, progress
from tasks.store.lake import (
    CATALOG_FORMAT,
    INDEX_SCHEMA,
    PIXELS_SCHEMA,
    CatalogPixels,
    Lake,
    catalog_version,
    check_line_name,
)
from tasks.store.lake import labels_version as make_labels_version
from tasks.store.storage import open_store

TEST_FRACTION = 0.15
SPLIT_SEED = 0
SHARD_ROWS = 2000  # images per pixel shard
CHUNK = 64  # images per unit of decode work
POOL_MIN = 2000  # new images below this decode in-process (a pool's start costs seconds)
REQUIRED = ("image", "price")
SPLITS = ("train", "test")
SHOWN_BAD_ROWS = 3  # how many offending rows the one-line error names
REJECTED_SCHEMA = pa.schema([("image", pa.string()), ("reason", pa.string())])
SKIPPED_SCHEMA = pa.schema(
    [("row", pa.int64()), ("image", pa.string()), ("price", pa.string()), ("reason", pa.string())]
)
PRICES_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("split", pa.string()), ("label", pa.int32()),
     ("category", pa.string()), ("price", pa.float64())]
)  # fmt: skip

__all__ = ["CatalogError", "ImageSource", "open_source"]


# --- the prices table ------------------------------------------------------------------


def read_prices(uri: str) -> tuple[list[dict], bytes]:
    """(rows as dicts, the file's bytes); CatalogError for a missing file or columns."""
    import pandas as pd

    store, name = parent_of(uri)
    try:
        body = store.get_bytes(name)
    except FileNotFoundError:
        raise CatalogError(f"{uri}: no such prices file") from None
    try:
        if name.lower().endswith(".parquet"):
            frame = pq.read_table(io.BytesIO(body)).to_pandas()
        else:
            frame = pd.read_csv(io.BytesIO(body), dtype=str, keep_default_na=False)
    except Exception as err:
        raise CatalogError(f"{uri}: cannot read the prices table ({err})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if missing := [c for c in REQUIRED if c not in frame.columns]:
        raise CatalogError(
            f"{uri}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(found: {', '.join(frame.columns) or 'none'}; need image, price; optional "
            "category, split)"
        )
    return frame.to_dict("records"), body


def _price(value) -> tuple[float | None, str | None]:
    if isinstance(value, bool) or value is None:
        return None, f"price {value!r} is not a number"
    try:
        price = float(str(value).strip())
    except ValueError:
        return None, f"price {str(value)!r} is not a number"
    if not math.isfinite(price):
        return None, f"price {value!r} is not finite"
    if price < 0:
        return None, f"negative price {price:g}"
    return price, None


def check_rows(rows: list[dict], images: set[str], has_split: bool) -> list[tuple[int, str]]:
    """(row number from 1, reason) of every bad row of the prices table."""
    counts: dict[str, int] = {}
    for row in rows:
        key = str(row["image"]).strip()
        counts[key] = counts.get(key, 0) + 1
    bad = []
    for n, row in enumerate(rows, start=1):
        key = str(row["image"]).strip()
        _, why = _price(row["price"])
        if not key:
            why = "no image named"
        elif key not in images:
            why = f"no such image {key!r}"
        elif counts[key] > 1:
            why = f"image {key!r} priced {counts[key]} times"
        elif why is None and has_split and str(row["split"]).strip() not in SPLITS:
            why = f"split {row['split']!r} is not train or test"
        if why is not None:
            bad.append((n, why))
    return bad


# --- checking the inputs ------------------------------------------------------------


def stable_split(key: str, fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> str:
    """test for ``fraction`` of keys, by a hash of the key: the same key is in the same
    split in every version of the catalog, whatever else it holds."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return "test" if h < fraction * 2**64 else "train"


@dataclass
class CatalogPlan:
    """What a catalog's inputs are, checked; nothing written yet."""

    source: ImageSource
    listing: dict[str, str]  # key -> identity
    rows: list[dict]
    bad: list[tuple[int, str]]
    spec: dict

    @property
    def good(self) -> list[dict]:
        bad = {n for n, _ in self.bad}
        return [r for n, r in enumerate(self.rows, start=1) if n not in bad]


def check_catalog(
    source_uri: str, prices_uri: str, name: str, skip_bad_rows: bool = False
) -> CatalogPlan:
    """List the images, read the prices table and check it whole; CatalogError with one
    line for anything that stops the run. Writes nothing."""
    check_line_name(name)
    rows, _ = read_prices(prices_uri)  # a missing table stops before any listing
    source = open_source(source_uri)
    listing = source.listing()
    if not listing:
        raise CatalogError(f"{source_uri}: no images found")
    spec = {"max_side": MAX_SIDE, "test_fraction": TEST_FRACTION, "split_seed": SPLIT_SEED,
            "split": "column" if rows and "split" in rows[0] else "by key hash"}  # fmt: skip
    bad = check_rows(rows, set(listing), "split" in rows[0] if rows else False)
    if bad and not skip_bad_rows:
        first = "; ".join(f"row {n}: {why}" for n, why in bad[:SHOWN_BAD_ROWS])
        raise CatalogError(
            f"{prices_uri}: {len(bad)} bad row{'s' if len(bad) > 1 else ''} ({first}"
            f"{'; ...' if len(bad) > SHOWN_BAD_ROWS else ''}); fix them or pass --skip-bad-rows"
        )
    if len(bad) == len(rows):
        raise CatalogError(f"{prices_uri}: no usable rows ({len(bad)} bad)")
    return CatalogPlan(source, listing, rows, bad, spec)


def check_inputs(source_uri: str, prices_uri: str, name: str) -> None:
    """What a user typed, checked before any run starts: the line name, a readable
    prices table with its columns and a source with an image in it (the whole check,
    against the images, is ``check_catalog``, once, in the ingest)."""
    check_line_name(name)
    read_prices(prices_uri)
    source = open_source(source_uri)
    if not source.has_images():
        raise CatalogError(f"{source_uri}: " + ("no such file" if source.parquet else
                                                "no images found"))  # fmt: skip


# --- decoding, once per content ------------------------------------------------------


@dataclass
class Known:
    """What the catalog's pixel shards already hold: content id -> (shard, row, reason),
    and (key, identity) -> content id, as git's index knows a file it has hashed."""

    where: dict[str, tuple[str, int, str | None]] = field(default_factory=dict)
    content_of: dict[tuple[str, str], str] = field(default_factory=dict)

    def add_shard(self, shard: str, facts: dict) -> None:
        reasons = {int(i): r for i, r in facts.get("reasons", {}).items()}
        for row, (cid, (key, identity)) in enumerate(
            zip(facts["ids"], facts["sources"], strict=True)
        ):
            self.where.setdefault(cid, (shard, row, reasons.get(row)))
            self.content_of[(key, identity)] = cid


def known_pixels(lake: Lake, name: str) -> Known:
    """From the newest version's index, plus every shard that no index names yet (a
    killed ingest's, or another version's): read only their small markers."""
    known = Known()
    newest = lake.newest_catalog(name)
    pixels = lake.catalog_pixels(name)
    named: set[str] = set()
    if newest is not None:
        index = newest.index()
        for image_id, cid, identity, shard, row in zip(
            *(index[c].to_pylist() for c in ("image_id", "content_id", "identity", "shard", "row")),
            strict=True,
        ):
            known.where.setdefault(cid, (shard, row, None))
            known.content_of[(image_id, identity)] = cid
            named.add(shard)
    for shard in pixels.shards():
        if shard not in named:
            known.add_shard(shard, pixels.shard(shard))
    return known


@dataclass
class Decoded:
    """Per priced key: (content id, shard, row) of its pixels, or why it was rejected."""

    found: dict[str, tuple[str, str, int]]
    rejected: dict[str, str]
    decoded: int  # images decoded by this call
    reused: int  # images whose pixels were already stored


class ShardWriter:
    """Decoded images collected into pixel shards of ``rows``, written as they fill."""

    def __init__(self, pixels: CatalogPixels, known: Known, rows: int):
        self.pixels, self.known, self.rows = pixels, known, rows
        self.pending: list[tuple[str, str, str, bytes | None, str | None]] = []
        self.waiting: set[str] = set()
        self.written = 0

    def add(self, key: str, identity: str, cid: str, png: bytes | None, reason: str | None):
        if cid in self.known.where or cid in self.waiting:
            return  # stored already, or the same content under another key
        self.waiting.add(cid)
        self.pending.append((key, identity, cid, png, reason))
        if len(self.pending) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows = self.pending
        table = pa.table({"content_id": [p[2] for p in rows], "image": [p[3] for p in rows],
                          "reason": [p[4] for p in rows]}, schema=PIXELS_SCHEMA)  # fmt: skip
        sources = [(p[0], p[1]) for p in rows]
        self.known.add_shard(*self.pixels.write(table, sources))
        self.written += len(rows)
        self.pending, self.waiting = [], set()


def _in_order(results, window: int):
    """Results of submitted work in submission order, at most ``window`` in flight."""
    flight: deque = deque()
    for item in results:
        flight.append(item)
        if len(flight) >= window:
            yield flight.popleft().result()
    while flight:
        yield flight.popleft().result()


def decode_catalog(
    lake: Lake, plan: CatalogPlan, name: str, workers: int | None = None,
    shard_rows: int = SHARD_ROWS, pool_min: int = POOL_MIN,
) -> Decoded:  # fmt: skip
    """Every priced image's pixels: found by content id, or decoded (on ``workers``
    processes, default every core, once there are ``pool_min`` new images) and written to
    new pixel shards as they fill."""
    known = known_pixels(lake, name)
    writer = ShardWriter(lake.catalog_pixels(name), known, shard_rows)
    keys = sorted(str(r["image"]).strip() for r in plan.good)
    content: dict[str, str] = {}
    todo: list[tuple[str, str | None]] = []
    for key in keys:
        identity = plan.listing[key]
        cid = plan.source.content_id(identity) or known.content_of.get((key, identity))
        if cid is not None and cid in known.where:
            content[key] = cid
        else:
            todo.append((key, cid))
    reused = len(content)
    rejected: dict[str, str] = {}
    workers = max(1, workers or os.cpu_count() or 1)
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    with progress(len(todo), "decode", "image") as bar:
        if workers == 1 or len(chunks) <= 1 or len(todo) < pool_min:
            results = (decode_chunk(plan.source.uri, [k for k, _ in c], [i for _, i in c])
                       for c in chunks)  # fmt: skip
            pool = None
        else:
            pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=get_context("spawn"))
            submitted = (pool.submit(decode_chunk, plan.source.uri, [k for k, _ in c],
                                     [i for _, i in c]) for c in chunks)  # fmt: skip
            results = _in_order(submitted, 2 * workers)
        try:
            for result in results:
                for key, cid, png, reason in result:
                    if cid is None:
                        rejected[key] = reason
                    else:
                        writer.add(key, plan.listing[key], cid, png, reason)
                        content[key] = cid
                    bar.update()
            writer.flush()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    found = {}
    for key, cid in content.items():
        shard, row, reason = known.where[cid]
        if reason is not None:
            rejected[key] = reason
        else:
            found[key] = (cid, shard, row)
    return Decoded(found, rejected, len(todo), reused)


# --- the version ---------------------------------------------------------------------------


@dataclass
class Assignment:
    """The accepted images in key order, each with its split and category."""

    keys: list[str]
    splits: list[str]
    categories: list[str]  # per image ("" without a category column)
    names: list[str]  # the sorted category names (none without the column)
    classes: list[int]  # per image: index into names (0 without)


def assign_splits(decoded: Decoded, plan: CatalogPlan, prices_uri: str) -> Assignment:
    """Categories and splits: the table's split column, or stable per key. CatalogError
    when a split would be empty."""
    row_of = {str(r["image"]).strip(): r for r in plan.good}
    keys = sorted(decoded.found)
    has_cat, has_split = "category" in plan.rows[0], "split" in plan.rows[0]
    cats = [str(row_of[k]["category"]).strip() if has_cat else "" for k in keys]
    names = sorted(set(cats)) if has_cat else []
    index = {c: i for i, c in enumerate(names)}
    splits = [str(row_of[k]["split"]).strip() if has_split else stable_split(k) for k in keys]
    for s in SPLITS:
        if s not in splits:
            raise CatalogError(f"{prices_uri}: no {s} images left ({len(keys)} usable)")
    return Assignment(keys, splits, cats, names, [index.get(c, 0) for c in cats])


def dataset_version_of(name: str, decoded: Decoded, assigned: Assignment, spec: dict) -> str:
    images = [
        (k, decoded.found[k][0], s, c)
        for k, s, c in zip(assigned.keys, assigned.splits, assigned.categories, strict=True)
    ]
    return catalog_version(name, images, spec | {"rejected": sorted(decoded.rejected.items())})


def prices_of(plan: CatalogPlan, keys: list[str]) -> list[float]:
    row_of = {str(r["image"]).strip(): r for r in plan.good}
    return [float(_price(row_of[k]["price"])[0]) for k in keys]


def write_version(
    lake: Lake, plan: CatalogPlan, decoded: Decoded, assigned: Assignment, dv: str,
    inputs: dict,
) -> dict:  # fmt: skip
    """The version's index and rejections, its manifest last; returns the manifest."""
    dataset = lake.catalog(dv)
    where = [decoded.found[k] for k in assigned.keys]
    dataset.write_index(pa.table(
        {"image_id": assigned.keys, "content_id": [w[0] for w in where],
         "identity": [plan.listing[k] for k in assigned.keys], "split": assigned.splits,
         "label": assigned.classes, "category": assigned.categories,
         "shard": [w[1] for w in where], "row": [w[2] for w in where]}, schema=INDEX_SCHEMA))  # fmt: skip
    rejected = sorted(decoded.rejected.items())
    dataset.write_rejected(pa.table({"image": [k for k, _ in rejected],
                                     "reason": [r for _, r in rejected]},
                                    schema=REJECTED_SCHEMA))  # fmt: skip
    manifest = {
        "dataset": "catalog",
        "name": inputs["name"],
        "version": dv,
        "format": CATALOG_FORMAT,
        "source": {"images": inputs["source"], "listed": len(plan.listing)},
        "rules": plan.spec,
        "counts": {
            "images": len(assigned.keys),
            "rejected_images": len(rejected),
            "unpriced_images": len(plan.listing) - len(plan.good),
        },
        "categories": assigned.names,
        "splits": {s: {"rows": assigned.splits.count(s)} for s in SPLITS},
        "index": dataset.INDEX,
        "pixel_shards": sorted({w[1] for w in where}),
        "image_encoding": "png-rgb",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        + f".{time.time_ns() % 10**9:09d}Z",
        "created_by": {"package": "vggprice", "version": __version__},
    }
    dataset.write_manifest(manifest)  # last: marks the version complete
    return manifest


def write_labels(
    lake: Lake, plan: CatalogPlan, assigned: Assignment, dv: str, lv: str, prices: list[float]
) -> dict:
    """The labels of a dataset version: prices, the rows skipped, scaling last."""
    import numpy as np

    price = np.asarray(prices, dtype=np.float64)
    scaling = fit_scaling(price, np.asarray(assigned.splits)) | {
        "kind": "table", "categories": assigned.names, "dataset_version": dv,
    }  # fmt: skip
    rows, reasons = plan.rows, dict(plan.bad)
    skipped = pa.table(
        {"row": sorted(reasons), "image": [str(rows[n - 1]["image"]) for n in sorted(reasons)],
         "price": [str(rows[n - 1]["price"]) for n in sorted(reasons)],
         "reason": [reasons[n] for n in sorted(reasons)]}, schema=SKIPPED_SCHEMA)  # fmt: skip
    lake.labels(dv, lv).write(
        pa.table({"image_id": assigned.keys, "split": assigned.splits, "label": assigned.classes,
                  "category": assigned.categories, "price": price}, schema=PRICES_SCHEMA),
        scaling, skipped,
    )  # fmt: skip
    return scaling


def ingest_catalog(
    lake: Lake, source_uri: str, prices_uri: str, name: str, skip_bad_rows: bool = False,
    shard_rows: int = SHARD_ROWS, workers: int | None = None, pool_min: int = POOL_MIN,
) -> dict:  # fmt: skip
    """Check everything (once), find or decode the priced images, assign splits, then
    write the version (manifest last) and its labels (scaling last). Returns dataset and
    labels versions, how many images were decoded and reused, and ``skipped`` when both
    versions existed."""
    log = get_logger()
    plan = check_catalog(source_uri, prices_uri, name, skip_bad_rows)
    decoded = decode_catalog(lake, plan, name, workers, shard_rows, pool_min)
    assigned = assign_splits(decoded, plan, prices_uri)
    dv = dataset_version_of(name, decoded, assigned, plan.spec)
    prices = prices_of(plan, assigned.keys)
    rule = {"kind": "table", "prices": hashlib.sha256(
        "\n".join(f"{k}\t{p!r}" for k, p in zip(assigned.keys, prices, strict=True)).encode()
    ).hexdigest()[:16]}  # fmt: skip
    lv = make_labels_version(dv, rule, SPLIT_SEED)
    dataset, labels = lake.catalog(dv), lake.labels(dv, lv)
    counts = {"decoded": decoded.decoded, "reused": decoded.reused, "skipped_rows": len(plan.bad)}
    result = {"dataset_version": dv, "labels_version": lv} | counts
    if dataset.complete and labels.complete:
        log.info("catalog %s already in %s; nothing rewritten", dv, lake.uri)
        return result | {"skipped": True, "manifest": dataset.manifest()}
    inputs = {"name": name, "source": source_uri, "prices": prices_uri}
    manifest = dataset.marker() if dataset.complete else write_version(
        lake, plan, decoded, assigned, dv, inputs)  # fmt: skip
    if not labels.complete:
        write_labels(lake, plan, assigned, dv, lv, prices)
    log.info("catalog %s: %d images (%d decoded, %d found stored; %d rejected, %d rows "
             "skipped), labels %s", dv, len(assigned.keys), decoded.decoded, decoded.reused,
             len(decoded.rejected), len(plan.bad), lv)  # fmt: skip
    return result | {"skipped": False, "manifest": manifest}


@task(name="ingest-catalog", **TASK_RETRIES)
def ingest_catalog_task(
    store_uri: str, source: str, prices: str, name: str, skip_bad_rows: bool = False,
    workers: int | None = None,
) -> dict:  # fmt: skip
    """Check and write a catalog's dataset and labels versions (or find them)."""
    return ingest_catalog(Lake(open_store(store_uri)), source, prices, name, skip_bad_rows,
                          workers=workers)  # fmt: skip
