"""Scoring speed by engine and precision: bare Keras predict on decoded arrays against
vggprice scoring end to end on Keras and on OpenVINO.

N 28x28 PNG images of the labelled test split are written to drops in a local store (one
drop per row below, the same bytes). In one run, on the same model and batch size:
``model.predict`` of the stored float32 model on the already-decoded array, against
vggprice's scoring of a drop (listing, reading, decoding, pre-processing, predicting,
writing Parquet) with Keras float32 and bf16, and OpenVINO float32, bf16 and int8. Every
engine is loaded (and the int8 model made, with its accuracy gate) before its clock
starts. Each row: images/s, the ratio to bare Keras float32, the share of that
precision's compute limit, and the RMSE of the drop's prices against the images' labels
next to float32's.

The compute limit is the CPU's peak from its features and clock (printed with how it is
derived: cores x clock x operations per cycle per core, assuming two FMA units per core);
the work per image is the model's own multiply-adds (Conv2D and Dense layers) x 2.

    .venv/bin/python bench/score_speed.py [--images 2000] [--batch 256]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
from _common import prepared_store
from PIL import Image

from tasks.data.loading import load_data
from tasks.governance.registry import promote
from tasks.model.export import load_stored_model
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train
from tasks.scoring.engines import get_engine, int8_gate, rmse
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


def cpu_peaks() -> tuple[dict[str, float], str]:
    """Peak operations/s per precision from the CPU's flags and clock, and how."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))  # fmt: skip
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_khz.exists():
        ghz, clock = int(max_khz.read_text()) / 1e6, "cpuinfo_max_freq"
    else:
        mhz = [float(ln.split(":")[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")]
        ghz, clock = (max(mhz) / 1e3 if mhz else 2.0), "/proc/cpuinfo cpu MHz"
    cores = len(os.sched_getaffinity(0))
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4  # fp32 per vector
    per_cycle = {"float32": 2 * 2 * lanes}  # 2 FMA units x (mul+add) x lanes
    if "amx_bf16" in flags:
        per_cycle["bf16"], how_bf16 = 1024, "AMX"
    elif "avx512_bf16" in flags:
        per_cycle["bf16"], how_bf16 = 2 * per_cycle["float32"], "AVX512-BF16"
    else:
        per_cycle["bf16"], how_bf16 = per_cycle["float32"], "none (runs float32)"
    if "amx_int8" in flags:
        per_cycle["int8"], how_int8 = 2048, "AMX"
    elif "avx512_vnni" in flags:
        per_cycle["int8"], how_int8 = 2 * 2 * 64, "AVX512-VNNI"
    elif "avx_vnni" in flags or "avx2" in flags:
        per_cycle["int8"], how_int8 = 2 * 2 * 32, "AVX-VNNI/AVX2"
    else:
        per_cycle["int8"], how_int8 = per_cycle["float32"], "none"
    how = (f"limit = {cores} cores x {ghz:.2f} GHz ({clock}) x ops/cycle/core: "
           f"float32 {per_cycle['float32']} ({lanes}-lane FMA x 2 units), "
           f"bf16 {per_cycle['bf16']} ({how_bf16}), int8 {per_cycle['int8']} ({how_int8}); "
           "theoretical peaks, not measured")  # fmt: skip
    return {p: cores * ghz * 1e9 * n for p, n in per_cycle.items()}, how


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    store, dv, lv, what = prepared_store()
    settings = TrainSettings(
        weights="none", freeze=15, epochs=1, views=1, train_limit=500, test_limit=args.images
    )  # the recipe's 48x48 graph; the weights do not change the speed
    mv = train(store, dv, lv, settings)["model_version"]
    promote(store, mv, force=True)  # a bench model need not beat the mean-price baseline
    test = load_data(store, dv, lv, {"test": args.images}, 0).test
    images, labels = test.images[: args.images], test.price[: args.images]
    keys = [f"img-{i:06d}.png" for i in range(len(images))]
    label_of = dict(zip(keys, labels, strict=True))
    for key, img in zip(keys, images, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        for engine, precision in RUNS:
            store.store.put_bytes(f"drops/{engine}-{precision}/{key}", buf.getvalue())

    model = store.model(mv)
    bare_model = load_stored_model(model)
    # warmed on the same array: every batch shape it meets (the ragged last one too) is
    # traced before the clock starts, as the engines below are loaded and warmed first
    bare_model.predict(images[..., None], batch_size=args.batch, verbose=0)
    t0 = time.time()
    bare_prices = bare_model.predict(images[..., None], batch_size=args.batch, verbose=0)
    bare = time.time() - t0
    flops = model_flops(bare_model)
    peaks, how = cpu_peaks()

    n = len(images)
    print(f"{what}: {n} PNG images of 28x28, batch {args.batch}, model {mv} (48x48 VGG16), "
          f"{flops / 1e9:.3f} GFLOP per image (its Conv2D and Dense layers)")  # fmt: skip
    print(how)
    header = f"{'':46} {'img/s':>8} {'ratio':>7} {'limit':>7} {'RMSE':>9} {'f32 RMSE':>9}"
    print(header)

    def row(name: str, rate: float, precision: str, error: float, reference: float) -> None:
        share = rate * flops / peaks[precision]
        print(f"{name:46} {rate:8.1f} {rate * bare / n:6.2f}x {share:6.1%} "
              f"{error:9.4f} {reference:9.4f}")  # fmt: skip

    reference = rmse(np.asarray(bare_prices).reshape(-1), labels)
    row("bare keras predict, float32, decoded array", n / bare, "float32", reference, reference)
    float32 = {}
    for engine, precision in RUNS:
        options = ScoreOptions(batch_size=args.batch, engine=engine, precision=precision)
        if precision == "int8":
            gate = int8_gate(model, options, make=True)  # made once, before the clock
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
        rows = store.score_run(drop, mv).prices(["key", "price"]).to_pylist()
        error = rmse([r["price"] for r in rows], [label_of[r["key"]] for r in rows])
        float32.setdefault(engine, error)
        ran = f"{loaded.engine} {loaded.precision}"
        name = f"vggprice end to end, {ran}" + ("" if ran == drop.replace("-", " ") else
                                                 f" (asked {precision})")  # fmt: skip
        row(name, n / seconds, loaded.precision, error, float32[engine])


if __name__ == "__main__":
    main()
