"""Training speed: the reference recipe's plain Keras fit against vggprice's training.

Same images, same epochs, same head and frozen layers (the first 15, batch 32,
horizontal flips, no random shifts), in one run on this machine. Prints images/s
for each and the ratio, for a cold and a warm feature cache; then the frozen-feature
extraction alone (the forward pass a cold cache pays for) with Keras and with
OpenVINO, both float32, on the same images, and the ratio.

    .venv/bin/python bench/train_speed.py [--images 2000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import time

from _common import prepared_store

from tasks.data.loading import load_data
from tasks.model.export import resolve_precision
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train


def plain_keras_fit(images, y, epochs: int, size: int) -> float:
    """The tutorial's way: 1/255 pixels, float32, the full model every batch."""
    import keras
    import numpy as np

    x = np.repeat(images[..., None], 3, axis=-1)
    inp = keras.Input((28, 28, 3))
    h = keras.layers.Resizing(size, size)(inp)
    h = keras.layers.Rescaling(1 / 255)(h)
    h = keras.layers.RandomFlip("horizontal")(h)
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    for layer in vgg.layers[:15]:
        layer.trainable = False
    h = vgg(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(256, activation="relu")(h)
    h = keras.layers.Dropout(0.5)(h)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.RMSprop(1e-4), "mse")
    t0 = time.time()
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return time.time() - t0


def extraction_speed(images, settings: TrainSettings) -> None:
    """Frozen-feature extraction img/s (``features.extract``, batch 128, as training
    calls it) with each engine on the same images, each warmed up before its clock;
    Keras also at this machine's training precision when that is not float32."""
    import numpy as np

    from tasks.model.features import extract
    from tasks.model.frozen_engine import frozen_runner
    from tasks.model.graphs import build_graphs
    from tasks.runtime import keras_precision, seeded

    def frozen_at(precision: str):
        with keras_precision(precision), seeded(settings.seed):
            return build_graphs(settings)[0]

    float32 = frozen_at("float32")
    runners = {"keras float32": frozen_runner(float32, "keras"),
               "openvino float32": frozen_runner(float32, "openvino")}  # fmt: skip
    if (auto := resolve_precision("auto")) != "float32":
        runners[f"keras {auto}"] = frozen_runner(frozen_at(auto), "keras")
    rates, feats = {}, {}
    for name, runner in runners.items():
        extract(runner, images[: 128 + len(images) % 128])  # both batch shapes traced
        t0 = time.time()
        feats[name] = extract(runner, images)
        rates[name] = len(images) / (time.time() - t0)
    base = rates["keras float32"]
    print(f"frozen-feature extraction: {len(images)} images, batch 128, "
          f"{settings.frozen_layers()} layers")  # fmt: skip
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:8.1f} images/s  ratio {rate / base:.2f}x")
    keras_f, ov_f = (feats[k].astype(np.float32) for k in ("keras float32", "openvino float32"))
    span = float(keras_f.max() - keras_f.min()) or 1.0
    print(f"  openvino vs keras float32 features: max |diff| {np.abs(ov_f - keras_f).max():.2e}"
          f" ({np.abs(ov_f - keras_f).max() / span:.2e} of their range)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    store, dv, lv, what = prepared_store()
    settings = TrainSettings(
        weights="none",  # same compute as imagenet; no download needed
        freeze=15,
        input_size=48,
        epochs=args.epochs,
        views=2,  # the image and its flip
        shift=0.0,
        train_limit=args.images,
        test_limit=500,
    )
    limits = {"train": settings.train_limit, "test": settings.test_limit}
    data = load_data(store, dv, lv, limits, settings.seed)
    n = len(data.train.y)
    work = n * args.epochs
    print(f"{what}: {n} train images, {args.epochs} epochs, 48x48, first 15 layers frozen")

    plain = plain_keras_fit(data.train.images, data.train.y, args.epochs, 48)
    t0 = time.time()
    cold = train(store, dv, lv, settings)
    cold_s = time.time() - t0
    t0 = time.time()
    warm = train(store, dv, lv, settings.model_copy(update={"head_units": 255}))
    warm_s = time.time() - t0
    assert warm["features"]["hit"] and not cold["features"]["hit"]

    print(f"precision: {resolve_precision('auto')}")
    print(f"plain keras fit (float32)  {work / plain:8.1f} images/s  ({plain:.1f} s)")
    print(f"vggprice, cold cache       {work / cold_s:8.1f} images/s  ({cold_s:.1f} s)  "
          f"ratio {plain / cold_s:.2f}x")  # fmt: skip
    print(f"vggprice, warm cache       {work / warm_s:8.1f} images/s  ({warm_s:.1f} s)  "
          f"ratio {plain / warm_s:.2f}x")  # fmt: skip
    extraction_speed(data.train.images, settings)


if __name__ == "__main__":
    main()
