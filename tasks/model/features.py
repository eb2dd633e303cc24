"""The frozen-feature cache: frozen VGG16 layers are a pure function of the image.

Their outputs are computed once per (images, base weights, input size, cut
layer, precision, views) and kept under ``features/<key>/``; training then fits
only the unfrozen top. Random shifts cannot be cached per batch, so the cache
holds a fixed number of pre-augmented views per train image: view 0 is the
image, view 1 its horizontal flip, views 2.. a seeded random shift (+ flip).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tasks.data.images import GRAY28, model_input
from tasks.runtime import ProgressLog, get_logger, progress
from tasks.store.lake import FeatureCache, feature_key

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

    def key(self) -> str:
        spec = asdict(self)
        spec["views"] = {k: spec["views"][k] for k in ("n", "shift", "flip")}
        if spec["preprocess"] == GRAY28:  # the demo's keys as they were before modes
            del spec["preprocess"]
        return feature_key(spec)


def shift_image_batch(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Integer pixel shifts with edge ('nearest') fill, per image."""
    n, h, w = images.shape[:3]
    rows = np.clip(np.arange(h)[None, :] - dy[:, None], 0, h - 1)
    cols = np.clip(np.arange(w)[None, :] - dx[:, None], 0, w - 1)
    return images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment_view(images: np.ndarray, view: int, shift: float, flip: bool, seed: int) -> np.ndarray:
    """View 0: as is. View 1: flipped (if flip). Later views: seeded shift, random flip."""
    if view == 0:
        return images
    if view == 1 and flip:
        return images[:, :, ::-1]
    rng = np.random.default_rng([seed, view])
    n, h, w = images.shape[:3]
    my, mx = round(shift * h), round(shift * w)
    out = shift_image_batch(
        images, rng.integers(-my, my + 1, size=n), rng.integers(-mx, mx + 1, size=n)
    )
    if flip:
        flips = rng.random(n) < 0.5
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
