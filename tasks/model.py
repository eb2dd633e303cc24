"""The VGG16 price model: settings, base weights, and the Keras graphs built from them.

One builder makes every graph, so training and scoring see the same layers by
the same names:

- ``preprocess``: gray uint8 (28, 28, 1) -> resized, 3 channels, VGG16's own
  ``preprocess_input`` (BGR mean subtraction on 0..255), all built-in layers;
- ``frozen``: VGG16 layers ``[0, freeze)`` (the recipe: input..block4_pool);
- ``top``: the rest of VGG16 plus the head Flatten, Dense(256), Dropout, Dense(1).

The stored ``model.keras`` chains them and appends a ``Rescaling`` layer from
the scaled target back to price units: it takes 28x28 gray pixels and returns
prices, with no vggprice code needed to load it (``safe_mode=True`` works).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from tasks.dataset import sha256_file
from tasks.settings import default_cache_dir
from tasks.storage import ObjectNotFound, open_store

VGG_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications.vgg16.preprocess_input, "caffe"
IMAGE_SIZE = 28
N_VGG_LAYERS = 19  # VGG16 without top: input + 13 conv + 5 pool
RECIPE_FREEZE = 15  # input through block4_pool


class WeightsError(ValueError):
    """The base weights cannot be had or do not fit; the message says which and why."""


class TrainSettings(BaseModel):
    """Every training setting; the defaults are the reference recipe."""

    input_size: int = Field(48, ge=32, description="VGG16 input side (>= 32)")
    weights: str = Field(
        "imagenet", description="imagenet, none, or a path / s3:// URI of a .h5 weights file"
    )
    weights_sha256: str | None = Field(None, description="expected SHA-256 of a weights file")
    freeze: int | None = Field(
        None,
        ge=0,
        le=N_VGG_LAYERS,
        description="VGG16 layers frozen from the input; default 15 (through block4_pool) "
        "with pretrained weights, 0 with weights=none",
    )
    head_units: int = Field(256, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    learning_rate: float = Field(1e-4, gt=0)
    decay: float = Field(1e-6, ge=0, description="inverse-time decay per step (Keras 2 'decay')")
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(5, ge=1)
    augment: Literal["cached", "online", "none"] = Field(
        "cached",
        description="cached: train the top on pre-augmented cached views; online: the "
        "recipe's full model with random shifts per batch; none: no augmentation",
    )
    views: int = Field(
        4, ge=1, description="cached views per train image: original, flip, then shifted"
    )
    shift: float = Field(0.1, ge=0, lt=0.5, description="max width/height shift fraction")
    flip: bool = Field(True, description="random horizontal flips")
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    train_limit: int | None = Field(None, ge=1, description="train on a seeded subset")
    test_limit: int | None = Field(None, ge=1, description="validate on a seeded subset")
    seed: int = 0

    @model_validator(mode="after")
    def _weights_named(self) -> TrainSettings:
        if self.weights.strip() == "":
            raise ValueError("weights must be imagenet, none, or a path/URI of a weights file")
        return self

    def frozen_layers(self) -> int:
        if self.freeze is not None:
            return self.freeze
        return 0 if self.weights == "none" else RECIPE_FREEZE

    def uses_cache(self) -> bool:
        return self.frozen_layers() > 1 and self.augment != "online"


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


def hardware() -> dict:
    import platform

    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "gpus": gpus}


# --- base weights ----------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a weights file, once per content stamp (identity and load both need it)."""
    return sha256_file(Path(path))


def fetch_weights(source: str, expected_sha256: str | None = None) -> tuple[Path | None, str]:
    """(local file or None, identity) for a weights source.

    Files from the store are downloaded once per worker into the cache directory,
    keyed by URI; every file is checked against ``expected_sha256`` when given.
    """
    if source == "none":
        return None, "none"
    if source == "imagenet":
        return None, "imagenet"
    if source.startswith("s3://"):
        bucket_key = source[len("s3://") :]
        bucket, _, key = bucket_key.partition("/")
        cache = default_cache_dir() / "weights" / hashlib.sha256(source.encode()).hexdigest()[:16]
        local = cache / Path(key).name
        if not local.is_file():
            try:
                open_store(f"s3://{bucket}").get_file(key, local)
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


# --- graphs -------------------------------------------------------------------


def set_precision(precision: str) -> None:
    import keras

    keras.mixed_precision.set_global_policy(precision)


def build_vgg(settings: TrainSettings):
    """VGG16 without top, with the configured base weights loaded."""
    import keras

    shape = (settings.input_size, settings.input_size, 3)
    keras.utils.set_random_seed(settings.seed)
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
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
    path, _ = fetch_weights(settings.weights, settings.weights_sha256)
    if path is not None:
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


def preprocess_layers(x, size: int):
    """gray uint8 28x28 -> VGG16 input, in float32 whatever the global policy."""
    import keras

    x = keras.layers.Resizing(size, size, interpolation="bilinear", name="resize", dtype="float32")(
        x
    )
    x = keras.layers.Concatenate(name="gray_to_rgb", dtype="float32")([x, x, x])
    return keras.layers.Normalization(
        mean=list(VGG_MEAN_BGR), variance=[1.0, 1.0, 1.0], name="vgg_preprocess", dtype="float32"
    )(x)


def head_layers(x, settings: TrainSettings):
    import keras

    x = keras.layers.Flatten(name="head_flatten")(x)
    x = keras.layers.Dense(settings.head_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(settings.dropout, name="head_dropout", seed=settings.seed)(x)
    return keras.layers.Dense(1, name="head_out", dtype="float32")(x)


PATCH_MAX_POSITIONS = 36  # up to 6x6 maps: the neighbour gather stays a small fraction


def neighbour_matrix(h: int, w: int):
    """0/1 matrix (h*w*9, h*w): row (position, tap) picks the input position that a
    3x3 'same' convolution reads there, or nothing where the tap falls in the padding."""
    import numpy as np

    s = np.zeros((h * w * 9, h * w), np.float32)
    for oy in range(h):
        for ox in range(w):
            for tap in range(9):
                y, x = oy + tap // 3 - 1, ox + tap % 3 - 1
                if 0 <= y < h and 0 <= x < w:
                    s[(oy * w + ox) * 9 + tap, y * w + x] = 1.0
    return s


def patch_conv_class():
    """A 3x3, stride-1, same-padding ReLU convolution computed as matrix products.

    On the small maps of the trainable top (3x3 after block4_pool at 48x48) the
    convolution kernels run far below the CPU's matrix units. Here one small
    matrix product with a constant 0/1 matrix gathers each position's nine
    neighbours (its gradient is the transposed product: no slicing kernels, which
    are slow in bfloat16 on CPU), and one GEMM applies the kernel. Same numbers
    as Conv2D; it holds the same weights (kernel (3, 3, in, out), bias), so the
    stored model uses plain Conv2D layers and needs none of this.
    """
    import keras
    from keras import ops

    class PatchConv2D(keras.layers.Layer):
        def __init__(self, filters: int, **kwargs):
            super().__init__(**kwargs)
            self.filters = filters

        def build(self, input_shape):
            _, h, w, c = input_shape
            self.kernel = self.add_weight(
                shape=(3, 3, c, self.filters), initializer="glorot_uniform", name="kernel"
            )
            self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")
            self.neighbours = neighbour_matrix(h, w)

        def call(self, x):
            _, h, w, c = x.shape
            pick = ops.convert_to_tensor(self.neighbours, dtype=x.dtype)
            patches = ops.matmul(pick, ops.reshape(x, (-1, h * w, c)))  # (b, h*w*9, c)
            kernel = ops.cast(ops.reshape(self.kernel, (9 * c, self.filters)), x.dtype)
            y = ops.matmul(ops.reshape(patches, (-1, 9 * c)), kernel)
            y = ops.reshape(y, (-1, h, w, self.filters)) + ops.cast(self.bias, x.dtype)
            return ops.relu(y)

    return PatchConv2D


def as_patch_conv(layer):
    """The fast training twin of a VGG16 conv layer on a small map (same name, same
    weights), or the layer itself."""
    cfg = layer.get_config()
    _, h, w, _ = layer.input.shape
    if not (
        cfg.get("kernel_size") == (3, 3)
        and cfg.get("strides") == (1, 1)
        and cfg.get("padding") == "same"
        and cfg.get("activation") == "relu"
        and h * w <= PATCH_MAX_POSITIONS
    ):
        return layer
    twin = patch_conv_class()(cfg["filters"], name=layer.name)
    twin.build(layer.input.shape)
    twin.set_weights(layer.get_weights())
    return twin


def build_graphs(settings: TrainSettings, vgg=None):
    """(frozen, top): ``frozen`` maps pixels to the cut-layer features (None when nothing
    is frozen), ``top`` maps those features (or pixels) to the scaled price."""
    import keras

    vgg = vgg if vgg is not None else build_vgg(settings)
    cut = max(settings.frozen_layers(), 1)  # layer 0 is the input: no weights
    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="pixels")
    x = preprocess_layers(pixels, settings.input_size)
    for layer in vgg.layers[1:cut]:
        layer.trainable = False
        x = layer(x)
    frozen = keras.Model(pixels, x, name="frozen") if cut > 1 else None
    if frozen is not None:  # the top trains on cached features: small maps, use GEMMs
        feats = keras.Input(x.shape[1:], name="features")
        y = feats
        top_layers = [as_patch_conv(layer) for layer in vgg.layers[cut:]]
    else:
        feats = pixels
        y = x
        top_layers = vgg.layers[cut:]
    for layer in top_layers:
        y = layer(y)
    top = keras.Model(feats, head_layers(y, settings), name="top")
    return frozen, top


def augmentation_layers(settings: TrainSettings):
    import keras

    layers = []
    if settings.shift > 0:
        layers.append(
            keras.layers.RandomTranslation(
                settings.shift, settings.shift, fill_mode="nearest", seed=settings.seed
            )
        )
    if settings.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=settings.seed))
    return layers


def fused_rmsprop(learning_rate):
    """Keras's RMSprop (rho 0.9, eps 1e-7, no momentum) with each variable's update
    done by TensorFlow's fused ``ResourceApplyRMSProp`` kernel: one pass over the
    weights instead of Keras's chain of element-wise ops (measured 6.6 against
    14.8 ms a step for VGG16's block5 + head on this CPU). Same formula: ``ms =
    rho*ms + (1-rho)*g^2``, ``w -= lr*g/sqrt(ms + eps)``; the kernel keeps the
    last increment in a slot of its own. On other Keras backends: plain RMSprop."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return keras.optimizers.RMSprop(learning_rate=learning_rate)
    import tensorflow as tf

    class FusedRMSprop(keras.optimizers.RMSprop):
        def build(self, var_list):
            if self.built:
                return
            super().build(var_list)
            self._increments = self.add_optimizer_variables(var_list, "increment")

        def update_step(self, gradient, variable, learning_rate):
            i = self._get_variable_index(variable)
            tf.raw_ops.ResourceApplyRMSProp(
                var=variable.handle,
                ms=self._velocities[i].value.handle,
                mom=self._increments[i].value.handle,
                lr=tf.cast(learning_rate, variable.dtype),
                rho=tf.cast(self.rho, variable.dtype),
                momentum=tf.zeros((), variable.dtype),
                epsilon=tf.cast(self.epsilon, variable.dtype),
                grad=tf.cast(gradient, variable.dtype),
            )

    return FusedRMSprop(learning_rate=learning_rate)


def compile_top(model, settings: TrainSettings) -> None:
    import keras
    import tensorflow as tf

    lr = keras.optimizers.schedules.InverseTimeDecay(
        settings.learning_rate, decay_steps=1, decay_rate=settings.decay
    )
    # XLA measured 2.5x slower on this CPU (a bf16 block5 + head epoch: 3.9 vs 1.5 s); GPUs use it.
    jit = "auto" if tf.config.list_physical_devices("GPU") else False
    model.compile(optimizer=fused_rmsprop(lr), loss="mse", jit_compile=jit)


def build_inference(settings: TrainSettings, scaling: dict, precision: str = "float32"):
    """pixels -> price: pre-processing, VGG16, head, and the rescale to price units.
    Pre-processing and the output layers stay float32 at any precision."""
    import keras

    set_precision(precision)
    vgg = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(settings.input_size,) * 2 + (3,)
    )
    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="pixels")
    x = preprocess_layers(pixels, settings.input_size)
    for layer in vgg.layers[1:]:
        x = layer(x)
    x = head_layers(x, settings)
    span = scaling["max"] - scaling["min"]
    price = keras.layers.Rescaling(span, offset=scaling["min"], name="to_price", dtype="float32")(x)
    return keras.Model(pixels, price, name="vggprice")


def export_model(settings: TrainSettings, trained: list, scaling: dict):
    """The float32 model to store, weights copied by layer name from the trained graphs."""
    model = build_inference(settings, scaling, "float32")
    source = {}
    for m in trained:
        if m is not None:
            source.update({layer.name: layer for layer in m.layers if layer.weights})
    for layer in model.layers:
        if layer.weights and layer.name in source:
            layer.set_weights([w.astype("float32") for w in source[layer.name].get_weights()])
    return model


def load_inference_model(path: Path, config: dict, precision: str = "auto"):
    """A stored model.keras for scoring: as stored in float32, or rebuilt at a lower
    precision (bfloat16 on AMX CPUs, float16 on GPUs) with the stored weights."""
    import keras

    precision = resolve_precision(precision)
    if precision == "float32":
        set_precision("float32")
        return keras.models.load_model(path, safe_mode=True)
    settings = TrainSettings(**config["settings"])
    model = build_inference(settings, config["scaling"], precision)
    model.load_weights(path)
    set_precision("float32")
    return model
