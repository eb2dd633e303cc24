"""Model writes that cannot interleave: every training attempt writes under its own
prefix and publishes by creating lineage.json once; the first complete attempt wins, a
model with a marker is never rewritten, and the loser reports the winner. Real processes
train the same tiny model version at once, on the local store and on moto's S3."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.model.export import cached_model_file
from tasks.model.train_settings import TrainSettings
from tasks.model.training import extract_features, version_for
from tests.conftest import REPO, TINY
from tests.test_training import make_versions

LOST = "lost, attempt"  # the loser's one log line


def start(store_uri: str, versions, ready: Path, *wait: Path) -> subprocess.Popen:
    """A training of TINY in its own process (tests/programs/train_race.py)."""
    _, dv, lv = versions
    args = [store_uri, dv, lv, json.dumps(TINY), str(ready), *map(str, wait)]
    return subprocess.Popen([sys.executable, "-m", "tests.programs.train_race", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    """(the training's result, its stderr) once the process has ended well."""
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1]), err


def model_objects(lake, mv: str) -> dict[str, bytes]:
    """Every object under the model version's prefix, key -> bytes."""
    model = lake.model(mv)
    return {key: lake.store.get_bytes(key) for key in lake.store.keys(model.prefix)}


def assert_one_published_attempt(lake, mv: str, attempts: set[str]) -> dict:
    """One marker naming one of ``attempts``, only that attempt's files, and a model.keras
    whose SHA-256 is the one lineage.json records (also through the model cache)."""
    model = lake.model(mv)
    lineage = model.lineage()
    assert lineage["attempt"] in attempts
    keys = lake.store.keys(model.prefix)
    assert [k for k in keys if k.endswith(model.MARKER)] == [model.key(model.MARKER)]
    stored = {k.split("/attempts/")[1].split("/")[0] for k in keys if "/attempts/" in k}
    assert stored == {lineage["attempt"]}, "the loser's files are gone"
    body = model.files().get_bytes(model.FILE)
    assert hashlib.sha256(body).hexdigest() == lineage["model_sha256"]
    assert cached_model_file(model).read_bytes() == body
    return lineage


def with_features(versions):
    """The versions, their frozen features extracted first: the attempts then start their
    epochs together. (Extracting, one would wait for the shards the other claimed, start
    later, find the other's checkpoint of the last epoch and train none.)"""
    lake, dv, lv = versions
    extract_features(lake, dv, lv, TrainSettings(**TINY))
    return versions


@pytest.fixture
def local_versions(tmp_path, idx_source):
    return with_features(make_versions(str(tmp_path / "lake"), idx_source))


def test_two_trainings_of_one_version_publish_one_model(store_uri, idx_source, tmp_path):
    """Both attempts train and write their files at once (they meet after the last
    epoch): one marker, the winner's file matching its hash, the loser naming the winner."""
    versions = with_features(make_versions(store_uri, idx_source))
    a, b = tmp_path / "a-ready", tmp_path / "b-ready"
    procs = [start(store_uri, versions, a, a, b), start(store_uri, versions, b, a, b)]
    (ra, ea), (rb, eb) = (finish(p) for p in procs)
    mv = version_for(versions.dataset_version, versions.labels_version, TrainSettings(**TINY))
    assert ra["model_version"] == rb["model_version"] == mv
    assert not ra["skipped"] and not rb["skipped"], "both attempts trained"
    assert ra["attempt"] != rb["attempt"]
    lineage = assert_one_published_attempt(versions.lake, mv, {ra["attempt"], rb["attempt"]})
    (winner, w_err), (loser, l_err) = sorted([(ra, ea), (rb, eb)], key=lambda r: not r[0]["won"])
    assert winner["won"] is True and loser["won"] is False
    assert winner["attempt"] == lineage["attempt"] == loser["winner"]["attempt"]
    assert loser["winner"]["model_sha256"] == lineage["model_sha256"]
    lost = [line for line in l_err.splitlines() if LOST in line]
    assert len(lost) == 1 and loser["attempt"] in lost[0] and winner["attempt"] in lost[0]
    assert LOST not in w_err


def test_a_published_model_is_never_rewritten(local_versions, tmp_path):
    """A second attempt that started before the marker existed and finishes after it
    leaves every byte under models/<v>/ as the first attempt published it."""
    lake, dv, lv = local_versions
    store_uri = lake.store.uri
    a, b, go = tmp_path / "a-ready", tmp_path / "b-ready", tmp_path / "go"
    first = start(store_uri, local_versions, a, a, b)  # publishes once b has trained
    second = start(store_uri, local_versions, b, go)  # publishes when the test says
    ra, _ = finish(first)
    assert ra["won"] is True
    published = model_objects(lake, ra["model_version"])
    assert second.poll() is None, "the second attempt waits, trained, to publish"
    go.touch()
    rb, err = finish(second)
    assert rb["won"] is False and rb["winner"]["attempt"] == ra["attempt"]
    assert model_objects(lake, ra["model_version"]) == published, "not a byte rewritten"
    assert_one_published_attempt(lake, ra["model_version"], {ra["attempt"]})
    assert sum(LOST in line for line in err.splitlines()) == 1


def test_models_stored_before_attempts_still_read(tiny_lake, tmp_path):
    """A model whose files sit directly under models/<v>/ (stored before attempts): its
    marker names no attempt, and every reader finds the files there."""
    from tasks.store.lake import Lake
    from tasks.store.storage import LocalStore

    source, _, _, mv = tiny_lake
    old = Lake(LocalStore(tmp_path / "old"))
    model, files = source.model(mv), source.model(mv).files()
    target = old.model(mv)
    for name in files.names():
        target.put_bytes(name, files.get_bytes(name))
    lineage = {k: v for k, v in model.lineage().items() if k != "attempt"}
    assert target.write_lineage(lineage) is True
    assert target.write_lineage(lineage | {"model_sha256": "0" * 64}) is False, "created once"
    assert target.files().prefix == target.prefix
    assert target.config() == model.config() and target.history() == model.history()
    assert target.plot("loss") == model.plot("loss")
    assert cached_model_file(target).read_bytes() == files.get_bytes(model.FILE)
    assert target.file_uri() == target.uri(model.FILE)
