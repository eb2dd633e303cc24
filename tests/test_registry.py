"""The champion/challenger gate and its compare-and-swap on the champion pointer,
through real parts: a local directory, moto's S3 server over HTTP, real processes
racing, and the fault proxy in front of S3.

Models are fake but complete (lineage.json + metrics.json on their own labels), so
``promote`` reads their metrics and never trains or evaluates: a model entry has no
config.json, so a call to ``evaluate`` would fail at ``model.config()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.governance.registry import promote
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore, S3Store, open_store
from tests.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[1]
CHAMPION_PUT = "registry/champion.json"
RACE_LOG = "another promotion changed the champion meanwhile"


def add_model(lake: Lake, mv: str, rmse: float, baseline_rmse: float = 100.0) -> None:
    """A complete model version with metrics on its own labels (marker written last)."""
    model = lake.model(mv)
    model.put_json(
        "metrics.json",
        {
            "rmse": rmse,
            "baseline_rmse": baseline_rmse,
            "mae": 1.0,
            "mape": 1.0,
            "mse_scaled": 0.01,
            "noise_floor_rmse": 3.0,
            "n": 10,
            "labels_version": "px-x",
            "model_version": mv,
        },
    )
    model.put_json("config.json", {"settings": {}})  # the default settings
    model.write_lineage({"model_version": mv, "dataset_version": "fm-x", "labels_version": "px-x"})


def assert_models_untouched(lake: Lake, mvs: list[str]) -> None:
    """Nothing evaluated or written under models/: promote only read the metrics."""
    names = ("config.json", "lineage.json", "metrics.json")
    expected = sorted(f"models/{mv}/{n}" for mv in mvs for n in names)
    assert lake.store.keys("models/") == expected


def is_champion_put(method: str, path: str) -> bool:
    return method == "PUT" and CHAMPION_PUT in path


def s3_store(s3_uri: str, endpoint: str) -> S3Store:
    bucket, _, prefix = s3_uri[len("s3://") :].partition("/")
    return S3Store(bucket, prefix, endpoint_url=endpoint)


def promoted_chain(lake: Lake) -> list[str]:
    """The promoted decisions as one chain from "no champion" to the champion pointer.

    Each decision names the champion it was decided against (the one it replaced): a
    fork (two promotions replacing the same champion, one of them lost) or a gap fails.
    """
    decisions = lake.registry().decisions()
    champion = lake.registry().champion()
    assert champion is not None
    promoted = [d for d in decisions if d["promoted"]]
    by_replaced: dict[str | None, dict] = {}
    for d in promoted:
        replaced = d["champion"]["model_version"] if d["champion"] else None
        other = by_replaced.get(replaced, {}).get("challenger", {}).get("model_version")
        assert replaced not in by_replaced, (
            f"fork: {replaced} replaced by both {other} and {d['challenger']['model_version']}"
        )
        by_replaced[replaced] = d
    chain, current, last = [], None, None
    while current in by_replaced and len(chain) <= len(promoted):
        last = by_replaced[current]
        current = last["challenger"]["model_version"]
        chain.append(current)
    assert len(chain) == len(promoted), f"chain {chain} misses promotions: {promoted}"
    assert chain[-1] == champion["model_version"]
    assert champion["promotion_id"] == last["promotion_id"]
    assert champion["replaced"] == (chain[-2] if len(chain) > 1 else None)
    return chain


# --- the store's compare-and-swap ---------------------------------------------------


def test_put_if_match_and_get_versioned(store_uri):
    store = open_store(store_uri)
    key = "registry/champion.json"
    assert store.put_if_match(key, b"one", "no-such-version") is False, "a token needs an object"
    assert not store.exists(key)
    assert store.put_if_match(key, b"one", None) is True, "None: create"
    assert store.put_if_match(key, b"two", None) is False, "None: only create"
    body, token = store.get_versioned(key)
    assert body == b"one"
    if isinstance(store, LocalStore):
        assert token == hashlib.sha256(b"one").hexdigest()
    assert store.put_if_match(key, b"two", "stale-or-made-up") is False
    assert store.get_bytes(key) == b"one", "a lost swap leaves the object untouched"
    assert store.put_if_match(key, b"two", token) is True
    body2, token2 = store.get_versioned(key)
    assert (body2, token2 != token) == (b"two", True)
    assert store.put_if_match(key, b"three", token) is False, "the old token is spent"
    assert store.get_bytes(key) == b"two"
    assert store.keys() == [key], "no lock or temp file in listings"
    if isinstance(store, LocalStore):
        hidden = sorted(p.name for p in (store.root / "registry").iterdir())
        assert hidden == [".tmp-lock-champion.json", "champion.json"]


def test_champion_swap_is_compare_and_swap(store_uri):
    registry = Lake(open_store(store_uri)).registry()
    assert registry.champion_versioned() == (None, None)
    assert registry.swap_champion({"model_version": "m-a", "promotion_id": "1"}, None)
    a, token_a = registry.champion_versioned()
    assert not registry.swap_champion({"model_version": "m-x", "promotion_id": "x"}, None)
    assert registry.swap_champion({"model_version": "m-b", "promotion_id": "2"}, token_a)
    assert not registry.swap_champion({"model_version": "m-c", "promotion_id": "3"}, token_a)
    assert registry.champion() == {"model_version": "m-b", "promotion_id": "2"}


# --- promote against one store ----------------------------------------------------------


def test_gate_and_decisions(store_uri):
    lake = Lake(open_store(store_uri))
    rmses = {"m-a": 10.0, "m-b": 9.0, "m-c": 8.95, "m-d": 12.0, "m-e": 7.0}
    for mv, rmse in rmses.items():
        add_model(lake, mv, rmse)
    results = {mv: promote(lake, mv) for mv in rmses}
    assert {mv: d["promoted"] for mv, d in results.items()} == {
        "m-a": True,  # no champion yet
        "m-b": True,
        "m-c": False,  # 8.95 is not below 9.0 * 0.99
        "m-d": False,
        "m-e": True,
    }
    assert "needs < 8.910" in results["m-c"]["reason"]
    again = promote(lake, "m-e")
    assert (again["promoted"], again["reason"]) == (False, "already the champion")
    forced = promote(lake, "m-d", force=True)
    assert forced["promoted"] and forced["forced"]
    assert len(lake.registry().decisions()) == len(rmses) + 2
    assert promoted_chain(lake) == ["m-a", "m-b", "m-e", "m-d"]
    champion = lake.registry().champion()
    assert champion["metrics"]["rmse"] == 12.0 and champion["forced"] is True
    assert_models_untouched(lake, list(rmses))


@pytest.mark.usefixtures("prefect_server")
def test_gate_refuses_a_first_champion_no_better_than_the_mean(store_uri, capsys):
    """A model no better than always predicting the mean train price never serves by
    itself, not even as the first champion; --force puts it in service, recorded."""
    from flows.cli import main

    lake = Lake(open_store(store_uri))
    add_model(lake, "m-nonsense", 126.2, baseline_rmse=85.0)
    decision = promote(lake, "m-nonsense")
    assert decision["promoted"] is False and lake.registry().champion() is None
    assert "does not beat the mean-price baseline's 85.000" in decision["reason"]
    assert lake.registry().decisions()[-1]["reason"] == decision["reason"], "recorded"
    assert main(["promote", "m-nonsense", "--store", store_uri]) == 0
    out = capsys.readouterr().out
    assert "promoted: False" in out
    (reason,) = [line for line in out.splitlines() if line.startswith("reason:")]
    assert "mean-price baseline" in reason and "--force" in reason
    forced = promote(lake, "m-nonsense", force=True)
    assert forced["promoted"] and lake.registry().champion()["forced"] is True


# --- two processes promoting at once --------------------------------------------------


@pytest.mark.parametrize("n_procs,per_proc", [(2, 6), (3, 10)], ids=["2x6", "3x10"])
def test_processes_promote_at_once(store_uri, tmp_path, n_procs, per_proc):
    """Every promotion is forced, so every one wants to swap: with all of them in
    flight at once, a lost update would show as a fork in the decisions' chain."""
    lake = Lake(open_store(store_uri))
    mvs = [f"m-{i:02d}" for i in range(n_procs * per_proc)]
    for i, mv in enumerate(mvs):
        add_model(lake, mv, 20.0 - i * 0.5)
    go = tmp_path / "go"
    procs, ready = [], []
    for p in range(n_procs):
        ready.append(tmp_path / f"ready-{p}")
        models = json.dumps(mvs[p::n_procs])  # interleaved, so RMSEs mix
        args = [store_uri, str(ready[-1]), str(go), models]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.programs.racer", *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "racers did not get ready"
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    retries = [err.count(RACE_LOG) for _, err in outputs]
    backend = "s3" if store_uri.startswith("s3://") else "local"
    print(f"\n{backend} {n_procs}x{per_proc}: CAS retries per process {retries}")
    if n_procs * per_proc >= 30:  # 30 forced swaps started at once: some must collide
        assert sum(retries) > 0, "the processes never raced: the test did not test the CAS"

    decisions = lake.registry().decisions()
    assert len(decisions) == len(mvs)
    assert all(d["promoted"] and d["forced"] for d in decisions)
    assert sorted(d["challenger"]["model_version"] for d in decisions) == mvs
    chain = promoted_chain(lake)
    assert sorted(chain) == mvs
    raw = lake.store.get_bytes(CHAMPION_PUT)
    assert json.loads(raw)["model_version"] in mvs, "the pointer is whole JSON"
    assert_models_untouched(lake, mvs)


# --- another promotion wins between the read and the write ------------------------------


class RivalLocalStore(LocalStore):
    """A real local store that lets a hook run just before each champion swap."""

    def __init__(self, root, before_swap):
        super().__init__(root)
        self.before_swap = before_swap

    def put_if_match(self, key, data, token):
        if key == CHAMPION_PUT:
            self.before_swap()
        return super().put_if_match(key, data, token)


@pytest.mark.parametrize("force", [False, True], ids=["gated", "forced"])
def test_lost_race_reruns_the_gate_against_the_new_champion(store_uri, force, caplog):
    direct = Lake(open_store(store_uri))
    for mv, rmse in {"m-old": 10.0, "m-rival": 5.0, "m-chal": 8.0}.items():
        add_model(direct, mv, rmse)
    promote(direct, "m-old")
    rival: list[dict] = []

    def rival_promotes() -> None:
        if not rival:
            rival.append(promote(direct, "m-rival"))

    caplog.set_level(logging.INFO, logger="vggprice")
    if store_uri.startswith("s3://"):
        endpoint = os.environ["AWS_ENDPOINT_URL"]

        def hook(method: str, path: str) -> bool:
            if is_champion_put(method, path):
                rival_promotes()  # straight to moto, not through the proxy
            return False

        with FaultProxy(endpoint, match=hook) as proxy:
            decision = promote(Lake(s3_store(store_uri, proxy.url)), "m-chal", force=force)
    else:
        lake = Lake(RivalLocalStore(store_uri, rival_promotes))
        decision = promote(lake, "m-chal", force=force)

    assert rival and rival[0]["promoted"]
    assert caplog.text.count(RACE_LOG) == 1
    assert decision["champion"]["model_version"] == "m-rival", "decided against the winner"
    assert decision["champion"]["metrics"]["rmse"] == 5.0
    assert decision["promoted"] is force
    expected = ["m-old", "m-rival", "m-chal"] if force else ["m-old", "m-rival"]
    assert promoted_chain(direct) == expected
    assert len(direct.registry().decisions()) == 3


# --- S3 faults on the champion write ------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["first", "replace"])
@pytest.mark.parametrize("fault", ["lost", "503", "500", "reset"])
def test_fault_on_champion_write_is_own_success(s3_endpoint, s3_uri, fault, existing, caplog):
    """ "lost": the write is applied and its answer dropped; boto3 retries it, the retry
    loses the condition (412), and promote reads back its own promotion id. The
    others are not applied; the retry succeeds."""
    direct = Lake(s3_store(s3_uri, s3_endpoint))
    add_model(direct, "m-old", 10.0)
    add_model(direct, "m-new", 5.0)
    if existing:
        promote(direct, "m-old")
    caplog.set_level(logging.INFO, logger="vggprice")
    with FaultProxy(s3_endpoint) as proxy:
        proxy.fail_next(fault, match=is_champion_put)
        decision = promote(Lake(s3_store(s3_uri, proxy.url)), "m-new")
        stats = proxy.snapshot()
    assert stats[fault] == 1, stats
    assert decision["promoted"] is True, decision["reason"]
    assert RACE_LOG not in caplog.text, "its own write is not a lost race"
    champion = direct.registry().champion()
    assert champion["model_version"] == "m-new"
    assert champion["promotion_id"] == decision["promotion_id"]
    mine = [d for d in direct.registry().decisions() if d["challenger"]["model_version"] == "m-new"]
    assert len(mine) == 1
    assert promoted_chain(direct) == (["m-old", "m-new"] if existing else ["m-new"])


def test_promotion_through_flaky_s3(s3_endpoint, s3_uri, caplog):
    direct = Lake(s3_store(s3_uri, s3_endpoint))
    # (model, RMSE, promoted with margin 0.01 against the champion before it)
    plan = [
        ("m-1", 10.0, True),
        ("m-2", 9.0, True),
        ("m-3", 8.95, False),  # needs < 8.91
        ("m-4", 8.0, True),
        ("m-5", 7.0, True),
        ("m-6", 6.95, False),  # needs < 6.93
        ("m-7", 6.0, True),
        ("m-8", 5.0, True),
        ("m-9", 4.0, True),
    ]
    for mv, rmse, _ in plan:
        add_model(direct, mv, rmse)
    add_model(direct, "m-worse", 11.0)
    caplog.set_level(logging.INFO, logger="vggprice")
    with FaultProxy(s3_endpoint, rate=0.2, faults=("503", "500", "reset", "lost"), seed=7) as px:
        # And at least one lost champion write for sure, on the first and a later swap.
        px.fail_next("lost", match=is_champion_put)
        lake = Lake(s3_store(s3_uri, px.url))
        got = {mv: promote(lake, mv)["promoted"] for mv, _, _ in plan}
        px.fail_next("lost", match=is_champion_put)
        last = promote(lake, "m-worse", force=True)
        stats = px.snapshot()
    print(f"\nflaky S3 proxy: {stats}")
    assert sum(stats[f] for f in ("503", "500", "reset", "lost")) > 5, stats
    assert stats["lost"] >= 2
    assert got == {mv: expected for mv, _, expected in plan}
    assert last["promoted"]
    assert RACE_LOG not in caplog.text, "one promoter: never a lost race"
    decisions = direct.registry().decisions()
    assert len(decisions) == len(plan) + 1
    assert promoted_chain(direct) == [mv for mv, _, ok in plan if ok] + ["m-worse"]
    assert direct.registry().champion()["model_version"] == "m-worse"
    assert_models_untouched(direct, [mv for mv, _, _ in plan] + ["m-worse"])


def test_lost_write_replaced_before_the_read_back_is_still_own_success(s3_endpoint, s3_uri, caplog):
    """m-chal's swap is applied but its answer lost; before boto3's retry (which loses
    the condition) m-rival replaces m-chal. m-chal did serve: its decision must say
    promoted, so that the decisions stay one chain old -> chal -> rival (the pointer
    remembers the promotions it replaced)."""
    direct = Lake(s3_store(s3_uri, s3_endpoint))
    for mv, rmse in {"m-old": 10.0, "m-rival": 5.0, "m-chal": 8.0}.items():
        add_model(direct, mv, rmse)
    promote(direct, "m-old")
    champion_puts: list[str] = []
    rival: list[dict] = []

    def hook(method: str, path: str) -> bool:
        if not is_champion_put(method, path):
            return False
        champion_puts.append(path)
        if len(champion_puts) == 2:  # boto3's retry of the lost write
            rival.append(promote(direct, "m-rival"))
        return True

    caplog.set_level(logging.INFO, logger="vggprice")
    with FaultProxy(s3_endpoint, match=hook) as proxy:
        proxy.fail_next("lost", match=is_champion_put)
        decision = promote(Lake(s3_store(s3_uri, proxy.url)), "m-chal")
        assert proxy.snapshot()["lost"] == 1
    assert rival[0]["promoted"] and rival[0]["champion"]["model_version"] == "m-chal"
    assert direct.registry().champion()["replaced"] == "m-chal", "m-chal's write was applied"
    assert RACE_LOG not in caplog.text, "its own applied write is not a lost race"
    assert decision["promoted"] is True, decision["reason"]
    assert promoted_chain(direct) == ["m-old", "m-chal", "m-rival"]
