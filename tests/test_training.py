"""Training, evaluation and promotion with tiny settings on both store backends."""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import pytest

from flows.evaluate import evaluate_flow, promote_flow
from flows.pipeline import train_on_pool
from flows.train import train_flow
from tasks.data.fashion_mnist import find_source, ingest
from tasks.data.loading import load_data
from tasks.data.prices import PriceRule, make_labels
from tasks.governance.evaluation import evaluate
from tasks.governance.registry import decide, resolve_champion
from tasks.model.export import (
    ExportError,
    cached_model_file,
    export_model,
    load_inference_model,
    load_stored_model,
    resolve_precision,
)
from tasks.model.features import augment_view
from tasks.model.train_settings import TrainSettings
from tasks.model.training import resolved, train, version_for
from tasks.model.weights import WeightsError
from tasks.reports import line_key
from tasks.runtime import keras_precision
from tasks.store.lake import Lake
from tasks.store.storage import open_store
from tests.conftest import TINY

TINY = TINY | {"views": 2}  # two cached views: the image and its flip


def artifacts_by_key() -> dict[str, str]:
    """The newest markdown of each artifact key on the Prefect server."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = sorted(client.read_artifacts(), key=lambda a: a.created)
    return {a.key: a.data for a in found if a.key and a.type == "markdown"}


class Versions(NamedTuple):
    lake: Lake
    dataset_version: str
    labels_version: str


def dataset_shards(lake: Lake, dv: str, split: str) -> list[str]:
    """The pixel shards of one split of a demo version."""
    index = lake.dataset(dv).index(["split", "shard"]).to_pylist()
    return sorted({r["shard"] for r in index if r["split"] == split})


def make_versions(store_uri, idx_source) -> Versions:
    lake = Lake(open_store(store_uri))
    dv = ingest(lake, find_source(idx_source))["version"]
    lv = make_labels(lake, dv, PriceRule(), seed=0)["labels_version"]
    return Versions(lake, dataset_version=dv, labels_version=lv)


@pytest.fixture
def versions(store_uri, idx_source):
    """Both backends."""
    return make_versions(store_uri, idx_source)


@pytest.fixture
def local_versions(tmp_path, idx_source):
    """The local store only: for behaviour that does not depend on the backend."""
    return make_versions(str(tmp_path / "lake"), idx_source)


@pytest.mark.own_process
@pytest.mark.usefixtures("prefect_server")
def test_train_evaluate_promote(versions, store_uri, tmp_path):
    lake, dv, lv = versions
    store = lake.store
    first = train_flow(dv, lv, store=store_uri, settings=TrainSettings(**TINY))
    mv = first["model_version"]
    assert first["features"]["hit"] is False and first["skipped"] is False
    assert first["settings"]["precision"] == resolve_precision("auto"), "auto resolved"
    lineage = store.get_json(f"models/{mv}/lineage.json")
    assert lineage["attempt"] and first["winner"] is None, "this run's attempt published"
    for name in ("model.keras", "config.json", "history.json", "summary.txt", "plots/loss.png"):
        assert store.exists(f"models/{mv}/attempts/{lineage['attempt']}/{name}"), name
    assert (lineage["dataset_version"], lineage["labels_version"]) == (dv, lv)
    assert lineage["feature_cache_key"] == first["features"]["key"]
    # The demo streams as a catalog does: features per pixel shard, every view in each.
    shards = lake.dataset(dv).manifest()["pixel_shards"]
    cache = lake.shard_features(first["features"]["key"])
    assert first["features"]["streamed"] and cache.done(shards) == set(shards)
    assert first["features"]["in_memory"], "this small, its features are batched from memory"
    assert first["features"]["extracted_images"] == 80, "60 train and 20 test images, once"
    split_of = {s: split for split in ("train", "test") for s in dataset_shards(lake, dv, split)}
    assert {s: cache.open(s, str(tmp_path)).shape[0] for s in shards} == {
        s: 2 if split_of[s] == "train" else 1 for s in shards
    }, "a train shard holds both views, a test shard (validation reads it) the image alone"

    metrics = evaluate_flow(mv, store=store_uri)
    assert metrics["n"] == 20 and metrics["rmse"] > 0 and metrics["noise_floor_rmse"] > 0
    for name in ("metrics.json", "plots/pred_vs_true.png", "plots/residuals.png"):
        assert store.exists(f"models/{mv}/{name}"), name
    assert metrics["baseline_rmse"] > 0 and metrics["baseline_price"] > 0
    reports = artifacts_by_key()
    evaluation = reports[line_key(store_uri, "demo", f"eval-{mv}")]
    training = reports[line_key(store_uri, "demo", f"train-{mv}")]
    assert evaluation.count("](data:image/png;base64,") == 3, "plots inline, loss curve too"
    assert "always the mean train price" in evaluation and "| 0 T-shirt/top |" in evaluation
    assert evaluation.split("\n")[2].startswith(("**Learned", "**Beats")), "a verdict first"
    assert "| 1 | " in training and training.count("](data:image/png;base64,") == 1

    decision = promote_flow(mv, store=store_uri, force=True)  # tiny: not past the baseline
    assert decision["promoted"] and decision["forced"]
    assert resolve_champion(lake, None)["model_version"] == mv

    # Same inputs, another top hyper-parameter: the feature cache is hit, not rebuilt.
    features_before = {o.key: o.etag for o in store.list("features/")}
    second = train_flow(dv, lv, store=store_uri, settings=TrainSettings(**TINY, head_units=64))
    assert second["features"] == second["features"] | {"hit": True, "key": first["features"]["key"]}
    assert {o.key: o.etag for o in store.list("features/")} == features_before

    # The same training twice is found, not redone.
    assert train_flow(dv, lv, store=store_uri, settings=TrainSettings(**TINY))["skipped"] is True

    decision = promote_flow(second["model_version"], store=store_uri, margin=10.0)
    assert decision["promoted"] is False, "a 1000 % margin cannot be beaten"
    assert resolve_champion(lake, None)["model_version"] == mv
    forced = promote_flow(second["model_version"], store=store_uri, force=True)
    assert forced["promoted"] and forced["forced"]
    champion = resolve_champion(lake, None)
    assert champion["model_version"] == second["model_version"] and champion["forced"]
    decisions = [store.get_json(k) for k in store.keys("registry/decisions/")]
    assert [d["promoted"] for d in decisions] == [True, False, True]
    assert decisions[1]["champion"]["metrics"]["rmse"] > 0
    assert decisions[1]["challenger"]["metrics"]["rmse"] > 0


@pytest.mark.own_process
def test_resume_after_crash(versions):
    lake, dv, lv = versions
    store = lake.store
    settings = TrainSettings(**TINY | {"epochs": 2})

    class Crash(Exception):
        pass

    def crash_after_first(epoch, history, fit):
        if epoch == 1:
            raise Crash("worker died")

    with pytest.raises(Crash):
        train(lake, dv, lv, settings, on_epoch=crash_after_first)
    (state,) = [k for k in store.keys("checkpoints/") if k.endswith("state.json")]
    assert store.get_json(state)["epoch"] == 1
    seen = []
    result = train(lake, dv, lv, settings, on_epoch=lambda e, h, f: seen.append(e))
    assert result["resumed_from_epoch"] == 1 and seen == [2]
    history = lake.model(result["model_version"]).history()
    assert len(history["loss"]) == 2 and len(history["val_loss"]) == 2
    assert store.keys("checkpoints/") == [], "checkpoints are removed once the model is stored"


@pytest.mark.own_process
def test_checkpoint_from_other_code_is_not_resumed(local_versions, caplog):
    lake, dv, lv = local_versions
    store = lake.store
    settings = TrainSettings(**TINY | {"epochs": 2})

    def crash(epoch, history, fit):
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        train(lake, dv, lv, settings, on_epoch=crash)
    (npz,) = [k for k in store.keys("checkpoints/") if k.endswith(".npz")]
    arrays = dict(np.load(io.BytesIO(store.get_bytes(npz))))
    arrays.pop(sorted(k for k in arrays if k.startswith("o"))[-1])  # an optimizer slot fewer
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.put_bytes(npz, buf.getvalue())
    seen = []
    result = train(lake, dv, lv, settings, on_epoch=lambda e, h, f: seen.append(e))
    assert result["resumed_from_epoch"] == 0 and seen == [1, 2]
    assert "checkpoint does not fit" in caplog.text


@pytest.mark.own_process
def test_weights_from_file(tmp_path, local_versions):
    import hashlib

    import keras

    lake, dv, lv = local_versions
    path = tmp_path / "base.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        path
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    settings = TrainSettings(**TINY | {"weights": str(path), "weights_sha256": digest})
    result = train(lake, dv, lv, settings)
    lineage = lake.model(result["model_version"]).lineage()
    assert lineage["base_weights"]["identity"] == f"sha256:{digest}"

    with pytest.raises(WeightsError, match="does not match the expected"):
        train(
            lake, dv, lv, TrainSettings(**TINY | {"weights": str(path), "weights_sha256": "0" * 64})
        )

    wrong = tmp_path / "wrong.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save_weights(wrong)
    with pytest.raises(WeightsError, match="wrong.weights.h5: not VGG16"):
        train(lake, dv, lv, TrainSettings(**TINY | {"weights": str(wrong)}))


@pytest.mark.own_process
def test_weights_from_store_uri(tmp_path, s3_uri, local_versions):
    import keras

    lake, dv, lv = local_versions
    path = tmp_path / "base.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        path
    )
    open_store(s3_uri).put_file("weights/vgg16.weights.h5", path)
    settings = TrainSettings(**TINY | {"weights": f"{s3_uri}/weights/vgg16.weights.h5"})
    result = train(lake, dv, lv, settings)
    assert result["skipped"] is False


def test_imagenet_offline_fails_fast(local_versions, monkeypatch, tmp_path):
    lake, dv, lv = local_versions
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # no cached download
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and no network
    with pytest.raises(WeightsError, match="weights=none"):
        train(lake, dv, lv, TrainSettings(**TINY | {"weights": "imagenet", "freeze": None}))


def scaled_to_price(y: np.ndarray, scaling: dict) -> np.ndarray:
    return (
        np.asarray(y, np.float64).reshape(-1) * (scaling["max"] - scaling["min"]) + scaling["min"]
    )


@pytest.mark.own_process
def test_stored_model_is_the_trained_model(local_versions):
    """The in-memory trained graphs (frozen layers, then the top with its fast
    convolutions) and the stored model.keras give the same prices on the same images;
    the bfloat16 and float16 scoring rebuilds stay close to float32."""
    import keras

    lake, dv, lv = local_versions
    settings = TrainSettings(**TINY | {"precision": "float32"})
    trained = {}
    result = train(lake, dv, lv, settings, on_epoch=lambda e, h, fit: trained.update(fit=fit))
    data = load_data(lake, dv, lv, {"test": None}, 0)
    images, scaling = data.test.images, data.scaling
    fit = trained["fit"]
    assert type(fit.top.get_layer("block5_conv1")).__name__ == "PatchConv2D"
    with keras_precision("float32"):
        features = fit.frozen.predict(images[..., None], verbose=0)
        in_memory = scaled_to_price(fit.top.predict(features, verbose=0), scaling)
    model = lake.model(result["model_version"])
    path = cached_model_file(model)
    stored = keras.models.load_model(path, safe_mode=True)
    from_store = np.asarray(stored.predict(images[..., None], verbose=0), np.float64).reshape(-1)
    np.testing.assert_allclose(from_store, in_memory, rtol=1e-4, atol=1e-3)
    assert np.ptp(from_store) > 0, "prices differ between images"

    span = scaling["max"] - scaling["min"]
    for precision in ("mixed_bfloat16", "mixed_float16"):
        low = load_inference_model(path, model.config(), precision)
        got = np.asarray(low.predict(images[..., None], verbose=0), np.float64).reshape(-1)
        # Stated tolerance: within 2 % of the price range on every image.
        assert np.abs(got - from_store).max() <= 0.02 * span, (precision, got - from_store)
    assert keras.mixed_precision.global_policy().name == "float32", "policy restored"


@pytest.mark.own_process
def test_same_inputs_same_model(local_versions, tmp_path, idx_source):
    """One model version, one model: the same inputs and settings train the same
    weights on this machine (seeded, with a seeded batch order)."""
    lake, dv, lv = local_versions
    other, dv2, lv2 = make_versions(str(tmp_path / "other"), idx_source)
    assert (dv2, lv2) == (dv, lv)
    settings = TrainSettings(**TINY | {"epochs": 2})
    a, b = train(lake, dv, lv, settings), train(other, dv, lv, settings)
    assert a["model_version"] == b["model_version"]
    mv = a["model_version"]
    assert lake.model(mv).history()["loss"] == other.model(mv).history()["loss"]
    wa, wb = (load_stored_model(x.model(mv)).get_weights() for x in (lake, other))
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


@pytest.mark.own_process
def test_the_demo_streams_and_a_subset_extracts_its_own_shards_alone(tmp_path, idx_source,
                                                                     monkeypatch):  # fmt: skip
    """The demo is stored as a catalog is: each split in ``subset_rank`` order, so a
    subset of N is the leading shards, and a training extracts the frozen features of
    those shards alone and streams them (features over ``train_memory_mb``, here 0);
    evaluation reads the same test images, a shard at a time."""
    monkeypatch.setenv("VGGPRICE_TRAIN_MEMORY_MB", "0")
    lake = Lake(open_store(str(tmp_path / "lake")))
    dv = ingest(lake, find_source(idx_source), shard_rows=10)["version"]
    lv = make_labels(lake, dv, PriceRule(), seed=0)["labels_version"]
    dataset = lake.dataset(dv)
    manifest = dataset.manifest()
    assert lake.by_content(dv) and [len(manifest["splits"][s]["shards"]) for s in
                                    ("train", "test")] == [6, 2]  # fmt: skip
    settings = TrainSettings(**TINY | {"train_limit": 20, "test_limit": 10})
    data = load_data(lake, dv, lv, {"train": 20, "test": 10}, seed=0, pixels=False)
    where = dataset.locations()
    leading = {s["name"] for split in ("train", "test") for s in
               manifest["splits"][split]["shards"][: {"train": 2, "test": 1}[split]]}  # fmt: skip
    assert {dataset.shard_name(where[i][0]) for i in data.train.ids + data.test.ids} == leading
    other_seed = load_data(lake, dv, lv, {"train": 20, "test": 10}, seed=7, pixels=False)
    assert other_seed.train.ids == data.train.ids, "a subset does not depend on the seed"

    result = train(lake, dv, lv, settings)
    facts = result["features"]
    assert facts["streamed"] and (facts["shards"], facts["extracted_images"]) == (3, 30)
    assert facts["in_memory"] is False, "streamed from the shards, not gathered"
    cache = lake.shard_features(facts["key"])
    assert len(cache.done(manifest["pixel_shards"])) == 3, "no other shard's features"
    assert evaluate(lake, result["model_version"])["n"] == 10, "the test subset, streamed"
    # The same images through the in-memory path (no frozen layers) as through streams.
    assert load_data(lake, dv, lv, {"train": 20}, seed=0).train.images.shape == (20, 28, 28)


@pytest.mark.own_process
def test_one_version_one_precision(local_versions):
    """A model version names one precision: float32 and mixed_bfloat16 (both forced)
    are two versions; the same precision again is found, not retrained; ``auto`` is the
    version of the precision it resolves to on this machine, and config.json shows it."""
    lake, dv, lv = local_versions
    tiny = TINY | {"train_limit": 30}
    f32 = train(lake, dv, lv, TrainSettings(**tiny | {"precision": "float32"}))
    bf16 = train(lake, dv, lv, TrainSettings(**tiny | {"precision": "mixed_bfloat16"}))
    assert f32["skipped"] is False and bf16["skipped"] is False
    assert f32["model_version"] != bf16["model_version"]
    for result, precision in ((f32, "float32"), (bf16, "mixed_bfloat16")):
        model = lake.model(result["model_version"])
        assert model.lineage()["precision"] == precision
        assert model.config()["settings"]["precision"] == precision
        assert result["settings"]["precision"] == precision

    again = train(lake, dv, lv, TrainSettings(**tiny | {"precision": "float32"}))
    assert again["skipped"] is True and again["model_version"] == f32["model_version"]

    here = resolve_precision("auto")
    auto = train(lake, dv, lv, TrainSettings(**tiny))
    assert auto["skipped"] is True, "auto finds the model of the precision it resolves to"
    assert auto["model_version"] == {"float32": f32, "mixed_bfloat16": bf16}[here]["model_version"]
    assert auto["settings"]["precision"] == here
    assert sorted(lake.model_versions()) == sorted([f32["model_version"], bf16["model_version"]])

    # A parent resolves auto for the pool that trains, not for its own CPU: float32 on a
    # cpu pool, whatever this CPU is; the model exists, so no run is started.
    on_pool = train_on_pool("cpu", dv, lv, lake.store.uri, TrainSettings(**tiny))
    assert on_pool["skipped"] is True and on_pool["model_version"] == f32["model_version"]
    assert on_pool["settings"]["precision"] == "float32"


def test_resolved_settings_name_the_version():
    """Run-time choices are resolved before hashing: the default freeze is the number it
    stands for; auto is this machine's precision, or the one a caller resolves it to."""
    dv, lv = "fm-x", "px-y"
    here = resolve_precision("auto")
    auto = TrainSettings(**TINY)
    assert resolved(auto).precision == here and resolved(resolved(auto)) == resolved(auto)
    assert version_for(dv, lv, auto) == version_for(
        dv, lv, TrainSettings(**TINY | {"precision": here})
    )
    others = {"float32", "mixed_bfloat16", "mixed_float16"} - {here}
    for other in others:
        pinned = TrainSettings(**TINY | {"precision": other})
        assert version_for(dv, lv, pinned) != version_for(dv, lv, auto)
        assert resolved(auto, auto_precision=other).precision == other
        assert resolved(pinned, auto_precision=here).precision == other, "pinned is kept"

    none = TrainSettings(weights="none", input_size=32)
    assert resolved(none).freeze == 0
    assert version_for(dv, lv, none) == version_for(dv, lv, none.model_copy(update={"freeze": 0}))
    imagenet = TrainSettings(input_size=32)
    assert resolved(imagenet).freeze == 15
    assert version_for(dv, lv, imagenet) == version_for(
        dv, lv, imagenet.model_copy(update={"freeze": 15})
    )
    assert version_for(dv, lv, imagenet) != version_for(
        dv, lv, imagenet.model_copy(update={"freeze": 14})
    )


def test_export_fails_naming_a_layer_without_trained_weights():
    from tasks.model.graphs import build_graphs

    settings = TrainSettings(**TINY)
    with keras_precision("float32"):
        frozen, top = build_graphs(settings)
    with pytest.raises(ExportError, match="'block1_conv1' has no trained counterpart"):
        export_model(settings, [top], {"min": 0.0, "max": 1.0})


@pytest.mark.own_process
def test_mixed_float16_trains_with_loss_scaling(local_versions):
    """The GPU pool's precision on CPU: Keras's loss scaling around the fused RMSprop."""
    import keras

    lake, dv, lv = local_versions
    seen = {}

    def look(epoch, history, fit):
        seen["optimizer"] = fit.model.optimizer
        seen["loss"] = history["loss"][-1]

    settings = TrainSettings(**TINY | {"precision": "mixed_float16", "train_limit": 30})
    result = train(lake, dv, lv, settings, on_epoch=look)
    assert isinstance(seen["optimizer"], keras.optimizers.LossScaleOptimizer)
    assert type(seen["optimizer"].inner_optimizer).__name__ == "FusedRMSprop"
    assert np.isfinite(seen["loss"])
    assert lake.model(result["model_version"]).lineage()["precision"] == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == "float32"
    # The parent of a gpu pool resolves auto to what the GPU workers train: this model.
    auto = TrainSettings(**TINY | {"train_limit": 30})
    on_pool = train_on_pool("gpu", dv, lv, lake.store.uri, auto)
    assert on_pool["skipped"] is True and on_pool["model_version"] == result["model_version"]
    assert on_pool["settings"]["precision"] == "mixed_float16"


@pytest.mark.own_process
def test_training_leaves_no_global_state_behind(local_versions):
    import random

    import keras

    lake, dv, lv = local_versions
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    with keras_precision("float32"):
        train(lake, dv, lv, TrainSettings(**TINY | {"precision": "mixed_bfloat16"}))
        assert keras.mixed_precision.global_policy().name == "float32"
    assert (random.random(), np.random.rand()) == expected, "seeds put back as they were"


@pytest.mark.own_process
def test_off_a_terminal_training_says_what_it_does_and_how_far(local_versions, caplog,
                                                                 monkeypatch):  # fmt: skip
    """The first line names the precision and why; then progress lines within the steps
    (here after every batch: VGGPRICE_PROGRESS_SECONDS=0), with a rate and time left."""
    import logging
    import re

    from tasks.model.export import precision_reason, resolve_precision

    monkeypatch.setenv("VGGPRICE_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO)
    lake, dv, lv = local_versions
    train(lake, dv, lv, TrainSettings(**TINY))
    (start,) = [m for m in caplog.messages if m.startswith("training m-")]
    reason = precision_reason(resolve_precision("auto"))
    assert start.endswith(f"precision {reason}") and ": this" in reason, start
    line = r"[\d.]+ images/s, about \d+ s left"
    steps = [m for m in caplog.messages if re.fullmatch(r"training: \d+/\d+ images, " + line, m)]
    frozen = [m for m in caplog.messages
              if re.fullmatch(r"frozen features: \d+/\d+ images, " + line, m)]  # fmt: skip
    assert steps and frozen, caplog.messages


@pytest.mark.own_process
def test_online_mode_and_none_default_trains_all(local_versions, caplog):
    lake, dv, lv = local_versions
    settings = TrainSettings(weights="none", input_size=32, epochs=1, augment="online")
    assert settings.frozen_layers() == 0 and not settings.uses_cache()
    result = train(lake, dv, lv, settings)
    assert result["features"] is None
    assert "all layers train" in caplog.text


def test_decide_margin():
    assert decide(9.0, None, 0.01) == (True, "no champion yet")
    assert decide(9.0, 10.0, 0.01)[0] is True
    assert decide(9.95, 10.0, 0.01)[0] is False
    assert decide(10.5, 10.0, 0.0)[0] is False
    # The mean-price baseline bars every candidate, the first champion too.
    promoted, reason = decide(60.0, None, 0.01, baseline_rmse=62.8)
    assert not promoted and "mean-price baseline's 62.800 by more than 5%" in reason
    assert "needs < 59.660" in reason and "--force" in reason and "\n" not in reason
    assert decide(59.0, None, 0.01, baseline_rmse=62.8) == (True, "no champion yet")
    assert decide(59.0, 70.0, 0.01, baseline_rmse=62.8)[0] is True
    assert decide(61.0, 70.0, 0.01, baseline_rmse=62.8)[0] is False, "better, still nonsense"


def test_augment_views_are_deterministic():
    images = np.random.default_rng(0).integers(0, 255, (16, 28, 28), dtype=np.uint8)
    assert (augment_view(images, 0, 0.1, True, 0) == images).all()
    assert (augment_view(images, 1, 0.1, True, 0) == images[:, :, ::-1]).all()
    a = augment_view(images, 2, 0.1, True, 0)
    assert (a == augment_view(images, 2, 0.1, True, 0)).all()
    assert not (a == images).all()


def test_random_base_layers_are_the_same_whatever_other_threads_draw():
    """weights=none: the random VGG16 and head are a function of the seed alone, also
    while another thread of the process draws from Python's global random state (as a
    Dask worker's or a Prefect task runner's threads do): otherwise two extractors of one
    feature spec would store features of different networks under one key."""
    import random
    import threading

    from tasks.model.graphs import build_graphs

    settings = TrainSettings(**TINY | {"preprocess": "rgb"})

    def weights() -> list[np.ndarray]:
        frozen, top = build_graphs(settings)
        return frozen.get_weights() + top.get_weights()

    quiet = weights()
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.random()
            stop.wait(0.0005)

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        busy = weights()
    finally:
        stop.set()
        thread.join()
    assert len(quiet) == len(busy) > 20
    for a, b in zip(quiet, busy, strict=True):
        np.testing.assert_array_equal(a, b)
    other = build_graphs(TrainSettings(**TINY | {"preprocess": "rgb", "seed": 1}))[0]
    assert not np.array_equal(other.get_weights()[-2], quiet[len(other.get_weights()) - 2])
    kernel = quiet[0] if quiet[0].ndim == 4 else next(w for w in quiet if w.ndim == 4)
    limit = np.sqrt(6 / (9 * (kernel.shape[2] + kernel.shape[3])))  # Glorot-uniform
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit


@pytest.mark.parametrize("side", [3, 2, 6])
def test_patch_conv_matches_conv2d(side):
    import keras

    from tasks.model.kernels import as_patch_conv

    with keras_precision("float32"):
        inp = keras.Input((side, side, 64))
        conv = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="block5_conv1")
        model = keras.Model(inp, conv(inp))
        twin = as_patch_conv(conv)
    assert type(twin).__name__ == "PatchConv2D" and twin.name == conv.name
    x = np.random.default_rng(0).normal(size=(5, side, side, 64)).astype("float32")
    assert np.allclose(model.predict(x, verbose=0), np.asarray(twin(x)), atol=1e-5)


def test_patch_conv_leaves_other_convolutions():
    import keras

    from tasks.model.kernels import as_patch_conv

    strided = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")
    strided(keras.Input((6, 6, 4)))
    assert as_patch_conv(strided) is strided, "only the 3x3/stride-1/same/relu shape is swapped"
    large = keras.layers.Conv2D(8, 3, padding="same", activation="relu")
    large(keras.Input((12, 12, 4)))
    assert as_patch_conv(large) is large, "large maps keep Keras's convolution"


def test_fused_rmsprop_matches_keras_rmsprop():
    import keras

    from tasks.model.kernels import fused_rmsprop

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    weights, initial = [], []
    for make in (keras.optimizers.RMSprop, fused_rmsprop):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1)])  # fmt: skip
        lr = keras.optimizers.schedules.InverseTimeDecay(1e-2, decay_steps=1, decay_rate=0.1)
        model.compile(optimizer=make(learning_rate=lr), loss="mse")
        initial.append(model.get_weights())
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*initial, strict=True)), "same start"
    assert not np.allclose(weights[0][0], initial[0][0]), "training moved the weights"
    for ours, theirs in zip(weights[1], weights[0], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_quick_preset_anneals_its_learning_rate_to_zero_by_its_last_step():
    """--quick trains every layer from random weights for one epoch: its last weights
    must not be a full-size step's (on a bf16 CPU, test RMSE 75 vs 47 at seed 0)."""
    import keras

    from tasks.model.train_settings import QUICK, TrainSettings
    from tasks.model.training import compile_top

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    quick, recipe = TrainSettings(**QUICK), TrainSettings()
    assert quick.lr_schedule == "cosine" and recipe.lr_schedule == "inverse_time"
    rates = {}
    for settings in (quick, recipe):
        compile_top(model, settings, steps=125)
        schedule = model.optimizer._learning_rate
        rates[settings.lr_schedule] = [float(schedule(s)) for s in (0, 62, 125)]
    cos = rates["cosine"]
    assert cos[0] == pytest.approx(quick.learning_rate)
    assert cos[1] == pytest.approx(quick.learning_rate / 2, rel=0.05)
    assert cos[2] == pytest.approx(0.0, abs=1e-12)
    assert rates["inverse_time"][2] == pytest.approx(1e-4 / (1 + 125e-6)), "the recipe's decay"


@pytest.mark.parametrize("epochs", [1, 2, 5])
def test_the_training_curves_show_whole_epochs(epochs):
    """The loss plot's x axis marks whole epochs only, a one-epoch run's too (it showed
    0.945 ... 1.050)."""
    import matplotlib.pyplot as plt

    from tasks.reports import loss_figure

    losses = list(np.linspace(0.2, 0.05, epochs))
    fig = loss_figure({"loss": losses, "val_loss": losses})
    try:
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert shown and all(float(t).is_integer() for t in shown), shown
        assert 1 in shown and epochs in shown, shown
    finally:
        plt.close(fig)
