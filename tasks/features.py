"""The frozen-feature cache: frozen VGG16 layers are a pure function of the image.

Their outputs are computed once per (images, base weights, input size, cut
layer, precision, views) and kept under ``features/<key>/``; training then fits
only the unfrozen top. Random shifts cannot be cached per batch, so the cache
holds a fixed number of pre-augmented views per train image: view 0 is the
image, view 1 its horizontal flip, views 2.. a seeded random shift (+ flip).
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from tasks.runtime import get_logger
from tasks.storage import ObjectNotFound, Store, features_prefix

FORMAT = 1
DTYPE = np.float16  # half the bytes; bf16 features lose nothing more by it


def feature_key(
    dataset_version: str,
    subset: dict,
    weights_id: str,
    input_size: int,
    cut: int,
    precision: str,
    views: dict,
) -> str:
    spec = {
        "format": FORMAT,
        "dataset": dataset_version,
        "subset": subset,
        "weights": weights_id,
        "input_size": input_size,
        "cut": cut,
        "precision": precision,
        "views": views,
    }
    return "ft-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def shift_image_batch(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Integer pixel shifts with edge ('nearest') fill, per image."""
    n, h, w = images.shape
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
    n, h, w = images.shape
    my, mx = round(shift * h), round(shift * w)
    out = shift_image_batch(
        images, rng.integers(-my, my + 1, size=n), rng.integers(-mx, mx + 1, size=n)
    )
    if flip:
        flips = rng.random(n) < 0.5
        out[flips] = out[flips, :, ::-1]
    return out


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def _stacked(n: int, arrays) -> np.ndarray:
    """np.stack of ``n`` equal-shape arrays, filled in place as they come: the views
    are never held twice."""
    out = None
    for i, a in enumerate(arrays):
        if out is None:
            out = np.empty((n, *a.shape), a.dtype)
        out[i] = a
    return out


def extract(frozen, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Frozen-layer outputs for uint8 (n, 28, 28) images, as float16."""
    out = frozen.predict(images[..., None], batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=DTYPE)


def load_or_extract(
    store: Store,
    key: str,
    frozen,
    train_images: np.ndarray,
    test_images: np.ndarray,
    n_views: int,
    shift: float,
    flip: bool,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train features [views, n, ...], test features [n, ...], cache hit)."""
    prefix = features_prefix(key)
    log = get_logger()
    try:
        manifest = store.get_json(prefix + "manifest.json")
        keys = manifest["train"]
        train = _stacked(len(keys), (_load_npy(store.get_bytes(k)) for k in keys))
        test = _load_npy(store.get_bytes(manifest["test"]))
        log.info("feature cache hit: %s (%s)", key, "x".join(map(str, train.shape)))
        return train, test, True
    except ObjectNotFound:
        pass
    log.info("feature cache miss: extracting %d views of %d images", n_views, len(train_images))
    keys = [f"{prefix}train-view-{v}.npy" for v in range(n_views)]

    def views():
        for v, view_key in enumerate(keys):
            feats = extract(frozen, augment_view(train_images, v, shift, flip, seed))
            store.put_bytes(view_key, _npy(feats))
            yield feats

    train = _stacked(n_views, views())
    test = extract(frozen, test_images)
    store.put_bytes(prefix + "test.npy", _npy(test))
    store.put_json(
        prefix + "manifest.json",
        {"key": key, "train": keys, "test": prefix + "test.npy", "shape": list(test.shape[1:])},
    )
    return train, test, False
