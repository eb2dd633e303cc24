"""Scoring engines: OpenVINO float32 against Keras, the int8 model and its accuracy gate
(made once, reused, never used when it failed, made again under other settings or after
an error), verified local caches, bf16 in ``auto``, the int8 engine made at promotion,
and what every row and manifest says."""

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
from tasks.governance.engine_gates import allowed_drop, gate_context, gate_files, int8_gate
from tasks.model.export import load_stored_model, predict_prices, preprocess_of
from tasks.model.ov_runtime import native_bf16, openvino_float, rmse
from tasks.scoring.engines import get_engine
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
    files = gate_files(lake.model(mv), "int8", ScoreOptions())[0]
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
    files = gate_files(lake.model(mv), "int8", ScoreOptions())[0]
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
    files, context, _ = gate_files(lake.model(mv), "int8", ScoreOptions())
    files.write_gate({"model_version": mv, "attempt": "handmade", "passed": False,
                      "reason": "int8 RMSE 9.0 > float32 1.0 + 0.5", "context": context})  # fmt: skip
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


def _float_cache(lake, mv: str) -> Path:
    """The local OpenVINO float32 conversion of the model (made if need be)."""
    import hashlib

    import openvino as ov

    from tasks.settings import load_settings

    openvino_float(lake.model(mv))
    sha = lake.model(mv).lineage()["model_sha256"]
    where = hashlib.sha256(f"{sha}/{ov.__version__}".encode()).hexdigest()[:24]
    return load_settings().cache_dir / "engines" / "openvino-float" / where


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@pytest.mark.parametrize("damage", ["truncated", "same-size"])
def test_a_damaged_local_cache_is_made_again(tiny_lake, tmp_path, damage):
    """A truncated or same-size-changed model.bin of the float32 conversion (and a
    truncated cached model.keras) is made again by the next scorer: the same prices."""
    from tasks.model.export import cached_model_file

    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))  # its own scorer engines
    mv = tiny_lake.model_version
    images = _test_split(lake, mv).images[:6]
    options = ScoreOptions(engine="openvino", precision="float32", batch_size=4)
    intact = get_engine(tiny_lake.lake.model(mv), options)  # loaded before the damage
    expected = intact.predict(images, 4)
    weights = _float_cache(lake, mv) / "model.bin"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zeroed weights, same size
    _replace(weights, bytes(data))  # a new file: this process's engine keeps its mapping
    if damage == "truncated":
        keras_file = cached_model_file(lake.model(mv))
        _replace(keras_file, keras_file.read_bytes()[:100])
    _png_drop(lake, "damaged", images)
    out = score_drop(lake, "damaged", options=options)
    assert out["engines"] == {"openvino/float32": 1}
    rows = _prices(lake, "damaged", mv)
    assert [rows[k][0] for k in sorted(rows)] == expected.tolist(), "priced as intact"
    assert weights.read_bytes() != bytes(data), "made again"
    sha = lake.model(mv).lineage()["model_sha256"]
    assert sha256_file(cached_model_file(lake.model(mv))) == sha


def test_a_gate_of_other_settings_or_an_error_is_made_again(tiny_lake, tmp_path, caplog):
    """A gate.json recording a looser tolerance, fewer images or another OpenVINO is
    not trusted and is made again; an error while making it (no calibration images)
    records nothing, logs one line, and the next run makes it."""
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    model = lake.model(mv)
    today = ScoreOptions()
    files, context, _ = gate_files(model, "int8", today)
    loose = ScoreOptions(int8_max_drop_price=100.0, int8_validation_images=8)
    assert gate_context(model, "int8", loose) == context, "options never loosen the gate"
    other = [
        context | {"max_drop": {"fraction": 0.02, "price": 100.0}},
        context | {"validation": context["validation"] | {"images": 8}},
        context | {"versions": context["versions"] | {"openvino": "2023.0.0"}},
    ]
    for recorded in other:
        files.write_gate({"model_version": mv, "attempt": "old", "passed": True,
                          "context": recorded})  # fmt: skip
        assert gate_files(model, "int8", today)[2] is None, recorded
        assert int8_gate(model, today, make=False) is None
    images = _test_split(lake, mv).images[:4]
    _png_drop(lake, "broken", images)
    broken = ScoreOptions(engine="openvino", precision="int8", int8_calibration_images=0)
    with caplog.at_level(logging.INFO, logger="vggprice"):
        out = score_drop(lake, "broken", options=broken)
    lines = [r.getMessage() for r in caplog.records if "making its int8 gate failed" in r.message]
    assert len(lines) == 1 and "made again on the next try" in lines[0], lines
    assert out["engines"] == {"openvino/float32": 1}, "not scored with the old gate"
    assert files.gate()["attempt"] == "old" and files.attempts() == [], "nothing recorded"
    _png_drop(lake, "retried", images)  # the next run: another process, the CLI
    run = subprocess.run([sys.executable, "-m", "flows.cli", "score", "retried", "--store", lake.uri, "--engine",
                          "openvino", "--precision", "int8"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    gate = files.gate()
    assert gate["attempt"] != "old" and gate["context"] == context, "made again"
    assert files.attempts() == [gate["attempt"]]
    want = "openvino/int8" if gate["passed"] else "openvino/float32"
    assert lake.score_run("retried", mv).manifest()["engines"] == {want: 1}


@pytest.mark.usefixtures("prefect_server")
def test_promotion_makes_the_int8_engine_for_the_first_drop(tiny_lake, tmp_path, monkeypatch):
    from flows.evaluate import promote_flow

    monkeypatch.setenv("VGGPRICE_ENGINES_AT_PROMOTION", "true")  # the default (conftest: off)
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    assert int8_gate(lake.model(mv), ScoreOptions(), make=False) is None
    decision = promote_flow(model_version=mv, store=lake.uri, force=True)
    gate = int8_gate(lake.model(mv), ScoreOptions(), make=False)
    assert gate is not None, decision
    assert decision["engines"]["int8"] == gate["passed"]
    _png_drop(lake, "first", _test_split(lake, mv).images[:4])
    manifest = score_drop(lake, "first")
    ((picked, reason),) = manifest["engine_reasons"].items()
    assert manifest["engines"] == {picked: 1}
    if gate["passed"]:
        assert picked == "openvino/int8" and "int8 passed its gate" in reason
    else:
        assert picked != "openvino/int8" and "int8 failed its gate" in reason, reason
    assert lake.score_run("first", mv).manifest()["engine_reasons"] == {picked: reason}


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(tiny_lake, tmp_path):
    """No int8 engine: ``auto`` scores in bf16 where the CPU has avx512_bf16 or
    amx_bf16 (its gate made and passed), else in float32; the manifest says why."""
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    _png_drop(lake, "auto", _test_split(lake, mv).images[:4])
    manifest = score_drop(lake, "auto", options=ScoreOptions(batch_size=4))
    ((picked, reason),) = manifest["engine_reasons"].items()
    assert "no int8 engine made" in reason
    bf16 = gate_files(lake.model(mv), "bf16", ScoreOptions())[2]
    if native_bf16():
        assert bf16 is not None and bf16["passed"], bf16
        assert bf16["rmse_bf16"] <= bf16["rmse_float32"] + bf16["allowed_drop"]
        assert manifest["engines"] == {"openvino/bf16": 1} and "bf16: native" in reason
    else:
        assert bf16 is None
        assert manifest["engines"] == {"openvino/float32": 1} and "no native bf16" in reason
    assert {p for _, _, p in _prices(lake, "auto", mv).values()} == {picked.split("/")[1]}
