"""Which runtime computes the frozen-feature forward pass of training.

- ``keras``: the frozen Keras sub-model itself (``build_graphs``), at the training's
  precision;
- ``openvino``: the same sub-model converted by ``openvino.convert_model`` (its
  pre-processing layers included, so it takes the same prepared uint8 pixels) and
  compiled for the CPU with the THROUGHPUT hint and inference precision f32, asked for
  explicitly: on CPUs with bf16 (AVX512-BF16, AMX) OpenVINO would otherwise run bf16.

Both give ``frozen_runner(frozen, engine).predict(x, batch_size=..., verbose=0)``, so
``features.extract`` runs either. The two engines' features agree to float32 rounding,
not bit for bit, so the engine belongs in the feature spec: caches made by different
engines never mix. The scoring engines (``tasks/scoring/engines.py``) do the same for
whole models; the learning code keeps its own few lines so that it depends on nothing
above it.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

ENGINES = ("keras", "openvino")
F32 = "f32"  # OpenVINO's name for float32 inference


class FrozenEngineError(ValueError):
    """An extraction engine that cannot run here (the message says what to use)."""


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except (ImportError, OSError):  # not installed, or its libraries do not load
        return False
    return True


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def default_extraction_engine() -> str:
    """``openvino`` on a machine without a GPU where OpenVINO imports, else ``keras``
    (a GPU runs Keras faster than a CPU runs anything)."""
    return "openvino" if openvino_available() and not has_gpu() else "keras"


def _float32_only(frozen) -> None:
    """The OpenVINO runner is float32: a sub-model built under a mixed policy would
    bring its casts along and compute in less."""
    other = sorted({layer.compute_dtype for layer in frozen.layers} - {"float32"})
    if other:
        raise FrozenEngineError(
            f"frozen layers compute in {', '.join(other)}: build them under the float32 "
            "policy for the openvino extraction engine, or use extraction_engine=keras"
        )


def convert(frozen):
    """The OpenVINO model of the frozen Keras sub-model: pixels in, cut-layer features out."""
    import openvino as ov

    _float32_only(frozen)
    with warnings.catch_warnings():  # Keras: the converter passes the one input as a tuple
        warnings.filterwarnings("ignore", "The structure of `inputs`", UserWarning)
        return ov.convert_model(frozen)


def compile_f32(ov_model):
    """Compiled for the CPU with the THROUGHPUT hint at float32 (asked for explicitly).
    A process limited to some cores (TF_NUM_INTRAOP_THREADS) keeps to them here too."""
    import openvino as ov

    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": F32}
    if threads := os.environ.get("TF_NUM_INTRAOP_THREADS"):
        config["INFERENCE_NUM_THREADS"] = str(max(1, int(threads)))
    return ov.Core().compile_model(ov_model, "CPU", config)


def inference_precision(compiled) -> str:
    """What the compiled model computes in, from its own property (``f32``, ``bf16``)."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)


class OpenVinoFrozen:
    """The compiled frozen layers with Keras's ``predict``: float32 features shaped as
    Keras gives them, in whole batches of ``batch_size`` (the last one padded: one shape),
    as many batches at once as the THROUGHPUT hint has streams."""

    engine = "openvino"

    def __init__(self, compiled):
        self.compiled = compiled
        shape = compiled.output(0).get_partial_shape()
        if shape.rank.is_dynamic or any(d.is_dynamic for d in list(shape)[1:]):
            raise FrozenEngineError(f"the frozen layers' output shape {shape} is not fixed")
        self.feature_shape = tuple(d.get_length() for d in list(shape)[1:])

    def predict(self, x, batch_size: int = 128, verbose: int = 0) -> np.ndarray:
        import openvino as ov

        x = np.asarray(x)
        n = len(x)
        out = np.zeros((n, *self.feature_shape), np.float32)
        if n == 0:
            return out
        batches = (n + batch_size - 1) // batch_size
        limit = self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        queue = ov.AsyncInferQueue(self.compiled, max(1, min(batches, limit)))

        def done(request, i):
            start = i * batch_size
            stop = min(start + batch_size, n)
            out[start:stop] = request.get_output_tensor(0).data[: stop - start]

        queue.set_callback(done)
        for i in range(batches):
            batch = x[i * batch_size : (i + 1) * batch_size].astype(np.float32)
            if len(batch) < batch_size:
                batch = np.concatenate(
                    [batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), np.float32)]
                )
            queue.start_async({0: batch}, userdata=i)  # the inputs are copied
        queue.wait_all()
        return out


def frozen_runner(frozen, engine: str):
    """What computes the frozen features: the Keras sub-model itself for ``keras``, its
    float32 OpenVINO compilation for ``openvino``."""
    if engine == "keras":
        return frozen
    if engine != "openvino":
        raise FrozenEngineError(
            f"unknown extraction engine {engine!r}: use one of {', '.join(ENGINES)}"
        )
    if not openvino_available():
        raise FrozenEngineError(
            "the openvino extraction engine needs the openvino package: install it, or use "
            "extraction_engine=keras"
        )
    return OpenVinoFrozen(compile_f32(convert(frozen)))
