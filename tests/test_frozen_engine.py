"""The frozen-feature forward pass of training on OpenVINO float32 against Keras."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.model.features import DTYPE, extract
from tasks.model.frozen_engine import (
    F32,
    FrozenEngineError,
    OpenVinoFrozen,
    compile_f32,
    convert,
    default_extraction_engine,
    frozen_runner,
    inference_precision,
)
from tasks.model.graphs import build_graphs
from tasks.model.train_settings import TrainSettings
from tasks.runtime import keras_precision, seeded

pytest.importorskip("openvino")

SETTINGS = TrainSettings(weights="none", freeze=15, input_size=32, preprocess="rgb")
# Keras and OpenVINO both compute float32 (summing in their own orders), then the
# features are stored as float16: a few float16 steps at the top of the range at most.
TOLERANCE = 2e-3  # of the features' range


def frozen_at(precision: str):
    """The frozen sub-model as training builds it (random base weights, seeded)."""
    with keras_precision(precision), seeded(SETTINGS.seed):
        frozen, _ = build_graphs(SETTINGS)
    return frozen


@pytest.fixture(scope="module")
def frozen():
    return frozen_at("float32")


@pytest.fixture(scope="module")
def runner(frozen):
    return frozen_runner(frozen, "openvino")


@pytest.fixture(scope="module")
def images():
    # 61 images: batches of 8 leave a padded last batch of 5
    return np.random.default_rng(0).integers(0, 256, (61, 32, 32, 3), dtype=np.uint8)


def test_openvino_features_match_keras(frozen, runner, images):
    keras_feats = extract(frozen_runner(frozen, "keras"), images, batch_size=8)
    ov_feats = extract(runner, images, batch_size=8)
    assert ov_feats.dtype == keras_feats.dtype == DTYPE
    assert ov_feats.shape == keras_feats.shape == (61, 2, 2, 512)  # block4_pool at 32x32
    span = float(keras_feats.max() - keras_feats.min())
    assert span > 0 and np.count_nonzero(keras_feats) > keras_feats.size // 4, "not all dead"
    diff = np.abs(ov_feats.astype(np.float32) - keras_feats.astype(np.float32)).max()
    assert diff <= TOLERANCE * span, f"max |openvino - keras| {diff} over {TOLERANCE} x {span}"
    # each image keeps its own features whatever batch (and padding) it lands in
    alone = extract(runner, images[-3:], batch_size=8)
    assert np.abs(alone.astype(np.float32) - ov_feats[-3:]).max() <= TOLERANCE * span


def test_openvino_features_repeat_exactly(runner, images):
    first = extract(runner, images, batch_size=8)
    again = extract(runner, images, batch_size=8)
    assert np.array_equal(first, again)
    assert runner.predict(images[:0], batch_size=8).shape == (0, 2, 2, 512)


def test_openvino_runs_float32_even_where_bf16_is_the_default(frozen, runner):
    import openvino as ov

    assert inference_precision(runner.compiled) == F32
    assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) == str(ov.Type.f32)
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" in capabilities:  # e.g. AMX: without the hint OpenVINO computes bf16
        plain = ov.Core().compile_model(convert(frozen), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
        assert inference_precision(plain) == "bf16"
    again = OpenVinoFrozen(compile_f32(convert(frozen)))
    assert again.feature_shape == (2, 2, 512)


def test_runner_choice_and_its_errors():
    frozen = frozen_at("mixed_bfloat16")
    assert frozen_runner(frozen, "keras") is frozen
    with pytest.raises(FrozenEngineError, match="bfloat16: build them under the float32"):
        frozen_runner(frozen, "openvino")
    with pytest.raises(FrozenEngineError, match="unknown extraction engine 'onnx': use one of"):
        frozen_runner(frozen, "onnx")
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert default_extraction_engine() == ("keras" if gpu else "openvino")
