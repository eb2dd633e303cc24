"""Scoring engines: which runtime prices the pixels, at which precision. Scoring only
loads engines; the int8 engine and the gates are made in ``governance/engine_gates.py``.

- ``keras``: the stored model.keras in Keras (float32, or rebuilt at bfloat16 / float16
  with its weights: ``export.load_inference_model``);
- ``openvino``: the same model converted by ``openvino.convert_model`` from the loaded
  Keras model (its pre-processing layers included, so it takes the same uint8 pixels),
  compiled for the CPU with the THROUGHPUT hint; ``float32`` and ``bf16`` set OpenVINO's
  inference precision hint, ``int8`` runs the model's int8 engine.

**Local caches** (the float32 conversion, the downloaded int8 engine) are checked
against their hashes before every use and made again when they differ
(``model/verified_cache.py``): a damaged cache is replaced, never used.

**Gates.** int8 (NNCF-quantized) and bf16 are used only where a verdict says they price
within the tolerance of float32 on the model's test images. A verdict depends on its
*context* (``gate_context``): the model's hash, the tolerance and validation images
(``gate_settings``: the options', never looser than the defaults), the validation set's
identity, the OpenVINO and NNCF versions and the CPU class. Each context has its own
``models/<v>/engines/openvino-<kind>-<context digest>/gate.json`` (``lake.EngineFiles``,
published by a conditional create); a gate.json recording another context is made
again. A verdict that could not be made (an error) is not recorded: the next try makes
it again.

``auto`` picks per worker: Keras on a GPU; else OpenVINO in int8 when the model's int8
engine for this context passed its gate (``auto`` never quantizes: promotion makes it,
as does asking for ``int8``), else bf16 where the CPU has native bf16 (avx512_bf16,
amx_bf16) and bf16 passed its gate (made on first use: no quantizing), else float32.
Every engine carries ``reason``: why it is the one; the drop's manifest records it.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.images import model_input
from tasks.model.export import (
    MODELS_KEPT,
    cached_model_file,
    cpu_flags,
    get_model,
    load_stored_model,
    predict_prices,
    resolve_precision,
)
from tasks.model.verified_cache import CacheError, ensure
from tasks.runtime import get_logger
from tasks.scoring.ledger import ScoreOptions
from tasks.settings import load_settings
from tasks.store.lake import EngineFiles, Model, digest
from tasks.store.storage import sha256_file

ENGINES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "float32", "bf16", "int8")
KERAS_PRECISION = {"float32": "float32", "bf16": "mixed_bfloat16", "float16": "mixed_float16"}
_OV_HINT = {"float32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the rest in f32
CPU_CLASS_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
SEED = 0
RETRY_SECONDS = 600.0  # a worker whose gate could not be made tries again this much later


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
    reason: str = ""  # why this engine and precision (the drop's manifest says it)
    retry_at: float = math.inf  # a gate could not be made: loaded again after this

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
    batches at once as the THROUGHPUT hint has streams. No Python callbacks: OpenVINO's
    threads never wait for the GIL (an AsyncInferQueue callback could deadlock a compiled
    model released with the GIL held, seen inside a Prefect flow)."""
    n = len(pixels)
    if n == 0:
        return np.zeros(0)
    batches = (n + batch_size - 1) // batch_size
    padded = np.zeros((batches * batch_size, *pixels.shape[1:]), np.float32)
    padded[:n] = pixels
    x = model_input(padded)
    out = np.zeros(batches * batch_size, np.float64)
    jobs = max(1, min(batches, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    requests = [compiled.create_infer_request() for _ in range(jobs)]
    running: list[int | None] = [None] * jobs  # the batch each request is pricing

    def collect(r: int) -> None:
        if (i := running[r]) is not None:
            requests[r].wait()
            out[i * batch_size : (i + 1) * batch_size] = (
                requests[r].get_output_tensor(0).data.reshape(-1)
            )
            running[r] = None

    for i in range(batches):
        r = i % jobs
        collect(r)
        requests[r].start_async({0: x[i * batch_size : (i + 1) * batch_size]})
        running[r] = i
    for r in range(jobs):
        collect(r)
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
    OpenVINO version (converting costs seconds, reading it back a fraction of one), its
    files checked against their hashes before every use and converted again when they
    differ (``verified_cache``)."""
    import openvino as ov

    keras_file = cached_model_file(model)
    sha = model.lineage().get("model_sha256") or sha256_file(keras_file)
    where = hashlib.sha256(f"{sha}/{ov.__version__}".encode()).hexdigest()[:24]
    local = float_cache_dir() / where
    xml = model.engine().XML

    def make(folder: Path) -> None:
        ov.save_model(convert(load_stored_model(model)), folder / xml, compress_to_fp16=False)

    return _core().read_model(ensure(local, make) / xml), model.config()


def rmse(prices: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(prices) - np.asarray(truth)) ** 2)))


# --- the gates: which verdict counts for this model, these settings, this machine ------


def cpu_class() -> str:
    """What the CPU offers the engines: its bf16, int8 and vector extensions."""
    return "+".join(sorted(cpu_flags() & CPU_CLASS_FLAGS)) or "baseline"


def native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def gate_settings(options) -> dict:
    """The tolerance and validation images a gate is made and trusted with: the options',
    never looser than the defaults (options reach scorers from flow parameters)."""
    d = ScoreOptions()
    images = (options.int8_validation_images, d.int8_validation_images)
    return {
        "max_drop": {"fraction": min(options.int8_max_drop_fraction, d.int8_max_drop_fraction),
                     "price": min(options.int8_max_drop_price, d.int8_max_drop_price)},
        "validation_images": None if None in images else max(images),
    }  # fmt: skip


def gate_context(model: Model, kind: str, options) -> dict:
    """Everything a gate's verdict depends on; a gate counts only where it is today's."""
    import openvino as ov

    lineage = model.lineage()
    settings = gate_settings(options)
    try:
        nncf = metadata.version("nncf")
    except metadata.PackageNotFoundError:
        nncf = None
    return {
        "engine": f"openvino-{kind}",
        "model_version": model.version,
        "model_sha256": lineage.get("model_sha256") or model.files(lineage).file_info().etag,
        "max_drop": settings["max_drop"],
        "validation": {"dataset_version": lineage["dataset_version"],
                       "labels_version": lineage["labels_version"], "split": "test",
                       "seed": SEED, "images": settings["validation_images"]},
        "versions": {"openvino": ov.__version__, "nncf": nncf},
        "cpu": cpu_class(),
    }  # fmt: skip


def gate_files(model: Model, kind: str, options) -> tuple[EngineFiles, dict, dict | None]:
    """(where the gate for today's context lives, the context, its gate when it was made
    in exactly this context: a gate recorded with other settings is None, to make again)."""
    context = gate_context(model, kind, options)
    files = model.engine(f"openvino-{kind}-{digest(context)}")
    gate = files.gate()
    if gate is not None and gate.get("context") != context:
        get_logger().info("model %s: its %s gate was made with other settings; making it again",
                          model.version, kind)  # fmt: skip
        gate = None
    return files, context, gate


def int8_gate(model: Model, options, make: bool) -> dict | None:
    """The model's int8 gate for today's context; made now when there is none and
    ``make`` (None when making it failed: made again on the next try)."""
    gate = gate_files(model, "int8", options)[2]
    if gate is None and make:
        from tasks.governance.engine_gates import make_int8

        gate = make_int8(model, options)
    return gate


def bf16_gate(model: Model, options) -> dict | None:
    """The model's bf16 gate for today's context, made now when there is none (no
    quantizing: float32 and bf16 on the gate's images)."""
    gate = gate_files(model, "bf16", options)[2]
    if gate is None:
        from tasks.governance.engine_gates import make_bf16

        gate = make_bf16(model, options)
    return gate


def _load_int8(model: Model, files: EngineFiles, gate: dict):
    local = (
        load_settings().cache_dir
        / "engines"
        / hashlib.sha256(
            f"{model.store.uri}/{model.version}/{gate['attempt']}".encode()
        ).hexdigest()[:24]
    )
    try:
        ensure(local, lambda folder: files.download(gate, folder), gate.get("sha256") or None)
    except CacheError as err:
        raise EngineError(f"{files.file_uri(gate)}: its files do not match gate.json; "
                          "delete the engine's files to make them again") from err  # fmt: skip
    return _core().read_model(local / files.XML)


# --- one engine per process, store, model, engine and precision -----------------------

_ENGINES: OrderedDict[tuple, Engine] = OrderedDict()
_LOCK = threading.Lock()


def get_engine(model: Model, options) -> Engine:
    """The engine that scores for ``options`` (engine, precision) on this worker,
    loaded once per process (again after RETRY_SECONDS when a gate could not be made); a
    model whose int8 failed its gate scores in float32 (one log line says why)."""
    key = (model.store.uri, model.version, options.engine, _normal(options.precision))
    with _LOCK:
        if key not in _ENGINES or _ENGINES[key].retry_at < time.monotonic():
            _ENGINES[key] = _load(model, options)
            while len(_ENGINES) > MODELS_KEPT:
                _ENGINES.popitem(last=False)
        _ENGINES.move_to_end(key)
        return _ENGINES[key]


def _load(model: Model, options) -> Engine:
    engine, precision = requested(options.engine, options.precision)
    if engine == "keras":
        net, config, lock = get_model(model, KERAS_PRECISION[precision])
        why = "as asked" if options.engine == "keras" else "auto: a GPU"
        return Engine("keras", precision, net, config, lock, why)
    log = get_logger()
    why, retry = "as asked", False
    if precision in ("auto", "int8"):
        files, _, gate = gate_files(model, "int8", options)
        if gate is None and precision == "int8":
            gate = int8_gate(model, options, make=True)
            retry = gate is None
        if gate is not None and gate["passed"]:
            compiled = compile_ov(_load_int8(model, files, gate), "int8")
            why = (f"int8 passed its gate: RMSE {gate['rmse_int8']:.4f} vs float32 "
                   f"{gate['rmse_float32']:.4f} + {gate['allowed_drop']:.4f}")  # fmt: skip
            return Engine("openvino", "int8", compiled, model.config(), reason=why)
        if gate is not None:
            log.warning("model %s: int8 failed its accuracy gate (%s; %s); scoring with "
                        "openvino %s", model.version, gate.get("reason"),
                        files.uri(files.MARKER), "float32" if precision == "int8" else "auto")  # fmt: skip
            why = f"int8 failed its gate ({gate.get('reason')})"
        else:
            why = "no int8 engine made for this model, settings and CPU"
        if precision == "int8":
            precision, why = "float32", f"{why}; float32 (asked int8)"
        else:
            precision, why, retry = _auto_float(model, options, why)
    ov_float, config = openvino_float(model)
    compiled = compile_ov(ov_float, precision)
    ran = compiled_precision(compiled, precision)
    if ran != precision:
        log.warning("openvino: this CPU has no %s; scoring model %s in %s", precision,
                    model.version, ran)  # fmt: skip
        why = f"{why}; this CPU has no {precision}"
    retry_at = time.monotonic() + RETRY_SECONDS if retry else math.inf
    return Engine("openvino", ran, compiled, config, reason=why, retry_at=retry_at)


def _auto_float(model: Model, options, why: str) -> tuple[str, str, bool]:
    """``auto`` without int8: bf16 where the CPU has it natively and it passed its gate
    (checked against float32 on the gate's images), else float32; why; whether to retry
    (the bf16 gate could not be made)."""
    if not native_bf16():
        return (
            "float32",
            f"{why}; float32: this CPU has no native bf16 (avx512_bf16, amx_bf16)",
            False,
        )
    gate = bf16_gate(model, options)
    if gate is not None and gate["passed"]:
        return "bf16", (f"{why}; bf16: native on this CPU, passed its gate (RMSE "
                        f"{gate['rmse_bf16']:.4f} vs float32 {gate['rmse_float32']:.4f})"), False  # fmt: skip
    verdict = "no bf16 gate (making it failed)" if gate is None else gate.get("reason")
    return "float32", f"{why}; float32: bf16 did not pass its gate ({verdict})", gate is None
