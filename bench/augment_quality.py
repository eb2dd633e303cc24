"""Augmentation modes: what caching the frozen features costs in quality, and saves in time.

The recipe's shifts are random per batch, which a feature cache cannot hold; the
`cached` mode trains on a fixed number of pre-augmented views instead. This runs
the recipe's settings (48x48, first 15 layers frozen, 5 epochs, shift 0.1 and
flips) in each mode, once per seed (the seed picks the random base weights and
the order; the subset is fixed), and prints the mean time and the test RMSE:

- online: the recipe exactly: the full model with fresh random shifts every batch;
- cached-4 (the default, views=4): image, flip, and two seeded shifted views;
- cached-2 (views=2): image and flip only;
- none: no augmentation.

No ImageNet weights offline, so the frozen layers are random (weights=none,
freeze=15): the comparison is between the modes, not with the recipe's numbers.

    .venv/bin/python bench/augment_quality.py [--images 5000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import prepared_store

from tasks.governance.evaluation import evaluate
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train

MODES = {
    "online": {"augment": "online"},
    "cached-4": {"augment": "cached", "views": 4},
    "cached-2": {"augment": "cached", "views": 2},
    "none": {"augment": "none"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3, help="runs per mode (seed 0, 1, ...)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    args = ap.parse_args()
    store, dv, lv, what = prepared_store()
    print(f"{what}: {args.images} train / {args.test} test images, {args.epochs} epochs, "
          f"48x48, first 15 layers frozen (random), shift 0.1 + flips, seeds 0..{args.seeds - 1}")  # fmt: skip
    print(f"{'mode':10s} {'seconds':>8s} {'RMSE mean':>10s} {'min':>7s} {'max':>7s} {'MSE (scaled)':>13s}")  # fmt: skip
    for name in args.modes.split(","):
        seconds, rmse, mse = [], [], []
        for seed in range(args.seeds):
            settings = TrainSettings(
                weights="none",
                freeze=15,
                input_size=48,
                epochs=args.epochs,
                train_limit=args.images,
                test_limit=args.test,
                seed=seed,
                **MODES[name],
            )
            t0 = time.time()
            trained = train(store, dv, lv, settings)
            seconds.append(time.time() - t0)
            m = evaluate(store, trained["model_version"])
            rmse.append(m["rmse"])
            mse.append(m["mse_scaled"])
        print(f"{name:10s} {np.mean(seconds):8.1f} {np.mean(rmse):10.2f} {min(rmse):7.2f} "
              f"{max(rmse):7.2f} {np.mean(mse):13.4f}", flush=True)  # fmt: skip
    print(f"noise floor RMSE {m['noise_floor_rmse']:.2f}")


if __name__ == "__main__":
    main()
