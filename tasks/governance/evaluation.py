"""Evaluation: a model version on a labelled test split, in price units, next to the noise floor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from prefect import task

from tasks.data.loading import Split, iter_pixels, load_data
from tasks.data.prices import PriceRule
from tasks.governance import tracking
from tasks.model.export import load_stored_model, predict_prices, preprocess_of
from tasks.model.train_settings import TrainSettings
from tasks.reports import (
    GARMENTS,
    line_key,
    plots_markdown,
    pred_vs_true_plot,
    publish_markdown,
    publish_table,
    residuals_plot,
    rounded,
)
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.store.lake import DEMO_LINE, Lake, line_of

RECIPE_MSE_SCALED = 0.0136  # the reference tutorial's val MSE after 5 epochs
RECIPE_RMSE = 25.0  # about that, in price units


def error_metrics(true: np.ndarray, pred: np.ndarray, scaling: dict, train_mean: float) -> dict:
    """RMSE/MAE/MAPE in price units, MSE on the scaled price, and the baseline that
    always predicts the mean train price: what every evaluation reports."""
    err = pred - true
    span = (scaling["max"] - scaling["min"]) or 1.0
    return {
        "n": int(len(true)),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "mape": float(np.mean(np.abs(err) / np.maximum(np.abs(true), 1e-9)) * 100),
        "mse_scaled": float(np.mean((err / span) ** 2)),
        "baseline_rmse": float(np.sqrt(np.mean((true - train_mean) ** 2))),
        "baseline_price": float(train_mean),
    }


def group_errors(true: np.ndarray, pred: np.ndarray, groups: list[tuple[dict, np.ndarray]]):
    """One row per non-empty group (its fields, then count, RMSE, mean predicted/true)."""
    return [
        fields | {"count": int(m.sum()), "rmse": float(np.sqrt(np.mean((pred[m] - true[m]) ** 2))),
                  "mean_pred": float(pred[m].mean()), "mean_true": float(true[m].mean())}
        for fields, m in groups
        if m.any()
    ]  # fmt: skip


def demo_metrics(test: Split, pred: np.ndarray, scaling: dict, train_mean: float) -> dict:
    """The demo's metrics: the common ones, the noise floor of the price rule, the
    recipe's figures and a per-class table."""
    rule = PriceRule(**{k: scaling["rule"][k] for k in ("means", "sigma")})
    floor = np.asarray(rule.means)[test.classes] - test.price
    classes = [
        ({"class": c, "garment": GARMENTS[c] if c < len(GARMENTS) else str(c)}, test.classes == c)
        for c in range(len(rule.means))
    ]
    return error_metrics(test.price, pred, scaling, train_mean) | {
        "noise_floor_rmse": float(np.sqrt(np.mean(floor**2))),
        "recipe_mse_scaled": RECIPE_MSE_SCALED,
        "recipe_rmse": RECIPE_RMSE,
        "per_class": group_errors(test.price, pred, classes),
    }


def catalog_metrics(
    test: Split, pred: np.ndarray, scaling: dict, train_mean: float, train_prices: np.ndarray
) -> dict:
    """A catalog's metrics: the common ones and a table per category, or per decile of
    the train prices when there are none."""
    true, names = test.price, scaling.get("categories") or []
    if names:
        groups = [(n, test.classes == i) for i, n in enumerate(names)]
    else:
        edges = np.quantile(train_prices, np.linspace(0, 1, 11))
        which = np.clip(np.searchsorted(edges[1:-1], true, side="right"), 0, 9)
        groups = [(f"decile {d + 1} ({edges[d]:.2f}..{edges[d + 1]:.2f})", which == d)
                  for d in range(10)]  # fmt: skip
    return error_metrics(true, pred, scaling, train_mean) | {
        "grouped_by": "category" if names else "price decile",
        "per_group": group_errors(true, pred, [({"group": n}, m) for n, m in groups]),
    }


def verdict(m: dict) -> str:
    """One line a person reads first (the recipe and the noise floor where they apply)."""
    rmse, base = m["rmse"], m["baseline_rmse"]
    if rmse >= base:
        return (f"**Learned nothing useful yet**: RMSE {rmse:.1f} is no better than always "
                f"predicting the mean train price ({base:.1f}).")  # fmt: skip
    gain = f"{1 - rmse / base:.0%} better than always predicting the mean train price"
    if "recipe_rmse" not in m:
        return f"**Learned something**: RMSE {rmse:.1f}, {gain} ({base:.1f})."
    floor = m["noise_floor_rmse"]
    if rmse <= m["recipe_rmse"]:
        return f"**Beats the reference recipe** (~{m['recipe_rmse']:.0f}): RMSE {rmse:.1f}, {gain}; the noise floor is {floor:.1f}."
    return (f"**Learned something**: RMSE {rmse:.1f}, {gain} ({base:.1f}); the reference "
            f"recipe reaches about {m['recipe_rmse']:.0f} and no model beats the noise floor "
            f"({floor:.1f}).")  # fmt: skip


def report_markdown(
    heading: str, labels_version: str, m: dict, plots: dict, groups: tuple[str, list],
    digits: int = 1, extra_rows: str = "", note: str = "",
) -> str:  # fmt: skip
    """An evaluation report: verdict, the metrics next to the mean-price baseline (plus
    ``extra_rows``, each after a newline, and a ``note`` where the kind of model has them), the error table
    ``groups`` = (header, [(row label, row)]), and the plots inline."""
    f = f".{digits}f"
    header, rows = groups
    table = "\n".join(
        f"| {label} | {r['count']} | {r['rmse']:{f}} | {r['mean_pred']:{f}} | {r['mean_true']:{f}} |"
        for label, r in rows
    )
    return f"""# Evaluation of {heading}

{verdict(m)}

Labels `{labels_version}`, {m["n"]} test images.

| | RMSE (price units) | MAE | MAPE | MSE on the scaled price |
| --- | --- | --- | --- | --- |
| **this model** | **{m["rmse"]:{f}}** | {m["mae"]:{f}} | {m["mape"]:.1f} % | {m["mse_scaled"]:.4f} |
| always the mean train price ({m["baseline_price"]:.2f}) | {m["baseline_rmse"]:{f}} | | | |{extra_rows}

{note}| {header} | test images | RMSE | mean predicted | mean true |
| --- | --- | --- | --- | --- |
{table}

{plots_markdown(plots)}
"""


@dataclass(frozen=True)
class Publication:
    """What an evaluation shows in the Prefect UI and the log."""

    key: str  # the report's artifact key; the table's is key + table_suffix
    markdown: str
    description: str
    table_suffix: str
    table: list[dict]
    table_description: str
    summary: str  # the log line


def demo_publication(
    store_uri: str, model_version: str, labels_version: str, m: dict, plots: dict, sigma: float
):
    extra = (f"\n| reference recipe | ~{RECIPE_RMSE:.0f} | | | {RECIPE_MSE_SCALED} |\n"
             f"| noise floor | {m['noise_floor_rmse']:.1f} | | | |")  # fmt: skip
    note = ("No model can beat the noise floor on average: prices are drawn around a class\n"
            f"mean with sigma {sigma:g}.\n\n")  # fmt: skip
    rows = [(f"{r['class']} {r['garment']}", r) for r in m["per_class"]]
    return Publication(
        key=line_key(store_uri, DEMO_LINE, f"eval-{model_version}"),
        markdown=report_markdown(
            f"`{model_version}`", labels_version, m, plots, ("class", rows), 1, extra, note
        ),  # fmt: skip
        description=f"evaluation of {model_version}: {headline(m)}",
        table_suffix="-classes",
        table=rounded(m["per_class"]),
        table_description="per-garment errors",
        summary=f"{model_version}: RMSE {m['rmse']:.2f} (noise floor {m['noise_floor_rmse']:.2f}), scaled "
        f"MSE {m['mse_scaled']:.4f} on {m['n']} images",  # fmt: skip
    )


def catalog_publication(
    store_uri: str, model_version: str, line: str, labels_version: str, m: dict, plots: dict
):
    rows = [(r["group"], r) for r in m["per_group"]]
    return Publication(
        key=line_key(store_uri, line, f"eval-{model_version}"),
        markdown=report_markdown(
            f"`{model_version}` (catalog `{line}`)",
            labels_version,
            m,
            plots,
            (m["grouped_by"], rows),
            2,
        ),  # fmt: skip
        description=f"evaluation of {model_version} ({line}): {headline(m)}",
        table_suffix="-groups",
        table=rounded(m["per_group"]),
        table_description=f"errors per {m['grouped_by']}",
        summary=f"{model_version} ({line}): RMSE {m['rmse']:.2f} (mean-price baseline "
        f"{m['baseline_rmse']:.2f}) on {m['n']} images",  # fmt: skip
    )


def headline(m: dict) -> str:
    return verdict(m).split(":")[0].strip("*")


def publish(publication: Publication) -> None:
    """The one publish path: the report and its table as artifacts, one log line."""
    p = publication
    publish_markdown(p.key, p.markdown, p.description)
    publish_table(p.key + p.table_suffix, p.table, p.table_description)
    get_logger().info("%s", p.summary)


@dataclass(frozen=True)
class TestImages:
    """Which labelled images a model is scored on, when not its own test split: another
    dataset's (``dataset_version``), less a dataset's train split (``leave_out_train_of``),
    drawn with another subset (``limit``, ``seed``). The gate scores a champion and its
    challenger on the same ones."""

    dataset_version: str
    leave_out_train_of: str | None
    limit: int | None
    seed: int


def leave_out(lake: Lake, images: TestImages | None) -> frozenset[str]:
    if images is None or images.leave_out_train_of in (None, images.dataset_version):
        return frozenset()
    return frozenset(lake.dataset(images.leave_out_train_of).read_split("train", ["image_id"])
                     ["image_id"].to_pylist())  # fmt: skip


def gate_images(lake: Lake, challenger: str, champion: str) -> tuple[TestImages | None, int]:
    """The images a champion is scored on against a challenger: the challenger's test
    split (its subset), less the champion's own train split; and how many test images
    that leaves out (0: the challenger's own evaluation is on the same images)."""
    c_model, m_model = lake.model(challenger), lake.model(champion)
    dv = c_model.lineage()["dataset_version"]
    own_dv = m_model.lineage()["dataset_version"]
    c, m = (TrainSettings(**x.config()["settings"]) for x in (c_model, m_model))
    if own_dv == dv and (c.test_limit, c.seed) == (m.test_limit, m.seed):
        return None, 0
    images = TestImages(dv, own_dv if own_dv != dv else None, c.test_limit, c.seed)
    out = leave_out(lake, images)
    overlap = sum(k in out for k in lake.dataset(dv).read_split("test", ["image_id"])
                  ["image_id"].to_pylist()) if out else 0  # fmt: skip
    return images, overlap


def evaluate(
    lake: Lake, model_version: str, labels_version: str | None = None,
    tracking_uri: str | None = None, images: TestImages | None = None,
) -> dict:  # fmt: skip
    """Score the test split and write metrics.json and plots (under models/<v>/ for the
    model's own labels, under models/<v>/eval/<labels>/ for other labels); with a
    ``tracking_uri``, then the model's MLflow run (reconciled from the lake), linked from
    the report. ``images``: score these instead of the labels' own test split."""
    mv = model_version
    model = lake.model(mv)
    config, lineage = model.config(), model.lineage()
    evaluation = model.evaluation(labels_version, dataclasses.asdict(images) if images else None)
    existing = evaluation.metrics()
    if existing is not None:
        get_logger().info(
            "%s already evaluated on %s; nothing redone", mv, evaluation.labels_version
        )
        tracking.record_model(tracking_uri, lake, mv)  # what MLflow may have missed
        return existing | {"skipped": True}
    settings = TrainSettings(**config["settings"])
    dataset_version = images.dataset_version if images else lineage["dataset_version"]
    limit, seed = (images.limit, images.seed) if images else (settings.test_limit, settings.seed)
    left_out = leave_out(lake, images)
    streamed = lake.by_content(dataset_version)
    data = load_data(lake, dataset_version, evaluation.labels_version, {"test": limit}, seed,
                     *preprocess_of(config), leave_out=left_out, pixels=not streamed)  # fmt: skip
    test = data.test
    net = load_stored_model(model)
    if streamed:  # a catalog stored by content: one pixel shard in memory at a time
        pred = np.zeros(len(test.ids))
        for positions, pixels in iter_pixels(lake, dataset_version, test.ids,
                                             *preprocess_of(config)):  # fmt: skip
            pred[positions] = predict_prices(net, pixels)
    else:
        pred = predict_prices(net, test.images)
    train_mean = float(np.mean(data.train_prices))
    line = line_of(lineage["dataset_version"])
    if line == DEMO_LINE:
        metrics = demo_metrics(test, pred, data.scaling, train_mean)
    else:
        metrics = catalog_metrics(test, pred, data.scaling, train_mean, data.train_prices)
    metrics |= {"model_version": mv, "labels_version": evaluation.labels_version}
    if images:
        metrics["images"] = dataclasses.asdict(images)
    plots = {
        "predicted vs true": (pred_vs_true_plot(test.price, pred), "pred_vs_true"),
        "residuals": (residuals_plot(test.price, pred), "residuals"),
    }
    shown = {title: (png, evaluation.write_plot(name, png)) for title, (png, name) in plots.items()}
    evaluation.write_metrics(metrics)
    if evaluation.labels_version == lineage["labels_version"]:
        shown["training curves"] = (model.plot("loss"), model.plot_link("loss"))
    link = tracking.record_model(tracking_uri, lake, mv)
    if line == DEMO_LINE:
        sigma = data.scaling["rule"]["sigma"]
        publication = demo_publication(lake.uri, mv, evaluation.labels_version, metrics, shown,
                                       sigma)  # fmt: skip
    else:
        publication = catalog_publication(lake.uri, mv, line, evaluation.labels_version, metrics,
                                          shown)  # fmt: skip
    publish(with_run_link(publication, link))
    return metrics


def with_run_link(publication: Publication, url: str | None) -> Publication:
    """The report with a link to the model's MLflow run under its heading (as it was
    without one)."""
    if not url:
        return publication
    heading, rest = publication.markdown.split("\n", 1)
    markdown = f"{heading}\n\n[The run in MLflow]({url})\n{rest}"
    return dataclasses.replace(publication, markdown=markdown)


def read_metrics(lake: Lake, model_version: str, labels_version: str | None = None) -> dict | None:
    return lake.model(model_version).evaluation(labels_version).metrics()


@task(name="evaluate-model", **TASK_RETRIES)
def evaluate_model(
    store_uri: str, model_version: str, labels_version: str | None = None,
    tracking_uri: str | None = None,
) -> dict:  # fmt: skip
    """Metrics and plots of a model version on a labelled test split."""
    from tasks.store.storage import open_store

    return evaluate(Lake(open_store(store_uri)), model_version, labels_version, tracking_uri)
