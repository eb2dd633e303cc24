"""What people see: plots as PNG bytes, markdown reports, and Prefect artifacts.

The plot and markdown builders are plain functions; the ``publish_*`` helpers
create Prefect artifacts when called inside a run and do nothing outside one.
"""

from __future__ import annotations

import io

import numpy as np


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(TaskRunContext.get() or FlowRunContext.get())


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))


def loss_plot(history: dict) -> bytes:
    fig, ax = _figure()
    epochs = np.arange(1, len(history["loss"]) + 1)
    ax.plot(epochs, history["loss"], "o-", label="loss (train)")
    ax.plot(epochs, history["val_loss"], "s-", label="val_loss (test)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE on the scaled price")
    ax.set_title("Training curves")
    ax.legend()
    return _png(fig)


def pred_vs_true_plot(true: np.ndarray, pred: np.ndarray) -> bytes:
    fig, ax = _figure()
    ax.scatter(true, pred, s=4, alpha=0.3)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect")
    ax.set_xlabel("true price")
    ax.set_ylabel("predicted price")
    ax.set_title("Predicted vs true (test split)")
    ax.legend()
    return _png(fig)


def residuals_plot(true: np.ndarray, pred: np.ndarray) -> bytes:
    fig, ax = _figure()
    ax.hist(pred - true, bins=60)
    ax.set_xlabel("predicted - true price")
    ax.set_ylabel("images")
    ax.set_title("Residuals (test split)")
    return _png(fig)


class TrainingProgress:
    """The progress artifact of one training run, updated every epoch (inside a run)."""

    def __init__(self, model_version: str, epochs: int):
        self.model_version, self.epochs = model_version, epochs
        self.artifact_id = None

    def update(self, epoch: int, history: dict, images: int) -> None:
        if not _in_run():
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        pct = 100.0 * epoch / self.epochs
        desc = f"training {self.model_version}: epoch {epoch}/{self.epochs}"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                pct, key=artifact_key(f"train-{self.model_version}")[:60], description=desc
            )
        else:
            update_progress_artifact(self.artifact_id, pct, description=desc)


def emit(event: str, resource_id: str, payload: dict) -> None:
    """A Prefect event (automations trigger on these), from inside a run only."""
    if _in_run():
        from prefect.events import emit_event

        emit_event(event=event, resource={"prefect.resource.id": resource_id}, payload=payload)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if _in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=key, description=description)


def publish_table(key: str, rows: list[dict], description: str) -> None:
    if _in_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact(rows, key=key, description=description)


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower())[:100]


def drop_markdown(m: dict, throughput: float | None) -> str:
    """The per-drop summary: counts, rejections, prices, drift."""
    c, d, p = m["counts"], m["drift"], m["prices"]
    reasons = "\n".join(f"| {r} | {n} |" for r, n in sorted(m["rejections"].items())) or "| - | 0 |"
    quant = " / ".join(f"{k} {v:.2f}" for k, v in p["quantiles"].items()) or "no prices"
    flag = {
        True: "**looks unlike the training data**",
        False: "looks like the training data",
        None: "unknown (the model recorded no training statistics)",
    }[d["flagged"]]
    speed = f"{throughput:.0f} images/s" if throughput else "-"
    return f"""# Drop `{m["drop_id"]}` priced by `{m["model_version"]}`

| listed | priced | rejected | throughput |
| --- | --- | --- | --- |
| {c["listed"]} | {c["priced"]} | {c["rejected"]} | {speed} |

Prices: {quant}

| rejection reason | images |
| --- | --- |
{reasons}

Drift: {flag} ({d["pixel_out_of_range_fraction"]:.0%} of images have a mean
brightness outside the training 1st-99th percentiles, {d["price_out_of_range_fraction"]:.0%}
of prices outside the training price range).
"""


def price_bands(prices: list[float], means: list[float]) -> list[dict]:
    """How many predicted prices sit nearest to each class mean (a predicted class band)."""
    arr = np.asarray(prices, dtype=np.float64)
    centers = np.asarray(means, dtype=np.float64)
    nearest = np.abs(arr[:, None] - centers[None, :]).argmin(axis=1) if len(arr) else arr
    return [
        {"class": c, "mean_price": float(centers[c]), "images": int((nearest == c).sum())}
        for c in range(len(centers))
    ]
