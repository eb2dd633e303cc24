"""Scoring speed by engine and precision: bare Keras predict on decoded arrays against
vggprice scoring end to end on Keras and on OpenVINO, the first drop after a promotion,
and what ``auto`` picked.

N 28x28 PNG images of the labelled test split are written to drops in a local store (one
drop per row below, the same bytes). In one run, on the same model and batch size:
``model.predict`` of the stored float32 model on the already-decoded array, against
vggprice's scoring of a drop (listing, reading, decoding, pre-processing, predicting,
writing Parquet) with Keras float32 and bf16, and OpenVINO float32, bf16 and int8. The
model is promoted and its engines made as promotion makes them (``make_engines``,
timed); the first drop after it is scored with ``auto`` and its engine loaded inside the
clock (what a scorer meets after a promotion; the manifest's reason is printed). Every
other engine is loaded before its clock starts. Each row: images/s, the ratio to bare
Keras float32, the share of the measured roof of that engine and precision, and the RMSE
of the drop's prices against the images' labels next to float32's.

**The roof is measured**, in the same run: a dense (S x S) @ (S x S) matmul through the
same runtime and precision (Keras: ``tf.matmul`` in float32 / bfloat16; OpenVINO: a
MatMul model compiled as the engines are, int8 by NNCF's quantization of it), FLOP/s =
2 S^3 / time. The work per image is the model's own multiply-adds (Conv2D and Dense
layers) x 2.

    .venv/bin/python bench/score_speed.py [--images 2000] [--batch 256] [--roof 2048]
    .venv/bin/python bench/score_speed.py --images 64 --batch 16 --roof 256 --train 200  # tiny
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from _common import prepared_store
from PIL import Image

from tasks.data.loading import load_data
from tasks.governance.engine_gates import int8_gate, make_engines
from tasks.governance.registry import promote
from tasks.model.export import load_stored_model
from tasks.model.ov_runtime import compile_ov, rmse
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train
from tasks.scoring.engines import get_engine
from tasks.scoring.ledger import ScoreOptions
from tasks.scoring.runner import score_drop

RUNS = [("keras", "float32"), ("keras", "bf16"), ("openvino", "float32"),
        ("openvino", "bf16"), ("openvino", "int8")]  # fmt: skip


def model_flops(model) -> float:
    """FLOPs per image (2 x multiply-adds) of the Conv2D and Dense layers."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * layer.input.shape[-1] * c_out
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(layer.input.shape[1:])) * layer.units
    return float(total)


def matmul_roof(engine: str, precision: str, size: int) -> float:
    """Measured FLOP/s of a dense (size x size) @ (size x size) matmul on ``engine`` at
    ``precision`` (best of a few runs after a warm-up)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)
    w = rng.standard_normal((size, size)).astype(np.float32)
    jobs = 1  # matmuls per call
    if engine == "keras":
        import tensorflow as tf

        dtype = tf.bfloat16 if precision == "bf16" else tf.float32
        ta, tw = tf.constant(a, dtype), tf.constant(w, dtype)
        run = tf.function(lambda: tf.matmul(ta, tw))
        call = lambda: run().numpy()  # noqa: E731
    else:
        import openvino as ov
        import openvino.opset13 as ops

        x = ops.parameter([size, size], ov.Type.f32)
        model = ov.Model([ops.matmul(x, ops.constant(w), False, False)], [x])
        if precision == "int8":
            import nncf

            model = nncf.quantize(model, nncf.Dataset([a]), subset_size=1)
        compiled = compile_ov(model, precision)
        # THROUGHPUT gives each stream its own cores: one request alone uses one stream's
        # share, so the roof keeps every stream busy, as the engines' batches do
        jobs = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        queue = ov.AsyncInferQueue(compiled, jobs)  # no callback: nothing runs Python

        def call() -> None:
            for _ in range(jobs):
                queue.start_async({0: a})
            queue.wait_all()

    call()
    best = min(_timed(call) for _ in range(5))
    return 2 * size**3 * jobs / best


def _timed(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--roof", type=int, default=2048, help="matmul size of the measured roof")
    ap.add_argument("--train", type=int, default=500, help="training images of the model")
    args = ap.parse_args()
    store, dv, lv, what = prepared_store()
    settings = TrainSettings(
        weights="none", freeze=15, epochs=1, views=1, train_limit=args.train,
        test_limit=args.images,
    )  # fmt: skip  # the recipe's 48x48 graph; the weights do not change the speed
    mv = train(store, dv, lv, settings)["model_version"]
    promote(store, mv, force=True)  # a bench model need not beat the mean-price baseline
    model = store.model(mv)
    t0 = time.time()
    made = make_engines(model, ScoreOptions(batch_size=args.batch))  # as promotion does
    made_seconds = time.time() - t0
    test = load_data(store, dv, lv, {"test": args.images}, 0).test
    images, labels = test.images[: args.images], test.price[: args.images]
    keys = [f"img-{i:06d}.png" for i in range(len(images))]
    label_of = dict(zip(keys, labels, strict=True))
    drops = ["first-after-promotion", *(f"{e}-{p}" for e, p in RUNS)]
    for key, img in zip(keys, images, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        for drop in drops:
            store.store.put_bytes(f"drops/{drop}/{key}", buf.getvalue())

    bare_model = load_stored_model(model)
    # warmed on the same array: every batch shape it meets (the ragged last one too) is
    # traced before the clock starts, as the engines below are loaded and warmed first
    bare_model.predict(images[..., None], batch_size=args.batch, verbose=0)
    t0 = time.time()
    bare_prices = bare_model.predict(images[..., None], batch_size=args.batch, verbose=0)
    bare = time.time() - t0
    flops = model_flops(bare_model)
    roofs: dict[tuple, float] = {}

    def roof(engine: str, precision: str) -> float:
        if (engine, precision) not in roofs:
            roofs[engine, precision] = matmul_roof(engine, precision, args.roof)
        return roofs[engine, precision]

    n = len(images)
    print(f"{what}: {n} PNG images of 28x28, batch {args.batch}, model {mv} (48x48 VGG16), "
          f"{flops / 1e9:.3f} GFLOP per image (its Conv2D and Dense layers)")  # fmt: skip
    print(f"engines made at promotion in {made_seconds:.1f} s: {made}")
    print(f"limit = images/s x GFLOP per image / the measured roof: a {args.roof}x{args.roof} "
          "matmul through the same engine and precision, in this run")  # fmt: skip
    header = f"{'':58} {'img/s':>8} {'ratio':>7} {'limit':>7} {'RMSE':>9} {'f32 RMSE':>9}"
    print(header)

    def row(name: str, rate: float, engine: str, precision: str, error: float,
            reference: float) -> None:  # fmt: skip
        share = rate * flops / roof(engine, precision)
        print(f"{name:58} {rate:8.1f} {rate * bare / n:6.2f}x {share:6.1%} "
              f"{error:9.4f} {reference:9.4f}")  # fmt: skip

    def drop_rmse(drop: str) -> float:
        rows = store.score_run(drop, mv).prices(["key", "price"]).to_pylist()
        return rmse([r["price"] for r in rows], [label_of[r["key"]] for r in rows])

    reference = rmse(np.asarray(bare_prices).reshape(-1), labels)
    row("bare keras predict, float32, decoded array", n / bare, "keras", "float32", reference,
        reference)  # fmt: skip
    t0 = time.time()  # the first drop after the promotion: auto, its engine loaded here
    first = score_drop(store, "first-after-promotion",
                       options=ScoreOptions(batch_size=args.batch))  # fmt: skip
    seconds = time.time() - t0
    ((picked, reason),) = first["engine_reasons"].items()
    engine, precision = picked.split("/")
    row(f"first drop after promotion, auto: {picked} (load incl.)", n / seconds, engine,
        precision, drop_rmse("first-after-promotion"), reference)  # fmt: skip
    print(f"  auto picked {picked}: {reason}")
    float32 = {}
    for engine, precision in RUNS:
        options = ScoreOptions(batch_size=args.batch, engine=engine, precision=precision)
        if precision == "int8":
            gate = int8_gate(model, options, make=True)  # made at promotion: found here
            if gate is not None:
                print(f"int8 gate: passed={gate['passed']} RMSE int8 {gate['rmse_int8']} vs "
                      f"float32 {gate['rmse_float32']:.4f} (allowed +{gate['allowed_drop']:.4f} "
                      f"on {gate['validation_images']} test images) {gate['reason'] or ''}")  # fmt: skip
        loaded = get_engine(model, options)
        loaded.predict(images[:64], args.batch)  # warm
        drop = f"{engine}-{precision}"
        t0 = time.time()
        result = score_drop(store, drop, options=options)
        seconds = time.time() - t0
        assert result["counts"]["priced"] == n
        error = drop_rmse(drop)
        float32.setdefault(engine, error)
        ran = f"{loaded.engine} {loaded.precision}"
        name = f"vggprice end to end, {ran}" + ("" if ran == drop.replace("-", " ") else
                                                 f" (asked {precision})")  # fmt: skip
        row(name, n / seconds, loaded.engine, loaded.precision, error, float32[engine])
    print("measured roofs (GFLOP/s): " + ", ".join(
        f"{e} {p} {r / 1e9:.0f}" for (e, p), r in sorted(roofs.items())))  # fmt: skip


if __name__ == "__main__":
    main()
