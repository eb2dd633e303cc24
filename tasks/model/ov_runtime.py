"""OpenVINO for vggprice's models: convert a loaded Keras model, compile it for the CPU,
predict prices in whole batches, keep each model's float conversion in this machine's
cache (verified against its hashes before every use), and say what the CPU offers. The
one OpenVINO path that scoring's engines and the engine gates share.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from tasks.data.images import model_input
from tasks.model.export import cached_model_file, cpu_flags, load_stored_model
from tasks.model.verified_cache import ensure
from tasks.settings import load_settings
from tasks.store.lake import Model
from tasks.store.storage import sha256_file

_OV_HINT = {"float32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the rest in f32
CPU_CLASS_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}


def ov_core():
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
    return ov_core().compile_model(ov_model, "CPU", config)


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

    return ov_core().read_model(ensure(local, make) / xml), model.config()


def rmse(prices: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(prices) - np.asarray(truth)) ** 2)))


def cpu_class() -> str:
    """What the CPU offers the engines: its bf16, int8 and vector extensions."""
    return "+".join(sorted(cpu_flags() & CPU_CLASS_FLAGS)) or "baseline"


def native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
