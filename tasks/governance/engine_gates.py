"""Making the faster engines of a model and their accuracy gates (scoring only loads
them: ``tasks/scoring/engines.py``).

**int8**: NNCF's accuracy-controlled post-training quantization
(``nncf.quantize_with_accuracy_control``) of the local OpenVINO float32 conversion,
calibrated on a seeded sample of the model's train split (``int8_calibration_images``)
and validated on its test split (``gate_settings``: at most ``int8_validation_images``,
seeded) with RMSE in price units. **bf16**: the same conversion compiled at bf16 against
float32 on the same images (nothing is made but the verdict).

**The gate** allows the larger of ``int8_max_drop_fraction`` of float32's RMSE and
``int8_max_drop_price`` (never looser than the defaults). Before anything is compared,
float32's RMSE (the baseline) is checked against the model's stored evaluation (its RMSE
on the test split: within ``BASELINE_EXACT`` when the gate saw as many images as the
evaluation (the same ones), else ``BASELINE_SAMPLED``): a damaged conversion never becomes the baseline.

gate.json records the context the verdict depends on (``gate_context``), both
RMSEs, the verdict and (int8) the files' hashes; it is published by a conditional create
(makers that race both quantize, one publishes, every scorer uses the published one), or
replaces a gate.json that records another context. An error while making (the data, the
quantizer, the baseline check) logs one line and records nothing: the next try makes it.

``make_engines`` is what promotion runs (``flows/evaluate.py``): the champion's int8
(and bf16, on a CPU that has it) verdicts exist before its first drop is priced.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from tasks.data.images import model_input
from tasks.model.export import preprocess_of
from tasks.model.ov_runtime import (
    compile_ov,
    compiled_precision,
    cpu_class,
    native_bf16,
    openvino_float,
    ov_predict,
    rmse,
)
from tasks.runtime import get_logger
from tasks.store.lake import EngineFiles, Lake, Model, digest
from tasks.store.storage import sha256_file

CALIBRATION_BATCH = 32
BASELINE_EXACT = 0.005  # float32's RMSE on the whole test split vs the evaluation's
BASELINE_SAMPLED = 0.15  # ... on a sample of it


SEED = 0  # the seeded samples of the gates


def gate_settings(options) -> dict:
    """The tolerance and validation images a gate is made and trusted with: the options',
    never looser than the defaults (options reach scorers from flow parameters)."""
    d = type(options)()  # the defaults of the options' own kind (ScoreOptions)
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
        gate = make_int8(model, options)
    return gate


def bf16_gate(model: Model, options) -> dict | None:
    """The model's bf16 gate for today's context, made now when there is none (no
    quantizing: float32 and bf16 on the gate's images)."""
    gate = gate_files(model, "bf16", options)[2]
    if gate is None:
        gate = make_bf16(model, options)
    return gate


class GateError(RuntimeError):
    """A gate could not be made now (the message says why); nothing was recorded."""


def gate_data(model: Model, options, calibration: bool = True):
    """(calibration pixels: a seeded sample of the train split (None unless
    ``calibration``), validation pixels: the test split (``gate_settings``), prices)."""
    from tasks.data.loading import load_data

    lineage = model.lineage()
    mode, size = preprocess_of(model.config())
    splits = {"test": gate_settings(options)["validation_images"]}
    if calibration:
        splits["train"] = options.int8_calibration_images
    data = load_data(Lake(model.store), lineage["dataset_version"], lineage["labels_version"],
                     splits, SEED, mode, size)  # fmt: skip
    train = data.train.images if calibration else None
    return train, data.test.images, data.test.price


def allowed_drop(rmse_float32: float, options) -> float:
    """The gate: the larger of a fraction of float32's RMSE and a price difference."""
    m = gate_settings(options)["max_drop"]
    return max(m["fraction"] * rmse_float32, m["price"])


def check_baseline(model: Model, rmse_float32: float, n: int) -> None:
    """GateError unless float32's RMSE here is the stored evaluation's (see module)."""
    from tasks.governance.evaluation import read_metrics

    metrics = read_metrics(Lake(model.store), model.version)
    if not metrics:
        raise GateError(f"model {model.version} has no evaluation to check float32 against: "
                        "evaluate it (vggprice evaluate)")  # fmt: skip
    tolerance = BASELINE_EXACT if n == metrics["n"] else BASELINE_SAMPLED  # the same images
    if abs(rmse_float32 - metrics["rmse"]) > tolerance * metrics["rmse"] + 1e-6:
        raise GateError(f"OpenVINO float32 RMSE {rmse_float32:.4f} on {n} test images is not "
                        f"the evaluation's {metrics['rmse']:.4f} on {metrics['n']} (within "
                        f"{tolerance:.1%}): the float32 conversion is not the model")  # fmt: skip


def _baseline(model: Model, ov_float, images, truth, batch: int) -> float:
    rmse_float32 = rmse(ov_predict(compile_ov(ov_float, "float32"), images, batch), truth)
    check_baseline(model, rmse_float32, len(images))
    return rmse_float32


def _record(model: Model, kind: str, options, make) -> dict | None:
    """Make a gate (``make(files)`` returns its fields) and publish it; None, logged,
    when making it failed."""
    files, context, _ = gate_files(model, kind, options)
    stale = (files.gate() or {"context": context}).get("context") != context  # replaced
    attempt = uuid.uuid4().hex[:12]
    try:
        fields = make(files, attempt)
    except Exception as err:  # not a verdict: the next try makes it again
        get_logger().warning("model %s: making its %s gate failed (%s: %s); not recorded, "
                             "made again on the next try", model.version, kind,
                             type(err).__name__, err)  # fmt: skip
        return None
    gate = {"model_version": model.version, "attempt": attempt, "context": context, **fields,
            "made_at": datetime.now(UTC).isoformat()}  # fmt: skip
    if stale:
        files.write_gate(gate)
        return gate
    stands = files.publish(gate)
    if stands["attempt"] != attempt:
        get_logger().info("model %s: %s published by another maker first; using theirs",
                          model.version, kind)  # fmt: skip
    return stands


def _verdict(kind: str, rmse_float32: float, rmse_other: float | None, allowed: float,
             reason: str | None = None) -> dict:  # fmt: skip
    passed = reason is None and rmse_other is not None and rmse_other <= rmse_float32 + allowed
    if reason is None and not passed:
        reason = f"{kind} RMSE {rmse_other:.4f} > float32 {rmse_float32:.4f} + {allowed:.4f}"
    return {"passed": bool(passed), "reason": reason, "rmse_float32": rmse_float32,
            f"rmse_{kind}": rmse_other, "allowed_drop": allowed}  # fmt: skip


def make_int8(model: Model, options) -> dict | None:
    """Quantize the model with accuracy control, store this attempt's files and publish
    its gate.json unless another maker did first; the gate that stands (None: failed)."""

    def make(files, attempt: str) -> dict:
        import nncf
        import openvino as ov

        nncf.set_log_level(logging.WARNING)  # its INFO lines are for NNCF's developers
        ov_float, _ = openvino_float(model)
        calibration, images, truth = gate_data(model, options)
        if len(calibration) == 0 or len(images) == 0:
            raise GateError(f"{len(calibration)} calibration and {len(images)} validation "
                            "images: nothing to quantize with")  # fmt: skip
        batch = options.batch_size
        rmse_float32 = _baseline(model, ov_float, images, truth, batch)
        allowed = allowed_drop(rmse_float32, options)
        items = [(images[i : i + batch], truth[i : i + batch]) for i in range(0, len(images), batch)]  # fmt: skip
        inputs = model_input(calibration.astype(np.float32))
        batches = [inputs[i : i + CALIBRATION_BATCH] for i in range(0, len(inputs), CALIBRATION_BATCH)]  # fmt: skip

        def validate(compiled, data) -> float:  # NNCF maximises: minus the RMSE
            pairs = list(data)
            predicted = [np.asarray(compiled(model_input(x.astype(np.float32)))[0]).reshape(-1)
                         for x, _ in pairs]  # fmt: skip
            return -rmse(np.concatenate(predicted), np.concatenate([y for _, y in pairs]))

        quantized = nncf.quantize_with_accuracy_control(
            ov_float, nncf.Dataset(batches), nncf.Dataset(items), validation_fn=validate,
            max_drop=allowed, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(batches),
        )  # fmt: skip
        rmse_int8 = rmse(ov_predict(compile_ov(quantized, "int8"), images, batch), truth)
        fields = _verdict("int8", rmse_float32, rmse_int8, allowed) | {
            "validation_images": len(images),
            "validation_sha256": _identity(images, truth),
            "calibration_images": len(calibration),
            "method": "nncf.quantize_with_accuracy_control",
        }
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / files.XML
            ov.save_model(quantized, xml, compress_to_fp16=False)
            weights = xml.with_suffix(Path(files.BIN).suffix)
            fields["sha256"] = {files.XML: sha256_file(xml), files.BIN: sha256_file(weights)}
            files.write_files(attempt, xml, weights)
        return fields

    return _record(model, "int8", options, make)


def make_bf16(model: Model, options) -> dict | None:
    """The bf16 verdict: the float32 conversion at bf16 against float32 on the gate's
    images, published as make_int8's (None: failed)."""

    def make(files, attempt: str) -> dict:
        ov_float, _ = openvino_float(model)
        _, images, truth = gate_data(model, options, calibration=False)
        if len(images) == 0:
            raise GateError("no validation images")
        rmse_float32 = _baseline(model, ov_float, images, truth, options.batch_size)
        allowed = allowed_drop(rmse_float32, options)
        compiled = compile_ov(ov_float, "bf16")
        if compiled_precision(compiled, "bf16") != "bf16":
            fields = _verdict("bf16", rmse_float32, None, allowed, "this CPU runs bf16 as float32")
        else:
            rmse_bf16 = rmse(ov_predict(compiled, images, options.batch_size), truth)
            fields = _verdict("bf16", rmse_float32, rmse_bf16, allowed)
        return fields | {"validation_images": len(images),
                         "validation_sha256": _identity(images, truth)}  # fmt: skip

    return _record(model, "bf16", options, make)


def _identity(images: np.ndarray, truth: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.asarray(truth, np.float64).tobytes())
    return h.hexdigest()


def make_engines(model: Model, options) -> dict:
    """The model's int8 engine and bf16 verdict for this worker (made unless they exist
    for today's context): what promotion runs. {kind: passed, or None when not made}."""
    made = {"int8": int8_gate(model, options, make=True)}
    if native_bf16():
        made["bf16"] = bf16_gate(model, options)
    return {kind: None if gate is None else gate["passed"] for kind, gate in made.items()}
