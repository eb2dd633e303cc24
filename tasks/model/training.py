"""The training run: graphs, the frozen-feature cache, the epoch loop with checkpoints,
and the stored model with its lineage."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task

from tasks import __version__
from tasks.data.images import model_input
from tasks.data.loading import Data, load_data, train_stats
from tasks.model.checkpoints import CheckpointWriter, restore_checkpoint
from tasks.model.export import export_model, hardware, precision_reason, resolve_precision
from tasks.model.features import (
    FeatureSpec,
    ShardStream,
    ViewRecipe,
    extract_shards,
    extract_work,
    load_or_extract,
)
from tasks.model.frozen_engine import frozen_runner, openvino_available
from tasks.model.graphs import augmentation_layers, build_graphs, input_shape
from tasks.model.kernels import fused_rmsprop
from tasks.model.train_settings import TrainSettings
from tasks.model.weights import build_vgg, weights_identity
from tasks.reports import TrainingProgress, loss_plot
from tasks.runtime import TASK_RETRIES, ProgressLog, get_logger, keras_precision, seeded
from tasks.settings import load_settings
from tasks.store.claims import worker_name
from tasks.store.lake import Lake, Model, attempt_id, code_fingerprint, line_of, model_version
from tasks.store.storage import sha256_file

# Called after every epoch with (epoch, history, fit): progress, tests, crash drills.
EpochHook = Callable[[int, dict, "Fit"], None]


def resolved(settings: TrainSettings, auto_precision: str | None = None) -> TrainSettings:
    """The settings with every value that is otherwise decided at run time made concrete:
    ``precision`` (``auto``: ``auto_precision`` when given, else what this machine picks,
    see ``resolve_precision``), ``freeze`` (None: the default for the base weights) and
    ``extraction_engine`` (auto: openvino for float32 where it is installed).
    The version is derived from these, and config.json and the train flow show them, so
    one version names one model whichever machine trains it. Resolving twice changes
    nothing; a precision other than ``auto`` is kept as it is."""
    precision = settings.precision
    if precision == "auto":
        precision = auto_precision or resolve_precision("auto")
    engine = settings.extraction_engine
    if not settings.uses_cache():
        engine = "keras"  # nothing is extracted
    elif engine == "auto":
        engine = "openvino" if precision == "float32" and openvino_available() else "keras"
    elif engine == "openvino" and precision != "float32":
        raise ValueError(f"extraction_engine=openvino runs float32, not {precision}: set "
                         "precision=float32, or extraction_engine=keras")  # fmt: skip
    return _with(settings, precision=precision, freeze=settings.frozen_layers(),
                 extraction_engine=engine)  # fmt: skip


def version_for(dataset_version: str, labels_version: str, settings: TrainSettings) -> str:
    """The model version these inputs, settings (resolved first: ``auto`` is decided on
    this machine unless already resolved), base weights and code make. A warm start's
    parent is one of the settings, so ``warm_start=champion`` must be made concrete first
    (``warm_resolved``)."""
    settings = resolved(settings)
    if settings.warm_start == "champion":
        raise ValueError("warm_start=champion names no model yet: resolve it (warm_resolved)")
    return model_version(
        {
            "dataset": dataset_version,
            "labels": labels_version,
            "settings": settings.model_dump(),
            "weights": weights_identity(settings),
        }
    )


def warm_resolved(lake: Lake, dataset_version: str, labels_version: str,
                  settings: TrainSettings) -> TrainSettings:  # fmt: skip
    """The settings, resolved, with ``warm_start=champion`` made concrete: the line's
    champion when its top fits this training, else ``off`` (one log line says why).
    When the champion was trained on exactly these inputs nothing changed: the
    ``warm_start`` it was trained with is kept, so its version is found again and
    nothing retrains. A model version named outright must fit (ValueError says why)."""
    settings = resolved(settings)
    asked = settings.warm_start
    if asked == "off":
        return settings
    streamed = settings.uses_cache() and lake.by_content(dataset_version)
    why = None if streamed else "it applies to catalogs with frozen layers"
    if asked != "champion":  # a model version named outright must fit
        why = why or warm_mismatch(lake, asked, dataset_version, settings)
        if why is not None:
            raise ValueError(f"warm_start={asked}: cannot start from that model: {why}")
        return settings
    champion = lake.registry(line_of(dataset_version)).champion() if streamed else None
    if why is None and champion is None:
        why = "the line has no champion yet"
    if why is None:
        parent = lake.model(champion["model_version"])
        lineage = parent.lineage()
        if (lineage["dataset_version"], lineage["labels_version"]) == (
            dataset_version, labels_version,
        ):  # fmt: skip
            return _with(settings, warm_start=parent.config()["settings"].get("warm_start", "off"))
        why = warm_mismatch(lake, parent.version, dataset_version, settings)
    if why is not None:
        get_logger().info("warm_start=champion: training from the start (%s)", why)
        return _with(settings, warm_start="off")
    get_logger().info("warm start from the champion %s", parent.version)
    return _with(settings, warm_start=parent.version)


def _with(settings: TrainSettings, **fields) -> TrainSettings:
    return TrainSettings(**settings.model_dump() | fields)


def warm_mismatch(lake: Lake, parent: str, dataset_version: str,
                  settings: TrainSettings) -> str | None:  # fmt: skip
    """Why the model ``parent``'s top cannot start this training's, or None: it must
    have trained on the same frozen features (base weights, input, cut, precision, views
    and code: the feature key) with a head of the same size."""
    lineage = lake.model(parent).lineage()  # NotInLake lists the models there are
    key = feature_spec(dataset_version, settings, settings.precision, True).key()
    if lineage.get("feature_cache_key") != key:
        return (f"{parent} trained on other frozen features (base weights, input size, "
                "frozen layers, precision, views or code differ)")  # fmt: skip
    units = lake.model(parent).config()["settings"]["head_units"]
    if units != settings.head_units:
        return f"{parent} has a head of {units} units, this training {settings.head_units}"
    return None


def warm_rows(lake: Lake, data: Data, settings: TrainSettings) -> tuple[np.ndarray, dict]:
    """The train rows a warm start fits, sorted: every image that is new or changed
    since the parent trained (other pixels, other price, or not in its train split), and
    ``replay`` unchanged ones per changed one, a sample seeded by (seed, parent), at
    least one batch in all where there are that many; and their counts."""
    parent = lake.model(settings.warm_start).lineage()
    before = lake.labels(parent["dataset_version"], parent["labels_version"]).prices()
    was = {key: price for key, price, split in zip(before["image_id"].to_pylist(),
           before["price"].to_pylist(), before["split"].to_pylist(), strict=True)
           if split == "train"}  # fmt: skip
    then = lake.dataset(parent["dataset_version"]).locations()
    now = lake.dataset(data.dataset_version).locations()
    changed = np.array([key not in was or was[key] != price or then.get(key) != now[key]
                        for key, price in zip(data.train.ids, data.train.price, strict=True)],
                       dtype=bool)  # fmt: skip
    n_changed = int(changed.sum())
    unchanged = np.flatnonzero(~changed)
    n_replay = min(len(unchanged),
                   max(round(settings.replay * n_changed), settings.batch_size - n_changed))  # fmt: skip
    rng = np.random.default_rng([settings.seed, zlib.crc32(settings.warm_start.encode())])
    rows = np.sort(np.concatenate([np.flatnonzero(changed),
                                   rng.choice(unchanged, n_replay, replace=False)]))  # fmt: skip
    return rows, {"parent": settings.warm_start, "changed": n_changed, "replayed": n_replay}


def warm_top(lake: Lake, top, parent: str, scaling: dict) -> None:
    """The parent model's weights into every layer of ``top`` (by name), its output
    layer rescaled from the parent's price scaling to this training's, so the warm top
    predicts the parent's prices exactly."""
    import keras

    with tempfile.TemporaryDirectory() as tmp, keras_precision("float32"):
        path = Path(tmp) / Model.FILE
        lake.model(parent).download(path)
        net = keras.models.load_model(path, safe_mode=True)
    for layer in top.layers:
        if layer.weights:
            layer.set_weights(net.get_layer(layer.name).get_weights())
    then = lake.model(parent).config()["scaling"]
    span, span_then = scaling["max"] - scaling["min"], then["max"] - then["min"]
    a, c = span_then / span, (then["min"] - scaling["min"]) / span
    out = top.get_layer("head_out")
    kernel, bias = out.get_weights()
    out.set_weights([kernel * a, bias * a + c])


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


def compile_top(model, settings: TrainSettings, steps: int) -> None:
    """The optimizer and loss; ``steps``: how many batches the whole run takes."""
    import keras
    import tensorflow as tf

    if settings.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(settings.fit_learning_rate(), max(steps, 1))
    else:
        lr = keras.optimizers.schedules.InverseTimeDecay(
            settings.fit_learning_rate(), decay_steps=1, decay_rate=settings.decay
        )
    # XLA measured 2.5x slower on this CPU (a bf16 block5 + head epoch: 3.9 vs 1.5 s); GPUs use it.
    jit = "auto" if tf.config.list_physical_devices("GPU") else False
    # Under mixed_float16 Keras wraps the optimizer in its LossScaleOptimizer.
    model.compile(optimizer=fused_rmsprop(lr), loss="mse", jit_compile=jit)


def epoch_bar(epoch: int, epochs: int, steps: int) -> list:
    """A progress bar for one epoch in a terminal ("Epoch 1/5", batches, loss), as a
    Keras callback; none elsewhere, where each epoch's log line is the progress. (Keras's
    own bar cannot say "Epoch 1/N" when fit runs one epoch at a time.)"""
    if not sys.stderr.isatty():
        return []
    import keras
    from tqdm import tqdm

    class Bar(keras.callbacks.Callback):
        def on_epoch_begin(self, _epoch, logs=None):
            self.bar = tqdm(total=steps, desc=f"Epoch {epoch + 1}/{epochs}", unit="batch")

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update()
            self.bar.set_postfix(loss=f"{(logs or {}).get('loss', float('nan')):.4f}")

        def on_epoch_end(self, _epoch, logs=None):
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", val_loss=f"{logs['val_loss']:.4f}")
            self.bar.close()

    return [Bar()]


def batch_lines(lines: ProgressLog, batch_size: int) -> list:
    """Off a terminal, the training's progress lines (images done, rate, time left), as a
    Keras callback that counts every batch; none where the bar shows."""
    if not lines.enabled:
        return []
    import keras

    class Lines(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            lines.advance(batch_size)

    return [Lines()]


@dataclass
class Fit:
    """What the epoch loop trains: the compiled model and its inputs. With ``multi_view``
    the train x is (views, n, ...) and each epoch draws one view per image."""

    model: object  # what fit() trains: the top on cached features, or the whole graph
    frozen: object | None  # pixels -> cut-layer features (None when nothing is frozen)
    top: object  # features (or pixels) -> scaled price
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    multi_view: bool
    features: dict | None  # the feature cache used: key, hit, views, seconds
    streams: tuple[ShardStream, ShardStream] | None = None  # (train, val) by pixel shard
    workdir: tempfile.TemporaryDirectory | None = None  # the streams' local feature copies
    means: np.ndarray | None = None  # the streamed train images' pixel means (drift)
    warm: dict | None = None  # a warm start's parent and counts (warm_rows)


def stream_batches(stream: ShardStream, batch_size: int, shuffle: tuple | None = None):
    """A tf.data pipeline over a ShardStream's batches (drawn anew for each epoch)."""
    import tensorflow as tf

    seed, epoch = shuffle or (0, 0)
    spec = (tf.TensorSpec((None, *stream.shape), tf.float16), tf.TensorSpec((None,), tf.float32))
    steps = -(-len(stream) // batch_size)
    return (
        tf.data.Dataset.from_generator(
            lambda: stream.batches(batch_size, seed, epoch, shuffle is not None),
            output_signature=spec,
        )
        .apply(tf.data.experimental.assert_cardinality(steps))
        .prefetch(1)
    )


def fit_epochs(
    fit: Fit,
    settings: TrainSettings,
    start_epoch: int,
    history: dict,
    checkpoints: CheckpointWriter,
    progress: TrainingProgress,
    on_epoch: EpochHook | None,
) -> float:
    """The epochs left after ``start_epoch``, a checkpoint after each; returns the seconds
    spent in ``fit``."""
    log = get_logger()
    if fit.streams is not None:
        val = stream_batches(fit.streams[1], settings.batch_size)
    else:
        val = batches(fit.val_x, fit.val_y, settings.batch_size)
    fit_seconds = 0.0
    lines = ProgressLog("training", (settings.epochs - start_epoch) * len(fit.train_y), "images")
    for epoch in range(start_epoch, settings.epochs):
        shuffle = (settings.seed, epoch)
        if fit.streams is not None:
            train_batches = stream_batches(fit.streams[0], settings.batch_size, shuffle)
        else:
            epoch_x = fit.train_x
            if fit.multi_view:
                rng = np.random.default_rng([settings.seed, epoch])
                pick = rng.integers(0, len(fit.train_x), size=fit.train_x.shape[1])
                epoch_x = fit.train_x[pick, np.arange(fit.train_x.shape[1])]
            train_batches = batches(epoch_x, fit.train_y, settings.batch_size, shuffle=shuffle)
        t0 = time.time()
        h = fit.model.fit(
            train_batches,
            epochs=epoch + 1,
            initial_epoch=epoch,
            validation_data=val,
            shuffle=False,  # batches() has shuffled
            verbose=0,
            callbacks=epoch_bar(epoch, settings.epochs, -(-len(fit.train_y) // settings.batch_size))
            + batch_lines(lines, settings.batch_size),
        )
        seconds = time.time() - t0
        fit_seconds += seconds
        for k in ("loss", "val_loss"):
            history[k].append(float(h.history[k][-1]))
        history["seconds"].append(round(seconds, 3))
        checkpoints.save(fit.model, epoch + 1, history)
        log.info(
            "epoch %d/%d: loss %.5f val_loss %.5f (%.1f s)",
            epoch + 1,
            settings.epochs,
            history["loss"][-1],
            history["val_loss"][-1],
            seconds,
        )
        progress.update(epoch + 1, history, len(fit.train_y))
        if on_epoch is not None:
            on_epoch(epoch + 1, history, fit)
    return fit_seconds


def prepare_fit(lake: Lake, data: Data, settings: TrainSettings, precision: str) -> Fit:
    """The graphs and what trains, extracting the frozen layers' outputs once into the
    feature cache when layers are frozen."""
    import keras

    frozen, top = build_graphs(settings, build_vgg(settings))
    if not settings.uses_cache():
        pixels = keras.Input(input_shape(settings), name="pixels")
        x = pixels
        if settings.augment != "none":
            for layer in augmentation_layers(settings):
                x = layer(x)
        if frozen is not None:
            x = frozen(x)
        model = keras.Model(pixels, top(x), name="train")
        fit = Fit(model, frozen, top, model_input(data.train.images), data.train.y,
                  model_input(data.test.images), data.test.y, False, None)  # fmt: skip
        return fit
    recipe = recipe_of(settings)
    by_content = lake.by_content(data.dataset_version)  # features per pixel shard
    key = feature_spec(data.dataset_version, settings, precision, by_content).key()
    t0 = time.time()
    runner = frozen_runner(frozen, settings.extraction_engine)  # computes the features
    if by_content:
        return _streamed_fit(lake, data, settings, recipe, key, frozen, runner, top, t0)
    train_x, val_x, hit = load_or_extract(
        lake.features(key), runner, data.train.images, data.test.images, recipe
    )
    info = {"key": key, "hit": hit, "views": recipe.n, "seconds": round(time.time() - t0, 2)}
    return Fit(top, frozen, top, train_x, data.train.y, val_x, data.test.y, True, info)


def recipe_of(settings: TrainSettings) -> ViewRecipe:
    return ViewRecipe(settings.cached_views(), settings.shift, settings.flip, settings.seed)


def feature_spec(dataset_version: str, settings: TrainSettings, precision: str,
                 by_content: bool) -> FeatureSpec:  # fmt: skip
    """What the frozen features of this training depend on: a dataset stored by content
    shares them per pixel shard across its versions (``by-content``); one stored before
    (whole) keys them by its version and subset."""
    subset = {} if by_content else {"train": settings.train_limit, "test": settings.test_limit}
    return FeatureSpec(
        dataset_version="by-content" if by_content else dataset_version,
        subset=subset,
        weights=weights_identity(settings),
        input_size=settings.input_size,
        preprocess=settings.preprocess,
        cut=settings.frozen_layers(),
        precision=precision,
        views=recipe_of(settings),
        engine=settings.extraction_engine,
    )


def feature_shards(lake: Lake, data: Data) -> tuple[list, list, list[str]]:
    """Where each train and test image's pixels are (shard, row), and the shards."""
    where = lake.dataset(data.dataset_version).locations()
    train_at, test_at = [where[i] for i in data.train.ids], [where[i] for i in data.test.ids]
    return train_at, test_at, sorted({s for s, _ in train_at} | {s for s, _ in test_at})


def _streamed_fit(lake: Lake, data: Data, settings: TrainSettings, recipe: ViewRecipe,
                  key: str, frozen, runner, top, t0: float) -> Fit:  # fmt: skip
    """A dataset stored by content: features extracted for the pixel shards that have
    none under this spec, then the top trains from shard streams (bounded memory)."""
    train_at, test_at, shards = feature_shards(lake, data)
    cache = lake.shard_features(key)
    facts = extract_shards(cache, lake.dataset(data.dataset_version).pixels(), runner, shards,
                           recipe, settings.preprocess, settings.input_size)  # fmt: skip
    workdir = tempfile.TemporaryDirectory(prefix="vggprice-features-")
    means = ShardStream(cache, train_at, data.train.y, recipe.n, workdir.name).means()
    rows, warm = np.arange(len(train_at)), None
    if settings.warm_start != "off":  # a parent's top, fit on what changed since it
        rows, warm = warm_rows(lake, data, settings)
        warm_top(lake, top, settings.warm_start, data.scaling)
        get_logger().info("warm start from %s: fitting the %d train images changed since it and "
                          "%d others, of %d", warm["parent"], warm["changed"], warm["replayed"],
                          len(train_at))  # fmt: skip
    train_y = data.train.y[rows]
    streams = (ShardStream(cache, [train_at[i] for i in rows], train_y, recipe.n, workdir.name),
               ShardStream(cache, test_at, data.test.y, 1, workdir.name))  # fmt: skip
    # Small enough: batched from memory, as fast as ever; larger: streamed from the shards.
    in_memory = sum(s.nbytes() for s in streams) <= load_settings().train_memory_mb * 2**20
    info = {"key": key, "hit": facts["extracted_shards"] == 0, "views": recipe.n,
            "seconds": round(time.time() - t0, 2), "streamed": True,
            "in_memory": in_memory} | facts  # fmt: skip
    if in_memory:
        train_x, val_x = streams[0].gather(), streams[1].gather()[0]
        workdir.cleanup()
        return Fit(top, frozen, top, train_x, train_y, val_x, data.test.y, True, info,
                   means=means, warm=warm)  # fmt: skip
    return Fit(top, frozen, top, None, train_y, None, data.test.y, True, info, streams,
               workdir, means, warm)  # fmt: skip


def _feature_work(lake: Lake, dataset_version: str, labels_version: str,
                  settings: TrainSettings) -> tuple[str, list[str]] | None:  # fmt: skip
    """(feature key, the training's feature shards) of a dataset stored by content with
    frozen layers, else None (nothing extracted per shard)."""
    if not (settings.uses_cache() and lake.by_content(dataset_version)):
        return None
    limits = {"train": settings.train_limit, "test": settings.test_limit}
    data = load_data(lake, dataset_version, labels_version, limits, settings.seed,
                     settings.preprocess, settings.input_size, pixels=False)  # fmt: skip
    key = feature_spec(dataset_version, settings, settings.precision, True).key()
    return key, feature_shards(lake, data)[2]


def features_missing(lake: Lake, dataset_version: str, labels_version: str,
                     settings: TrainSettings) -> int:  # fmt: skip
    """How many of the training's feature shards have no features yet (0 when its
    model is stored, or nothing is extracted per shard)."""
    settings = warm_resolved(lake, dataset_version, labels_version, settings)
    if lake.model(version_for(dataset_version, labels_version, settings)).complete:
        return 0
    work = _feature_work(lake, dataset_version, labels_version, settings)
    if work is None:
        return 0
    key, shards = work
    return len(shards) - len(lake.shard_features(key).done(shards))


def extract_features(
    lake: Lake, dataset_version: str, labels_version: str, settings: TrainSettings,
    start: int = 0,
) -> dict:  # fmt: skip
    """One extractor of a dataset version's frozen features, wherever it runs (a Dask
    worker process, a flow run on a pool): the frozen layers built as training builds
    them, then the ledger's loop over the training's feature shards
    (``features.extract_work``: each shard once, whoever else works on them). The
    training then finds them stored. ``settings`` are resolved first (give the
    training's resolved settings: its precision and engine name the features)."""
    settings = resolved(settings)
    work = _feature_work(lake, dataset_version, labels_version, settings)
    if work is None:
        return {"extractor": worker_name(), "stored": []}
    key, shards = work
    with keras_precision(settings.precision):
        frozen, _ = build_graphs(settings, build_vgg(settings))
    stored = extract_work(lake.shard_features(key), lake.dataset(dataset_version).pixels(),
                          frozen_runner(frozen, settings.extraction_engine), shards,
                          recipe_of(settings), settings.preprocess, settings.input_size,
                          claim_seconds=load_settings().extract_claim_seconds,
                          start=start)  # fmt: skip
    return {"extractor": worker_name(), "key": key, "stored": stored}


def train(
    lake: Lake,
    dataset_version: str,
    labels_version: str,
    settings: TrainSettings,
    on_epoch: EpochHook | None = None,
) -> dict:
    """Train (or find) the model version for these inputs; returns its version, the
    resolved settings it was made with, and facts."""
    log = get_logger()
    if settings.weights == "none" and settings.freeze is None:
        log.warning("weights=none: random VGG16 layers are not worth freezing, so all layers "
                    "train (set freeze=N to override)")  # fmt: skip
    settings = warm_resolved(lake, dataset_version, labels_version, settings)
    mv = version_for(dataset_version, labels_version, settings)
    model = lake.model(mv)
    if model.complete:
        log.info("model %s already trained; nothing redone", mv)
        return {"model_version": mv, "skipped": True, "lineage": model.lineage(),
                "settings": settings.model_dump()}  # fmt: skip
    started = time.time()
    precision = settings.precision
    limits = {"train": settings.train_limit, "test": settings.test_limit}
    streamed = settings.uses_cache() and lake.by_content(dataset_version)
    data = load_data(lake, dataset_version, labels_version, limits, settings.seed,
                     settings.preprocess, settings.input_size, pixels=not streamed)  # fmt: skip
    log.info("training %s: %d images x %d epoch%s at %dx%d, %d of 19 VGG16 layers frozen; "
             "precision %s", mv, len(data.train.y), settings.epochs,
             "" if settings.epochs == 1 else "s", settings.input_size, settings.input_size,
             settings.frozen_layers(), precision_reason(precision))  # fmt: skip
    with keras_precision(precision), seeded(settings.seed):
        fit = prepare_fit(lake, data, settings, precision)
        steps = settings.epochs * -(-len(fit.train_y) // settings.batch_size)
        compile_top(fit.model, settings, steps)
        start_epoch, history = restore_checkpoint(model.checkpoints(), fit.model)
        if start_epoch:
            log.info("resuming %s after epoch %d of %d", mv, start_epoch, settings.epochs)
        writer = CheckpointWriter(model.checkpoints())
        try:
            fit_seconds = fit_epochs(fit, settings, start_epoch, history, writer,
                                     TrainingProgress(lake.uri, mv, settings.epochs, about(settings)),
                                     on_epoch)  # fmt: skip
        finally:
            writer.close()  # the last finished epoch is stored, even when training failed
            if fit.workdir is not None:
                fit.workdir.cleanup()
    final = export_model(settings, [fit.frozen, fit.top], data.scaling)
    epochs_run = settings.epochs - start_epoch
    facts = {
        "model_version": mv,
        "attempt": attempt_id(),
        "precision": precision,
        "train_images": len(data.train.y),
        "fit_images": len(fit.train_y),  # fewer with a warm start
        "warm_start": fit.warm,
        "epochs_run": epochs_run,
        "resumed_from_epoch": start_epoch,
        "fit_seconds": round(fit_seconds, 2),
        "images_per_second": round(len(fit.train_y) * epochs_run / fit_seconds, 1)
        if fit_seconds
        else None,
        "seconds": round(time.time() - started, 2),
        "features": fit.features,
    }
    published = write_model(model, final, settings, data, history, precision, facts, fit.means)
    model.checkpoints().delete_all()
    won = published.get("attempt") == facts["attempt"]
    result = facts | {"skipped": False, "settings": settings.model_dump(), "won": won}
    return result if won else result | {"winner": winner_of(published)}


def winner_of(lineage: dict) -> dict:
    """The attempt whose files a model's lineage.json published, as a result reports it."""
    keys = ("attempt", "model_sha256", "created_at", "hardware")
    return {k: lineage.get(k) for k in keys}


def write_model(
    model: Model, net, settings: TrainSettings, data: Data, history: dict, precision: str,
    facts: dict, means: np.ndarray | None = None,
) -> dict:  # fmt: skip
    """The model's files under this attempt's own prefix (models/<v>/attempts/<id>/),
    then lineage.json created only if the version has none: the first complete attempt
    wins, and a model with a marker is never rewritten. Returns the marker that stands;
    a losing attempt says so in one line and removes its own files (nothing names them)."""
    import keras
    import tensorflow as tf

    files = model.attempt(facts["attempt"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / model.FILE
        net.save(path)
        model_sha256 = sha256_file(path)
        files.write_file(path)
    lines: list[str] = []
    net.summary(print_fn=lambda line, *a, **k: lines.append(line), line_length=100)
    files.write_summary("\n".join(lines) + "\n")
    files.write_config(
        {
            "model_version": model.version,
            "settings": settings.model_dump(),
            "scaling": {k: data.scaling[k] for k in ("min", "max", "fit_on")},
            "input": input_description(settings),
            "preprocess": {"mode": settings.preprocess, "size": settings.input_size},
            "output": "price",
            "train_stats": train_stats(data.train.images, data.train.price, means),
        },
    )
    files.write_history(history)
    files.write_plot("loss", loss_plot(history))
    published = model.publish(
        files,
        {
            "model_version": model.version,
            "model_sha256": model_sha256,
            "dataset_version": data.dataset_version,
            "labels_version": data.labels_version,
            "base_weights": {"source": settings.weights, "identity": weights_identity(settings)},
            "feature_cache_key": (facts.get("features") or {}).get("key"),
            "code": code_fingerprint(),
            "package": {"name": "vggprice", "version": __version__, "git_commit": git_commit()},
            "libraries": {"keras": keras.__version__, "tensorflow": tf.__version__},
            "hardware": hardware(),
            "precision": precision,
            "training": facts,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    if published.get("attempt") != files.attempt:
        get_logger().warning(
            "model %s: attempt %s lost, attempt %s (%s) was published first; it stands and "
            "this attempt's files are removed",
            model.version, files.attempt, published.get("attempt") or "(before attempts)",
            published.get("created_at"),
        )  # fmt: skip
        files.delete_all()
    return published


def about(settings: TrainSettings) -> str:
    """The resolved run-time choices, for the training report."""
    return f"Precision `{settings.precision}`, {settings.frozen_layers()} VGG16 layers frozen."


def input_description(settings: TrainSettings) -> dict:
    """What model.keras takes, as config.json says it."""
    meaning = "gray pixels 0..255" if settings.preprocess == "gray28" else "RGB pixels 0..255"
    return {"shape": list(input_shape(settings)), "dtype": "uint8", "meaning": meaning}


@task(name="train-model", **TASK_RETRIES)
def train_model(
    store_uri: str, dataset_version: str, labels_version: str, settings: TrainSettings
) -> dict:
    """Train the price model (or find it); a retried run resumes from its last checkpoint."""
    from tasks.store.storage import open_store

    return train(Lake(open_store(store_uri)), dataset_version, labels_version, settings)
