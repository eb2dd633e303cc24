"""A fixed offline quality benchmark: compare later changes against these numbers.

weights=none (no download), a seeded 10,000 / 2,000 subset, seed 0, 32x32 input,
all layers trained (the default with random weights), 3 epochs. Prints RMSE and
the scaled MSE next to the noise floor and the reference recipe's figures.

    .venv/bin/python bench/quality.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import time

from _common import prepared_store

from tasks.governance.evaluation import evaluate
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--augment", default="cached")
    args = ap.parse_args()
    store, dv, lv, what = prepared_store()
    settings = TrainSettings(
        weights="none",
        input_size=32,
        epochs=args.epochs,
        augment=args.augment,
        train_limit=10_000,
        test_limit=2_000,
        seed=0,
    )
    t0 = time.time()
    trained = train(store, dv, lv, settings)
    m = evaluate(store, trained["model_version"])
    print(f"{what}, 10k/2k subset, {args.epochs} epochs, augment={args.augment}, "
          f"{time.time() - t0:.0f} s")  # fmt: skip
    print(f"RMSE          {m['rmse']:7.2f}   noise floor {m['noise_floor_rmse']:.2f}   "
          f"recipe ~{m['recipe_rmse']:.0f}")  # fmt: skip
    print(f"MSE (scaled)  {m['mse_scaled']:7.4f}   recipe {m['recipe_mse_scaled']}")
    print(f"MAE {m['mae']:.2f}  MAPE {m['mape']:.1f} %")


if __name__ == "__main__":
    main()
