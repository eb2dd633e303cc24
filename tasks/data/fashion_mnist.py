"""Fashion-MNIST: find the IDX files, parse them strictly, store them as a catalog is
stored (an index over pixel shards named by content), a catalog that never changes.

Pixel shards hold a catalog's columns (``content_id``, ``image``: lossless PNG bytes,
``reason``) and the image's ``image_id`` (stable: ``train-00000``) and ``label``, so the
dataset's own shards are valid input for scoring and any tool that reads Parquet + PNG
can open them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from prefect import task

from tasks import __version__
from tasks.data.loading import subset_rank
from tasks.reports import GARMENTS
from tasks.runtime import TASK_RETRIES, get_logger, progress
from tasks.settings import load_settings
from tasks.store.lake import DATASET_FORMAT, INDEX_SCHEMA, Lake
from tasks.store.lake import PIXELS_SCHEMA as CATALOG_PIXELS
from tasks.store.lake import dataset_version as version_of
from tasks.store.storage import sha256_file

FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MIRRORS = (
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
KERAS_DIR = Path.home() / ".keras" / "datasets" / "fashion-mnist"
SHARD_ROWS = 1_000  # images per pixel shard: the quick subsets (4,000 / 1,000) are whole shards
N_CLASSES = 10
# A demo pixel shard: a catalog's columns, then the image's id and label (a Parquet drop too)
PIXELS_SCHEMA = CATALOG_PIXELS.append(pa.field("image_id", pa.string())).append(
    pa.field("label", pa.int8())
)

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


class DatasetError(ValueError):
    """A source file is missing, corrupt or inconsistent; the message names it."""


# --- IDX -----------------------------------------------------------------------


def _decompress(path: Path, raw: bytes) -> bytes:
    if not raw:
        raise DatasetError(f"{path}: empty file")
    if raw[:2] != b"\x1f\x8b":
        return raw  # plain, uncompressed IDX
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DatasetError(f"{path}: truncated or corrupt gzip ({err})") from None


def _header(path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    need = 4 + 4 * ndim
    if len(data) < need:
        raise DatasetError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DatasetError(f"{path}: wrong magic number 0x{got:08x}, expected 0x{magic:08x}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = need + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: header says {dims} ({expected} bytes) but the file has {len(data)} bytes"
        )
    return dims


def parse_idx_images(path: Path, raw: bytes) -> np.ndarray:
    data = _decompress(path, raw)
    n, rows, cols = _header(path, data, IMAGES_MAGIC, 3)
    if rows == 0 or cols == 0:
        raise DatasetError(f"{path}: image dimensions {rows}x{cols}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def parse_idx_labels(path: Path, raw: bytes) -> np.ndarray:
    data = _decompress(path, raw)
    _header(path, data, LABELS_MAGIC, 1)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if labels.size and labels.max() >= N_CLASSES:
        raise DatasetError(f"{path}: label {labels.max()} outside 0..{N_CLASSES - 1}")
    return labels


def read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = SPLITS[split]
    images_path, labels_path = source / images_name, source / labels_name
    images = parse_idx_images(images_path, images_path.read_bytes())
    labels = parse_idx_labels(labels_path, labels_path.read_bytes())
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return images, labels


# --- where the files come from ---------------------------------------------------


@dataclass(frozen=True)
class Source:
    directory: Path
    how: str  # "explicit", "env", "debian", "keras-cache", "download"
    sha256: dict[str, str]
    verified: bool


def _has_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def _download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    log = get_logger()
    for name, digest in FILES.items():
        target = dest / name
        if target.is_file() and sha256_file(target) == digest:
            continue
        last_err: Exception | None = None
        for mirror in MIRRORS:
            try:
                with urllib.request.urlopen(mirror + name, timeout=30) as resp:
                    body = resp.read()
            except OSError as err:
                last_err = err
                continue
            if hashlib.sha256(body).hexdigest() != digest:
                last_err = DatasetError(f"{mirror}{name}: SHA-256 mismatch")
                continue
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(body)
            os.replace(tmp, target)
            log.info("downloaded %s from %s", name, mirror)
            break
        else:
            raise DatasetError(
                f"cannot download {name} ({last_err}); install the Debian package "
                "dataset-fashion-mnist or pass --source DIR"
            )


def find_source(explicit: str | os.PathLike | None = None, allow_download: bool = True) -> Source:
    """The first place that has all four files: ``explicit`` (--source,
    VGGPRICE_DATA_SOURCE or FASHION_MNIST_DIR), the Debian package, the Keras cache,
    then a download from the public mirrors."""
    candidates: list[tuple[Path, str]] = []
    if explicit:
        path = Path(explicit).expanduser()
        if not _has_files(path):
            missing = [n for n in FILES if not (path / n).is_file()]
            raise DatasetError(f"{path}: missing {', '.join(missing)}")
        candidates.append((path, "explicit"))
    else:
        candidates += [(DEBIAN_DIR, "debian"), (KERAS_DIR, "keras-cache")]
        found = [(p, how) for p, how in candidates if _has_files(p)]
        if not found:
            if not allow_download:
                raise DatasetError(
                    "Fashion-MNIST not found: pass --source DIR, set FASHION_MNIST_DIR, or "
                    "apt-get install dataset-fashion-mnist"
                )
            cache = load_settings().cache_dir / "fashion-mnist"
            _download(cache)
            found = [(cache, "download")]
        candidates = found[:1]
    directory, how = candidates[0]
    digests = {name: sha256_file(directory / name) for name in FILES}
    verified = digests == FILES
    if not verified:
        bad = [n for n in FILES if digests[n] != FILES[n]]
        get_logger().warning(
            "%s: %s do not match the published SHA-256; recorded as unverified",
            directory,
            ", ".join(bad),
        )
    return Source(directory, how, digests, verified)


def dataset_version(source: Source) -> str:
    """Derived from the source content only: same bytes, same version."""
    return version_of(source.sha256)


# --- shards --------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def images_name(split: str) -> str:
    return SPLITS[split][0]


def pixel_table(ids: list[str], labels: np.ndarray, pngs: list[bytes]) -> pa.Table:
    """A demo pixel shard: a catalog's columns (content id, PNG, no rejection reason),
    then the image's id and label, so the shard is a valid Parquet drop as well."""
    return pa.table(
        {"content_id": [hashlib.sha256(b).hexdigest() for b in pngs], "image": pngs,
         "reason": pa.nulls(len(pngs), pa.string()), "image_id": ids,
         "label": labels.astype(np.int8)}, schema=PIXELS_SCHEMA)  # fmt: skip


def ingest(lake: Lake, source: Source, shard_rows: int = SHARD_ROWS) -> dict:
    """Write the dataset as a catalog is stored: pixel shards, the index, the manifest
    last (it marks the version complete). Each split's shards hold its images in
    ``subset_rank`` order, so a subset of N (``train_limit``) is the first shards and a
    training computes the frozen features of those alone. Idempotent by version."""
    dataset = lake.dataset(dataset_version(source))
    log = get_logger()
    if dataset.complete:
        log.info("dataset %s already in %s; nothing rewritten", dataset.version, lake.uri)
        return dataset.manifest() | {"skipped": True}

    # Parse and check everything before the first write.
    splits = {split: read_split(source.directory, split) for split in SPLITS}
    pixels = dataset.pixels()
    manifest_splits, index = {}, {c: [] for c in INDEX_SCHEMA.names}
    bar = progress(sum(-(-len(i) // shard_rows) for i, _ in splits.values()), "ingest", "shard")
    for split, (images, labels) in splits.items():
        ids = [f"{split}-{i:05d}" for i in range(len(images))]
        order = np.argsort([subset_rank(i) for i in ids], kind="stable")
        shards = []
        for start in range(0, len(order), shard_rows):
            rows = order[start : start + shard_rows]
            chunk = [ids[r] for r in rows]
            identities = [f"{images_name(split)}#{r}" for r in rows]  # where in the IDX file
            table = pixel_table(chunk, labels[rows], [encode_png(images[r]) for r in rows])
            shard, _ = pixels.write(table, list(zip(chunk, identities, strict=True)), split)
            shards.append({"name": dataset.shard_name(shard), "rows": len(rows)})
            index["image_id"] += chunk
            index["content_id"] += table["content_id"].to_pylist()
            index["identity"] += identities
            index["split"] += [split] * len(rows)
            index["label"] += labels[rows].tolist()
            index["category"] += [GARMENTS[c] for c in labels[rows]]
            index["shard"] += [shard] * len(rows)
            index["row"] += list(range(len(rows)))
            bar.update()
        manifest_splits[split] = {
            "rows": len(images),
            "image_shape": list(images.shape[1:]),
            "label_counts": np.bincount(labels, minlength=N_CLASSES).tolist(),
            "shards": shards,
        }
        log.info("wrote %s: %d rows in %d pixel shards", split, len(images), len(shards))
    dataset.write_index(pa.table(index, schema=INDEX_SCHEMA))

    manifest = {
        "dataset": "fashion-mnist",
        "version": dataset.version,
        "format": DATASET_FORMAT,
        "source": {
            "how": source.how,
            "directory": str(source.directory),
            "verified": source.verified,
            "files": {
                name: {"sha256": digest, "verified": FILES.get(name) == digest}
                for name, digest in source.sha256.items()
            },
        },
        "splits": manifest_splits,
        "index": dataset.INDEX,
        "pixel_shards": sorted(set(index["shard"])),
        "schema": {f.name: str(f.type) for f in PIXELS_SCHEMA},
        "image_encoding": "png",
        "created_by": {"package": "vggprice", "version": __version__},
    }
    bar.close()
    dataset.write_manifest(manifest)  # last: marks the version complete
    return manifest | {"skipped": False}


# --- Prefect task wrappers: retries and logging around the plain functions -------


@task(name="ingest-dataset", **TASK_RETRIES)
def ingest_dataset(store_uri: str, source: str | None = None) -> dict:
    """Find the IDX files, verify them, and write the dataset version to the store."""
    from tasks.store.storage import open_store

    return ingest(Lake(open_store(store_uri)), find_source(source))
