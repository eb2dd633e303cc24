"""Your own catalog: a folder (or s3:// prefix, or Parquet file) of images and a table
of prices into a dataset version and a labels version.

- **Images** are listed (any depth; folder markers and hidden names skipped) and
  every priced one is decoded with the scoring rules (``tasks.data.images``), kept in
  RGB with its longest side at most ``images.MAX_SIDE`` and stored as PNG in
  Parquet shards. An undecodable file is a row of ``rejected.parquet``.
- **Prices** (CSV or Parquet) need ``image`` (the key relative to the source, or the
  Parquet file's ``image_id``) and ``price``; ``category`` and ``split`` (``train``
  / ``test``) are optional. The table is checked as a whole before anything is
  written: a price that is not a finite number >= 0, an image that does not exist,
  an image priced twice or a split that is not train/test is a bad row; bad rows
  fail the run with one line (``CatalogError``) unless ``skip_bad_rows``, which
  records them in ``skipped_rows.parquet``.
- **Split:** the ``split`` column, else seeded (``SPLIT_SEED``) and stratified by
  category, ``TEST_FRACTION`` to test.
- **Versions:** the dataset version hashes the listing (keys and S3 ETags, or the
  SHA-256 of local files), the prices file's SHA-256, the split and size rules and
  ``lake.CATALOG_FORMAT``; unchanged inputs skip. Labels are the table's prices,
  min-max scaled on the train split only.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks import __version__
from tasks.data.images import MAX_SIDE, ImageRejected, encode_png_rgb, to_rgb
from tasks.data.prices import fit_scaling
from tasks.runtime import TASK_RETRIES, get_logger, progress
from tasks.store.lake import CATALOG_FORMAT, Lake, catalog_version, check_line_name, is_image_key
from tasks.store.lake import labels_version as make_labels_version
from tasks.store.storage import Store, open_store

TEST_FRACTION = 0.15
SPLIT_SEED = 0
SHARD_ROWS = 2000
REQUIRED = ("image", "price")
SPLITS = ("train", "test")
SHOWN_BAD_ROWS = 3  # how many offending rows the one-line error names
SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int32()), ("image", pa.binary())])
REJECTED_SCHEMA = pa.schema([("image", pa.string()), ("reason", pa.string())])
SKIPPED_SCHEMA = pa.schema(
    [("row", pa.int64()), ("image", pa.string()), ("price", pa.string()), ("reason", pa.string())]
)
PRICES_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("split", pa.string()), ("label", pa.int32()),
     ("category", pa.string()), ("price", pa.float64())]
)  # fmt: skip


class CatalogError(ValueError):
    """The catalog's inputs cannot be used; the one-line message says why (nothing written)."""


# --- the images -------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """A directory or s3:// prefix of image files, or one Parquet file of image bytes."""

    uri: str
    store: Store
    parquet: str | None = None  # the key of the Parquet file in ``store``

    def listing(self) -> dict[str, str]:
        """image key -> content identity (S3 ETag, or SHA-256 of a local file or of a
        Parquet row's bytes)."""
        if self.parquet is not None:
            return {i: hashlib.sha256(b).hexdigest() for i, b in self.rows.items()}
        s3 = self.store.uri.startswith("s3://")
        found = {}
        for o in self.store.list():
            if not is_image_key(o.key):
                continue
            found[o.key] = o.etag if s3 else self.store.sha256(o.key)  # streamed
        return found

    @functools.cached_property
    def rows(self) -> dict[str, bytes]:
        """A Parquet source's images by id, read and parsed once."""
        try:
            table = pq.read_table(io.BytesIO(self.store.get_bytes(self.parquet)))
        except Exception as err:
            raise CatalogError(f"{self.uri}: unreadable Parquet ({err})") from None
        if "image" not in table.column_names:
            raise CatalogError(f"{self.uri}: no 'image' column of image bytes")
        images = table["image"].to_pylist()
        ids = (table["image_id"].to_pylist() if "image_id" in table.column_names
               else [str(i) for i in range(len(images))])  # fmt: skip
        return {str(i): b or b"" for i, b in zip(ids, images, strict=True)}

    def get(self, key: str) -> bytes:
        return self.rows[key] if self.parquet is not None else self.store.get_bytes(key)

    def read_all(self, keys: list[str]) -> dict[str, bytes]:
        return {k: self.get(k) for k in keys}


def _parent(uri: str) -> tuple[Store, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_store(parent or "."), name


def open_source(uri: str) -> ImageSource:
    if uri.lower().endswith(".parquet"):
        store, name = _parent(uri)
        return ImageSource(uri, store, name)
    return ImageSource(uri, open_store(uri.rstrip("/")))


# --- the prices table ------------------------------------------------------------------


def read_prices(uri: str) -> tuple[list[dict], bytes]:
    """(rows as dicts, the file's bytes); CatalogError for a missing file or columns."""
    import pandas as pd

    store, name = _parent(uri)
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


def stratified_split(categories: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded split, ``fraction`` of each category to test (at least one of any
    category with two or more rows)."""
    rng = np.random.default_rng(seed)
    split = ["train"] * len(categories)
    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_cat.setdefault(c, []).append(i)
    for c in sorted(by_cat):
        idx = np.asarray(by_cat[c])
        n_test = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        for i in rng.permutation(idx)[:n_test]:
            split[int(i)] = "test"
    return split


# --- ingest -------------------------------------------------------------------------------


@dataclass
class CatalogPlan:
    """What a catalog's inputs are, checked; nothing written yet."""

    source: ImageSource
    listing: dict[str, str]
    rows: list[dict]
    prices_sha256: str
    bad: list[tuple[int, str]]
    spec: dict
    dataset_version: str
    labels_version: str


def check_catalog(
    source_uri: str, prices_uri: str, name: str, skip_bad_rows: bool = False
) -> CatalogPlan:
    """List the images, read the prices table and check it whole; CatalogError with one
    line for anything that stops the run. Writes nothing."""
    check_line_name(name)
    rows, prices_body = read_prices(prices_uri)  # a missing table stops before any listing
    source = open_source(source_uri)
    listing = source.listing()
    if not listing:
        raise CatalogError(f"{source_uri}: no images found")
    prices_sha256 = hashlib.sha256(prices_body).hexdigest()
    spec = {"max_side": MAX_SIDE, "test_fraction": TEST_FRACTION, "split_seed": SPLIT_SEED}
    dv = catalog_version(name, listing, prices_sha256, spec)
    lv = make_labels_version(dv, {"kind": "table"}, SPLIT_SEED)
    bad = check_rows(rows, set(listing), "split" in rows[0] if rows else False)
    if bad and not skip_bad_rows:
        first = "; ".join(f"row {n}: {why}" for n, why in bad[:SHOWN_BAD_ROWS])
        raise CatalogError(
            f"{prices_uri}: {len(bad)} bad row{'s' if len(bad) > 1 else ''} ({first}"
            f"{'; ...' if len(bad) > SHOWN_BAD_ROWS else ''}); fix them or pass --skip-bad-rows"
        )
    if len(bad) == len(rows):
        raise CatalogError(f"{prices_uri}: no usable rows ({len(bad)} bad)")
    return CatalogPlan(source, listing, rows, prices_sha256, bad, spec, dv, lv)


def check_inputs(prices_uri: str, name: str) -> None:
    """What a user typed, checked before any run starts: the line name and a readable
    prices table with its columns (the whole check, against the images, is
    ``check_catalog``, once, in the ingest)."""
    check_line_name(name)
    read_prices(prices_uri)


@dataclass
class Decoded:
    """The priced images that decode, sorted by key, and the files that do not."""

    accepted: list[tuple[str, dict, bytes]]  # (key, prices row, normalised PNG)
    rejected: list[tuple[str, str]]  # (key, reason)


def decode_images(plan: CatalogPlan) -> Decoded:
    """Every priced image decoded by the scoring rules and stored as RGB PNG; one bad
    file is one rejection, never a crash."""
    bad_rows = {n for n, _ in plan.bad}
    good = [r for n, r in enumerate(plan.rows, start=1) if n not in bad_rows]
    blobs = plan.source.read_all([str(r["image"]).strip() for r in good])
    accepted, rejected = [], []
    with progress(len(good), "decode", "image") as bar:
        for row in good:
            key = str(row["image"]).strip()
            try:
                png = encode_png_rgb(to_rgb(blobs[key]))
            except ImageRejected as err:
                rejected.append((key, str(err)))
            except Exception as err:  # whatever a decoder raises, one bad file is one row
                rejected.append((key, f"undecodable: {type(err).__name__}: {err}"))
            else:
                accepted.append((key, row, png))
            bar.update()
    return Decoded(sorted(accepted, key=lambda a: a[0]), rejected)


@dataclass
class Assignment:
    """Each accepted image's category index and split, and the category names."""

    categories: list[str]  # per image ("" without a category column)
    names: list[str]  # the sorted category names (none without the column)
    classes: list[int]  # per image: index into names (0 without)
    splits: list[str]  # per image: train or test


def assign_splits(decoded: Decoded, plan: CatalogPlan, prices_uri: str) -> Assignment:
    """Categories and splits: the table's split column, or a seeded stratified split.
    CatalogError when a split would be empty."""
    rows = [r for _, r, _ in decoded.accepted]
    has_cat = "category" in plan.rows[0]
    cats = [str(r["category"]).strip() if has_cat else "" for r in rows]
    names = sorted(set(cats)) if has_cat else []
    index = {c: i for i, c in enumerate(names)}
    if "split" in plan.rows[0]:
        splits = [str(r["split"]).strip() for r in rows]
    else:
        splits = stratified_split(cats, TEST_FRACTION, SPLIT_SEED)
    for s in SPLITS:
        if s not in splits:
            raise CatalogError(f"{prices_uri}: no {s} images left ({len(rows)} usable)")
    return Assignment(cats, names, [index.get(c, 0) for c in cats], splits)


def write_catalog(
    lake: Lake, plan: CatalogPlan, decoded: Decoded, assigned: Assignment, inputs: dict,
    shard_rows: int,
) -> dict:  # fmt: skip
    """The dataset's shards, rejections and skipped rows, its manifest last, then its
    labels (scaling last); returns the manifest."""
    dataset = lake.catalog(plan.dataset_version)
    accepted, rows = decoded.accepted, plan.rows
    manifest_splits = {}
    for s in SPLITS:
        idx = [i for i, x in enumerate(assigned.splits) if x == s]
        shards = []
        for j, start in enumerate(range(0, len(idx), shard_rows)):
            part = idx[start : start + shard_rows]
            table = pa.table(
                {"image_id": [accepted[i][0] for i in part],
                 "label": [assigned.classes[i] for i in part],
                 "image": [accepted[i][2] for i in part]},
                schema=SCHEMA,
            )  # fmt: skip
            shards.append(dataset.write_shard(s, j, table))
        manifest_splits[s] = {"rows": len(idx), "shards": shards}
    dataset.write_rejected(pa.table({"image": [k for k, _ in decoded.rejected],
                                     "reason": [r for _, r in decoded.rejected]},
                                    schema=REJECTED_SCHEMA))  # fmt: skip
    reasons = dict(plan.bad)
    dataset.write_skipped(pa.table(
        {"row": sorted(reasons), "image": [str(rows[n - 1]["image"]) for n in sorted(reasons)],
         "price": [str(rows[n - 1]["price"]) for n in sorted(reasons)],
         "reason": [reasons[n] for n in sorted(reasons)]}, schema=SKIPPED_SCHEMA))  # fmt: skip
    manifest = {
        "dataset": "catalog",
        "name": inputs["name"],
        "version": plan.dataset_version,
        "format": CATALOG_FORMAT,
        "source": {
            "images": inputs["source"],
            "prices": inputs["prices"],
            "listed": len(plan.listing),
            "prices_sha256": plan.prices_sha256,
        },  # fmt: skip
        "rules": plan.spec | {"split": "column" if "split" in rows[0] else "seeded, stratified"},
        "counts": {
            "rows": len(rows),
            "skipped_rows": len(plan.bad),
            "rejected_images": len(decoded.rejected),
            "images": len(accepted),
            "unpriced_images": len(plan.listing) - len(rows) + len(plan.bad),
        },  # fmt: skip
        "categories": assigned.names,
        "splits": manifest_splits,
        "schema": {f.name: str(f.type) for f in SCHEMA},
        "image_encoding": "png-rgb",
        "created_by": {"package": "vggprice", "version": __version__},
    }
    dataset.write_manifest(manifest)  # last: marks the version complete

    price = np.array([float(_price(r["price"])[0]) for _, r, _ in accepted])
    scaling = fit_scaling(price, np.asarray(assigned.splits)) | {
        "kind": "table", "categories": assigned.names, "dataset_version": plan.dataset_version,
    }  # fmt: skip
    lake.labels(plan.dataset_version, plan.labels_version).write(
        pa.table({"image_id": [a[0] for a in accepted], "split": assigned.splits,
                  "label": assigned.classes, "category": assigned.categories, "price": price},
                 schema=PRICES_SCHEMA),
        scaling,
    )  # fmt: skip
    return manifest


def ingest_catalog(
    lake: Lake, source_uri: str, prices_uri: str, name: str, skip_bad_rows: bool = False,
    shard_rows: int = SHARD_ROWS,
) -> dict:  # fmt: skip
    """Check everything (once), decode the priced images, assign splits, then write the
    dataset (manifest last) and its labels (scaling last). Returns dataset and labels
    versions; ``skipped`` when both existed."""
    log = get_logger()
    plan = check_catalog(source_uri, prices_uri, name, skip_bad_rows)
    dv, lv = plan.dataset_version, plan.labels_version
    dataset, labels = lake.catalog(dv), lake.labels(dv, lv)
    if dataset.complete and labels.complete:
        log.info("catalog %s already in %s; nothing rewritten", dv, lake.uri)
        return {"dataset_version": dv, "labels_version": lv, "skipped": True,
                "manifest": dataset.manifest()}  # fmt: skip
    decoded = decode_images(plan)  # in memory: nothing is final until the manifest
    assigned = assign_splits(decoded, plan, prices_uri)
    inputs = {"name": name, "source": source_uri, "prices": prices_uri}
    manifest = write_catalog(lake, plan, decoded, assigned, inputs, shard_rows)
    log.info("catalog %s: %d images (%d rejected, %d rows skipped), labels %s", dv,
             len(decoded.accepted), len(decoded.rejected), len(plan.bad), lv)  # fmt: skip
    return {"dataset_version": dv, "labels_version": lv, "skipped": False, "manifest": manifest}


@task(name="ingest-catalog", **TASK_RETRIES)
def ingest_catalog_task(
    store_uri: str, source: str, prices: str, name: str, skip_bad_rows: bool = False
) -> dict:
    """Check and write a catalog's dataset and labels versions (or find them)."""
    return ingest_catalog(Lake(open_store(store_uri)), source, prices, name, skip_bad_rows)
