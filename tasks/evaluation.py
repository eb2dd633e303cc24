"""Evaluation: a model version on a labelled test split, in price units, next to the noise floor."""

from __future__ import annotations

import numpy as np
from prefect import task

from tasks.data import load_data
from tasks.inference import load_stored_model, predict_prices
from tasks.labels import PriceRule
from tasks.lake import Lake
from tasks.reports import (
    artifact_key,
    pred_vs_true_plot,
    publish_markdown,
    publish_table,
    residuals_plot,
)
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.train_settings import TrainSettings

RECIPE_MSE_SCALED = 0.0136  # the reference tutorial's val MSE after 5 epochs
RECIPE_RMSE = 25.0  # about that, in price units


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


def report_markdown(mv: str, labels_version: str, m: dict, links: dict, sigma: float) -> str:
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
mean with sigma {sigma:g}.

| class | count | RMSE | mean predicted | mean true |
| --- | --- | --- | --- | --- |
{rows}

Plots:
{plots}
"""


def evaluate(lake: Lake, mv: str, labels_version: str | None = None) -> dict:
    """Score the test split and write metrics.json and plots (under models/<v>/ for the
    model's own labels, under models/<v>/eval/<labels>/ for other labels)."""
    model = lake.model(mv)
    config, lineage = model.config(), model.lineage()
    evaluation = model.evaluation(labels_version)
    existing = evaluation.metrics()
    if existing is not None:
        get_logger().info(
            "%s already evaluated on %s; nothing redone", mv, evaluation.labels_version
        )
        return existing | {"skipped": True}
    settings = TrainSettings(**config["settings"])
    data = load_data(lake, lineage["dataset_version"], evaluation.labels_version,
                     {"test": settings.test_limit}, settings.seed)  # fmt: skip
    test = data.test
    pred = predict_prices(load_stored_model(model), test.images)
    rule = PriceRule(**{k: data.scaling["rule"][k] for k in ("means", "sigma")})
    metrics = metrics_for(test.price, pred, test.labels, data.scaling, rule)
    metrics |= {"model_version": mv, "labels_version": evaluation.labels_version}
    links = {
        "pred_vs_true": evaluation.write_plot("pred_vs_true", pred_vs_true_plot(test.price, pred)),
        "residuals": evaluation.write_plot("residuals", residuals_plot(test.price, pred)),
    }
    evaluation.write_metrics(metrics)
    if evaluation.labels_version == lineage["labels_version"]:
        links["loss"] = model.plot_link("loss")
    publish_markdown(
        artifact_key(f"eval-{mv}"),
        report_markdown(mv, evaluation.labels_version, metrics, links, rule.sigma),
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


def read_metrics(lake: Lake, mv: str, labels_version: str | None = None) -> dict | None:
    return lake.model(mv).evaluation(labels_version).metrics()


@task(name="evaluate-model", **TASK_RETRIES)
def evaluate_model(store_uri: str, model_version: str, labels_version: str | None = None) -> dict:
    """Metrics and plots of a model version on a labelled test split."""
    from tasks.storage import open_store

    return evaluate(Lake(open_store(store_uri)), model_version, labels_version)
