"""Training: data, the epoch loop with checkpoints and resume, and the stored model."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from prefect import task

from tasks import __version__
from tasks.dataset import load_split
from tasks.features import feature_key, load_or_extract
from tasks.images import to_pixels_batch
from tasks.labels import read_prices, read_scaling
from tasks.model import (
    TrainSettings,
    augmentation_layers,
    build_graphs,
    build_vgg,
    compile_top,
    export_model,
    hardware,
    resolve_precision,
    set_precision,
    weights_identity,
)
from tasks.reports import loss_plot, publish_progress
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.storage import ObjectNotFound, Store, checkpoint_prefix, model_prefix, open_store

FORMAT = 1
EpochHook = Callable[[int, dict], None]


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded random subset, in row order (all rows without a limit)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def load_data(
    store: Store,
    dataset_version: str,
    labels_version: str,
    settings: TrainSettings,
    splits: tuple[str, ...] = ("train", "test"),
) -> dict:
    """Pixels (uint8, n x 28 x 28), prices and scaled targets for the given splits."""
    scaling = read_scaling(store, dataset_version, labels_version)
    prices = read_prices(store, dataset_version, labels_version).to_pandas()
    price_of = dict(zip(prices["image_id"], prices["price"], strict=True))
    out = {
        "scaling": scaling,
        "dataset_version": dataset_version,
        "labels_version": labels_version,
    }
    limits = {"train": settings.train_limit, "test": settings.test_limit}
    for split in splits:
        limit = limits[split]
        table = load_split(store, dataset_version, split)
        idx = subset_indices(table.num_rows, limit, settings.seed)
        table = table.take(idx)
        ids = table["image_id"].to_pylist()
        price = np.array([price_of[i] for i in ids], dtype=np.float64)
        out[split] = {
            "ids": ids,
            "images": to_pixels_batch(table["image"].to_pylist()),
            "labels": table["label"].to_numpy().astype(np.int64),
            "price": price,
            "y": ((price - scaling["min"]) / (scaling["max"] - scaling["min"])).astype(np.float32),
        }
    return out


def model_version(
    dataset_version: str, labels_version: str, settings: TrainSettings, weights_id: str
) -> str:
    spec = {
        "format": FORMAT,
        "dataset": dataset_version,
        "labels": labels_version,
        "settings": settings.model_dump(),
        "weights": weights_id,
    }
    return "m-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --- checkpoints -----------------------------------------------------------------


class CheckpointWriter:
    """Writes each epoch's checkpoint in the background while the next epoch trains.

    The weights and optimizer state are copied when the epoch ends; the npz goes
    to the store first and ``state.json`` (the marker that the epoch finished)
    after it, so a reader finds the previous checkpoint or this one, never half of
    one. One write is in flight at a time; ``wait`` re-raises a failed write.
    """

    def __init__(self, store: Store, mv: str):
        self.store, self.prefix = store, checkpoint_prefix(mv)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None

    def save(self, model, epoch: int, history: dict) -> None:
        arrays = {f"w{i}": np.array(w) for i, w in enumerate(model.weights)}
        arrays |= {f"o{i}": np.array(v) for i, v in enumerate(model.optimizer.variables)}
        state = {"epoch": epoch, "history": {k: list(v) for k, v in history.items()}}
        self.wait()
        self.pending = self.pool.submit(self._write, arrays, state)

    def _write(self, arrays: dict, state: dict) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.store.put_bytes(self.prefix + f"epoch-{state['epoch']}.npz", buf.getvalue())
        self.store.put_json(self.prefix + "state.json", state)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def restore_checkpoint(store: Store, mv: str, model) -> tuple[int, dict]:
    """(epochs finished, history) from the last checkpoint, or (0, empty) when there is
    none or it does not fit this model and optimizer (written by other code)."""
    prefix = checkpoint_prefix(mv)
    try:
        state = store.get_json(prefix + "state.json")
    except ObjectNotFound:
        return 0, {"loss": [], "val_loss": []}
    with np.load(io.BytesIO(store.get_bytes(prefix + f"epoch-{state['epoch']}.npz"))) as npz:
        data = dict(npz)  # each array read once (an NpzFile re-reads on every access)
    model.optimizer.build(model.trainable_variables)
    targets = {f"w{i}": w for i, w in enumerate(model.weights)}
    targets |= {f"o{i}": v for i, v in enumerate(model.optimizer.variables)}
    if set(data) != set(targets) or any(
        data[k].shape != tuple(v.shape) for k, v in targets.items()
    ):
        get_logger().warning(
            "%s: checkpoint does not fit this model's variables; training from the start",
            store.uri_for(prefix + "state.json"),
        )
        return 0, {"loss": [], "val_loss": []}
    for k, var in targets.items():
        var.assign(data[k])
    return state["epoch"], state["history"]


# --- the training run -------------------------------------------------------------


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: tuple | None = None):
    """A tf.data pipeline of (x, y) batches, in a seeded random order when ``shuffle``
    gives (seed, epoch): the same order again on a resumed run. tf.data's autotuning
    is off: deleting an autotuned iterator at the end of an epoch stalled for about
    0.7 s on this 2-core CPU, every other epoch."""
    import tensorflow as tf

    xs, ys = tf.constant(x), tf.constant(y)
    order = tf.data.Dataset.range(len(y))
    if shuffle is not None:
        seed = int(np.random.default_rng(list(shuffle)).integers(2**31))
        order = order.shuffle(len(y), seed=seed)
    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        order.batch(batch_size)
        .map(lambda i: (tf.gather(xs, i), tf.gather(ys, i)))
        .prefetch(1)
        .with_options(options)
    )


def fit_epochs(
    store: Store,
    mv: str,
    model,
    settings: TrainSettings,
    train_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
    start_epoch: int,
    history: dict,
    views: bool,
    on_epoch: EpochHook | None,
) -> float:
    """The epochs left after ``start_epoch``, a checkpoint after each; returns the seconds
    spent in ``fit``. With ``views`` the train x is (views, n, ...) and each epoch draws
    one view per image."""
    log = get_logger()
    train_x, train_y = train_xy
    val = batches(*val_xy, settings.batch_size)
    fit_seconds = 0.0
    checkpoints = CheckpointWriter(store, mv)
    try:
        for epoch in range(start_epoch, settings.epochs):
            epoch_x = train_x
            if views:
                rng = np.random.default_rng([settings.seed, epoch])
                pick = rng.integers(0, len(train_x), size=train_x.shape[1])
                epoch_x = train_x[pick, np.arange(train_x.shape[1])]
            t0 = time.time()
            h = model.fit(
                batches(epoch_x, train_y, settings.batch_size, shuffle=(settings.seed, epoch)),
                epochs=epoch + 1,
                initial_epoch=epoch,
                validation_data=val,
                shuffle=False,  # batches() has shuffled
                verbose=1 if sys.stdout.isatty() else 0,  # Keras's progress bar in a terminal
            )
            fit_seconds += time.time() - t0
            for k in ("loss", "val_loss"):
                history[k].append(float(h.history[k][-1]))
            checkpoints.save(model, epoch + 1, history)
            log.info(
                "epoch %d/%d: loss %.5f val_loss %.5f (%.1f s)",
                epoch + 1,
                settings.epochs,
                history["loss"][-1],
                history["val_loss"][-1],
                time.time() - t0,
            )
            publish_progress(mv, epoch + 1, settings.epochs)
            if on_epoch is not None:
                on_epoch(epoch + 1, history)
    finally:
        checkpoints.close()  # the last finished epoch is stored, even when training failed
    return fit_seconds


def train(
    store: Store,
    dataset_version: str,
    labels_version: str,
    settings: TrainSettings,
    on_epoch: EpochHook | None = None,
) -> dict:
    """Train (or find) the model version for these inputs; returns its version and facts."""
    import keras

    log = get_logger()
    weights_id = weights_identity(settings)
    mv = model_version(dataset_version, labels_version, settings, weights_id)
    prefix = model_prefix(mv)
    try:
        lineage = store.get_json(prefix + "lineage.json")
        log.info("model %s already trained; nothing redone", mv)
        return {"model_version": mv, "skipped": True, "lineage": lineage}
    except ObjectNotFound:
        pass
    if settings.weights == "none" and settings.freeze is None:
        log.warning(
            "weights=none: random VGG16 layers are not worth freezing, so all layers train "
            "(set freeze=N to override)"
        )

    started = time.time()
    precision = resolve_precision(settings.precision)
    set_precision(precision)
    data = load_data(store, dataset_version, labels_version, settings)
    vgg = build_vgg(settings)
    frozen, top = build_graphs(settings, vgg)
    train_y, test_y = data["train"]["y"], data["test"]["y"]

    feature_info = None
    if settings.uses_cache():
        n_views = settings.views if settings.augment == "cached" else 1
        key = feature_key(
            dataset_version,
            {"train": settings.train_limit, "test": settings.test_limit, "seed": settings.seed},
            weights_id,
            settings.input_size,
            settings.frozen_layers(),
            precision,
            {"n": n_views, "shift": settings.shift, "flip": settings.flip},
        )
        t0 = time.time()
        train_x, val_x, hit = load_or_extract(
            store,
            key,
            frozen,
            data["train"]["images"],
            data["test"]["images"],
            n_views,
            settings.shift,
            settings.flip,
            settings.seed,
        )
        feature_info = {"key": key, "hit": hit, "views": n_views, "seconds": time.time() - t0}
        model = top
    else:
        pixels = keras.Input(data["train"]["images"].shape[1:] + (1,), name="pixels")
        x = pixels
        if settings.augment != "none":
            for layer in augmentation_layers(settings):
                x = layer(x)
        if frozen is not None:
            x = frozen(x)
        model = keras.Model(pixels, top(x), name="train")
        train_x = data["train"]["images"][..., None]
        val_x = data["test"]["images"][..., None]
    compile_top(model, settings)

    start_epoch, history = restore_checkpoint(store, mv, model)
    if start_epoch:
        log.info("resuming %s after epoch %d of %d", mv, start_epoch, settings.epochs)
    fit_seconds = fit_epochs(
        store,
        mv,
        model,
        settings,
        (train_x, train_y),
        (val_x, test_y),
        start_epoch,
        history,
        views=feature_info is not None,
        on_epoch=on_epoch,
    )

    final = export_model(settings, [frozen, top], data["scaling"])
    facts = {
        "model_version": mv,
        "precision": precision,
        "train_images": len(train_y),
        "epochs_run": settings.epochs - start_epoch,
        "resumed_from_epoch": start_epoch,
        "fit_seconds": round(fit_seconds, 2),
        "images_per_second": round(len(train_y) * (settings.epochs - start_epoch) / fit_seconds, 1)
        if fit_seconds
        else None,
        "seconds": round(time.time() - started, 2),
        "features": feature_info,
    }
    write_model(store, mv, final, settings, data, history, weights_id, precision, facts)
    store.delete_prefix(checkpoint_prefix(mv))
    return facts | {"skipped": False}


def write_model(
    store: Store,
    mv: str,
    model,
    settings: TrainSettings,
    data: dict,
    history: dict,
    weights_id: str,
    precision: str,
    facts: dict,
) -> None:
    """Everything under models/<v>/, lineage.json last: it marks the version complete."""
    prefix = model_prefix(mv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        store.put_file(prefix + "model.keras", path)
    lines: list[str] = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line), line_length=100)
    store.put_bytes(prefix + "summary.txt", ("\n".join(lines) + "\n").encode())
    config = {
        "model_version": mv,
        "settings": settings.model_dump(),
        "scaling": {k: data["scaling"][k] for k in ("min", "max", "fit_on")},
        "input": {"shape": [28, 28, 1], "dtype": "uint8", "meaning": "gray pixels 0..255"},
        "output": "price",
        "train_stats": train_stats(data["train"]["images"], data["train"]["price"]),
    }
    store.put_json(prefix + "config.json", config)
    store.put_json(prefix + "history.json", history)
    store.put_bytes(prefix + "plots/loss.png", loss_plot(history))
    lineage = {
        "model_version": mv,
        "dataset_version": data["dataset_version"],
        "labels_version": data["labels_version"],
        "base_weights": {"source": settings.weights, "identity": weights_id},
        "feature_cache_key": (facts.get("features") or {}).get("key"),
        "package": {"name": "vggprice", "version": __version__, "git_commit": git_commit()},
        "hardware": hardware(),
        "precision": precision,
        "training": facts,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.put_json(prefix + "lineage.json", lineage)


def train_stats(images: np.ndarray, prices: np.ndarray) -> dict:
    """What training data looked like, for the drift signal when scoring drops."""
    means = images.reshape(len(images), -1).mean(axis=1)
    p = np.percentile
    return {
        "pixel_mean_p01": float(p(means, 1)),
        "pixel_mean_p99": float(p(means, 99)),
        "pixel_mean": float(means.mean()),
        "price_p01": float(p(prices, 1)),
        "price_p99": float(p(prices, 99)),
        "price_mean": float(prices.mean()),
    }


def read_model_config(store: Store, mv: str) -> dict:
    try:
        return store.get_json(model_prefix(mv) + "config.json") | {
            "lineage": store.get_json(model_prefix(mv) + "lineage.json")
        }
    except ObjectNotFound:
        raise ObjectNotFound(
            f"{store.uri_for(model_prefix(mv) + 'lineage.json')}: no such (complete) model version"
        ) from None


@task(name="train-model", **TASK_RETRIES)
def train_model(
    store_uri: str, dataset_version: str, labels_version: str, settings: TrainSettings
) -> dict:
    """Train the price model (or find it); a retried run resumes from its last checkpoint."""
    return train(open_store(store_uri), dataset_version, labels_version, settings)
