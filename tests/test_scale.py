"""Scoring with many scorers through real failures: a flaky S3 endpoint, lost answers,
`kill -9`, several processes and a Dask cluster on one drop, and keys real buckets hold."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.model.export import cached_model_file
from tasks.scoring.ledger import ScoreOptions, plan_work
from tasks.scoring.runner import locate_drop, score_drop
from tasks.store.claims import take_claim
from tasks.store.lake import Lake
from tasks.store.storage import S3Store
from tests.conftest import TinyLake, copy_lake, prefect_home
from tests.faultproxy import FaultProxy

REPO = Path(__file__).resolve().parents[1]


def png(seed: int, size=(28, 28)) -> bytes:
    """A light garment-like block on black, a little different for every seed."""
    a = np.zeros(size[::-1], np.uint8)
    h, w = a.shape
    a[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = 120 + seed % 120
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def put_images(lake: Lake, drop: str, n: int) -> list[str]:
    keys = [f"img-{i:04d}.png" for i in range(n)]
    for i, key in enumerate(keys):
        lake.store.put_bytes(f"drops/{drop}/{key}", png(i))
    return keys


def assert_exactly_once(lake: Lake, drop_id: str, mv: str, keys: list[str]) -> dict:
    run = lake.score_run(drop_id, mv)
    manifest = run.manifest()
    assert manifest is not None, "the drop was finished"
    priced = run.prices()
    got = priced["key"].to_pylist() if priced is not None else []
    rejected = run.rejected()["key"].to_pylist()
    assert len(got) + len(rejected) == len(set(got) | set(rejected)), "no row twice"
    assert sorted(got + rejected) == sorted(keys), "every key exactly once"
    assert manifest["counts"]["priced"] + manifest["counts"]["rejected"] == len(keys)
    return manifest


@pytest.fixture
def s3_lake(tiny_lake, s3_uri) -> TinyLake:
    """The session's tiny lake copied into a fresh bucket (`lake`), its model cached."""
    copy = tiny_lake._replace(lake=copy_lake(tiny_lake.lake, s3_uri))
    # the model file is not what these tests are about
    cached_model_file(copy.lake.model(copy.model_version))
    return copy


def through(proxy: FaultProxy, lake: Lake) -> Lake:
    store = lake.store
    return Lake(S3Store(store.bucket, store.prefix, endpoint_url=proxy.url))


def is_put(fragment: str):
    return lambda method, path: method == "PUT" and fragment in path


def test_a_drop_through_a_flaky_s3_is_priced_exactly_once(s3_endpoint, s3_lake):
    lake, mv = s3_lake.lake, s3_lake.model_version
    keys = put_images(lake, "flaky", 60)
    with FaultProxy(s3_endpoint, rate=0.2, faults=("503", "500", "reset", "lost"), seed=3) as px:
        manifest = score_drop(through(px, lake), "flaky", options=ScoreOptions(shard_size=5))
        stats = px.snapshot()
    assert sum(stats[f] for f in ("503", "500", "reset", "lost")) > 20 and stats["lost"] > 3, stats
    assert assert_exactly_once(lake, "flaky", mv, keys)["counts"]["priced"] == 60
    assert manifest["skipped"] is False


def test_lost_answers_on_plan_and_claim_writes(s3_endpoint, s3_lake):
    """The plan's and the claims' conditional creates are applied but their answers
    lost: the retries meet 412, read the objects back, and know them for their own."""
    lake, mv = s3_lake.lake, s3_lake.model_version
    keys = put_images(lake, "lost", 12)
    with FaultProxy(s3_endpoint) as px:
        px.fail_next("lost", match=is_put("/_plans/"))
        px.fail_next("lost", match=is_put("/_claims/"), count=3)
        manifest = score_drop(through(px, lake), "lost", options=ScoreOptions(shard_size=4))
        assert px.snapshot()["lost"] == 4
    assert manifest["skipped"] is False and len(lake.score_run("lost", mv).plans()) == 1
    assert_exactly_once(lake, "lost", mv, keys)


def start_scorers(store: str, drop: str, go: Path, n: int, ttl: float) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.programs.scorer", store, drop, str(go), str(ttl)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]  # fmt: skip
    for _ in range(600):
        if len(list(go.parent.glob(go.name + ".ready-*"))) == n:
            break
        time.sleep(0.1)
    go.touch()
    return procs


def test_three_scorer_processes_on_one_drop(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    keys = put_images(lake, "many", 400)
    procs = start_scorers(lake.uri, "many", tmp_path / "go", 3, 30)
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    manifest = assert_exactly_once(lake, "many", mv, keys)
    assert len(manifest["scorer_counts"]) >= 2, manifest["scorer_counts"]
    assert sum(manifest["scorer_counts"].values()) == 40


def test_kill_9_mid_drop_costs_one_claim_lifetime(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    keys = put_images(lake, "killed", 400)
    (proc,) = start_scorers(lake.uri, "killed", tmp_path / "go", 1, 4)
    run = lake.score_run("killed", mv)
    for _ in range(3000):
        if run.done_shards():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(run.done_shards())
    assert 0 < done < 40 and run.manifest() is None, "killed mid-drop"
    manifest = score_drop(lake, "killed", options=ScoreOptions(shard_size=10, claim_seconds=4))
    assert_exactly_once(lake, "killed", mv, keys)
    assert manifest["timings"]["shards_scored_here"] == 40 - done, "nothing priced twice"
    dead = [s for s in manifest["scorer_counts"] if s.endswith(f":{proc.pid}")]
    assert dead and manifest["scorer_counts"][dead[0]] == done


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_dask_local_cluster_spreads_the_scorers(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    keys = put_images(lake, "dask", 400)
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "prefect")}
    out = cli("score", "dask", "--store", lake.uri, "--workers", "2", "--shard-size", "10",
              "--json", env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    manifest = assert_exactly_once(lake, "dask", mv, keys)
    assert result["scorer_counts"] == manifest["scorer_counts"]
    assert len(manifest["scorer_counts"]) == 2, "two Dask worker processes priced shards"


def test_no_wait_when_live_scorers_hold_everything(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    put_images(lake, "held", 20)
    run, source = lake.score_run("held", mv), locate_drop(lake, "held")
    for shard in plan_work(run, source.listing()[0], 10)[1]["shards"]:
        assert take_claim(run, shard, "elsewhere:42", 600)
    out = cli("score", "held", "--store", lake.uri, "--shard-size", "10", "--no-wait",
              env=os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "prefect")})  # fmt: skip
    assert out.returncode == 3, out.stderr[-2000:]
    (last,) = [ln for ln in out.stderr.splitlines() if ln.startswith("vggprice: error:")]
    assert last.startswith("vggprice: error: drop held: 0 shards priced here, 2 shards held")
    assert "elsewhere:42" in last and run.manifest() is None


def test_keys_real_buckets_hold(s3_lake):
    """Folder markers, a bare drops/ marker, a key with an empty segment, a JPEG cut
    inside its header, a zero-byte Parquet file: rows or skips, never a crash."""
    lake, mv = s3_lake.lake, s3_lake.model_version
    client, bucket, prefix = lake.store.client, lake.store.bucket, lake.store.prefix
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(buf, format="JPEG")
    raw = {
        "drops/": b"",
        "drops/odd/": b"",
        "drops/odd/sub/": b"",
        "drops/odd/a.png": png(1),
        "drops/odd/sub/b.png": png(2),
        "drops/odd/x//c.png": png(3),
        "drops/odd/cut.jpg": buf.getvalue()[:30],
        "drops/odd/zero.parquet": b"",
    }
    for key, body in raw.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=body)
    assert lake.drop_ids() == ["odd"], "a bare marker is not a drop"
    manifest = score_drop(lake, "odd")
    assert manifest["skipped_keys"] == 2, "the two folder markers"
    rejected = dict(zip(*(lake.score_run("odd", mv).rejected()[c].to_pylist()
                          for c in ("key", "reason")), strict=True))  # fmt: skip
    assert "unusable key" in rejected["x//c.png"]
    assert "JPEG" in rejected["cut.jpg"] or "not an image" in rejected["cut.jpg"], rejected
    assert "unreadable Parquet" in rejected["zero.parquet"]
    assert manifest["counts"] == {"listed": 5, "priced": 2, "rejected": 3}


def test_two_uris_with_one_basename_do_not_collide(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    for side in ("a", "b"):
        (tmp_path / side / "photos").mkdir(parents=True)
        for i in range(2 if side == "a" else 3):
            (tmp_path / side / "photos" / f"{i}.png").write_bytes(png(i))
    a = score_drop(lake, str(tmp_path / "a" / "photos"), from_user=True)  # a typed path
    b = score_drop(lake, str(tmp_path / "b" / "photos"), from_user=True)
    assert a["drop_id"] != b["drop_id"] and a["drop_id"].startswith("photos-")
    assert (a["counts"]["priced"], b["counts"]["priced"]) == (2, 3)


def test_an_overwritten_file_is_priced_again_once(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    mv = tiny_lake.model_version
    keys = put_images(lake, "over", 6)
    first = score_drop(lake, "over", options=ScoreOptions(shard_size=4))
    assert score_drop(lake, "over")["skipped"] is True, "unchanged: nothing to do"
    lake.store.put_bytes("drops/over/img-0001.png", png(77, (40, 40)))  # other bytes, other ETag
    again = score_drop(lake, "over", options=ScoreOptions(shard_size=4))
    run = lake.score_run("over", mv)
    assert again["skipped"] is False and again["superseded_rows"] == 1
    assert_exactly_once(lake, "over", mv, keys)
    old = run.superseded()
    assert old["key"].to_pylist() == ["img-0001.png"] and old["shard"][0].as_py() != ""
    prices = dict(zip(*(run.prices()[c].to_pylist() for c in ("key", "price")), strict=True))
    assert first["counts"] == again["counts"] and len(prices) == 6


def test_cli_bad_input_is_one_line_and_writes_nothing(tiny_lake, tmp_path, capsys):
    from flows.cli import main

    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    put_images(lake, "real", 2)
    before = lake.store.keys()
    for args, expected in (
        (["score", "nope"], "no such drop 'nope'"),
        (["score", str(tmp_path / "missing-dir")], "no such drop"),
        (["score", "real", "--model", "m-nope"], "no such (complete) model version"),
    ):
        assert main([*args, "--store", lake.uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vggprice: error: ") and expected in err[0]
    assert lake.store.keys() == before, "nothing written"


def test_dask_cluster_by_address(tiny_lake, tmp_path):
    from distributed import LocalCluster

    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    keys = put_images(lake, "remote", 200)
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "prefect")}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster:
        out = cli("score", "remote", "--store", lake.uri, "--dask-address",
                  cluster.scheduler_address, "--shard-size", "10", "--json", env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["counts"]["priced"] == 200
    manifest = assert_exactly_once(lake, "remote", tiny_lake.model_version, keys)
    assert len(manifest["scorer_counts"]) == 2, "one scorer per Dask worker"
