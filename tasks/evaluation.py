"""Evaluation: a model version on a labelled test split, in price units, next to the noise floor."""

from __future__ import annotations

import numpy as np
from prefect import task

from tasks.data import load_data
from tasks.inference import load_stored_model, predict_prices, preprocess_of
from tasks.labels import PriceRule
from tasks.lake import Lake, line_of
from tasks.reports import (
    GARMENTS,
    artifact_key,
    plots_markdown,
    pred_vs_true_plot,
    publish_markdown,
    publish_table,
    residuals_plot,
    rounded,
)
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.train_settings import TrainSettings

RECIPE_MSE_SCALED = 0.0136  # the reference tutorial's val MSE after 5 epochs
RECIPE_RMSE = 25.0  # about that, in price units


def metrics_for(
    true: np.ndarray, pred: np.ndarray, labels: np.ndarray, scaling: dict, rule: PriceRule,
    train_mean: float,
) -> dict:  # fmt: skip
    """RMSE/MAE/MAPE in price units, scaled MSE, the noise floor, the baseline that always
    predicts the mean train price, and a per-class table."""
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
                    "garment": GARMENTS[c] if c < len(GARMENTS) else str(c),
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
        "baseline_rmse": float(np.sqrt(np.mean((true - train_mean) ** 2))),
        "baseline_price": float(train_mean),
        "recipe_mse_scaled": RECIPE_MSE_SCALED,
        "recipe_rmse": RECIPE_RMSE,
        "per_class": per_class,
    }


def verdict(m: dict) -> str:
    """One line a person reads first."""
    rmse, base, floor = m["rmse"], m["baseline_rmse"], m["noise_floor_rmse"]
    if rmse >= base:
        return (f"**Learned nothing useful yet**: RMSE {rmse:.1f} is no better than always "
                f"predicting the mean train price ({base:.1f}).")  # fmt: skip
    gain = f"{1 - rmse / base:.0%} better than always predicting the mean train price"
    if rmse <= m["recipe_rmse"]:
        return f"**Beats the reference recipe** (~{m['recipe_rmse']:.0f}): RMSE {rmse:.1f}, {gain}; the noise floor is {floor:.1f}."
    return (f"**Learned something**: RMSE {rmse:.1f}, {gain} ({base:.1f}); the reference "
            f"recipe reaches about {m['recipe_rmse']:.0f} and no model beats the noise floor "
            f"({floor:.1f}).")  # fmt: skip


def report_markdown(mv: str, labels_version: str, m: dict, plots: dict, sigma: float) -> str:
    """The evaluation report: verdict, metrics, per-garment table, plots inline."""
    rows = "\n".join(
        f"| {r['class']} {r['garment']} | {r['count']} | {r['rmse']:.1f} | {r['mean_pred']:.1f} | "
        f"{r['mean_true']:.1f} |"
        for r in m["per_class"]
    )
    return f"""# Evaluation of `{mv}`

{verdict(m)}

Labels `{labels_version}`, {m["n"]} test images.

| | RMSE (price units) | MAE | MAPE | MSE on the scaled price |
| --- | --- | --- | --- | --- |
| **this model** | **{m["rmse"]:.1f}** | {m["mae"]:.1f} | {m["mape"]:.1f} % | {m["mse_scaled"]:.4f} |
| always the mean train price ({m["baseline_price"]:.2f}) | {m["baseline_rmse"]:.1f} | | | |
| reference recipe | ~{RECIPE_RMSE:.0f} | | | {RECIPE_MSE_SCALED} |
| noise floor | {m["noise_floor_rmse"]:.1f} | | | |

No model can beat the noise floor on average: prices are drawn around a class
mean with sigma {sigma:g}.

| class | test images | RMSE | mean predicted | mean true |
| --- | --- | --- | --- | --- |
{rows}

{plots_markdown(plots)}
"""


def catalog_metrics(
    true: np.ndarray, pred: np.ndarray, labels: np.ndarray, scaling: dict, train_mean: float,
    train_prices: np.ndarray,
) -> dict:  # fmt: skip
    """A catalog's metrics: RMSE/MAE/MAPE, scaled MSE, the mean-train-price baseline, and
    a table per category, or per decile of the train prices when there are none."""
    err = pred - true
    span = (scaling["max"] - scaling["min"]) or 1.0
    names = scaling.get("categories") or []
    if names:
        groups = [(n, labels == i) for i, n in enumerate(names)]
    else:
        edges = np.quantile(train_prices, np.linspace(0, 1, 11))
        which = np.clip(np.searchsorted(edges[1:-1], true, side="right"), 0, 9)
        groups = [(f"decile {d + 1} ({edges[d]:.2f}..{edges[d + 1]:.2f})", which == d)
                  for d in range(10)]  # fmt: skip
    per_group = [
        {"group": name, "count": int(m.sum()), "rmse": float(np.sqrt(np.mean(err[m] ** 2))),
         "mean_pred": float(pred[m].mean()), "mean_true": float(true[m].mean())}
        for name, m in groups if m.any()
    ]  # fmt: skip
    return {
        "n": int(len(true)),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "mape": float(np.mean(np.abs(err) / np.maximum(np.abs(true), 1e-9)) * 100),
        "mse_scaled": float(np.mean((err / span) ** 2)),
        "baseline_rmse": float(np.sqrt(np.mean((true - train_mean) ** 2))),
        "baseline_price": float(train_mean),
        "grouped_by": "category" if names else "price decile",
        "per_group": per_group,
    }


def catalog_verdict(m: dict) -> str:
    rmse, base = m["rmse"], m["baseline_rmse"]
    if rmse >= base:
        return (f"**Learned nothing useful yet**: RMSE {rmse:.2f} is no better than always "
                f"predicting the mean train price ({base:.2f}).")  # fmt: skip
    return (f"**Learned something**: RMSE {rmse:.2f}, {1 - rmse / base:.0%} better than always "
            f"predicting the mean train price ({base:.2f}).")  # fmt: skip


def catalog_report(mv: str, line: str, labels_version: str, m: dict, plots: dict) -> str:
    rows = "\n".join(
        f"| {r['group']} | {r['count']} | {r['rmse']:.2f} | {r['mean_pred']:.2f} | "
        f"{r['mean_true']:.2f} |"
        for r in m["per_group"]
    )
    return f"""# Evaluation of `{mv}` (catalog `{line}`)

{catalog_verdict(m)}

Labels `{labels_version}`, {m["n"]} test images.

| | RMSE (price units) | MAE | MAPE | MSE on the scaled price |
| --- | --- | --- | --- | --- |
| **this model** | **{m["rmse"]:.2f}** | {m["mae"]:.2f} | {m["mape"]:.1f} % | {m["mse_scaled"]:.4f} |
| always the mean train price ({m["baseline_price"]:.2f}) | {m["baseline_rmse"]:.2f} | | | |

| {m["grouped_by"]} | test images | RMSE | mean predicted | mean true |
| --- | --- | --- | --- | --- |
{rows}

{plots_markdown(plots)}
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
                     {"test": settings.test_limit}, settings.seed, *preprocess_of(config))  # fmt: skip
    test = data.test
    pred = predict_prices(load_stored_model(model), test.images)
    prices = lake.labels(lineage["dataset_version"], evaluation.labels_version).prices()
    train_prices = np.array([p for p, s in zip(prices["price"].to_pylist(),
                                               prices["split"].to_pylist(), strict=True)
                             if s == "train"])  # fmt: skip
    train_mean = float(np.mean(train_prices))
    line = line_of(lineage["dataset_version"])
    catalog = data.scaling.get("kind") == "table"
    if catalog:
        metrics = catalog_metrics(test.price, pred, test.labels, data.scaling, train_mean,
                                  train_prices)  # fmt: skip
    else:
        rule = PriceRule(**{k: data.scaling["rule"][k] for k in ("means", "sigma")})
        metrics = metrics_for(test.price, pred, test.labels, data.scaling, rule, train_mean)
    metrics |= {"model_version": mv, "labels_version": evaluation.labels_version}
    plots = {
        "predicted vs true": (pred_vs_true_plot(test.price, pred), "pred_vs_true"),
        "residuals": (residuals_plot(test.price, pred), "residuals"),
    }
    shown = {title: (png, evaluation.write_plot(name, png)) for title, (png, name) in plots.items()}
    evaluation.write_metrics(metrics)
    if evaluation.labels_version == lineage["labels_version"]:
        shown["training curves"] = (model.plot("loss"), model.plot_link("loss"))
    if catalog:
        publish_markdown(
            artifact_key(f"{line}-eval-{mv}"),
            catalog_report(mv, line, evaluation.labels_version, metrics, shown),
            f"evaluation of {mv} ({line}): {catalog_verdict(metrics).split(':')[0].strip('*')}",
        )
        publish_table(artifact_key(f"{line}-eval-{mv}-groups"), rounded(metrics["per_group"]),
                      f"errors per {metrics['grouped_by']}")  # fmt: skip
        get_logger().info("%s (%s): RMSE %.2f (mean-price baseline %.2f) on %d images", mv,
                          line, metrics["rmse"], metrics["baseline_rmse"], metrics["n"])  # fmt: skip
        return metrics
    publish_markdown(
        artifact_key(f"eval-{mv}"),
        report_markdown(mv, evaluation.labels_version, metrics, shown, rule.sigma),
        f"evaluation of {mv}: {verdict(metrics).split(':')[0].strip('*')}",
    )
    publish_table(
        artifact_key(f"eval-{mv}-classes"), rounded(metrics["per_class"]), "per-garment errors"
    )
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
