"""What people see: plots as PNG bytes, markdown reports, and Prefect artifacts.

The plot and markdown builders are plain functions; the ``publish_*`` helpers
create Prefect artifacts when called inside a run and do nothing outside one.
Plots go into the markdown inline (``data:image/png;base64``), so the Prefect UI
shows them on a local store and on S3 alike, with no second server; each also
names its stored copy by its store URI, never a presigned link (artifacts are kept in
Prefect's database, and so would any credential in them).
"""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np

from tasks.store.lake import DEMO_LINE

# Fashion-MNIST's classes, in label order.
GARMENTS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
            "Sneaker", "Bag", "Ankle boot")  # fmt: skip


def inline_png(png: bytes, alt: str) -> str:
    """A markdown image whose bytes travel inside the markdown."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def stored_copy(uri: str) -> str:
    """Where a plot is stored: a link only when a browser can open it (http or https);
    a store URI (``s3://...``) or a local path is text, since a link to it would open
    nothing from the UI."""
    if uri.startswith(("http://", "https://")):
        return f"Stored copy: [{uri}]({uri})"
    return f"Stored copy: `{uri}`"


def plots_markdown(plots: dict[str, tuple[bytes, str]]) -> str:
    """title -> (PNG, the stored copy's URI): each plot shown, then where it is stored."""
    return "\n\n".join(
        f"### {title}\n\n{inline_png(png, title)}\n\n{stored_copy(uri)}"
        for title, (png, uri) in plots.items()
    )


def rounded(rows: list[dict], digits: int = 2) -> list[dict]:
    """Table rows with floats rounded to what a person reads."""
    return [
        {k: round(v, digits) if isinstance(v, float) else v for k, v in r.items()} for r in rows
    ]


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
    return _png(loss_figure(history))


def loss_figure(history: dict):
    """Loss per epoch, train and test, whole epochs on the x axis."""
    fig, ax = _figure()
    epochs = np.arange(1, len(history["loss"]) + 1)
    ax.plot(epochs, history["loss"], "o-", label="loss (train)")
    ax.plot(epochs, history["val_loss"], "s-", label="val_loss (test)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(0.5, len(epochs) + 0.5)  # whole epochs on the axis, one epoch too
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE on the scaled price")
    ax.set_title("Training curves")
    ax.legend()
    return fig


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


def epochs_markdown(
    model_version: str, history: dict, epochs: int, images: int, about: str = ""
) -> str:
    """The training artifact: one row per finished epoch, and the loss curves; ``about``
    (a line on the run's resolved settings) under the title."""
    rows = "\n".join(
        f"| {i + 1} | {loss:.4f} | {val:.4f} | {sec:.1f} | {images / sec:.0f} |"
        for i, (loss, val, sec) in enumerate(
            zip(history["loss"], history["val_loss"], history["seconds"], strict=True)
        )
    )
    return f"""# Training `{model_version}`: epoch {len(history["loss"])} of {epochs}

{about}

| epoch | loss (train) | val loss (test) | seconds | images/s |
| --- | --- | --- | --- | --- |
{rows}

Loss: MSE on the min-max scaled price.

{inline_png(loss_plot(history), "training curves")}
"""


class TrainingProgress:
    """The artifacts of one training run, updated every epoch (inside a run): a
    progress bar and the per-epoch table with the loss curves (key
    ``<store tag>-train-<model>``)."""

    def __init__(self, store_uri: str, model_version: str, epochs: int, about: str = ""):
        self.store_uri, self.model_version = store_uri, model_version
        self.epochs, self.about = epochs, about
        self.artifact_id = None

    def update(self, epoch: int, history: dict, images: int) -> None:
        if not _in_run():
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        pct = 100.0 * epoch / self.epochs
        desc = f"training {self.model_version}: epoch {epoch}/{self.epochs}"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(pct, description=desc)
        else:
            update_progress_artifact(self.artifact_id, pct, description=desc)
        publish_markdown(
            line_key(self.store_uri, DEMO_LINE, f"train-{self.model_version}"),
            epochs_markdown(self.model_version, history, self.epochs, images, self.about),
            desc,
        )


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

        create_table_artifact(rounded(rows), key=key, description=description)


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower())[:100]


def store_tag(store_uri: str) -> str:
    """A short name of a store for artifact keys: its folder's name and 6 hex digits of
    its URI's SHA-256 (``lake-3fa2c1``), so two stores' reports never share a key on one
    Prefect server."""
    name = store_uri.rstrip("/").rsplit("/", 1)[-1] or "store"
    digest = hashlib.sha256(store_uri.rstrip("/").encode()).hexdigest()[:6]
    return f"{artifact_key(name)[:24]}-{digest}"


def line_key(store_uri: str, line: str, name: str) -> str:
    """An artifact key of a store's model line: ``<store tag>-<name>`` for the demo,
    ``<store tag>-<line>-<name>`` for a catalog's line."""
    named = name if line == DEMO_LINE else f"{line}-{name}"
    return artifact_key(f"{store_tag(store_uri)}-{named}")


def price_histogram(prices: np.ndarray) -> bytes:
    fig, ax = _figure()
    ax.hist(prices, bins=50)
    ax.set_xlabel("predicted price")
    ax.set_ylabel("images")
    ax.set_title("Predicted prices in this drop")
    return _png(fig)


def drop_markdown(m: dict, throughput: float | None, plots: dict | None = None) -> str:
    """The per-drop summary: counts, why images were rejected, prices, drift, who scored."""
    c, d, p = m["counts"], m["drift"], m["prices"]
    reasons = "\n".join(f"| {r} | {n} |" for r, n in sorted(m["rejections"].items()))
    rejections = f"| rejection reason | images |\n| --- | --- |\n{reasons}\n\n" if reasons else ""
    quant = " / ".join(f"{k} {v:.2f}" for k, v in p["quantiles"].items()) or "no prices"
    flag = {
        True: "**looks unlike the training data**",
        False: "looks like the training data",
        None: "unknown (the model recorded no training statistics)",
    }[d["flagged"]]
    drift = (f"{flag} ({d['pixel_out_of_range_fraction']:.0%} of images have a mean brightness "
             "outside the training 1st-99th percentiles, "
             f"{d['price_out_of_range_fraction']:.0%} of prices outside the training price "
             "range).")  # fmt: skip
    speed = f"{throughput:.0f} images/s" if throughput else "-"
    scorers = "\n".join(f"| {s} | {n} |" for s, n in sorted(m.get("scorer_counts", {}).items()))
    return f"""# Drop `{m["drop_id"]}` priced by `{m["model_version"]}`

| listed | priced | rejected | skipped keys | throughput |
| --- | --- | --- | --- | --- |
| {c["listed"]} | {c["priced"]} | {c["rejected"]} | {m.get("skipped_keys", 0)} | {speed} |

Prices: {quant}

{rejections}Drift: {drift}

| scorer | shards |
| --- | --- |
{scorers}

{plots_markdown(plots or {})}
"""


def price_bands(prices: list[float], means: list[float]) -> list[dict]:
    """How many predicted prices sit nearest to each class mean (a predicted class band)."""
    arr = np.asarray(prices, dtype=np.float64)
    centers = np.asarray(means, dtype=np.float64)
    nearest = np.abs(arr[:, None] - centers[None, :]).argmin(axis=1) if len(arr) else arr
    return [
        {"class": c, "garment": GARMENTS[c] if c < len(GARMENTS) else str(c),
         "mean_price": float(centers[c]), "images": int((nearest == c).sum())}
        for c in range(len(centers))
    ]  # fmt: skip
