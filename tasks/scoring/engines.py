"""Scoring engines: which runtime prices the pixels, at which precision.

- ``keras``: the stored model.keras in Keras (float32, or rebuilt at bfloat16 / float16
  with its weights: ``export.load_inference_model``);
- ``openvino``: the same model converted by ``openvino.convert_model`` from the loaded
  Keras model (its pre-processing layers included, so it takes the same uint8 pixels),
  compiled for the CPU with the THROUGHPUT hint; ``float32`` and ``bf16`` set OpenVINO's
  inference precision hint, ``int8`` runs the model's int8 artifact (below).

**The int8 artifact** is derived once per model version: NNCF's accuracy-controlled
post-training quantization (``nncf.quantize_with_accuracy_control``), calibrated on a
seeded sample of the model's train split and validated on its test split with RMSE in
price units. The gate allows the larger of ``int8_max_drop_fraction`` of float32's RMSE
and ``int8_max_drop_price`` (``ScoreOptions``; default +2 % or +0.5), measured here on
the same images for both precisions. The files and ``gate.json`` (hashes, both RMSEs,
the verdict) go to ``lake.EngineFiles``, published by a conditional create: makers that
race both quantize, one publishes, every scorer uses the published one. A model whose
int8 failed its gate is never scored in int8: the scorer says so in one log line and
uses float32.

``auto`` picks per worker: Keras on a GPU; else OpenVINO, in int8 when the model's int8
artifact exists and passed its gate, else float32 (``auto`` never quantizes: asking for
``int8`` once makes the artifact).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.images import model_input
from tasks.model.export import (
    MODELS_KEPT,
    cached_model_file,
    get_model,
    load_stored_model,
    predict_prices,
    preprocess_of,
    resolve_precision,
)
from tasks.runtime import get_logger
from tasks.settings import load_settings
from tasks.store.lake import Lake, Model
from tasks.store.storage import sha256_file

ENGINES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "float32", "bf16", "int8")
KERAS_PRECISION = {"float32": "float32", "bf16": "mixed_bfloat16", "float16": "mixed_float16"}
_OV_HINT = {"float32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the rest in f32
CALIBRATION_BATCH = 32
SEED = 0


class EngineError(ValueError):
    """An engine or precision that cannot score (the message says what to use)."""


@dataclass
class Engine:
    """One loaded model, ready to price prepared pixels; ``engine`` and ``precision``
    are what every row it prices records."""

    engine: str
    precision: str
    net: Any
    config: dict
    lock: threading.Lock = field(default_factory=threading.Lock)

    def predict(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        if self.engine == "keras":
            return predict_prices(self.net, pixels, batch_size, self.lock)
        with self.lock:
            return ov_predict(self.net, pixels, batch_size)


def _normal(precision: str) -> str:
    """The public name of a precision (Keras's policy names are accepted too)."""
    return {"mixed_bfloat16": "bf16", "mixed_float16": "float16"}.get(precision, precision)


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def check(engine: str, precision: str) -> None:
    """EngineError (one line: what to use instead) for a choice that cannot score."""
    precision = _normal(precision)
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if precision not in (*PRECISIONS, "float16"):
        raise EngineError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if engine == "keras" and precision == "int8":
        raise EngineError("the keras engine has no int8: use --engine openvino (or auto)")
    if engine == "openvino" and precision == "float16":
        raise EngineError("the openvino engine scores on the CPU: use float32, bf16 or int8")


def requested(engine: str, precision: str, gpu: bool | None = None) -> tuple[str, str]:
    """(engine, precision) asked for, ``auto`` resolved except OpenVINO's precision
    (which depends on the model's int8 gate): Keras on a GPU (int8 is OpenVINO's), else
    OpenVINO."""
    check(engine, precision)
    precision = _normal(precision)
    if engine == "auto":
        if precision in ("int8", "float16"):
            engine = "openvino" if precision == "int8" else "keras"
        else:
            engine = "keras" if (has_gpu() if gpu is None else gpu) else "openvino"
    if engine == "keras" and precision == "auto":
        precision = _normal(resolve_precision("auto"))
    return engine, precision


# --- OpenVINO ----------------------------------------------------------------------


def _core():
    import openvino as ov

    return ov.Core()


def convert(keras_model):
    """The OpenVINO model of a loaded Keras model: pixels in, prices out."""
    import openvino as ov

    return ov.convert_model(keras_model)


def compile_ov(ov_model, precision: str):
    """Compiled for the CPU with the THROUGHPUT hint at ``precision`` (float32 is asked
    for explicitly: on CPUs with bf16 OpenVINO would default to it). A scorer limited to
    some cores (``--workers N`` sets TF_NUM_INTRAOP_THREADS) keeps to them here too."""
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": _OV_HINT[precision]}
    if threads := os.environ.get("TF_NUM_INTRAOP_THREADS"):
        config["INFERENCE_NUM_THREADS"] = str(max(1, int(threads)))
    return _core().compile_model(ov_model, "CPU", config)


def compiled_precision(compiled, precision: str) -> str:
    """What the CPU runs: bf16 asked for on a CPU without it runs float32."""
    if precision != "bf16":
        return precision
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return "bf16" if "bf16" in hint or "bfloat16" in hint else "float32"


def ov_predict(compiled, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Prices for prepared uint8 pixels, in whole batches (padded: one shape), as many
    batches at once as the THROUGHPUT hint has streams."""
    import openvino as ov

    n = len(pixels)
    if n == 0:
        return np.zeros(0)
    batches = (n + batch_size - 1) // batch_size
    padded = np.zeros((batches * batch_size, *pixels.shape[1:]), np.float32)
    padded[:n] = pixels
    x = model_input(padded)
    out = np.zeros(batches * batch_size, np.float64)
    jobs = max(1, min(batches, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    queue = ov.AsyncInferQueue(compiled, jobs)

    def done(request, i):
        out[i * batch_size : (i + 1) * batch_size] = request.get_output_tensor(0).data.reshape(-1)

    queue.set_callback(done)
    for i in range(batches):
        queue.start_async({0: x[i * batch_size : (i + 1) * batch_size]}, userdata=i)
    queue.wait_all()
    return out[:n]


def float_cache_dir(cache_dir: Path | None = None) -> Path:
    """Where this machine keeps converted float models, a folder each (under
    ``cache_dir``, default the settings'). A ``<folder>.<hex>`` beside them is a
    conversion that died before its rename (``unfinished_conversions``)."""
    return (cache_dir or load_settings().cache_dir) / "engines" / "openvino-float"


def unfinished_conversions(cache_dir: Path | None = None) -> list[Path]:
    folder = float_cache_dir(cache_dir)
    return sorted(p for p in folder.glob("*.*") if p.is_dir() and not p.is_symlink())


def openvino_float(model: Model):
    """(OpenVINO float model, config) from the stored model.keras, converted once per
    machine: kept under the cache directory by the content hash of model.keras and the
    OpenVINO version (converting costs seconds, reading it back a fraction of one)."""
    import openvino as ov

    keras_file = cached_model_file(model)
    sha = model.lineage().get("model_sha256") or sha256_file(keras_file)
    where = hashlib.sha256(f"{sha}/{ov.__version__}".encode()).hexdigest()[:24]
    local = float_cache_dir() / where
    xml = local / model.engine().XML
    if not (xml.is_file() and xml.with_suffix(Path(model.engine().BIN).suffix).is_file()):
        converted = convert(load_stored_model(model))
        tmp = local.with_name(f"{where}.{uuid.uuid4().hex}")  # whole, then renamed
        ov.save_model(converted, tmp / xml.name, compress_to_fp16=False)
        try:
            tmp.rename(local)
        except OSError:  # another process put it there first: the same model
            shutil.rmtree(tmp, ignore_errors=True)
        if not xml.is_file():
            return converted, model.config()
    return _core().read_model(xml), model.config()


def rmse(prices: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(prices) - np.asarray(truth)) ** 2)))


def gate_data(model: Model, options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration pixels: a seeded sample of the train split, validation pixels: the
    test split (at most ``int8_validation_images``, seeded), their prices)."""
    from tasks.data.loading import load_data

    lineage = model.lineage()
    mode, size = preprocess_of(model.config())
    data = load_data(Lake(model.store), lineage["dataset_version"], lineage["labels_version"],
                     {"train": options.int8_calibration_images,
                      "test": options.int8_validation_images}, SEED, mode, size)  # fmt: skip
    return data.train.images, data.test.images, data.test.price


def allowed_drop(rmse_float32: float, options) -> float:
    """The gate: the larger of a fraction of float32's RMSE and a price difference."""
    return max(options.int8_max_drop_fraction * rmse_float32, options.int8_max_drop_price)


def make_int8(model: Model, options) -> dict:
    """Quantize the model with accuracy control, store this attempt's files and publish
    its gate.json unless another maker did first; the gate that stands."""
    import nncf
    import openvino as ov

    files = model.engine()
    ov_float, _ = openvino_float(model)
    calibration, images, truth = gate_data(model, options)
    batch = options.batch_size
    f32 = compile_ov(ov_float, "float32")
    rmse_float32 = rmse(ov_predict(f32, images, batch), truth)
    allowed = allowed_drop(rmse_float32, options)
    items = [(images[i : i + batch], truth[i : i + batch]) for i in range(0, len(images), batch)]
    inputs = model_input(calibration.astype(np.float32))
    batches = [inputs[i : i + CALIBRATION_BATCH] for i in range(0, len(inputs), CALIBRATION_BATCH)]

    def validate(compiled, data) -> float:  # NNCF maximises: minus the RMSE
        pairs = list(data)
        predicted = np.concatenate(
            [
                np.asarray(compiled(model_input(x.astype(np.float32)))[0]).reshape(-1)
                for x, _ in pairs
            ]
        )
        return -rmse(predicted, np.concatenate([y for _, y in pairs]))

    reason = None
    try:
        quantized = nncf.quantize_with_accuracy_control(
            ov_float, nncf.Dataset(batches), nncf.Dataset(items), validation_fn=validate,
            max_drop=allowed, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(batches),
        )  # fmt: skip
        rmse_int8 = rmse(ov_predict(compile_ov(quantized, "int8"), images, batch), truth)
    except Exception as err:  # no int8 model: the verdict says why
        quantized, rmse_int8 = None, None
        reason = f"quantization failed: {type(err).__name__}: {err}"
    passed = rmse_int8 is not None and rmse_int8 <= rmse_float32 + allowed
    if reason is None and not passed:
        reason = f"int8 RMSE {rmse_int8:.4f} > float32 {rmse_float32:.4f} + {allowed:.4f}"
    attempt = uuid.uuid4().hex[:12]
    gate = {
        "model_version": model.version,
        "attempt": attempt,
        "passed": bool(passed),
        "reason": reason,
        "rmse_float32": rmse_float32,
        "rmse_int8": rmse_int8,
        "allowed_drop": allowed,
        "max_drop": {
            "fraction": options.int8_max_drop_fraction,
            "price": options.int8_max_drop_price,
        },  # fmt: skip
        "validation_images": len(images),
        "calibration_images": len(calibration),
        "method": "nncf.quantize_with_accuracy_control",
        "versions": {"openvino": ov.__version__, "nncf": nncf.__version__},
        "made_at": datetime.now(UTC).isoformat(),
    }
    if quantized is not None:
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / files.XML
            ov.save_model(quantized, xml, compress_to_fp16=False)
            weights = xml.with_suffix(Path(files.BIN).suffix)
            gate["sha256"] = {files.XML: sha256_file(xml), files.BIN: sha256_file(weights)}
            files.write_files(attempt, xml, weights)
    stands = files.publish(gate)
    if stands["attempt"] != attempt:
        get_logger().info("model %s: int8 published by another maker first; using theirs",
                          model.version)  # fmt: skip
    return stands


def int8_gate(model: Model, options, make: bool) -> dict | None:
    """The model's published int8 gate; made now when there is none and ``make``."""
    gate = model.engine().gate()
    if gate is None and make:
        gate = make_int8(model, options)
    return gate


def _load_int8(model: Model, gate: dict):
    files = model.engine()
    local = (
        load_settings().cache_dir
        / "engines"
        / hashlib.sha256(
            f"{model.store.uri}/{model.version}/{gate['attempt']}".encode()
        ).hexdigest()[:24]
    )
    xml = local / files.XML
    expected = gate.get("sha256", {})
    if not (xml.is_file() and (local / files.BIN).is_file()):
        files.download(gate, local)
    for name in (files.XML, files.BIN):
        if expected.get(name) and sha256_file(local / name) != expected[name]:
            (local / name).unlink()
            raise EngineError(f"{files.file_uri(gate)}: {name} does not match gate.json; "
                              "delete the engine's files to make them again")  # fmt: skip
    return _core().read_model(xml)


# --- one engine per process, store, model, engine and precision -----------------------

_ENGINES: OrderedDict[tuple, Engine] = OrderedDict()
_LOCK = threading.Lock()


def get_engine(model: Model, options) -> Engine:
    """The engine that scores for ``options`` (engine, precision) on this worker,
    loaded once per process; a model whose int8 failed its gate scores in float32 (one
    log line says why)."""
    key = (model.store.uri, model.version, options.engine, _normal(options.precision))
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = _load(model, options)
            while len(_ENGINES) > MODELS_KEPT:
                _ENGINES.popitem(last=False)
        _ENGINES.move_to_end(key)
        return _ENGINES[key]


def _load(model: Model, options) -> Engine:
    engine, precision = requested(options.engine, options.precision)
    if engine == "keras":
        net, config, lock = get_model(model, KERAS_PRECISION[precision])
        return Engine("keras", precision, net, config, lock)
    log = get_logger()
    if precision in ("auto", "int8"):
        gate = int8_gate(model, options, make=precision == "int8")
        if gate is not None and gate["passed"]:
            compiled = compile_ov(_load_int8(model, gate), "int8")
            return Engine("openvino", "int8", compiled, model.config())
        if gate is not None:
            log.warning("model %s: int8 failed its accuracy gate (%s; %s); scoring with "
                        "openvino float32", model.version, gate.get("reason"),
                        model.engine().uri(model.engine().MARKER))  # fmt: skip
        elif precision == "int8":  # (not reached: int8 makes the gate)
            raise EngineError(f"model {model.version}: no int8 gate")
        precision = "float32"
    ov_float, config = openvino_float(model)
    compiled = compile_ov(ov_float, precision)
    ran = compiled_precision(compiled, precision)
    if ran != precision:
        log.warning("openvino: this CPU has no %s; scoring model %s in %s", precision,
                    model.version, ran)  # fmt: skip
    return Engine("openvino", ran, compiled, config)
