"""VGG16's base weights: where they come from, what they are (a hash), and loading them.

Sources: ``imagenet`` (Keras's download, cached by Keras), ``none`` (random
initialisation, seeded), or a path / ``s3://`` URI of a no-top ``.h5`` /
``.weights.h5`` file, downloaded once per machine into the cache directory and
checked against ``weights_sha256`` when given.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np

from tasks.model.train_settings import TrainSettings
from tasks.runtime import seeded
from tasks.settings import load_settings
from tasks.store.storage import ObjectNotFound, open_object, sha256_file


class WeightsError(ValueError):
    """The base weights cannot be had or do not fit; the message says which and why."""


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a weights file, once per content stamp (identity and load both need it)."""
    return sha256_file(path)


def fetch_weights(source: str, expected_sha256: str | None = None) -> tuple[Path | None, str]:
    """(local file or None, identity) for a weights source."""
    if source in ("none", "imagenet"):
        return None, source
    if source.startswith("s3://"):
        name = hashlib.sha256(source.encode()).hexdigest()[:16]
        local = load_settings().cache_dir / "weights" / name / Path(source).name
        if not local.is_file():
            store, key = open_object(source)
            try:
                store.get_file(key, local)
            except ObjectNotFound:
                raise WeightsError(f"{source}: no such weights file") from None
    else:
        local = Path(source).expanduser()
        if not local.is_file():
            raise WeightsError(f"{source}: no such weights file")
    digest = _file_digest(str(local), *_stamp(local))
    if expected_sha256 and digest != expected_sha256.lower():
        if source.startswith("s3://"):
            shutil.rmtree(local.parent, ignore_errors=True)  # fetch again next time
        raise WeightsError(
            f"{source}: SHA-256 {digest} does not match the expected {expected_sha256}"
        )
    return local, digest


def weights_identity(settings: TrainSettings) -> str:
    """What the base weights are, for cache keys and model versions."""
    if settings.weights == "none":
        return f"none:seed={settings.seed}"
    if settings.weights == "imagenet":
        return "imagenet:keras-vgg16-notop"
    return "sha256:" + fetch_weights(settings.weights, settings.weights_sha256)[1]


def seeded_init(layers, seed: int) -> None:
    """Give each Conv2D and Dense layer of ``layers`` Keras's default initial values
    (Glorot-uniform kernel, zero bias), drawn from a NumPy generator seeded by ``seed``
    and the layer's name: the same weights in any process or thread. Keras draws each
    initializer's seed from Python's global random state, which any other thread of the
    process (a Dask worker's, a Prefect task runner's) may draw from meanwhile, so two
    extractors of one feature spec could otherwise hold different random layers."""
    import keras

    for layer in layers:
        if not isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            continue
        kernel, *rest = layer.get_weights()
        receptive = int(np.prod(kernel.shape[:-2]))  # 1 for a Dense kernel
        fan_in, fan_out = kernel.shape[-2] * receptive, kernel.shape[-1] * receptive
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        rng = np.random.default_rng([seed, zlib.crc32(layer.name.encode())])
        drawn = rng.uniform(-limit, limit, kernel.shape).astype(kernel.dtype)
        layer.set_weights([drawn, *(np.zeros_like(w) for w in rest)])


def build_vgg(settings: TrainSettings):
    """VGG16 without top, with the configured base weights loaded (random ones seeded)."""
    import keras

    shape = (settings.input_size, settings.input_size, 3)
    if settings.weights == "imagenet":
        try:
            return keras.applications.VGG16(
                include_top=False, weights="imagenet", input_shape=shape
            )
        except Exception as err:
            raise WeightsError(
                f"cannot load the imagenet weights for VGG16 ({type(err).__name__}: {err}); "
                "without network access use weights=<path or s3:// URI of a .h5 file> "
                "or weights=none"
            ) from None
    with seeded(settings.seed):
        vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
    path, _ = fetch_weights(settings.weights, settings.weights_sha256)
    if path is None:  # weights=none; a file's weights replace every layer's below
        seeded_init(vgg.layers, settings.seed)
    else:
        try:
            with warnings.catch_warnings():
                # Keras only warns when a file's layers do not match; a half-loaded
                # base would train on silently random layers, so it is an error here.
                warnings.simplefilter("error")
                vgg.load_weights(path)
        except Exception as err:
            raise WeightsError(
                f"{settings.weights}: not VGG16 (no top) weights: {type(err).__name__}: {err}"
            ) from None
    return vgg
