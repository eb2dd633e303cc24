"""A catalog that grows: ingest and training at several sizes, then the same catalog with
1 % new photos and 1 % of its prices changed.

    .venv/bin/python bench/catalog_scale.py [--sizes 4000,16000,64000] [--views 4]
        [--from-scratch | --compare] [--epochs 1] [--lr-schedule inverse_time]

Synthetic catalogs: Fashion-MNIST garments (the Debian package's, else generated ones)
tinted with a seeded colour, 64x64 JPEG in nested folders, priced by class and colour,
with a prices CSV. For each size, each stage runs in a fresh process (its own peak RSS,
workers included): ingest with 1 and with 2 decode workers (fresh stores), training of
the top on frozen features (input 32, blocks 1-4 frozen, four cached views, one epoch:
the issue's catalog command), then +1 % photos and 1 % prices changed and both stages
again, the training warm-started from the first model (``--from-scratch``: not;
``--compare``: both). Prints images decoded and features extracted (counts), the images
the +1 % training fit, the wall times and the +1 % run's share of the first, each
model's test RMSE next to the mean-price baseline, and peak RSS against the smallest
size. Targets (issue): peak RSS at the largest size at most 1.25x the smallest; ingest
at least 1.6x faster with 2 workers than with 1; the +1 % run decodes and extracts only
the new images and takes at most 15 % of the first run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bench._common import cpu_line  # noqa: E402

# The catalog command: weights none, blocks 1-4 frozen, input 32, one epoch, and
# the default four cached views per train image.
SETTINGS = {"weights": "none", "freeze": 15, "input_size": 32, "epochs": 1, "views": 4,
            "preprocess": "rgb"}  # fmt: skip


def make_catalog(root: Path, n: int, start: int = 0) -> list[dict]:
    """n tinted 64x64 JPEGs under root/photos/<colour>/<block>/, and their price rows."""
    import numpy as np
    from PIL import Image

    from tasks.data.fashion_mnist import DEBIAN_DIR, FILES, read_split
    from tasks.data.prices import DEFAULT_MEANS
    from tasks.reports import GARMENTS
    from tests.catalog_data import COLOURS, tint

    if all((DEBIAN_DIR / f).is_file() for f in FILES):
        images, labels = read_split(DEBIAN_DIR, "train")
    else:
        from tests.catalog_data import garments

        images, labels = garments(60000, seed=0)
    rng = np.random.default_rng(start + 1)
    names = list(COLOURS)
    rows = []
    for i in range(start, start + n):
        img, c = images[i % len(images)], int(labels[i % len(images)])
        colour = names[int(rng.integers(len(names)))]
        rgb = Image.fromarray(tint(img, colour)).resize((64, 64), Image.BILINEAR)
        key = f"{colour}/{i // 1000:03d}/{i:06d}.jpg"
        path = root / "photos" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb.save(path, format="JPEG", quality=90)
        price = DEFAULT_MEANS[c] + COLOURS[colour][1] + float(rng.normal(0, 2.0))
        rows.append({"image": key, "price": f"{price:.2f}", "category": GARMENTS[c]})
    return rows


def write_prices(root: Path, rows: list[dict]) -> str:
    from tests.catalog_data import csv_text

    (root / "prices.csv").write_text(csv_text(rows))
    return str(root / "prices.csv")


def stage(args: list[str], views: int) -> dict:
    """One stage in a fresh process: its result, wall time and peak RSS (itself and its
    children, the decode workers)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--stage", *args[:4], str(views), *args[4:]],
                         capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"stage {args[0]} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {"wall": time.perf_counter() - t0}


def run_stage(argv: list[str]) -> None:
    import numpy as np

    from tasks.store.lake import Lake
    from tasks.store.storage import LocalStore

    what, store, source, prices, views = argv[:5]
    argv = argv[:4] + argv[5:]
    SETTINGS.update(json.loads(os.environ.get("CATALOG_SCALE_SETTINGS", "{}")))
    lake = Lake(LocalStore(store))
    if what == "ingest":
        from tasks.data.catalog import ingest_catalog

        t0 = time.perf_counter()
        out = ingest_catalog(lake, source, prices, "bench", workers=int(argv[4]))
        result = {k: out[k] for k in ("dataset_version", "labels_version", "decoded", "reused")}
        result["seconds"] = time.perf_counter() - t0
    else:
        from tasks.model.train_settings import TrainSettings
        from tasks.model.training import train

        dv, lv = argv[4], argv[5]
        warm = argv[6] if len(argv) > 6 else "off"
        t0 = time.perf_counter()
        out = train(
            lake, dv, lv, TrainSettings(**SETTINGS | {"views": int(views), "warm_start": warm})
        )
        seconds = time.perf_counter() - t0
        from tasks.data.loading import load_data

        scaling = lake.labels(dv, lv).scaling()
        val_mse = lake.model(out["model_version"]).history()["val_loss"][-1]
        data = load_data(lake, dv, lv, {"test": None}, 0, pixels=False)
        baseline = float(np.sqrt(np.mean((data.test.price - data.train_prices.mean()) ** 2)))
        result = {"model_version": out["model_version"], "features": out.get("features"),
                  "train_images": out.get("train_images"), "fit_images": out.get("fit_images"),
                  "warm_start": out.get("warm_start"), "seconds": seconds,
                  "rmse": val_mse**0.5 * (scaling["max"] - scaling["min"]),
                  "baseline_rmse": baseline}  # fmt: skip
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps(result | {"rss": own, "rss_workers": kids}))


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4000,16000,64000")
    p.add_argument("--views", type=int, default=SETTINGS["views"], help="cached views (default 4)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    p.add_argument("--epochs", type=int, default=SETTINGS["epochs"], help="epochs (default 1)")
    p.add_argument("--lr-schedule", default="inverse_time", choices=["inverse_time", "cosine"])
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="train the +1 %% version from the start (default: warm start from the "
        "first model: its top, fit on what changed plus 4x that many others)",
    )
    p.add_argument("--compare", action="store_true",
                   help="also train the +1 %% version from the start: its share and test RMSE")  # fmt: skip
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(cpu_line())
    settings = SETTINGS | {"views": args.views, "epochs": args.epochs,
                           "lr_schedule": args.lr_schedule}  # fmt: skip
    os.environ["CATALOG_SCALE_SETTINGS"] = json.dumps(settings)
    print(f"settings: {settings}; catalogs 64x64 JPEG, sizes {sizes} ({sizes[-1] // sizes[0]}x)")
    work = Path(tempfile.mkdtemp(prefix="vggprice-catalog-scale-"))
    table = []
    try:
        for n in sizes:
            root = work / f"n{n}"
            rows = make_catalog(root, n)
            prices = write_prices(root, rows)
            source = str(root / "photos")
            one = stage(["ingest", str(root / "lake1"), source, prices, "1"], args.views)
            two = stage(["ingest", str(root / "lake2"), source, prices, "2"], args.views)
            shutil.rmtree(root / "lake1")
            fit = stage(["train", str(root / "lake2"), source, prices, two["dataset_version"],
                         two["labels_version"]], args.views)  # fmt: skip
            # +1 % new photos, 1 % of the prices changed
            add = max(1, n // 100)
            new_rows = make_catalog(root, add, start=n)
            for r in rows[: max(1, n // 100)]:
                r["price"] = f"{float(r['price']) + 10:.2f}"
            write_prices(root, rows + new_rows)
            again = stage(["ingest", str(root / "lake2"), source, prices, "2"], args.views)
            grown = ["train", str(root / "lake2"), source, prices, again["dataset_version"],
                     again["labels_version"]]  # fmt: skip
            refit = stage(grown + ([] if args.from_scratch else [fit["model_version"]]),
                          args.views)  # fmt: skip
            scratch = stage(grown, args.views) if args.compare else None
            first_wall, second_wall = two["wall"] + fit["wall"], again["wall"] + refit["wall"]
            feats = fit["features"] or {}
            row = {
                "n": n,
                "ingest_1w_s": one["seconds"], "ingest_2w_s": two["seconds"],
                "ingest_1w_ips": n / one["seconds"], "ingest_2w_ips": n / two["seconds"],
                "ingest_speedup": one["seconds"] / two["seconds"],
                "ingest_rss": two["rss"], "ingest_rss_workers": two["rss_workers"],
                "train_s": fit["seconds"], "train_rss": fit["rss"],
                "extract_ips": feats.get("extracted_images", 0) / max(feats.get("seconds", 0), 1e-9),
                "added": add, "decoded_again": again["decoded"],
                "extracted_again": (refit["features"] or {}).get("extracted_images"),
                "first_wall": first_wall, "second_wall": second_wall,
                "share": second_wall / first_wall,
                "fit_again": refit["fit_images"], "rmse_first": fit["rmse"],
                "rmse_again": refit["rmse"], "baseline_rmse": refit["baseline_rmse"],
                "rmse_scratch": scratch["rmse"] if scratch else None,
                "scratch_share": (again["wall"] + scratch["wall"]) / first_wall if scratch else None,
            }  # fmt: skip
            table.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        "| images | ingest 1 worker | ingest 2 workers | speed-up | ingest peak RSS (parent / "
        "worker) | train peak RSS | extraction img/s | +1 %: decoded / extracted | +1 % wall "
        "share | +1 %: images fit | test RMSE: first / +1 % (mean-price baseline) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['n']:,} | {r['ingest_1w_s']:.1f} s ({r['ingest_1w_ips']:.0f}/s) | "
              f"{r['ingest_2w_s']:.1f} s ({r['ingest_2w_ips']:.0f}/s) | {r['ingest_speedup']:.2f}x"
              f" | {mb(r['ingest_rss'])} / {mb(r['ingest_rss_workers'])} | {mb(r['train_rss'])} | "
              f"{r['extract_ips']:.0f} | {r['decoded_again']} / {r['extracted_again']} of "
              f"{r['added']} new | {r['share']:.1%} | {r['fit_again']:,} | {r['rmse_first']:.2f} / "
              f"{r['rmse_again']:.2f} ({r['baseline_rmse']:.2f}) |")  # fmt: skip
    for r in table:
        if r["rmse_scratch"] is not None:
            print(f"{r['n']:,} images, +1 % trained from the start instead: share "
                  f"{r['scratch_share']:.1%}, test RMSE {r['rmse_scratch']:.2f}")  # fmt: skip
    small, large = table[0], table[-1]
    print()
    checks = [
        ("ingest peak RSS, largest / smallest", large["ingest_rss"] / small["ingest_rss"], "<= 1.25",
         large["ingest_rss"] <= 1.25 * small["ingest_rss"]),
        ("train peak RSS, largest / smallest", large["train_rss"] / small["train_rss"], "<= 1.25",
         large["train_rss"] <= 1.25 * small["train_rss"]),
        ("ingest speed-up, 2 workers vs 1 (largest)", large["ingest_speedup"], ">= 1.6",
         large["ingest_speedup"] >= 1.6),
        ("+1 % run's wall share (largest)", large["share"], "<= 0.15", large["share"] <= 0.15),
        ("+1 % run decodes only the new images", float(all(r["decoded_again"] == r["added"]
                                                           for r in table)), "== 1", all(
            r["decoded_again"] == r["added"] for r in table)),
        ("+1 % run extracts only the new images (within their pixel shard)", float(all(
            (r["extracted_again"] or 0) <= r["added"] for r in table)), "== 1", all(
            (r["extracted_again"] or 0) <= r["added"] for r in table)),
    ]  # fmt: skip
    for name, value, target, ok in checks:
        print(f"{name}: {value:.2f} (target {target}) {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--stage":
        run_stage(sys.argv[2:])
    else:
        sys.exit(main())
