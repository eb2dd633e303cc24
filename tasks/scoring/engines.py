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
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.governance.engine_gates import bf16_gate, gate_files, int8_gate
from tasks.model.export import (
    MODELS_KEPT,
    get_model,
    predict_prices,
    resolve_precision,
)
from tasks.model.ov_runtime import (
    compile_ov,
    compiled_precision,
    native_bf16,
    openvino_float,
    ov_core,
    ov_predict,
)
from tasks.model.verified_cache import CacheError, ensure
from tasks.runtime import get_logger
from tasks.settings import load_settings
from tasks.store.lake import EngineFiles, Model

ENGINES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "float32", "bf16", "int8")
KERAS_PRECISION = {"float32": "float32", "bf16": "mixed_bfloat16", "float16": "mixed_float16"}
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
    return ov_core().read_model(local / files.XML)


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
