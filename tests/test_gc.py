"""`vggprice gc`: orphans of every kind older than the age go, counted with their bytes;
younger ones, published models and engines, champions, live claims and every part a
manifest names stay and read back. On the local store (ages set with os.utime) and on
moto's S3 over HTTP (LastModified cannot be set: age 0 and a later "now")."""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.governance.gc import collect_garbage, parse_age
from tasks.model.ov_runtime import float_cache_dir, unfinished_conversions
from tasks.store.claims import take_claim
from tasks.store.lake import Lake, parquet_bytes
from tasks.store.storage import TMP_PREFIX, open_store
from tests.test_cli import vggprice

SHARD, OTHER = "00000001-00000", "00000001-00001"
STORE_KINDS = {"training-attempt", "int8-attempt", "checkpoints", "score-side-file", "claim",
               "generation"}  # fmt: skip


def make_state(lake: Lake, tag: str, tmp: Path) -> dict:
    """One model line's worth of state, written by the lake's own entries: what must stay
    (returned, to read back) and an orphan of every kind (keys listed, to weigh)."""
    model = lake.model(f"m-{tag}")
    keras_file = tmp / f"{tag}.keras"
    keras_file.write_bytes(b"K" * 300)
    win, lose = model.attempt("20260101T000000Z-win"), model.attempt("20260101T000000Z-lose")
    for files, size in ((win, 10), (lose, 20)):
        files.write_file(keras_file)
        files.write_config({"train_stats": {}, "pad": "x" * size})
    assert model.publish(win, {"labels_version": "px-1", "model_version": model.version})
    model.checkpoints().write({"epoch": 1}, b"C" * 50)  # a losing trainer's, after the winner
    engine = model.engine()
    for attempt in ("int8win", "int8lose"):
        (tmp / "model.xml").write_bytes(b"<xml/>")
        (tmp / "model.bin").write_bytes(b"B" * 40)
        engine.write_files(attempt, tmp / "model.xml", tmp / "model.bin")
    engine.publish({"attempt": "int8win", "passed": True})
    champion = lake.registry().swap_champion({"model_version": model.version}, None)  # 1st
    training = lake.model(f"m-{tag}-training")  # no lineage.json: still training
    training.attempt("20260101T000000Z-busy").write_config({"busy": True})
    training.checkpoints().write({"epoch": 2}, b"R" * 30)

    run = lake.score_run(f"drop-{tag}", model.version)
    run.create_plan(1, {"writer": "w", "shards": {SHARD: [], OTHER: []}})
    prices = pa.table({"key": ["a.png"], "price": [9.5]})
    rejected = pa.table({"key": ["b.png"], "reason": ["not an image"]})
    assert run.write_shard(SHARD, "scorewin", prices, rejected, {"scorer": "h:1"})
    # a scorer that died after its side files, before its part lost
    run.write_shard_rejections(SHARD, "scorelose", rejected)
    run.write_shard_rejections(OTHER, "nopart", rejected)  # no part yet: kept
    # finishers' folders: one that lost (older plan, not named), the one the manifest
    # names, and one of a newer plan still being finished
    table = parquet_bytes(rejected)
    for folder in (run.generation(1, "lost"), run.generation(2, "won"), run.generation(3, "busy")):
        run.put_bytes(folder + "rejected.parquet", table)
    run.write_manifest({"parts": [run.part_name(SHARD)], "last_plan": 2,
                        "rejected": run.generation(2, "won") + "rejected.parquet"})  # fmt: skip
    assert take_claim(run, OTHER, "dead:1", 60)  # its holder died
    assert take_claim(run, "finish-00000001", "live:2", 30 * 24 * 3600)  # a long lifetime
    features = lake.shard_features(f"ft-{tag}")
    assert features.create_claim("px-shard", {"owner": "dead:3", "claim": "c", "seconds": 60})

    orphans = {
        "training-attempt": [o.key for o in lake.store.list(lose.prefix)],
        "int8-attempt": [o.key for o in lake.store.list(engine.attempt_prefix("int8lose"))],
        "checkpoints": lake.store.keys(model.checkpoints().prefix),
        "score-side-file": [run.key(n) for n in run.losing_side_files()],
        "claim": [run.claim_objects()[OTHER].key, features.claim_objects()["px-shard"].key],
        "generation": lake.store.keys(run.key(run.generation(1, "lost"))),
    }
    assert all(len(v) >= 1 for v in orphans.values()), orphans
    assert len(orphans["claim"]) == 2 and len(orphans["score-side-file"]) == 1, orphans
    return {"model": model, "training": training, "run": run, "orphans": orphans,
            "keras": keras_file.read_bytes(), "champion": champion}  # fmt: skip


def assert_intact(lake: Lake, state: dict, tmp: Path) -> None:
    """Everything that is not an orphan reads back."""
    model, run = state["model"], state["run"]
    assert model.lineage()["attempt"] == "20260101T000000Z-win"
    model.download(tmp / "back.keras")
    assert (tmp / "back.keras").read_bytes() == state["keras"]
    assert model.config()["pad"] == "x" * 10
    gate = model.engine().gate()
    assert model.engine().download(gate, tmp / "int8").read_bytes() == b"<xml/>"
    if state["champion"]:
        assert lake.registry().champion()["model_version"] == model.version
    assert state["training"].checkpoints().latest() == ({"epoch": 2}, b"R" * 30)
    assert state["training"].attempt("20260101T000000Z-busy").config() == {"busy": True}
    assert run.manifest()["parts"] == [run.part_name(SHARD)]
    assert run.part(SHARD)["price"].to_pylist() == [9.5]
    assert run.shard_facts() == {SHARD: {"scorer": "h:1"}}
    assert run.shard_rejections(SHARD, "scorewin").num_rows == 1
    assert run.shard_rejections(OTHER, "nopart").num_rows == 1
    assert run.read_claim("finish-00000001")[0]["owner"] == "live:2"
    assert run.plan(1)["writer"] == "w"
    assert run.rejected().num_rows == 1  # what the manifest names
    assert lake.store.keys(run.key(run.generation(3, "busy"))), "a newer plan's finisher's"


def age_everything(root: Path, days: float) -> None:
    then = time.time() - days * 24 * 3600
    for folder, dirs, names in os.walk(root):
        for name in names + dirs:
            os.utime(Path(folder) / name, (then, then))


def summary(report) -> dict:
    return report.as_dict()["kinds"]


def test_parse_age():
    assert parse_age("30m") == timedelta(minutes=30)
    assert parse_age("12h") == timedelta(hours=12) and parse_age("7d") == timedelta(days=7)
    for bad in ("7", "7 days", "-1d", "1.5h", "d", ""):
        with pytest.raises(ValueError, match="--older-than"):
            parse_age(bad)


def test_gc_local_removes_old_orphans_keeps_young_and_published(tmp_path):
    store = open_store(str(tmp_path / "lake"))
    lake = Lake(store)
    old = make_state(lake, "old", tmp_path)
    # the store's own leftovers: a crashed write's temp file and swap_champion's lock
    fd, crashed = tempfile.mkstemp(dir=old["model"].uri(), prefix=TMP_PREFIX)
    os.write(fd, b"T" * 70)
    os.close(fd)
    users = Path(lake.drop("d1").uri()) / f"{TMP_PREFIX}the-users-own"  # in a drop: kept
    users.parent.mkdir(parents=True)
    users.write_bytes(b"U")
    cache = tmp_path / "cache"
    dead = float_cache_dir(cache) / ("a" * 24 + ".0123abcd")
    done = float_cache_dir(cache) / ("b" * 24)
    for folder in (dead, done):
        folder.mkdir(parents=True)
        (folder / "model.bin").write_bytes(b"F" * 80)
    age_everything(tmp_path / "lake", days=8)
    age_everything(cache, days=8)
    young = make_state(lake, "young", tmp_path)
    temps = [o.key for o in store.temp_files()]
    assert any(".tmp-lock-" in k for k in temps) and len(temps) >= 2, temps
    old_temps = [o for o in store.temp_files()
                 if o.mtime < time.time() - 7 * 86400 and "the-users-own" not in o.key]  # fmt: skip
    sizes = {o.key: o.size for o in store.list()}
    before = sorted(sizes)

    def collect(**kw):  # the conversions listed again at each call, as the CLI does
        return collect_garbage(lake, timedelta(days=7), conversions=unfinished_conversions(cache),
                               **kw)  # fmt: skip

    dry = collect(dry_run=True)
    assert sorted(o.key for o in store.list()) == before, "a dry run removes nothing"
    assert Path(crashed).exists() and dead.exists()
    report = collect()
    assert report.as_dict()["items"] == dry.as_dict()["items"]

    kinds = summary(report)
    for kind, keys in old["orphans"].items():
        count = len(keys) if kind == "claim" else 1
        assert kinds[kind] == {"count": count, "bytes": sum(sizes[k] for k in keys)}, kind
        assert not any(store.exists(k) for k in keys), kind
    for keys in young["orphans"].values():  # the same kinds, younger than the age: kept
        assert all(store.exists(k) for k in keys)
    assert kinds["temp-file"]["count"] == len(old_temps)
    assert kinds["temp-file"]["bytes"] == sum(o.size for o in old_temps) >= 70
    assert not Path(crashed).exists() and not any(o in store.temp_files() for o in old_temps)
    assert users.read_bytes() == b"U"
    assert kinds["float-conversion"] == {"count": 1, "bytes": 80}
    assert not dead.exists() and (done / "model.bin").exists()
    assert report.as_dict()["bytes_freed"] == sum(k["bytes"] for k in kinds.values())
    for state in (old, young):
        assert_intact(lake, state, tmp_path)
    # what stays is what was there, less exactly what the report names
    gone = {k for keys in old["orphans"].values() for k in keys}
    assert sorted(o.key for o in store.list()) == sorted(set(before) - gone)
    assert collect().removed == []


def test_gc_s3(s3_uri, tmp_path):
    lake = Lake(open_store(s3_uri))
    state = make_state(lake, "s3", tmp_path)
    sizes = {o.key: o.size for o in lake.store.list()}
    now = datetime.now(UTC)
    assert collect_garbage(lake, timedelta(hours=1), now=now).removed == []
    later = now + timedelta(days=1)
    dry = collect_garbage(lake, timedelta(0), dry_run=True, now=later)
    assert sorted(o.key for o in lake.store.list()) == sorted(sizes)
    report = collect_garbage(lake, timedelta(0), now=later)
    assert report.as_dict()["items"] == dry.as_dict()["items"]
    kinds = summary(report)
    assert set(kinds) == STORE_KINDS
    for kind, keys in state["orphans"].items():
        count = len(keys) if kind == "claim" else 1
        assert kinds[kind] == {"count": count, "bytes": sum(sizes[k] for k in keys)}, kind
        assert not any(lake.store.exists(k) for k in keys)
    assert_intact(lake, state, tmp_path)


def test_cli_gc(tmp_path):
    store = str(tmp_path / "lake")
    lake = Lake(open_store(store))
    state = make_state(lake, "cli", tmp_path)
    cache = tmp_path / "cache"  # the CLI lists this machine's unfinished conversions
    (float_cache_dir(cache) / ("c" * 24 + ".0123abcd")).mkdir(parents=True)
    age_everything(tmp_path / "lake", days=2)
    age_everything(cache, days=2)
    before = sorted(lake.store.keys())
    env = os.environ | {"VGGPRICE_CACHE_DIR": str(cache)}
    code, err, out = vggprice("gc", "--dry-run", "--json", "--older-than", "1d", "--store", store,
                              env=env)  # fmt: skip
    assert code == 0, err
    printed = json.loads(out)
    assert printed["dry_run"] is True and set(STORE_KINDS) <= set(printed["kinds"])
    assert printed["kinds"]["float-conversion"]["count"] == 1, printed["kinds"]
    assert printed["kinds"]["training-attempt"]["count"] == 1
    assert printed["removed"] == len(printed["items"]) and printed["bytes_freed"] > 0
    assert sorted(lake.store.keys()) == before
    assert_intact(lake, state, tmp_path)
    code, err, out = vggprice("gc", "--older-than", "7x", "--store", store)
    assert code == 2 and len(err) == 1 and out == "", err
    assert err[0].startswith("vggprice: error: --older-than '7x': not an age")


def test_a_held_lock_file_is_kept_and_writers_relock_after_removal(tmp_path):
    """gc removes a lock file only while no writer holds it; a writer that waited on the
    removed file locks the new one, so two writers never hold different files at once."""
    import fcntl
    import threading

    from tasks.store.storage import _locked

    store = open_store(str(tmp_path / "lake"))
    key = "cas/object"
    assert store.put_if_match(key, b"1", None)
    (lock,) = [o.key for o in store.temp_files()]
    path = Path(store.uri_for(lock))
    with _locked(path):
        assert store.remove_temp(lock) is False and path.exists()
    held: list[bool] = []
    old = open(path, "a")  # noqa: SIM115 - held across the steps below
    fcntl.flock(old, fcntl.LOCK_EX)
    writer = threading.Thread(
        target=lambda: held.append(store.put_if_match(key, b"2", store.get_versioned(key)[1]))
    )
    writer.start()  # waits on the old file
    time.sleep(0.3)
    path.unlink()  # removed while locked, as remove_temp does
    with _locked(path):  # another writer locks the new file
        old.close()  # the old file's lock goes: the waiting writer must not go on
        time.sleep(0.5)
        assert held == [], "a writer went on under a removed lock file"
    writer.join(10)
    assert held == [True] and store.get_bytes(key) == b"2"
    assert store.remove_temp(lock) is True and not path.exists()
