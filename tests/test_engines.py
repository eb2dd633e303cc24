"""Scoring engines: OpenVINO float32 against Keras, the int8 model and its accuracy gate
(made once, reused, never used when it failed), and what every row and manifest says."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from flows.score import score_flow
from tasks.data.loading import load_data
from tasks.model.export import load_stored_model, predict_prices, preprocess_of
from tasks.scoring.engines import allowed_drop, get_engine, int8_gate, openvino_float, rmse
from tasks.scoring.ledger import ScoreOptions
from tasks.scoring.runner import score_drop
from tasks.store.storage import sha256_file
from tests.conftest import REPO, TinyLake, copy_lake
from tests.test_scoring import _save, put_drop, read_parts

# OpenVINO float32 against Keras float32, on the same images: within this share of the
# model's price span (its Rescaling), i.e. float32 rounding in another order of sums.
FLOAT32_TOLERANCE = 1e-4


def _test_split(lake, mv: str):
    model = lake.model(mv)
    lineage = model.lineage()
    return load_data(lake, lineage["dataset_version"], lineage["labels_version"],
                     {"test": None}, 0, *preprocess_of(model.config())).test  # fmt: skip


def _png_drop(lake, drop_id: str, images: np.ndarray) -> list[str]:
    files = {f"img-{i:03d}.png": _save(Image.fromarray(img), "PNG") for i, img in enumerate(images)}
    put_drop(lake, drop_id, files)
    return sorted(files)


def _prices(lake, drop_id: str, mv: str) -> dict[str, tuple]:
    rows = read_parts(lake, drop_id, mv).to_pylist()
    return {r["key"]: (r["price"], r["engine"], r["precision"]) for r in rows}


@pytest.fixture(scope="module")
def engine_lake(tiny_lake, tmp_path_factory) -> TinyLake:
    """A copy of the session's tiny model whose int8 model two makers raced to make."""
    return tiny_lake._replace(
        lake=copy_lake(tiny_lake.lake, str(tmp_path_factory.mktemp("engines") / "lake"))
    )


@pytest.mark.usefixtures("prefect_server")
def test_openvino_float32_matches_keras_and_repeats(engine_lake):
    lake, mv = engine_lake.lake, engine_lake.model_version
    test = _test_split(lake, mv)
    span = lake.model(mv).config()["scaling"]
    span = span["max"] - span["min"]
    keras_prices = predict_prices(load_stored_model(lake.model(mv)), test.images)
    engine = get_engine(lake.model(mv), ScoreOptions(engine="openvino", precision="float32"))
    assert (engine.engine, engine.precision) == ("openvino", "float32")
    ov_prices = engine.predict(test.images, 8)  # ragged: 20 images in batches of 8
    assert np.abs(ov_prices - keras_prices).max() <= FLOAT32_TOLERANCE * span

    _png_drop(lake, "flow", test.images[:4])  # the flow's parameters carry the choice
    out = score_flow("flow", store=lake.uri, engine="openvino", precision="float32")
    assert out["engines"] == {"openvino/float32": 1}, "in the drop's manifest"
    assert lake.score_run("flow", mv).manifest()["engines"] == {"openvino/float32": 1}
    flow_rows = _prices(lake, "flow", mv)
    assert {(e, p) for _, e, p in flow_rows.values()} == {("openvino", "float32")}

    # Small batches (ragged at the end of each shard) keep the padded work small here.
    options = ScoreOptions(engine="openvino", precision="float32", shard_size=7, batch_size=4)
    keys = _png_drop(lake, "same-a", test.images)
    _png_drop(lake, "same-b", test.images)
    assert score_drop(lake, "same-a", options=options)["engines"] == {"openvino/float32": 3}
    first = _prices(lake, "same-a", mv)
    assert sorted(first) == keys
    assert {(e, p) for _, e, p in first.values()} == {("openvino", "float32")}, "every row"
    got = np.array([first[k][0] for k in keys])
    assert np.abs(got - keras_prices).max() <= FLOAT32_TOLERANCE * span, "end to end"
    score_drop(lake, "same-b", options=options)
    second = _prices(lake, "same-b", mv)
    assert [second[k][0] for k in keys] == [first[k][0] for k in keys], "identical prices"

    _png_drop(lake, "keras", test.images)
    score_drop(lake, "keras", options=ScoreOptions(engine="keras", precision="float32",
                                                   batch_size=4))  # fmt: skip
    by_keras = _prices(lake, "keras", mv)
    assert {(e, p) for _, e, p in by_keras.values()} == {("keras", "float32")}
    np.testing.assert_allclose([by_keras[k][0] for k in keys], keras_prices, rtol=1e-6)


def test_two_makers_publish_one_int8_model(engine_lake, tmp_path):
    """Two scorers that both found no int8 model make one at once: both quantize,
    one gate.json stands, and both use the one it names."""
    lake, mv = engine_lake.lake, engine_lake.model_version
    files = lake.model(mv).engine()
    assert files.gate() is None
    openvino_float(lake.model(mv))  # converted once on this machine (the makers' cache)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.programs.int8_maker", lake.uri, mv, str(r), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in ready
    ]
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
        assert time.monotonic() < deadline, "makers did not get ready"
        time.sleep(0.1)
    go.touch()
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    stood = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    gate = files.gate()
    assert stood[0] == stood[1] == gate, "both use the one that was published"
    assert len(files.attempts()) == 2 and gate["attempt"] in files.attempts(), "both made one"
    assert sum("published by another maker first" in err for _, err in outs) == 1
    # gate.json: the files' hashes, both RMSEs on the same images, the verdict
    local = files.download(gate, tmp_path / "int8")
    assert gate["sha256"] == {files.XML: sha256_file(local),
                              files.BIN: sha256_file(local.with_name(files.BIN))}  # fmt: skip
    assert gate["validation_images"] == 20 and gate["calibration_images"] == 60
    assert gate["allowed_drop"] == allowed_drop(gate["rmse_float32"], ScoreOptions())
    assert gate["passed"] == (gate["rmse_int8"] <= gate["rmse_float32"] + gate["allowed_drop"])


def test_int8_prices_stay_within_the_gate(engine_lake):
    """The published int8 model scores (not made again), its prices of the held-out
    test images within the gate of float32's; ``auto`` picks it once it passed."""
    lake, mv = engine_lake.lake, engine_lake.model_version
    files = lake.model(mv).engine()
    before = files.attempts()  # the makers' (this test alone: made now, once)
    gate = int8_gate(lake.model(mv), ScoreOptions(), make=True)
    if not gate["passed"]:
        pytest.skip(f"this tiny model's int8 failed its gate here: {gate['reason']}")
    made = files.attempts()
    assert made == before or not before
    test = _test_split(lake, mv)
    keys = _png_drop(lake, "int8", test.images)
    options = ScoreOptions(engine="openvino", precision="int8", batch_size=4)
    out = score_drop(lake, "int8", options=options)
    assert out["engines"] == {"openvino/int8": 1}
    assert files.attempts() == made and files.gate() == gate, "reused, not made again"
    rows = _prices(lake, "int8", mv)
    assert {(e, p) for _, e, p in rows.values()} == {("openvino", "int8")}
    int8 = np.array([rows[k][0] for k in keys])
    f32 = get_engine(lake.model(mv), ScoreOptions(engine="openvino", precision="float32"))
    float32 = f32.predict(test.images, 4)
    assert rmse(int8, test.price) <= rmse(float32, test.price) + gate["allowed_drop"]
    # as the gate measured it (there in one batch of 256: other kernels' rounding)
    assert rmse(int8, test.price) == pytest.approx(gate["rmse_int8"], rel=1e-4)
    _png_drop(lake, "auto", test.images[:5])
    assert score_drop(lake, "auto")["engines"] == {"openvino/int8": 1}, "auto on a CPU"
    again = get_engine(lake.model(mv), ScoreOptions(engine="openvino", precision="int8"))
    assert np.array_equal(again.predict(test.images, 4), int8), "identical prices"


def test_failed_gate_falls_back_with_one_line(tiny_lake, tmp_path, caplog):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    files = lake.model(mv).engine()
    files.write_gate({"model_version": mv, "attempt": "handmade", "passed": False,
                      "reason": "int8 RMSE 9.0 > float32 1.0 + 0.5"})  # fmt: skip
    images = _test_split(lake, mv).images[:6]
    _png_drop(lake, "fallback", images)
    options = ScoreOptions(engine="openvino", precision="int8", shard_size=2, batch_size=2)
    with caplog.at_level(logging.INFO, logger="vggprice"):
        out = score_drop(lake, "fallback", options=options)
    lines = [r.getMessage() for r in caplog.records if "failed its accuracy gate" in r.message]
    assert len(lines) == 1, lines
    assert "int8 RMSE 9.0 > float32 1.0 + 0.5" in lines[0] and "float32" in lines[0]
    assert out["engines"] == {"openvino/float32": 3}
    rows = _prices(lake, "fallback", mv)
    assert {(e, p) for _, e, p in rows.values()} == {("openvino", "float32")}
    assert files.attempts() == [], "a failed gate is never made again"


def test_engine_choice_errors_are_one_line(tiny_lake, capsys):
    assert main(["score", "d", "--store", str(Path("/nonexistent")), "--engine", "keras",
                 "--precision", "int8"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "keras engine has no int8: use --engine openvino" in err[0]
