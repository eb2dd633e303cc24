"""Does a catalog model see colour? The tinted catalog (Fashion-MNIST garments, when the
Debian package is installed, else generated ones, tinted red / green / blue and priced
as the class mean plus the colour's premium: 0, 60 or 120), once in colour and once
made gray, through the real catalog ingest; the same RGB model (weights=none, 32x32,
all layers trained) on each; RMSE next to the mean-price baseline. The colour model
can use the premium, the gray one cannot: its floor is the premium's spread (about 49).

    .venv/bin/python bench/catalog_quality.py [--train 6000 --test 1000 --epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_line

from tasks.data.catalog import ingest_catalog
from tasks.data.fashion_mnist import DEBIAN_DIR, FILES, read_split
from tasks.governance.evaluation import evaluate
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore
from tests.catalog_data import COLOURS, csv_text, garments, write_catalog


def source_images(n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    if all((DEBIAN_DIR / n).is_file() for n in FILES):
        tr, trl = read_split(DEBIAN_DIR, "train")
        te, tel = read_split(DEBIAN_DIR, "test")
        images = np.concatenate([tr[:n_train], te[:n_test]])
        labels = np.concatenate([trl[:n_train], tel[:n_test]])
        what = "Fashion-MNIST"
    else:
        images, labels = garments(n_train + n_test, seed=0)
        what = "generated garments"
    return images, labels, ["train"] * n_train + ["test"] * n_test, what


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--input-size", type=int, default=32)
    args = ap.parse_args()
    print(cpu_line())
    root = Path(tempfile.mkdtemp(prefix="vggprice-catalog-bench-"))
    lake = Lake(LocalStore(root / "lake"))
    images, labels, split, what = source_images(args.train, args.test)
    settings = TrainSettings(weights="none", preprocess="rgb", input_size=args.input_size,
                             epochs=args.epochs, seed=0)  # fmt: skip
    print(f"{what}: {args.train} train / {args.test} test, tints {', '.join(COLOURS)} "
          f"(premiums {', '.join(f'{p:g}' for _, p in COLOURS.values())}), "
          f"{args.epochs} epochs at {args.input_size}x{args.input_size}, weights=none")  # fmt: skip
    results = {}
    for name, gray in (("tinted", False), ("tinted_gray", True)):
        t0 = time.time()
        rows = write_catalog(root / name, images, labels, seed=0, gray=gray)
        for row, s in zip(rows, split, strict=True):
            row["split"] = s
        prices = root / f"{name}.csv"
        prices.write_text(csv_text(rows))
        ingested = ingest_catalog(lake, str(root / name), str(prices), name)
        trained = train(lake, ingested["dataset_version"], ingested["labels_version"], settings)
        results[name] = evaluate(lake, trained["model_version"]) | {"s": time.time() - t0}
    for name, m in results.items():
        seen = "colour" if name == "tinted" else "gray  "
        print(f"{seen}  RMSE {m['rmse']:7.2f}  MAE {m['mae']:6.2f}  MAPE {m['mape']:5.1f} %  "
              f"mean-price baseline {m['baseline_rmse']:6.2f}  ({m['s']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
