"""The Keras graphs of the price model, all built here so training and scoring see the
same layers by the same names:

- ``preprocess``: gray uint8 (28, 28, 1) -> resized, 3 channels, VGG16's own
  ``preprocess_input`` (BGR mean subtraction on 0..255), all built-in layers;
- ``frozen``: VGG16 layers ``[0, freeze)`` (the recipe: input..block4_pool);
- ``top``: the rest of VGG16 plus the head Flatten, Dense(256), Dropout, Dense(1);
- ``inference``: all of it plus a ``Rescaling`` from the scaled target to price
  units: 28x28 gray pixels in, prices out, built-in layers only.

Catalog models (``preprocess="rgb"``) take uint8 RGB (input_size, input_size, 3);
their ``preprocess`` swaps RGB to BGR with a fixed, non-trainable 1x1 permutation
(a Dense layer) before the same mean subtraction: still built-in layers only, so
``model.keras`` loads with ``safe_mode=True``.
"""

from __future__ import annotations

import numpy as np

from tasks.data.images import GRAY28, pixel_shape
from tasks.model.kernels import as_patch_conv
from tasks.model.train_settings import TrainSettings
from tasks.model.weights import build_vgg, seeded_init
from tasks.runtime import keras_precision, seeded

VGG_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications.vgg16.preprocess_input, "caffe"


RGB_TO_BGR = np.eye(3, dtype="float32")[::-1].copy()  # x @ P reverses the channels


def input_shape(settings: TrainSettings) -> tuple[int, ...]:
    """What the model takes: (28, 28, 1) gray, or (input_size, input_size, 3) RGB."""
    shape = pixel_shape(settings.preprocess, settings.input_size)
    return shape + (1,) if len(shape) == 2 else shape


def preprocess_layers(x, size: int, mode: str = GRAY28):
    """gray uint8 28x28 (or RGB uint8 size x size) -> VGG16 input, in float32 whatever
    the global policy."""
    import keras

    if mode != GRAY28:
        to_bgr = keras.layers.Dense(
            3,
            use_bias=False,
            kernel_initializer=keras.initializers.Constant(RGB_TO_BGR),
            trainable=False,
            name="rgb_to_bgr",
            dtype="float32",
        )
        return keras.layers.Normalization(
            mean=list(VGG_MEAN_BGR), variance=[1.0, 1.0, 1.0], name="vgg_preprocess",
            dtype="float32",
        )(to_bgr(x))  # fmt: skip
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


def build_graphs(settings: TrainSettings, vgg=None):
    """(frozen, top): ``frozen`` maps pixels to the cut-layer features (None when nothing
    is frozen), ``top`` maps those features (or pixels) to the scaled price."""
    import keras

    vgg = vgg if vgg is not None else build_vgg(settings)
    cut = max(settings.frozen_layers(), 1)  # layer 0 is the input: no weights
    pixels = keras.Input(input_shape(settings), name="pixels")
    x = preprocess_layers(pixels, settings.input_size, settings.preprocess)
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
    seeded_init([top.get_layer("head_dense"), top.get_layer("head_out")], settings.seed)
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


def build_inference(settings: TrainSettings, scaling: dict, precision: str = "float32"):
    """pixels -> price: pre-processing, VGG16, head, and the rescale to price units.
    Pre-processing and the output layers stay float32 at any precision."""
    import keras

    # Seeded: the layers' throw-away initial values would otherwise draw from the
    # process's global random state.
    with keras_precision(precision), seeded(settings.seed):
        vgg = keras.applications.VGG16(
            include_top=False, weights=None, input_shape=(settings.input_size,) * 2 + (3,)
        )
        pixels = keras.Input(input_shape(settings), name="pixels")
        x = preprocess_layers(pixels, settings.input_size, settings.preprocess)
        for layer in vgg.layers[1:]:
            x = layer(x)
        x = head_layers(x, settings)
        span = scaling["max"] - scaling["min"]
        price = keras.layers.Rescaling(
            span, offset=scaling["min"], name="to_price", dtype="float32"
        )(x)
        return keras.Model(pixels, price, name="vggprice")
