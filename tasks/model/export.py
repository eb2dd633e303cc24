"""The stored model: export from the trained graphs (checked), load for scoring at a
precision, a local cache of model files, and prices from pixels."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from tasks.data.images import GRAY28, SIZE, model_input
from tasks.model.graphs import build_inference
from tasks.model.train_settings import TrainSettings
from tasks.model.verified_cache import CacheError, ensure
from tasks.runtime import keras_precision
from tasks.settings import load_settings
from tasks.store.lake import Model, digest


class ExportError(RuntimeError):
    """The stored model would not hold the trained weights; the message names the layer."""


def resolve_precision(precision: str) -> str:
    """auto: bfloat16 on CPUs with AVX512-BF16/AMX, float16 on GPUs, else float32."""
    if precision != "auto":
        return precision
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "mixed_bfloat16"
    return "float32"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {w for line in text.splitlines() if line.startswith("flags") for w in line.split()}


def precision_reason(precision: str) -> str:
    """The precision, and why it is the one this machine picks (or that it was set)."""
    if precision != resolve_precision("auto"):
        return f"{precision} (as set; this machine would pick {resolve_precision('auto')})"
    if precision == "mixed_float16":
        return "mixed_float16: a GPU"
    bf16 = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if precision == "mixed_bfloat16":
        return f"mixed_bfloat16: this CPU has {' and '.join(f.upper() for f in bf16)}"
    return ("float32: this CPU has no AVX512-BF16 or AMX (bfloat16 would be emulated, "
            "slower)")  # fmt: skip


def hardware() -> dict:
    import platform

    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "gpus": gpus}


def export_model(settings: TrainSettings, trained: list, scaling: dict):
    """The float32 model to store. Every layer with weights gets them from the trained
    layer of the same name and shapes, and every trained layer is used; else
    ExportError names the layer (a layer left at its random start would be silent)."""
    model = build_inference(settings, scaling, "float32")
    source = {}
    for m in trained:
        if m is not None:
            source.update({layer.name: layer for layer in m.layers if layer.weights})
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in source:
            raise ExportError(f"export: layer {layer.name!r} has no trained counterpart")
        weights = source[layer.name].get_weights()
        shapes = [tuple(w.shape) for w in weights]
        if shapes != [tuple(w.shape) for w in layer.weights]:
            raise ExportError(
                f"export: layer {layer.name!r} has weights {shapes} in training but "
                f"{[tuple(w.shape) for w in layer.weights]} in the stored model"
            )
        layer.set_weights([np.asarray(w, dtype="float32") for w in weights])
        used.add(layer.name)
    if unused := sorted(set(source) - used):
        raise ExportError(f"export: trained layers {unused} are not in the stored model")
    return model


def load_inference_model(path: Path, config: dict, precision: str = "auto"):
    """A stored model.keras for scoring: as stored in float32, or rebuilt at a lower
    precision (bfloat16 on AMX CPUs, float16 on GPUs) with the stored weights."""
    import keras

    precision = resolve_precision(precision)
    if precision == "float32":
        with keras_precision("float32"):
            return keras.models.load_model(path, safe_mode=True)
    model = build_inference(TrainSettings(**config["settings"]), config["scaling"], precision)
    model.load_weights(path)
    return model


def cached_model_file(model: Model) -> Path:
    """model.keras on this machine, under the cache directory, keyed by the store and
    the file's content hash (recorded in lineage.json): one store's model is never
    taken for another's. The local copy is checked before every use
    (``verified_cache``: against lineage.json's hash) and fetched again when it differs.
    The file is the one lineage.json publishes (its attempt's)."""
    lineage = model.lineage()
    files = model.files(lineage)
    sha = lineage.get("model_sha256")
    if sha is None:  # written before hashes were recorded: key by the listed ETag
        sha = digest(files.file_info().etag, 64)
    where = f"{digest(model.store.uri)}/{model.version}-{sha[:16]}"
    folder = load_settings().cache_dir / "models" / where
    expected = {model.FILE: sha} if "model_sha256" in lineage else None
    try:
        ensure(folder, lambda new: files.download(new / model.FILE), expected)
    except CacheError as err:
        raise ExportError(f"{files.file_uri()}: content does not match lineage.json") from err
    return folder / model.FILE


_MODELS: OrderedDict[tuple, tuple] = OrderedDict()
_MODELS_LOCK = threading.Lock()
MODELS_KEPT = 4  # a long-lived worker that scores for many stores keeps its memory bounded


def get_model(model: Model, precision: str = "auto") -> tuple:
    """(keras model, config, predict lock), loaded once per process, store, model
    version and precision; the least recently used beyond MODELS_KEPT are let go."""
    key = (model.store.uri, model.version, precision)
    with _MODELS_LOCK:
        if key not in _MODELS:
            config = model.config()
            net = load_inference_model(cached_model_file(model), config, precision)
            _MODELS[key] = (net, config, threading.Lock())
            while len(_MODELS) > MODELS_KEPT:
                _MODELS.popitem(last=False)
        _MODELS.move_to_end(key)
        return _MODELS[key]


def predict_prices(model, pixels: np.ndarray, batch_size: int = 256, lock=None) -> np.ndarray:
    """Prices for prepared uint8 images: gray (n, 28, 28) or RGB (n, s, s, 3). Padded to
    whole batches: one traced shape, no retracing for every ragged end. One predict at a
    time per model."""
    n = len(pixels)
    if n == 0:
        return np.zeros(0)
    padded = np.zeros(
        ((n + batch_size - 1) // batch_size * batch_size, *pixels.shape[1:]), np.uint8
    )
    padded[:n] = pixels
    with lock or threading.Lock():
        out = model.predict(model_input(padded), batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=np.float64).reshape(-1)[:n]


def preprocess_of(config: dict) -> tuple[str, int]:
    """(mode, size) a stored model was trained with; models from before modes: gray28."""
    p = config.get("preprocess") or {"mode": GRAY28, "size": SIZE}
    return p["mode"], int(p["size"])


def load_stored_model(model: Model):
    """The stored model.keras as it is (float32), loaded with safe_mode=True: no
    vggprice code needed."""
    import keras

    with keras_precision("float32"):
        return keras.models.load_model(cached_model_file(model), safe_mode=True)
