"""The lake's index: every thing the store holds, as a typed entry.

Each entry knows its keys, its completion marker, how it is (de)serialised and
how its version is derived; no other module builds a key (``storage.py`` only
moves bytes). Flows and tasks pass versions and these entries, never key
strings. Compare Kedro's data catalog and Dagster's IO managers.

```
datasets/fashion-mnist/<dataset>/{index.parquet, manifest.json}   (the demo, stored by content:
                                   its pixel shards under pixels/; versions stored before
                                   format v2: train/ and test/ shards)
datasets/fashion-mnist/<dataset>/pixels/<shard>.{parquet, json}   (as a catalog's _pixels/)
datasets/catalog/<name>/_pixels/<shard>.{parquet, json}  (decoded images by content id, shared by
                                   every version of the catalog; the .json, its ids, written last)
datasets/catalog/<name>/<dataset>/{index.parquet, rejected.parquet, manifest.json}
                                  (the index names each image's content id, split and pixel shard;
                                   catalogs stored before content ids: train/ and test/ shards)
labels/<dataset>/<labels>/{prices.parquet, [skipped_rows.parquet,] scaling.json}
features/<key>/{train-view-N.npy, test.npy, manifest.json}   (a dataset's, whole)
features/<key>/shards/<pixel shard>.{means.npy, npy}   (per pixel shard: every
                                   view of every row, and each row's pixel mean)
checkpoints/<model>/{state.json, epoch-N.npz}
models/<model>/attempts/<attempt>/{model.keras, config.json, history.json, summary.txt, plots/}
models/<model>/lineage.json        (created once, naming the attempt that won; models stored
                                    before attempts hold their files under models/<model>/)
models/<model>/[eval/<labels>/]{metrics.json, plots/}
models/<model>/engines/openvino-int8/{attempts/<attempt>/{model.xml, model.bin}, gate.json}
                                   (a derived engine model: gate.json, created once, names
                                    the attempt whose files it publishes and the verdict)
registry/champion.json, registry/decisions/<time>-<model>.json          (the demo line)
registry/lines/<name>/{champion.json, decisions/<time>-<model>.json}  (a catalog's line)
drops/<drop>/...                  (.ready: an optional marker, "this drop is complete"; hidden, so
                                    never priced: the S3 bridge emits the drop's event on it)
scores/<drop>/<model>/{_plans/, _claims/, _shards/, _rejected/, part-*.parquet,
                       _generations/<plan>-<claim>/, plots/, _manifest.json}
                                   (the manifest names the parts, rejected.parquet and
                                    superseded.parquet it covers)
```

The file named last in each entry is its completion marker: it is written
last, so an entry whose marker exists is whole.

Versions are content hashes. Models and feature caches also hash the code that
computes them (``code_fingerprint``): a change to that code gives new versions,
so "found, not redone" never hands back the output of other code. Datasets,
catalogs and labels hash a format constant that ``tests/test_lake.py`` pins to a golden
output, so a change that alters their bytes fails the tests until it is bumped.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import io
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.store.storage import ObjectInfo, ObjectNotFound, Store, json_bytes

DATASET_FORMAT = "vggprice-fashion-mnist-v2"  # bump when ingest writes other bytes
CATALOG_FORMAT = "vggprice-catalog-v2"  # bump when catalog ingest writes other bytes
DEMO_LINE = "demo"  # the Fashion-MNIST model line: registry/ as before lines existed
# The tables of a version stored by content: its pixel shards' rows and its index.
PIXELS_SCHEMA = pa.schema(
    [("content_id", pa.string()), ("image", pa.binary()), ("reason", pa.string())]
)
INDEX_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("content_id", pa.string()), ("identity", pa.string()),
     ("split", pa.string()), ("label", pa.int32()), ("category", pa.string()),
     ("shard", pa.string()), ("row", pa.int32())]
)  # fmt: skip
LINE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,39}$")
LABELS_FORMAT = 1  # bump when the same rule and seed draw other prices

# The code that decides what a feature cache or a model holds: every module under
# these packages (see code_fingerprint). tests/test_lake.py checks that their modules
# import nothing else of tasks/ but the store (its claims among it: who computes a
# shard, never what it holds), settings, runtime and reports.
LEARNING_CODE = ("tasks.data", "tasks.model")


class NotInLake(ObjectNotFound):
    """A version or entry that the store does not hold (the message lists what it does)."""


# --- versions -----------------------------------------------------------------------


def digest(spec: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return tree


def modules_of(names: tuple[str, ...]) -> list[str]:
    """The modules named, with a package standing for every module in its folder."""
    found = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"cannot fingerprint {name}: module not found")
        if spec.submodule_search_locations:
            folder = Path(spec.origin).parent
            found += [
                f"{name}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__"
            ]
        found.append(name)
    return sorted(found)


@functools.cache
def code_fingerprint(names: tuple[str, ...] = LEARNING_CODE) -> str:
    """A hash of what the modules (or packages: every module in them) compute: their
    syntax trees without docstrings and comments, so editing prose or formatting keeps
    versions, and editing code does not."""
    h = hashlib.sha256()
    for name in modules_of(names):
        with open(importlib.util.find_spec(name).origin, encoding="utf-8") as f:
            tree = _strip_docstrings(ast.parse(f.read()))
        h.update(f"{name}\n{ast.dump(tree)}\n".encode())
    return h.hexdigest()[:16]


def dataset_version(file_digests: dict[str, str]) -> str:
    """Derived from the source files' SHA-256 only: same bytes, same version."""
    h = hashlib.sha256(DATASET_FORMAT.encode())
    for name in sorted(file_digests):
        h.update(f"{name}:{file_digests[name]}\n".encode())
    return "fm-" + h.hexdigest()[:16]


def check_line_name(name: str) -> str:
    """A catalog (and its model line) name: lowercase letters, digits and '_', at most
    40, not the demo's."""
    if not LINE_NAME.match(name) or name == DEMO_LINE:
        raise ValueError(
            f"invalid catalog name {name!r}: use 1-40 lowercase letters, digits and '_' "
            f"(not {DEMO_LINE!r})"
        )
    return name


def catalog_version(name: str, images: list[tuple[str, str, str, str]], spec: dict) -> str:
    """Derived from the images it holds, as (key, content id, split, category), how they
    are stored, and the format: the same images give the same version, whatever the
    prices (they are the labels'). The name is part of it, so the version alone finds its
    place in the lake."""
    h = hashlib.sha256(f"{CATALOG_FORMAT}\n{json.dumps(spec, sort_keys=True)}\n".encode())
    for row in sorted(images):
        h.update(("\t".join(row) + "\n").encode())
    return f"cat-{check_line_name(name)}-{h.hexdigest()[:16]}"


def pixel_shard_name(content_ids: list[str]) -> str:
    """A pixel shard is named by the content ids it holds, in order."""
    return "px-" + digest([CATALOG_FORMAT, content_ids])


def line_of(dataset_version: str) -> str:
    """The model line a dataset's models belong to: the demo, or the catalog's name."""
    if dataset_version.startswith("cat-"):
        return dataset_version[len("cat-") : -17]
    return DEMO_LINE


def labels_version(dataset: str, rule: dict, seed: int) -> str:
    spec = {"dataset": dataset, "rule": rule, "seed": seed, "format": LABELS_FORMAT}
    return "px-" + digest(spec)


def feature_key(spec: dict) -> str:
    """The cache key of frozen-layer outputs: data, base weights, input size, cut layer,
    precision, views, and the code that computes them."""
    return "ft-" + digest(spec | {"code": code_fingerprint()})


def model_version(spec: dict) -> str:
    """Dataset, labels, settings, base weights, and the code that trains."""
    return "m-" + digest(spec | {"code": code_fingerprint()})


# --- (de)serialisation ------------------------------------------------------------------


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_parquet(body: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(body), columns=columns)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


# --- entries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """Something under one prefix of a store."""

    store: Store
    prefix: str
    MARKER = ""  # the object written last: the entry is complete when it exists

    @property
    def complete(self) -> bool:
        return self.exists(self.MARKER)

    def marker(self) -> Any | None:
        """The marker's JSON, or None while the entry is not complete."""
        try:
            return self.get_json(self.MARKER)
        except ObjectNotFound:
            return None

    def read_marker(self, what: str, known: Callable[[], list[str]]) -> Any:
        """The marker's JSON, or NotInLake naming what is missing and what the lake has."""
        found = self.marker()
        if found is None:
            raise NotInLake(
                f"{self.uri(self.MARKER)}: no such {what} (known: {', '.join(known()) or 'none'})"
            )
        return found

    def versioned(self, name: str) -> tuple[dict, str] | None:
        """(JSON, version token for a compare-and-swap), or None when there is none."""
        try:
            body, token = self.store.get_versioned(self.prefix + name)
        except ObjectNotFound:
            return None
        return json.loads(body), token

    def key(self, name: str) -> str:
        return self.prefix + name

    def uri(self, name: str = "") -> str:
        """The URI of ``name`` in the entry, or of the entry's folder (no trailing slash)."""
        return self.store.uri_for(self.prefix + name if name else self.prefix.rstrip("/"))

    def get_json(self, name: str) -> Any:
        return self.store.get_json(self.prefix + name)

    def put_json(self, name: str, obj: Any) -> None:
        self.store.put_json(self.prefix + name, obj)

    def get_bytes(self, name: str) -> bytes:
        return self.store.get_bytes(self.prefix + name)

    def put_bytes(self, name: str, data: bytes) -> None:
        self.store.put_bytes(self.prefix + name, data)

    def exists(self, name: str) -> bool:
        return self.store.exists(self.prefix + name)

    # plots: plots/<name>.png under the entry
    def write_plot(self, name: str, png: bytes) -> str:
        """Store a plot; returns where it is (``plot_link``)."""
        self.put_bytes(f"plots/{name}.png", png)
        return self.plot_link(name)

    def plot(self, name: str) -> bytes:
        return self.get_bytes(f"plots/{name}.png")

    def plot_link(self, name: str) -> str:
        """The stored plot's URI (``s3://bucket/key`` or a path), never a presigned URL:
        reports keep it for good (Prefect artifacts), and a credential in it would be
        kept with it."""
        return self.uri(f"plots/{name}.png")

    def plot_names(self) -> list[str]:
        """The names of the entry's stored plots (``plot`` reads one)."""
        return [n[len("plots/") : -len(".png")] for n in self.names("plots/") if n.endswith(".png")]

    def names(self, sub: str = "") -> list[str]:
        """Keys under ``prefix + sub``, relative to the prefix, in order."""
        return [k[len(self.prefix) :] for k in self.store.keys(self.prefix + sub)]

    def delete_all(self) -> int:
        return self.store.delete_prefix(self.prefix)


class Claims:
    """``_claims/<name>.json`` under an entry: the work claims (``tasks.store.claims``:
    conditional create, heartbeats, compare-and-swap takeover),
    for whatever its workers share out (a drop's shards, a catalog's feature shards)."""

    @staticmethod
    def _claim(name: str) -> str:
        return f"_claims/{name}.json"

    def create_claim(self, name: str, claim: dict) -> bool:
        return self.store.put_if_absent(self.key(self._claim(name)), json_bytes(claim))

    def read_claim(self, name: str) -> tuple[dict, str] | None:
        return self.versioned(self._claim(name))

    def replace_claim(self, name: str, claim: dict, token: str) -> bool:
        return self.store.put_if_match(self.key(self._claim(name)), json_bytes(claim), token)

    def drop_claim(self, name: str) -> None:
        self.store.delete(self.key(self._claim(name)))

    def claim_objects(self) -> dict[str, ObjectInfo]:
        """claim name -> its object (size, when it was last written)."""
        return {o.key[len(self.key("_claims/")) : -len(".json")]: o
                for o in self.store.list(self.key("_claims/"))}  # fmt: skip

    def claims(self) -> dict[str, dict]:
        """The claims held now; one released between the listing and its read is left
        out (other workers take and release claims all the time)."""
        held = {}
        for n in self.names("_claims/"):
            try:
                held[n[len("_claims/") : -len(".json")]] = self.get_json(n)
            except ObjectNotFound:
                continue
        return held


@dataclass(frozen=True)
class Dataset(Entry):
    version: str = ""
    MARKER = "manifest.json"

    def manifest(self) -> dict:
        return self.read_marker("dataset version", Lake(self.store).dataset_versions)

    def write_shard(self, split: str, index: int, table: pa.Table) -> dict:
        """One Parquet shard; returns its manifest row."""
        name = f"{split}/part-{index:05d}.parquet"
        body = parquet_bytes(table)
        self.put_bytes(name, body)
        return {"name": name, "rows": table.num_rows, "sha256": hashlib.sha256(body).hexdigest()}

    def write_manifest(self, manifest: dict) -> None:
        self.put_json(self.MARKER, manifest)

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """All shards of one split as one table (in image_id order)."""
        shards = self.manifest()["splits"][split]["shards"]
        return pa.concat_tables(
            [read_parquet(self.get_bytes(_shard_name(self, s)), columns) for s in shards]
        )

    def shard_uris(self, split: str) -> list[str]:
        return [self.uri(_shard_name(self, s)) for s in self.manifest()["splits"][split]["shards"]]


@dataclass(frozen=True)
class CatalogDataset(Dataset):
    """A catalog version: ``index.parquet`` (per image: key, content id, split, category
    and where its normalised RGB PNG is in the catalog's pixel shards), the files that
    could not be decoded (``rejected.parquet``); manifest.json last. Versions stored
    before content ids hold their own train/test shards (read as before)."""

    INDEX = "index.parquet"
    REJECTED = "rejected.parquet"
    SKIPPED = "skipped_rows.parquet"  # versions before content ids; newer ones: the labels'

    def pixels(self) -> CatalogPixels:
        return Lake(self.store).catalog_pixels(line_of(self.version))

    def images(self, ids: list[str]) -> pa.Array:
        """The PNGs of these image keys, in the order asked (one pixel shard read at a
        time; a version stored before content ids reads its split shards)."""
        if "index" not in self.manifest():
            found = {}
            for split in self.manifest()["splits"]:
                table = super().read_split(split, ["image_id", "image"])
                found |= dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist(),
                                  strict=True))  # fmt: skip
            return pa.array([found[i] for i in ids], pa.binary())
        where = self.locations()
        return self.pixels().images([where[i][0] for i in ids], [where[i][1] for i in ids])

    def write_index(self, table: pa.Table) -> None:
        self.put_bytes(self.INDEX, parquet_bytes(table))

    def index(self, columns: list[str] | None = None) -> pa.Table | None:
        """The version's index, or None for a version stored before content ids."""
        if "index" not in self.manifest():
            return None
        return read_parquet(self.get_bytes(self.INDEX), columns)

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """One split as (image_id, label, image) rows in image_id order."""
        index = self.index()
        if index is None:
            return super().read_split(split, columns)
        mask = pc.equal(index["split"], split)
        index = index.filter(mask).sort_by("image_id")
        columns = columns or ["image_id", "label", "image"]
        out = {"image_id": index["image_id"], "label": index["label"]}
        if "image" in columns:
            out["image"] = self.pixels().images(index["shard"].to_pylist(),
                                                index["row"].to_pylist())  # fmt: skip
        return pa.table({c: out[c] for c in columns})

    def locations(self) -> dict[str, tuple[str, int]]:
        """image key -> (pixel shard, row) of every image of the version."""
        index = self.index(["image_id", "shard", "row"])
        shard_row = zip(index["shard"].to_pylist(), index["row"].to_pylist(), strict=True)
        return dict(zip(index["image_id"].to_pylist(), shard_row, strict=True))

    def split_ids(self, split: str) -> list[str]:
        """The image keys of one split (no pixels read)."""
        return self.read_split(split, ["image_id"])["image_id"].to_pylist()

    def write_rejected(self, table: pa.Table) -> None:
        self.put_bytes(self.REJECTED, parquet_bytes(table))

    def rejected(self) -> pa.Table:
        return read_parquet(self.get_bytes(self.REJECTED))


@dataclass(frozen=True)
class CatalogPixels(Entry):
    """A catalog's decoded images by content id, in shards shared by all its versions:
    ``<shard>.parquet`` (content_id, image: PNG or null, reason: why it was rejected),
    then ``<shard>.json`` (its content ids and the source keys and identities they were
    read from: the marker; a shard without one is ignored and written again)."""

    def write(self, table: pa.Table, sources: list[tuple[str, str]], split: str | None = None
              ) -> tuple[str, dict]:  # fmt: skip
        """The shard, then its marker; returns (shard, marker). ``split``: the one split
        of every row, for shards that never change split (the demo's): the frozen
        features of a test shard need no views but the image itself."""
        ids = table["content_id"].to_pylist()
        shard = pixel_shard_name(ids)
        self.put_bytes(f"{shard}.parquet", parquet_bytes(table))
        reasons = {i: r for i, r in enumerate(table["reason"].to_pylist()) if r is not None}
        marker = {"ids": ids, "sources": sources, "reasons": reasons}
        if split is not None:
            marker["split"] = split
        self.put_json(f"{shard}.json", marker)
        return shard, marker

    def shards(self) -> list[str]:
        """The shards whose marker exists."""
        return [n[: -len(".json")] for n in self.names() if n.endswith(".json")]

    def shard(self, shard: str) -> dict:
        return self.get_json(f"{shard}.json")

    def table(self, shard: str) -> pa.Table:
        return read_parquet(self.get_bytes(f"{shard}.parquet"))

    def images(self, shards: list[str], rows: list[int]) -> pa.Array:
        """The PNGs at (shard, row) pairs, in the order asked; each shard read once."""
        wanted: dict[str, list[int]] = {}
        for i, s in enumerate(shards):
            wanted.setdefault(s, []).append(i)
        out: list[bytes | None] = [None] * len(shards)
        for s, positions in wanted.items():
            column = read_parquet(self.get_bytes(f"{s}.parquet"), ["image"])["image"]
            for i in positions:
                out[i] = column[rows[i]].as_py()
        return pa.array(out, pa.binary())


@dataclass(frozen=True)
class DemoDataset(CatalogDataset):
    """A Fashion-MNIST version: stored as a catalog is (an index over pixel shards), the
    shards its own (``pixels/``: the demo never changes, so no version shares them), each
    with ``image_id`` and ``label`` beside the catalog's columns, so a shard is a valid
    Parquet drop too. Versions stored before format v2 hold train/ and test/ shards."""

    PIXELS = "pixels/"

    def pixels(self) -> CatalogPixels:
        return CatalogPixels(self.store, f"{self.prefix}{self.PIXELS}")

    def shard_name(self, shard: str) -> str:
        """A pixel shard's object, relative to the version (as its manifest lists it)."""
        return f"{self.PIXELS}{shard}.parquet"


def _shard_name(dataset: Dataset, row: dict) -> str:
    # Manifests written before the catalog held the whole key; newer ones the name.
    return row.get("name") or row["key"][len(dataset.prefix) :]


@dataclass(frozen=True)
class Labels(Entry):
    dataset_version: str = ""
    version: str = ""
    MARKER = "scaling.json"
    PRICES = "prices.parquet"
    SKIPPED = "skipped_rows.parquet"  # a catalog's price rows left out (--skip-bad-rows)

    def write(self, prices: pa.Table, scaling: dict, skipped: pa.Table | None = None) -> None:
        self.put_bytes(self.PRICES, parquet_bytes(prices))
        if skipped is not None:
            self.put_bytes(self.SKIPPED, parquet_bytes(skipped))
        self.put_json(self.MARKER, scaling)

    def skipped(self) -> pa.Table:
        self.scaling()
        return read_parquet(self.get_bytes(self.SKIPPED))

    def scaling(self) -> dict:
        return self.read_marker(
            f"labels version for dataset {self.dataset_version}",
            lambda: Lake(self.store).labels_versions(self.dataset_version),
        )

    def prices(self) -> pa.Table:
        self.scaling()  # complete, or a clear error
        return read_parquet(self.get_bytes(self.PRICES))


@dataclass(frozen=True)
class FeatureCache(Entry):
    cache_key: str = ""
    MARKER = "manifest.json"

    def load(self) -> tuple[Iterator[np.ndarray], int, np.ndarray] | None:
        """(train views as they load, how many, test features), or None on a miss."""
        manifest = self.marker()
        if manifest is None:
            return None
        names = manifest["views"]
        views = (read_npy(self.get_bytes(n)) for n in names)
        return views, len(names), read_npy(self.get_bytes("test.npy"))

    def write_view(self, view: int, features: np.ndarray) -> str:
        name = f"train-view-{view}.npy"
        self.put_bytes(name, npy_bytes(features))
        return name

    def write(self, view_names: list[str], test: np.ndarray) -> None:
        self.put_bytes("test.npy", npy_bytes(test))
        self.put_json(
            self.MARKER,
            {"key": self.cache_key, "views": view_names, "shape": list(test.shape[1:])},
        )


@dataclass(frozen=True)
class ShardFeatures(Claims, Entry):
    """Frozen-layer outputs of a catalog's pixel shards under one feature spec: one
    array (views, rows, ...) per shard, written whole, so a shard's features exist or do
    not; shared by every version that holds the shard. Extractors claim a shard
    (``_claims/<shard>.json``) before they compute it: each is computed once."""

    cache_key: str = ""

    @staticmethod
    def name(shard: str) -> str:
        """The features' object, relative to the entry (written last: the marker)."""
        return f"shards/{shard}.npy"

    def write(self, shard: str, features: np.ndarray, means: np.ndarray) -> bool:
        """The rows' pixel means, then the features (the shard's marker) by a conditional
        create: True if these are the shard's, False if another extractor's were there
        first (the means are the same numbers either way: they are the pixels')."""
        self.put_bytes(f"shards/{shard}.means.npy", npy_bytes(means))
        return self.store.put_if_absent(self.key(self.name(shard)), npy_bytes(features))

    def done(self, shards: list[str]) -> set[str]:
        """Those of ``shards`` whose features are stored."""
        stored = set(self.names("shards/"))
        return {s for s in shards if self.name(s) in stored}

    def means(self, shard: str) -> np.ndarray:
        return read_npy(self.get_bytes(f"shards/{shard}.means.npy"))

    def open(self, shard: str, directory: str) -> np.ndarray:
        """The shard's features memory-mapped from a local copy in ``directory`` (fetched
        once): pages are read as rows are used, never the whole array at once."""
        path = Path(directory) / f"{shard}.npy"
        if not path.exists():
            self.store.get_file(self.key(self.name(shard)), path)
        return np.load(path, mmap_mode="r", allow_pickle=False)


@dataclass(frozen=True)
class Checkpoints(Entry):
    """checkpoints/<model>/: each epoch's arrays, then state.json naming the epoch."""

    MARKER = "state.json"

    def latest(self) -> tuple[dict, bytes] | None:
        state = self.marker()
        if state is None:
            return None
        return state, self.get_bytes(f"epoch-{state['epoch']}.npz")

    def write(self, state: dict, arrays: bytes) -> None:
        self.put_bytes(f"epoch-{state['epoch']}.npz", arrays)
        self.put_json(self.MARKER, state)


@dataclass(frozen=True)
class Evaluation(Entry):
    """metrics.json and plots of a model on one labels version."""

    model_version: str = ""
    labels_version: str = ""
    MARKER = "metrics.json"

    def metrics(self) -> dict | None:
        return self.marker()

    def write_metrics(self, metrics: dict) -> None:
        self.put_json(self.MARKER, metrics)


def attempt_id() -> str:
    """A new training attempt's id: when it started (UTC) and a random part."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class ModelFiles(Entry):
    """The files of one training attempt of a model version: models/<v>/attempts/<id>/
    (models/<v>/ itself for models stored before attempts). An attempt writes only here;
    nothing reads it until the model's lineage.json names it."""

    version: str = ""
    attempt: str | None = None  # None: a model stored before attempts
    FILE = "model.keras"

    def write_file(self, path) -> None:
        self.store.put_file(self.key(self.FILE), path)

    def download(self, path) -> None:
        self.store.get_file(self.key(self.FILE), path)

    def file_uri(self) -> str:
        return self.uri(self.FILE)

    def file_info(self) -> ObjectInfo:
        (info,) = [o for o in self.store.list(self.key(self.FILE)) if o.key == self.key(self.FILE)]
        return info

    def config(self) -> dict:
        return self.get_json("config.json")

    def write_config(self, config: dict) -> None:
        self.put_json("config.json", config)

    def history(self) -> dict:
        return self.get_json("history.json")

    def write_history(self, history: dict) -> None:
        self.put_json("history.json", history)

    def write_summary(self, text: str) -> None:
        self.put_bytes("summary.txt", text.encode())


@dataclass(frozen=True)
class EngineFiles(Entry):
    """models/<v>/engines/<name>/: an engine's own model derived from model.keras (the
    OpenVINO int8 model). Each attempt writes its files under attempts/<id>/; gate.json,
    the marker, is created once by a conditional write naming the attempt it publishes,
    its files' hashes and the accuracy gate's verdict: two makers never both publish."""

    version: str = ""
    MARKER = "gate.json"
    XML = "model.xml"
    BIN = "model.bin"

    def gate(self) -> dict | None:
        return self.marker()

    def write_files(self, attempt: str, xml, weights) -> None:
        """Store one attempt's model.xml and model.bin (local paths)."""
        self.store.put_file(self._file(attempt, self.XML), xml)
        self.store.put_file(self._file(attempt, self.BIN), weights)

    def download(self, gate: dict, directory: Path) -> Path:
        """The published attempt's files into ``directory``; the local model.xml."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in (self.XML, self.BIN):
            self.store.get_file(self._file(gate["attempt"], name), directory / name)
        return directory / self.XML

    def file_uri(self, gate: dict) -> str:
        return self.uri(self._file(gate["attempt"], self.XML)[len(self.prefix) :])

    def attempts(self) -> list[str]:
        """The attempts that wrote files (one published, others lost the race)."""
        keys = {o.key[len(self.prefix) :] for o in self.store.list(self.prefix + "attempts/")}
        return sorted({k.split("/")[1] for k in keys if k.count("/") >= 2})

    def publish(self, gate: dict) -> dict:
        """Create gate.json unless there is one; the gate that stands (this one when it
        won, also when only the response to its write was lost)."""
        if self.store.put_if_absent(self.key(self.MARKER), json_bytes(gate)):
            return gate
        return self.get_json(self.MARKER)

    def write_gate(self, gate: dict) -> None:
        """Replace gate.json as given (an operator's verdict, or a test's)."""
        self.put_json(self.MARKER, gate)

    def attempt_prefix(self, attempt: str) -> str:
        """Where one attempt's files are (relative to the store)."""
        return f"{self.prefix}attempts/{attempt}/"

    def _file(self, attempt: str, name: str) -> str:
        return self.attempt_prefix(attempt) + name


@dataclass(frozen=True)
class Model(Entry):
    """models/<v>/: lineage.json, the completion marker, created once by a conditional
    write that names the attempt whose files it publishes; the first complete attempt
    wins and a model with a marker is never rewritten. Every read of the model's files
    goes through the marker (``files``)."""

    version: str = ""
    MARKER = "lineage.json"
    FILE = ModelFiles.FILE
    ATTEMPTS = "attempts/"

    def lineage(self) -> dict:
        return self.read_marker(
            "(complete) model version", lambda: Lake(self.store).model_versions()[-10:]
        )

    def attempt(self, attempt: str) -> ModelFiles:
        """One training attempt's files (where that attempt writes)."""
        return ModelFiles(self.store, f"{self.prefix}{self.ATTEMPTS}{attempt}/", self.version,
                          attempt)  # fmt: skip

    def files(self, lineage: dict | None = None) -> ModelFiles:
        """The published files: the attempt lineage.json names, or models/<v>/ itself
        for a model stored before attempts. NotInLake while the model is not complete."""
        lineage = lineage if lineage is not None else self.lineage()
        if lineage.get("attempt"):
            return self.attempt(lineage["attempt"])
        return ModelFiles(self.store, self.prefix, self.version, None)

    def publish(self, files: ModelFiles, lineage: dict) -> dict:
        """Create lineage.json naming ``files``' attempt, unless the model has one: the
        first complete attempt wins. Returns the marker that stands, the winner's (this
        attempt's own when it won, also when only the response to its write was lost)."""
        marker = lineage | {"attempt": files.attempt}
        if self.store.put_if_absent(self.key(self.MARKER), json_bytes(marker)):
            return marker
        return self.lineage()

    def engine(self, name: str = "openvino-int8") -> EngineFiles:
        """models/<v>/engines/<name>/: a model derived from this one for a scoring engine."""
        return EngineFiles(self.store, f"{self.prefix}engines/{name}/", self.version)

    def write_lineage(self, lineage: dict) -> bool:
        """Create lineage.json as given (a model whose files sit under models/<v>/);
        False, writing nothing, when the model has one."""
        return self.store.put_if_absent(self.key(self.MARKER), json_bytes(lineage))

    def config(self) -> dict:
        return self.files().config()

    def history(self) -> dict:
        return self.files().history()

    def plot(self, name: str) -> bytes:
        return self.files().plot(name)

    def plot_link(self, name: str) -> str:
        return self.files().plot_link(name)

    def download(self, path) -> None:
        self.files().download(path)

    def file_uri(self) -> str:
        """Where the published model.keras is (NotInLake while the model is not complete)."""
        return self.files().file_uri()

    def evaluations(self) -> list[Evaluation]:
        """Every complete evaluation of the model: on its own labels first, then the others."""
        others = sorted({n.split("/")[1] for n in self.names("eval/") if n.count("/") >= 2})
        found = [self.evaluation(), *(self.evaluation(lv) for lv in others)]
        return [e for e in found if e.complete]

    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.store, f"checkpoints/{self.version}/")

    def evaluation(self, labels_version: str | None = None, images: dict | None = None
                   ) -> Evaluation:  # fmt: skip
        """Under models/<v>/ for the model's own labels, models/<v>/eval/<labels>/ else;
        on other test images than the labels' own (``images``: another model's train
        split left out, another subset), models/<v>/eval/<labels>-<hash of images>/."""
        own = self.lineage()["labels_version"]
        lv = labels_version or own
        sub = "" if lv == own and not images else f"eval/{lv}/"
        if images:
            sub = f"eval/{lv}-{digest(images, 8)}/"
        return Evaluation(self.store, self.prefix + sub, self.version, lv)


@dataclass(frozen=True)
class Registry(Entry):
    """registry/champion.json (which model serves) and every decision."""

    CHAMPION = "champion.json"

    def champion(self) -> dict | None:
        return self.champion_versioned()[0]

    def champion_versioned(self) -> tuple[dict | None, str | None]:
        """(champion, version token for ``swap_champion``); (None, None) when none."""
        return self.versioned(self.CHAMPION) or (None, None)

    def swap_champion(self, champion: dict, token: str | None) -> bool:
        """Replace the pointer only if it is still the version read (compare-and-swap).
        A lost response reads as a lost race; the caller checks the writer it named."""
        return self.store.put_if_match(self.key(self.CHAMPION), json_bytes(champion), token)

    def record_decision(self, stamp: str, model_version: str, decision: dict) -> None:
        self.put_json(f"decisions/{stamp}-{model_version}.json", decision)

    def decisions(self) -> list[dict]:
        return [self.get_json(n) for n in self.names("decisions/")]


def drop_name_problem(name: str) -> str | None:
    """Why a folder name under drops/ is not a drop (None: it is one). A drop id is a
    name in the store, never a path: '~' and '~root' are drops like any other; names
    that cannot be one folder, and hidden folders (an editor's checkpoints, rsync's
    partial transfers, a snapshot), are not drops."""
    if name in ("", ".", ".."):
        return "not a folder name" if name else "an empty name"
    if "/" in name or "\\" in name:
        return "holds a slash or backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if name.startswith("."):
        return "a hidden folder (tools' folders such as .ipynb_checkpoints are not drops)"
    return None


def shown(name: str) -> str:
    """A folder name as it can be printed on one line."""
    return name if name.isprintable() else ascii(name)


def is_image_key(key: str) -> bool:
    """Not a folder marker (a key ending in '/', as S3 consoles create them) nor a hidden
    name (.DS_Store and the like): an object that may hold images."""
    return key != "" and not key.endswith("/") and not key.rsplit("/", 1)[-1].startswith(".")


@dataclass(frozen=True)
class DropSource:
    """Where a drop's images are: a store and a prefix in it."""

    store: Store
    prefix: str
    drop_id: str

    def listing(self) -> tuple[list[ObjectInfo], int]:
        """(the drop's objects, keys relative to the drop; how many were skipped): folder
        markers (keys ending in '/', as consoles write them) and hidden names are not
        images to price. Local entries that are not files (named pipes, devices, sockets,
        links to nothing) are listed with what they are (``ObjectInfo.irregular``), so
        they are planned like any object and rejected with that reason when read."""
        n, objects, skipped = len(self.prefix), [], 0
        for o in self.store.list(self.prefix, irregular=True):
            key = o.key[n:]
            if not is_image_key(key):
                skipped += 1
            else:
                objects.append(ObjectInfo(key, o.size, o.etag, o.irregular))
        return objects, skipped

    def uri(self) -> str:
        """Where the drop's images are (its folder)."""
        return self.store.uri_for(self.prefix.rstrip("/")) if self.prefix else self.store.uri

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; TooLarge (from its size, before reading) over ``max_bytes``,
        NotRegularFile for a local entry that is not a file (never opened)."""
        return self.store.get_bytes(self.prefix + key, max_bytes)


@dataclass(frozen=True)
class ScoreRun(Claims, Entry):
    """scores/<drop>/<model>/: the ledger and work queue of a drop's scoring.

    ``_plans/<n>.json`` (numbered, each created once by a conditional write) split
    the listed objects into shards; a scorer claims a shard with ``_claims/<shard>``
    (conditional create, rewritten by heartbeats, taken over by compare-and-swap once
    unchanged for a claim lifetime), writes its attempt's ``_rejected/<shard>/<attempt>``
    and ``_shards/<shard>/<attempt>`` and last creates ``part-<shard>.parquet``, the
    shard's completion marker, conditionally: the first part wins, and names (in its
    Parquet metadata) the attempt whose side files are the shard's; parts are never
    rewritten. Finishing writes its own ``_generations/<plan>-<claim>/`` (parts without
    superseded rows, ``rejected.parquet``, ``superseded.parquet``) and, by
    compare-and-swap, ``_manifest.json`` last, naming them: readers read what it names.
    """

    drop_id: str = ""
    model_version: str = ""
    MARKER = "_manifest.json"
    PART = re.compile(r"^part-(.+)\.parquet$")
    PLAN = re.compile(r"^_plans/(\d+)\.json$")
    GENERATIONS = "_generations/"

    def generation(self, last_plan: int, claim_id: str) -> str:
        """The folder (relative) of one finisher's outputs for plans up to ``last_plan``."""
        return f"{self.GENERATIONS}{last_plan:08d}-{claim_id}/"

    @staticmethod
    def generation_table(folder: str, what: str) -> str:
        """A finisher's table (``rejected``, ``superseded``) in its folder."""
        return f"{folder}{what}.parquet"

    def stale_generations(self) -> dict[str, list[ObjectInfo]]:
        """Finishers' folders that the newest manifest does not name and that are of an
        older plan than it covers (a lost or lapsed finisher's), with their objects."""
        manifest = self.manifest() or {}
        named = {n for n in [*manifest.get("parts", []), manifest.get("rejected"),
                             manifest.get("superseded")] if n}  # fmt: skip
        last = int(manifest.get("last_plan") or 0)
        found: dict[str, list[ObjectInfo]] = {}
        for o in self.store.list(self.key(self.GENERATIONS)):
            rel = o.key[len(self.prefix) :]
            found.setdefault(rel[: rel.index("/", len(self.GENERATIONS)) + 1], []).append(o)
        return {folder: objects for folder, objects in found.items()
                if int(folder[len(self.GENERATIONS) :].split("-", 1)[0] or 0) < last
                and not any(n.startswith(folder) for n in named)}  # fmt: skip

    def manifest(self) -> dict | None:
        return self.marker()

    def write_manifest(self, manifest: dict) -> None:
        self.put_json(self.MARKER, manifest)

    def manifest_versioned(self) -> tuple[dict, str] | None:
        """(manifest, version token), or None while there is none."""
        return self.versioned(self.MARKER)

    def replace_manifest(self, manifest: dict, token: str | None) -> bool:
        """Write the manifest only if it is still the version ``token`` names (None:
        only if there is none); True if this call wrote it."""
        return self.store.put_if_match(self.key(self.MARKER), json_bytes(manifest), token)

    # plans
    def plans(self) -> dict[int, dict]:
        names = ((m, n) for n in self.names("_plans/") if (m := self.PLAN.match(n)))
        return {int(m.group(1)): self.get_json(n) for m, n in names}

    def create_plan(self, number: int, plan: dict) -> bool:
        return self.store.put_if_absent(self.key(f"_plans/{number:08d}.json"), json_bytes(plan))

    def plan(self, number: int) -> dict:
        return self.get_json(f"_plans/{number:08d}.json")

    @staticmethod
    def shard_name(plan: int, index: int) -> str:
        return f"{plan:08d}-{index:05d}"

    @staticmethod
    def finish_name(last_plan: int) -> str:
        """The claim of the one scorer that finishes the plans up to ``last_plan``."""
        return f"finish-{last_plan:08d}"

    @staticmethod
    def is_finish_name(name: str) -> bool:
        return name.startswith("finish-")

    # a shard: its attempt's rejections and facts, then its part (the completion marker)
    ATTEMPT = b"vggprice.attempt"  # the part's Parquet metadata: the attempt that wrote it

    def done_shards(self) -> set[str]:
        return {m.group(1) for n in self.names("part-") if (m := self.PART.match(n))}

    def part_names(self) -> list[str]:
        return self.names("part-")

    @staticmethod
    def part_name(shard: str) -> str:
        return f"part-{shard}.parquet"

    @staticmethod
    def _rejections_name(shard: str, attempt: str | None) -> str:
        # (None: a part written before parts named their attempt)
        return f"_rejected/part-{shard}.parquet" if attempt is None else \
            f"_rejected/{shard}/{attempt}.parquet"  # fmt: skip

    @staticmethod
    def _facts_name(shard: str, attempt: str | None) -> str:
        return f"_shards/{shard}.json" if attempt is None else f"_shards/{shard}/{attempt}.json"

    def write_shard(
        self, shard: str, attempt: str, prices: pa.Table, rejected: pa.Table, facts: dict
    ) -> bool:
        """The attempt's rejections and facts under its own names, then the part by a
        conditional create that names the attempt. True if this attempt's part is the
        shard's (also when our create was applied and only its answer lost); False if
        another attempt's part was there first: then this attempt's side files go."""
        rejections = self._rejections_name(shard, attempt)
        facts_name = self._facts_name(shard, attempt)
        self.put_bytes(rejections, parquet_bytes(rejected))
        self.put_json(facts_name, facts)
        meta = (prices.schema.metadata or {}) | {self.ATTEMPT: attempt.encode()}
        body = parquet_bytes(prices.replace_schema_metadata(meta))
        if self.store.put_if_absent(self.key(self.part_name(shard)), body):
            return True
        if self.attempt(shard) == attempt:
            return True
        for name in (rejections, facts_name):
            self.store.delete(self.key(name))
        return False

    def attempt(self, shard: str) -> str | None:
        """The attempt whose part is the shard's (None: a part from before attempts)."""
        body = self.get_bytes(self.part_name(shard))
        value = (pq.read_schema(pa.BufferReader(body)).metadata or {}).get(self.ATTEMPT)
        return value.decode() if value else None

    def part(self, shard: str) -> pa.Table:
        return read_parquet(self.get_bytes(f"part-{shard}.parquet"))

    def shard_rejections(self, shard: str, attempt: str | None) -> pa.Table:
        return read_parquet(self.get_bytes(self._rejections_name(shard, attempt)))

    def write_shard_rejections(self, shard: str, attempt: str | None, table: pa.Table) -> None:
        self.put_bytes(self._rejections_name(shard, attempt), parquet_bytes(table))

    def read_tables(self, names: list[str], columns: list[str] | None = None) -> pa.Table | None:
        tables = [read_parquet(self.get_bytes(n), columns) for n in names]
        # parts written before a column existed (engine, precision) read as nulls there
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def prices(self, columns: list[str] | None = None) -> pa.Table | None:
        """The parts the newest manifest names (before a manifest: every part)."""
        return self.read_tables((self.manifest() or {}).get("parts") or self.part_names(), columns)

    def shard_facts(self, attempts: dict[str, str | None] | None = None) -> dict[str, dict]:
        """shard -> the facts of the attempt whose part won (``attempts``: shard ->
        attempt, as ``attempt`` reads them; default: every finished shard)."""
        if attempts is None:
            attempts = {s: self.attempt(s) for s in sorted(self.done_shards())}
        found = {}
        for shard, attempt in attempts.items():
            try:
                found[shard] = self.get_json(self._facts_name(shard, attempt))
            except ObjectNotFound:
                continue
        return found

    def losing_side_files(self) -> list[str]:
        """Side files (rejections, facts) of attempts whose shard's part names another
        attempt: left by a scorer that died after writing them and before its part lost.
        A shard without a part keeps all of its attempts' files."""
        done, winners, found = self.done_shards(), {}, []
        for name in self.names("_rejected/") + self.names("_shards/"):
            shard, _, rest = name.split("/", 1)[1].partition("/")
            if rest and shard in done:
                if shard not in winners:
                    winners[shard] = self.attempt(shard)
                if rest.rsplit(".", 1)[0] != winners[shard]:
                    found.append(name)
        return found

    def named(self, what: str) -> str | None:
        """The file the newest manifest names for ``what`` (rejected, superseded; None:
        none); before manifests named them, ``<what>.parquet``."""
        manifest = self.manifest() or {}
        return manifest.get(what, f"{what}.parquet")

    def rejected(self) -> pa.Table:
        return read_parquet(self.get_bytes(self.named("rejected")))

    def superseded(self) -> pa.Table | None:
        name = self.named("superseded")
        try:
            return read_parquet(self.get_bytes(name)) if name else None
        except ObjectNotFound:
            return None


# --- the catalog ---------------------------------------------------------------------


@dataclass(frozen=True)
class Lake:
    """The entries of one store."""

    store: Store

    DATASETS = "datasets/fashion-mnist/"
    CATALOGS = "datasets/catalog/"
    DROPS = "drops/"
    LINES = "registry/lines/"

    @property
    def uri(self) -> str:
        return self.store.uri

    def dataset(self, version: str) -> CatalogDataset:
        """A Fashion-MNIST dataset version, or a catalog's (``cat-<name>-<hash>``)."""
        if version.startswith("cat-"):
            return self.catalog(version)
        return DemoDataset(self.store, f"{self.DATASETS}{version}/", version)

    def catalog(self, version: str) -> CatalogDataset:
        name = line_of(version)
        return CatalogDataset(self.store, f"{self.CATALOGS}{name}/{version}/", version)

    def catalog_pixels(self, name: str) -> CatalogPixels:
        return CatalogPixels(self.store, f"{self.CATALOGS}{check_line_name(name)}/_pixels/")

    def labels(self, dataset: str, version: str) -> Labels:
        return Labels(self.store, f"labels/{dataset}/{version}/", dataset, version)

    def features(self, key: str) -> FeatureCache:
        return FeatureCache(self.store, f"features/{key}/", key)

    def shard_features(self, key: str) -> ShardFeatures:
        return ShardFeatures(self.store, f"features/{key}/", key)

    def model(self, version: str) -> Model:
        return Model(self.store, f"models/{version}/", version)

    def registry(self, line: str = DEMO_LINE) -> Registry:
        """A model line's champion and decisions: the demo's under registry/, a
        catalog's under registry/lines/<name>/."""
        if line == DEMO_LINE:
            return Registry(self.store, "registry/")
        return Registry(self.store, f"{self.LINES}{check_line_name(line)}/")

    def champions(self) -> dict[str, dict]:
        """line -> its champion, for the lines that have one, the demo first."""
        found = {line: self.registry(line).champion()
                 for line in [DEMO_LINE, *self._children(self.LINES)]}  # fmt: skip
        return {line: champion for line, champion in found.items() if champion}

    def lines(self) -> list[str]:
        """The model lines that have a champion, the demo first."""
        return list(self.champions())

    def score_run(self, drop_id: str, model_version: str) -> ScoreRun:
        return ScoreRun(self.store, f"scores/{drop_id}/{model_version}/", drop_id, model_version)

    def score_runs(self) -> list[ScoreRun]:
        return [self.score_run(d, m) for d in self._children("scores/")
                for m in self._children(f"scores/{d}/")]  # fmt: skip

    def claim_holders(self) -> list[Claims]:
        """Every entry whose workers share work by claims: score runs, feature caches."""
        return [*self.score_runs(), *map(self.shard_features, self._children("features/"))]

    def drop(self, drop_id: str) -> DropSource:
        return DropSource(self.store, f"{self.DROPS}{drop_id}/", drop_id)

    DROP_READY = ".ready"  # drops/<drop>/.ready: "complete, price it now" (hidden: not priced)

    def drops_prefix(self) -> str:
        """Where drops land (what a bucket notification filters on, under the store)."""
        return self.DROPS

    def drop_of_key(self, key: str) -> tuple[str, bool] | None:
        """For a key of this store: (the drop it is in, whether it is the drop's ready
        marker), or None for a key that is in no drop (elsewhere in the lake, or an object
        right under drops/)."""
        if not key.startswith(self.DROPS):
            return None
        drop_id, sep, name = key[len(self.DROPS) :].partition("/")
        if not drop_id or not sep or not name:
            return None
        return drop_id, name == self.DROP_READY

    def drop_ready_key(self, drop_id: str) -> str:
        """The drop's ready marker, relative to the store."""
        return f"{self.DROPS}{drop_id}/{self.DROP_READY}"

    # what the lake holds (for listings and for error messages that name the known)
    def _children(self, prefix: str, depth: int = 0) -> list[str]:
        names = {k[len(prefix) :].split("/")[depth] for k in self.store.keys(prefix)}
        return sorted(names - {""})  # a bare folder marker names nothing

    def dataset_versions(self) -> list[str]:
        demo = [v for v in self._children(self.DATASETS) if self.dataset(v).complete]
        return demo + self.catalog_versions()

    def catalog_versions(self, name: str | None = None) -> list[str]:
        names = [name] if name else self._children(self.CATALOGS)
        found = [v for n in names for v in self._children(f"{self.CATALOGS}{n}/")
                 if not v.startswith("_")]  # fmt: skip
        return [v for v in found if self.catalog(v).complete]

    def by_content(self, dataset_version: str) -> bool:
        """Whether a dataset is stored by content (an index over pixel shards): every
        catalog and demo version but those stored before."""
        return "index" in self.dataset(dataset_version).manifest()

    def newest_catalog(self, name: str) -> CatalogDataset | None:
        """The catalog's most recently made version that has an index, or None."""
        found = [(m.get("created_at", ""), v) for v in self.catalog_versions(name)
                 if "index" in (m := self.catalog(v).manifest())]  # fmt: skip
        return self.catalog(max(found)[1]) if found else None

    def labels_versions(self, dataset: str) -> list[str]:
        return self._children(f"labels/{dataset}/")

    def model_versions(self) -> list[str]:
        return [v for v in self._children("models/") if self.model(v).complete]

    def drop_ids(self) -> list[str]:
        """The folder names under drops/, as listed (one folder listing): not every one
        is a drop name (``tasks.scoring.runner.drop_name_problem``)."""
        return self.store.list_folders(self.DROPS)
