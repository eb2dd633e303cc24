"""Evaluation: a model version on a labelled test split, in price units, next to the noise floor."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
from prefect import task

from tasks.labels import PriceRule
from tasks.model import TrainSettings
from tasks.reports import (
    artifact_key,
    pred_vs_true_plot,
    publish_markdown,
    publish_table,
    residuals_plot,
)
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.storage import ObjectNotFound, Store, model_prefix, open_store
from tasks.training import load_data, read_model_config

RECIPE_MSE_SCALED = 0.0136  # the reference tutorial's val MSE after 5 epochs
RECIPE_RMSE = 25.0  # about that, in price units


def load_model(store: Store, mv: str):
    """The stored model.keras, loaded with safe_mode=True (no custom code)."""
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        store.get_file(model_prefix(mv) + "model.keras", path)
        return keras.models.load_model(path, safe_mode=True)


def predict_prices(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Prices for uint8 (n, 28, 28) gray images."""
    out = model.predict(images[..., None], batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=np.float64).reshape(-1)


def metrics_for(
    true: np.ndarray, pred: np.ndarray, labels: np.ndarray, scaling: dict, rule: PriceRule
) -> dict:
    """RMSE/MAE/MAPE in price units, scaled MSE, the noise floor and a per-class table."""
    err = pred - true
    span = scaling["max"] - scaling["min"]
    floor = np.asarray(rule.means)[labels] - true
    per_class = []
    for c in range(len(rule.means)):
        m = labels == c
        if m.any():
            per_class.append(
                {
                    "class": c,
                    "count": int(m.sum()),
                    "rmse": float(np.sqrt(np.mean(err[m] ** 2))),
                    "mean_pred": float(pred[m].mean()),
                    "mean_true": float(true[m].mean()),
                }
            )
    return {
        "n": int(len(true)),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "mape": float(np.mean(np.abs(err) / np.maximum(np.abs(true), 1e-9)) * 100),
        "mse_scaled": float(np.mean((err / span) ** 2)),
        "noise_floor_rmse": float(np.sqrt(np.mean(floor**2))),
        "recipe_mse_scaled": RECIPE_MSE_SCALED,
        "recipe_rmse": RECIPE_RMSE,
        "per_class": per_class,
    }


def report_markdown(mv: str, labels_version: str, m: dict, links: dict) -> str:
    rows = "\n".join(
        f"| {r['class']} | {r['count']} | {r['rmse']:.2f} | {r['mean_pred']:.2f} | "
        f"{r['mean_true']:.2f} |"
        for r in m["per_class"]
    )
    plots = "\n".join(f"- [{name}]({url})" for name, url in links.items())
    return f"""# Evaluation of `{mv}`

Labels `{labels_version}`, {m["n"]} test images.

| metric | this model | noise floor | reference recipe |
| --- | --- | --- | --- |
| RMSE (price units) | **{m["rmse"]:.2f}** | {m["noise_floor_rmse"]:.2f} | ~{RECIPE_RMSE:.0f} |
| MAE (price units) | {m["mae"]:.2f} | | |
| MAPE | {m["mape"]:.1f} % | | |
| MSE on the scaled price | {m["mse_scaled"]:.4f} | | {RECIPE_MSE_SCALED} |

No model can beat the noise floor on average: prices are drawn around a class
mean with sigma 3.

| class | count | RMSE | mean predicted | mean true |
| --- | --- | --- | --- | --- |
{rows}

Plots:
{plots}
"""


def evaluate(store: Store, mv: str, labels_version: str | None = None) -> dict:
    """Score the test split and write metrics.json and plots (under models/<v>/ for the
    model's own labels, under models/<v>/eval/<labels>/ for other labels)."""
    config = read_model_config(store, mv)
    lineage = config["lineage"]
    own = labels_version in (None, lineage["labels_version"])
    labels_version = labels_version or lineage["labels_version"]
    out = eval_prefix(mv, labels_version, lineage["labels_version"])
    with contextlib.suppress(ObjectNotFound):
        existing = store.get_json(out + "metrics.json")
        get_logger().info("%s already evaluated on %s; nothing redone", mv, labels_version)
        return existing | {"skipped": True}
    settings = TrainSettings(**config["settings"])
    data = load_data(store, lineage["dataset_version"], labels_version, settings, ("test",))
    model = load_model(store, mv)
    test = data["test"]
    pred = predict_prices(model, test["images"])
    rule = PriceRule(**{k: data["scaling"]["rule"][k] for k in ("means", "sigma")})
    metrics = metrics_for(test["price"], pred, test["labels"], data["scaling"], rule)
    metrics |= {"model_version": mv, "labels_version": labels_version}
    store.put_bytes(out + "plots/pred_vs_true.png", pred_vs_true_plot(test["price"], pred))
    store.put_bytes(out + "plots/residuals.png", residuals_plot(test["price"], pred))
    store.put_json(out + "metrics.json", metrics)
    links = {n: store.link_for(out + f"plots/{n}.png") for n in ("pred_vs_true", "residuals")}
    if own:
        links["loss"] = store.link_for(model_prefix(mv) + "plots/loss.png")
    publish_markdown(
        artifact_key(f"eval-{mv}"),
        report_markdown(mv, labels_version, metrics, links),
        f"evaluation of {mv}",
    )
    publish_table(artifact_key(f"eval-{mv}-classes"), metrics["per_class"], "per-class errors")
    get_logger().info(
        "%s: RMSE %.2f (noise floor %.2f), scaled MSE %.4f on %d images",
        mv,
        metrics["rmse"],
        metrics["noise_floor_rmse"],
        metrics["mse_scaled"],
        metrics["n"],
    )
    return metrics


def eval_prefix(mv: str, labels_version: str, own_labels_version: str) -> str:
    """models/<v>/ for the model's own labels, models/<v>/eval/<labels>/ for others."""
    return model_prefix(mv) + (
        "" if labels_version == own_labels_version else f"eval/{labels_version}/"
    )


def read_metrics(store: Store, mv: str, labels_version: str | None = None) -> dict | None:
    own = store.get_json(model_prefix(mv) + "lineage.json")["labels_version"]
    try:
        return store.get_json(eval_prefix(mv, labels_version or own, own) + "metrics.json")
    except ObjectNotFound:
        return None


@task(name="evaluate-model", **TASK_RETRIES)
def evaluate_model(store_uri: str, model_version: str, labels_version: str | None = None) -> dict:
    """Metrics and plots of a model version on a labelled test split."""
    return evaluate(open_store(store_uri), model_version, labels_version)
