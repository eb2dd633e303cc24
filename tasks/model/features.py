"""The frozen-feature cache: frozen VGG16 layers are a pure function of the image.

Their outputs are computed once per (images, base weights, input size, cut
layer, precision, views) and kept under ``features/<key>/``; training then fits
only the unfrozen top. Random shifts cannot be cached per batch, so the cache
holds a fixed number of pre-augmented views per train image: view 0 is the
image, view 1 its horizontal flip, views 2.. a seeded random shift (+ flip).

A catalog's features are kept per pixel shard instead (``extract_shards``): a shard is
content-addressed and shared by every version that holds it, so a grown catalog
extracts only its new shards, and a price change none; training then reads them as
streams (``ShardStream``), a few shards at a time. Each image's random
views are then seeded by its content id, never by its place in a batch, so a version
built incrementally gets the same features as one built from scratch.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from tasks.data.images import GRAY28, model_input, prepare_batch
from tasks.data.loading import group_by_shard, pixel_means
from tasks.runtime import ProgressLog, get_logger, progress
from tasks.settings import load_settings
from tasks.store.claims import ClaimWatch, Lease, work_in_turn, worker_name
from tasks.store.lake import CatalogPixels, FeatureCache, ShardFeatures, feature_key

DTYPE = np.float16  # half the bytes; bf16 features lose nothing more by it


@dataclass(frozen=True)
class ViewRecipe:
    """How the cached train views are made: view 0 as is, 1 flipped, then shifted."""

    n: int
    shift: float
    flip: bool
    seed: int


@dataclass(frozen=True)
class FeatureSpec:
    """Everything the frozen-layer outputs depend on (with the code: see lake.feature_key)."""

    dataset_version: str
    subset: dict
    weights: str
    input_size: int
    preprocess: str
    cut: int
    precision: str
    views: ViewRecipe
    engine: str = "keras"  # what computed them: caches of different engines never mix

    def key(self) -> str:
        spec = asdict(self)
        spec["views"] = {k: spec["views"][k] for k in ("n", "shift", "flip")}
        if spec["engine"] == "keras":  # the keys as they were before engines
            del spec["engine"]
        if spec["preprocess"] == GRAY28:  # the demo's keys as they were before modes
            del spec["preprocess"]
        return feature_key(spec)


def shift_image_batch(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Integer pixel shifts with edge ('nearest') fill, per image."""
    n, h, w = images.shape[:3]
    rows = np.clip(np.arange(h)[None, :] - dy[:, None], 0, h - 1)
    cols = np.clip(np.arange(w)[None, :] - dx[:, None], 0, w - 1)
    return images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def content_seeds(content_ids: list[str]) -> list[int]:
    """A seed per image from its content id (its random views follow it anywhere)."""
    return [int.from_bytes(hashlib.sha256(c.encode()).digest()[:8], "big") for c in content_ids]


def augment_view(
    images: np.ndarray, view: int, shift: float, flip: bool, seed: int,
    image_seeds: list[int] | None = None,
) -> np.ndarray:  # fmt: skip
    """View 0: as is. View 1: flipped (if flip). Later views: seeded shift, random flip;
    drawn per image from ``image_seeds`` when given, else for the batch."""
    if view == 0:
        return images
    if view == 1 and flip:
        return images[:, :, ::-1]
    n, h, w = images.shape[:3]
    my, mx = round(shift * h), round(shift * w)
    if image_seeds is None:
        rng = np.random.default_rng([seed, view])
        dy, dx = rng.integers(-my, my + 1, size=n), rng.integers(-mx, mx + 1, size=n)
        flips = rng.random(n) < 0.5
    else:
        draws = [np.random.default_rng([seed, view, s]) for s in image_seeds]
        dy = np.array([r.integers(-my, my + 1) for r in draws], dtype=np.int64)
        dx = np.array([r.integers(-mx, mx + 1) for r in draws], dtype=np.int64)
        flips = np.array([r.random() < 0.5 for r in draws], dtype=bool)
    out = shift_image_batch(images, dy, dx)
    if flip:
        out[flips] = out[flips, :, ::-1]
    return out


def _stacked(n: int, arrays) -> np.ndarray:
    """np.stack of ``n`` equal-shape arrays, filled in place as they come: the views
    are never held twice."""
    out = None
    for i, a in enumerate(arrays):
        if out is None:
            out = np.empty((n, *a.shape), a.dtype)
        out[i] = a
    return out


def extract(
    frozen, images: np.ndarray, batch_size: int = 128, log: ProgressLog | None = None
) -> np.ndarray:
    """Frozen-layer outputs for prepared uint8 images, as float16, in chunks of whole
    batches (the same batches as one predict) so that ``log`` hears of each chunk."""
    chunk = batch_size * 8
    parts = []
    for start in range(0, max(len(images), 1), chunk):
        part = frozen.predict(model_input(images[start : start + chunk]), batch_size=batch_size,
                              verbose=0)  # fmt: skip
        parts.append(np.asarray(part, dtype=DTYPE))
        if log is not None:
            log.advance(len(part))
    return np.concatenate(parts)


def load_or_extract(
    cache: FeatureCache,
    frozen,
    train_images: np.ndarray,
    test_images: np.ndarray,
    views: ViewRecipe,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train features [views, n, ...], test features [n, ...], cache hit)."""
    log = get_logger()
    hit = cache.load()
    if hit is not None:
        loaded, n, test = hit
        train = _stacked(n, loaded)
        log.info("feature cache hit: %s (%s)", cache.cache_key, "x".join(map(str, train.shape)))
        return train, test, True
    log.info("feature cache miss: extracting %d views of %d images", views.n, len(train_images))
    names: list[str] = []

    bar = progress(views.n + 1, "frozen features", "view")
    total = views.n * len(train_images) + len(test_images)
    lines = ProgressLog("frozen features", total, "images", enabled=bar.disable)

    def extracted():
        for v in range(views.n):
            feats = extract(
                frozen, augment_view(train_images, v, views.shift, views.flip, views.seed),
                log=lines,
            )  # fmt: skip
            names.append(cache.write_view(v, feats))
            bar.update()
            yield feats

    train = _stacked(views.n, extracted())
    test = extract(frozen, test_images, log=lines)
    bar.update()
    bar.close()
    cache.write(names, test)
    return train, test, False


def shard_views(
    pixels: CatalogPixels, shard: str, frozen, views: ViewRecipe, mode: str, size: int,
    log: ProgressLog | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Every view of every row of one pixel shard, (views, rows, ...) float16 (zeros for
    a row whose file was rejected: no version reads it), and each row's pixel mean. A
    shard that is test images for good (its marker says so: the demo's) gets view 0
    alone: only validation reads it."""
    table = pixels.table(shard)
    if pixels.shard(shard).get("split") == "test":
        views = replace(views, n=1)
    blobs, seeds = table["image"].to_pylist(), content_seeds(table["content_id"].to_pylist())
    ok = [i for i, b in enumerate(blobs) if b is not None]
    images = prepare_batch([blobs[i] for i in ok], mode, size)
    means = np.zeros(len(blobs), np.float64)
    means[ok] = pixel_means(images)
    out = None
    for v in range(views.n):
        feats = extract(frozen, augment_view(images, v, views.shift, views.flip, views.seed,
                                             [seeds[i] for i in ok]), log=log)  # fmt: skip
        if out is None:
            out = np.zeros((views.n, len(blobs), *feats.shape[1:]), DTYPE)
        out[v, ok] = feats
    return out, means


def extract_work(
    cache: ShardFeatures, pixels: CatalogPixels, frozen, shards: list[str], views: ViewRecipe,
    mode: str, size: int, *, claim_seconds: float, start: int = 0,
    log: ProgressLog | None = None, watch: ClaimWatch | None = None,
) -> list[str]:  # fmt: skip
    """One extractor, the scorers' loop (``tasks.scoring.shard.work``) over feature
    shards: claim each named shard that has no features yet, extract it, store it by a
    conditional create and release it, until none is left unclaimed; returns the shards
    it stored. A shard another extractor holds is left to it. ``start`` spreads
    extractors over the list; ``watch``: what this process saw of other claims (tests)."""
    worker = worker_name()
    done = cache.done(shards)
    stored = []

    def one(shard: str, lease: Lease) -> None:
        features, means = shard_views(pixels, shard, frozen, views, mode, size, log)
        lease.check()
        if cache.write(shard, features, means):
            stored.append(shard)
        else:
            get_logger().warning("%s: features of shard %s were stored by another extractor "
                                 "first; ours are dropped", worker, shard)  # fmt: skip

    work_in_turn(cache, [s for s in shards if s not in done], worker, claim_seconds,
                 lambda s: cache.exists(cache.name(s)), one, start, watch, "feature shard",
                 "extractor")  # fmt: skip
    return stored


def extract_shards(
    cache: ShardFeatures, pixels: CatalogPixels, frozen, shards: list[str], views: ViewRecipe,
    mode: str, size: int, claim_seconds: float | None = None,
) -> dict:  # fmt: skip
    """Features for every shard named that has none yet under this spec, one shard in
    memory at a time, through claims: other trainings or extractors of the same line may
    work on the same shards at once, and each shard is computed once. Waits for shards
    that live extractors hold, and takes over a shard whose claim has not changed for
    ``claim_seconds`` (default: settings ``extract_claim_seconds``: a dead extractor's).
    Returns how many shards and images were new under this spec, and how many of those
    shards this call extracted."""
    claim_seconds = claim_seconds or load_settings().extract_claim_seconds
    logger = get_logger()
    done = cache.done(shards)
    missing = [s for s in shards if s not in done]
    markers = {s: pixels.shard(s) for s in missing}
    rows = {s: len(m["ids"]) for s, m in markers.items()}
    forwards = sum(n * (1 if markers[s].get("split") == "test" else views.n)
                   for s, n in rows.items())  # fmt: skip
    lines = ProgressLog("frozen features", forwards, "images")
    if missing:
        logger.info("frozen features: %d of %d pixel shards new (%d images; %d views of a "
                    "train image: %d passes)", len(missing), len(shards), sum(rows.values()),
                    views.n, forwards)  # fmt: skip
    here, waiting = [], False
    while True:
        here += extract_work(cache, pixels, frozen, missing, views, mode, size,
                             claim_seconds=claim_seconds, log=lines)  # fmt: skip
        left = [s for s in missing if s not in cache.done(missing)]
        if not left:
            break
        if not waiting:
            held = sorted({c["owner"] for n, c in cache.claims().items() if n in left})
            logger.info("frozen features: %d shards held by other extractors (%s); waiting "
                        "for them (a claim unchanged for %g s is taken over)", len(left),
                        ", ".join(held) or "just released", claim_seconds)  # fmt: skip
            waiting = True
        time.sleep(min(claim_seconds / 3, 2.0))
    return {"shards": len(shards), "extracted_shards": len(missing),
            "extracted_images": sum(rows.values()), "extracted_here": len(here)}  # fmt: skip


class ShardStream:
    """Batches of (features, scaled price) of one split, read from its pixel shards'
    feature arrays (memory-mapped local copies), in bounded memory: at most ``window``
    shards' rows of one view are gathered at a time.

    The order is seeded and deterministic for a version: each epoch draws, from
    (seed, epoch), an order of the shards, one view per image, and a shuffle of the
    rows of each window of shards; a resumed run draws the same. Without ``shuffle``
    (validation) shards and rows come in a fixed order, view 0."""

    def __init__(self, cache: ShardFeatures, at: list[tuple[str, int]], y: np.ndarray,
                 views: int, directory: str, window: int = 4):  # fmt: skip
        self.cache, self.y, self.views, self.directory = cache, y, views, directory
        self.groups = group_by_shard(at)
        self.shards = sorted(self.groups)
        self.window = window
        self.shape = self._open(self.shards[0]).shape[2:] if self.shards else ()

    def _open(self, shard: str) -> np.ndarray:
        return self.cache.open(shard, self.directory)

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = False):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.shards)) if shuffle else range(len(self.shards))
        order = [self.shards[i] for i in order]
        carry_x, carry_y = None, None
        for start in range(0, len(order), self.window):
            xs, ys = [], []
            for shard in order[start : start + self.window]:
                positions, rows = self.groups[shard]
                array = self._open(shard)
                if shuffle and self.views > 1:
                    view = rng.integers(0, self.views, size=len(rows))
                    xs.append(np.asarray(array[view, rows]))
                else:
                    xs.append(np.asarray(array[0, rows]))
                ys.append(self.y[positions])
            x, y = np.concatenate(xs), np.concatenate(ys)
            if shuffle:
                perm = rng.permutation(len(y))
                x, y = x[perm], y[perm]
            if carry_x is not None:
                x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
            whole = len(y) // batch_size * batch_size
            for b in range(0, whole, batch_size):
                yield x[b : b + batch_size], y[b : b + batch_size]
            carry_x, carry_y = (x[whole:], y[whole:]) if whole < len(y) else (None, None)
        if carry_x is not None and len(carry_y):
            yield carry_x, carry_y

    def nbytes(self) -> int:
        """What the split's rows of every view take gathered in memory."""
        return self.views * len(self.y) * int(np.prod(self.shape)) * np.dtype(DTYPE).itemsize

    def gather(self) -> np.ndarray:
        """Every view of the split's rows, (views, rows, ...) in the split's order: for a
        split small enough to batch from memory (``nbytes``)."""
        out = np.zeros((self.views, len(self.y), *self.shape), DTYPE)
        for shard in self.shards:
            positions, rows = self.groups[shard]
            out[:, positions] = self._open(shard)[: self.views][:, rows]
        return out

    def means(self) -> np.ndarray:
        """Each image's pixel mean, in the split's order (for the drift statistics)."""
        out = np.zeros(len(self.y), np.float64)
        for shard in self.shards:
            positions, rows = self.groups[shard]
            out[positions] = self.cache.means(shard)[rows]
        return out
