"""Scoring speed: bare Keras predict on decoded arrays against vggprice scoring end to end.

N 28x28 PNG images are written to a drop in a local store. In one run, on the same
model and batch size: ``model.predict`` of the stored float32 model on the
already-decoded array, against vggprice's scoring of the drop (listing, reading,
decoding, pre-processing, predicting at the auto precision, writing Parquet).
Both load the model before the clock starts.

    .venv/bin/python bench/score_speed.py [--images 2000] [--batch 256]
"""

from __future__ import annotations

import argparse
import io
import time

from _common import prepared_store
from PIL import Image

from tasks.data.loading import load_data
from tasks.governance.registry import promote
from tasks.model.export import get_model, load_stored_model, resolve_precision
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train
from tasks.scoring.ledger import ScoreOptions
from tasks.scoring.runner import score_drop


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
    promote(store, mv)
    images = load_data(store, dv, lv, {"test": args.images}, 0).test.images[: args.images]
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        for drop in ("bench", "bench-f32"):
            store.store.put_bytes(f"drops/{drop}/img-{i:06d}.png", buf.getvalue())

    bare_model = load_stored_model(store.model(mv))
    bare_model.predict(images[:64, ..., None], batch_size=args.batch, verbose=0)
    t0 = time.time()
    bare_model.predict(images[..., None], batch_size=args.batch, verbose=0)
    bare = time.time() - t0

    options = ScoreOptions(batch_size=args.batch)
    get_model(store.model(mv), options.precision)[0].predict(images[:64, ..., None], verbose=0)
    t0 = time.time()
    result = score_drop(store, "bench", options=options)
    ours = time.time() - t0
    assert result["counts"]["priced"] == len(images)

    f32 = ScoreOptions(batch_size=args.batch, precision="float32")
    get_model(store.model(mv), "float32")[0].predict(images[:64, ..., None], verbose=0)
    t0 = time.time()
    score_drop(store, "bench-f32", options=f32)
    ours32 = time.time() - t0

    n = len(images)
    print(f"{what}: {n} PNG images of 28x28, batch {args.batch}, model {mv} (48x48 VGG16)")
    print(f"bare keras predict, float32, decoded array  {n / bare:8.1f} images/s")
    print(f"vggprice score end to end ({resolve_precision(options.precision)})"
          f"  {n / ours:8.1f} images/s   ratio {bare / ours:.2f}x")  # fmt: skip
    print(f"vggprice score end to end (float32)"
          f"  {n / ours32:8.1f} images/s   ratio {bare / ours32:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
