"""Finishing is safe across plan generations: a finisher of an older plan, paused between
reading and writing while a newer plan is made, scored and finished, changes nothing that
the newer manifest names; and a finisher takes nothing from a listing of parts (which
may lag) and never publishes a drop whose planned parts are not all there."""

from __future__ import annotations

import logging
import threading

import pyarrow as pa

from tasks.scoring.finish import finish
from tasks.scoring.ledger import ScoreOptions, current_shards, plan_work
from tasks.scoring.prices import current_prices
from tasks.scoring.runner import locate_drop, score_drop
from tasks.scoring.shard import work
from tasks.store.lake import Lake, parquet_bytes
from tasks.store.storage import open_store
from tests.conftest import copy_lake
from tests.test_scale import assert_exactly_once, png, put_images

TTL = 3.0


class PausedWrites:
    """The store's writes, where the first one of ``thread`` waits until ``go`` is set:
    a scorer's finishing step paused (by the OS, a VM migration) after it read the parts
    and before it wrote anything. Scorers write from other threads and go on."""

    def __init__(self, store, thread: threading.Thread):
        self.put, self.thread = store.put_bytes, thread
        self.paused, self.go = threading.Event(), threading.Event()
        store.put_bytes = self  # the real write runs, only later

    def __call__(self, key: str, data: bytes) -> None:
        if threading.current_thread() is self.thread and not self.paused.is_set():
            self.paused.set()
            assert self.go.wait(300), "never resumed"
        self.put(key, data)


def newest_prices(run, keys: list[str]) -> dict[str, float]:
    """key -> its price in the part of its latest plan (the scorer's own, never rewritten
    by a finisher of that later plan: it holds no superseded row)."""
    current = current_shards(run.plans())
    found = {}
    for key in keys:
        part = run.part(current[key][1]).to_pydict()
        found |= {k: p for k, p in zip(part["key"], part["price"], strict=True) if k == key}
    return found


def test_an_older_finisher_paused_between_reading_and_writing_changes_nothing(store_uri,
                                                                              tiny_lake):  # fmt: skip
    """Plan 1 prices {k0, k1}; k0 is overwritten (plan 2) and plan 2's finisher pauses
    after reading; k1 is overwritten, plan 3 is made, scored and finished; plan 2's
    finisher resumes. Every key is once in what the manifest names, at its newest price,
    the superseded rows are both older ones, and a re-run has nothing to repair."""
    lake, mv = copy_lake(tiny_lake.lake, store_uri), tiny_lake.model_version
    keys = put_images(lake, "race", 2)
    options = ScoreOptions(shard_size=2, claim_seconds=TTL)
    assert score_drop(lake, "race", options=options)["last_plan"] == 1
    lake.store.put_bytes("drops/race/img-0000.png", png(77, (40, 40)))  # a new ETag: plan 2
    older = {}
    thread = threading.Thread(
        target=lambda: older.update(score_drop(lake, "race", options=options))
    )
    pause = PausedWrites(lake.store, thread)
    thread.start()
    try:
        assert pause.paused.wait(300), "plan 2's finisher reached its first write"
        run = lake.score_run("race", mv)
        assert max(run.plans()) == 2 and run.manifest()["last_plan"] == 1
        lake.store.put_bytes("drops/race/img-0001.png", png(78, (40, 40)))  # plan 3
        newer = score_drop(lake, "race", options=options)
        assert newer["skipped"] is False and newer["last_plan"] == 3
    finally:
        pause.go.set()
        thread.join(300)
    assert older["skipped"] is True and older["last_plan"] == 3, "the newer manifest kept"
    final = run.manifest()
    assert final["finisher"] == newer["finisher"], "the manifest is plan 3's"
    priced = run.prices()  # the parts the manifest names
    rows = sorted(zip(priced["key"].to_pylist(), priced["price"].to_pylist(), strict=True))
    assert rows == sorted(newest_prices(run, keys).items()), "every key once, at its newest price"
    assert final["counts"] == {"listed": 2, "priced": 2, "rejected": 0}
    (first,) = run.plans()[1]["shards"]
    old = run.superseded()
    assert sorted(zip(old["key"].to_pylist(), old["shard"].to_pylist(), strict=True)) == [
        (k, first) for k in keys
    ], "both older rows superseded"
    assert final["superseded_rows"] == 2
    prices = current_prices(lake, "race", mv)
    assert prices.finished and prices.superseded == 2
    assert (
        sorted(zip(*(prices.prices[c].to_pylist() for c in ("key", "price")), strict=True)) == rows
    )
    assert score_drop(lake, "race", options=options)["skipped"] is True
    assert run.manifest() == final, "a re-run changes nothing"
    assert not [
        n for n in run.names(run.GENERATIONS) if n.startswith(f"{run.GENERATIONS}00000002-")
    ], "the paused finisher removed what it wrote, which no manifest names"
    assert_exactly_once(lake, "race", mv, keys)


def lagging(store, hidden: set[str]):
    """The real store (same class, same connection) whose listings miss the keys in
    ``hidden``: an S3-compatible store whose listings lag behind its writes."""

    class Lagging(type(store)):
        def list(self, prefix: str = "", irregular: bool = False):
            return (o for o in super().list(prefix, irregular) if o.key not in hidden)

    copy = object.__new__(Lagging)
    copy.__dict__.update(store.__dict__)
    return copy


def test_a_listing_that_misses_a_part_does_not_decide_what_is_finished(store_uri, tiny_lake):
    """Plan 1 prices four objects in two shards, one object is overwritten and plan 2
    prices it; the listing of parts misses plan 1's first part (which holds the older
    row). The finisher reads every planned part by its name: the manifest covers all
    four objects, each once, and the superseded row is out of what it names."""
    lake, mv = copy_lake(tiny_lake.lake, store_uri), tiny_lake.model_version
    keys = put_images(lake, "lag", 4)
    run, source = lake.score_run("lag", mv), locate_drop(lake, "lag")
    options = ScoreOptions(shard_size=2, claim_seconds=TTL)
    plan_work(run, source.listing()[0], 2)
    work(run, source, options)
    lake.store.put_bytes("drops/lag/img-0000.png", png(77, (40, 40)))
    listing = source.listing()[0]
    plans = plan_work(run, listing, 2)
    work(run, source, options)
    first = min(plans[1]["shards"])
    assert "img-0000.png" in [k for k, _ in plans[1]["shards"][first]]
    slow = Lake(lagging(lake.store, {run.key(run.part_name(first))})).score_run("lag", mv)
    assert run.part_name(first) not in slow.names("part-") and len(slow.names("part-")) == 2
    manifest = finish(slow, plans, listing, 0, {}, TTL)
    assert manifest["skipped"] is False and manifest["last_plan"] == 2
    assert manifest["counts"] == {"listed": 4, "priced": 4, "rejected": 0}
    assert len(manifest["parts"]) == 3 and manifest["superseded_rows"] == 1
    assert_exactly_once(lake, "lag", mv, keys)
    assert sorted(run.prices()["key"].to_pylist()) == keys


def test_a_planned_part_that_is_not_there_leaves_the_drop_unfinished(store_uri, tiny_lake,
                                                                     caplog):  # fmt: skip
    """A finisher called while a planned shard has no part (as a listing that shows
    parts not yet readable would have it) publishes nothing and says why in one line;
    the next run scores the shard and finishes the drop."""
    lake, mv = copy_lake(tiny_lake.lake, store_uri), tiny_lake.model_version
    keys = put_images(lake, "gap", 4)
    options = ScoreOptions(shard_size=2, claim_seconds=TTL)
    assert score_drop(lake, "gap", options=options)["last_plan"] == 1
    run, source = lake.score_run("gap", mv), locate_drop(lake, "gap")
    lake.store.put_bytes("drops/gap/img-0003.png", png(77, (40, 40)))
    listing = source.listing()[0]
    plans = plan_work(run, listing, 2)  # plan 2: its shard not scored
    with caplog.at_level(logging.WARNING, logger="vggprice"):
        assert finish(run, plans, listing, 0, {}, TTL) is None
    lines = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    assert len(lines) == 1 and "1 planned shards have no part" in lines[0], lines
    assert run.manifest()["last_plan"] == 1, "not marked finished"
    assert run.claims() == {}, "its finishing claim released"
    manifest = score_drop(lake, "gap", options=options)
    assert manifest["skipped"] is False and manifest["last_plan"] == 2
    assert manifest["counts"] == {"listed": 4, "priced": 4, "rejected": 0}
    assert_exactly_once(lake, "gap", mv, keys)


def test_readers_read_what_the_newest_manifest_names(store_uri):
    """The parts, rejections and superseded rows are those the manifest names; a manifest
    from before it named them reads the fixed names, as before."""
    run = Lake(open_store(store_uri)).score_run("names", "m-1")

    def put(name: str, keys: list[str]) -> None:
        table = pa.table(
            {"key": pa.array(keys, pa.string()), "object": pa.array(keys, pa.string())}
        )
        run.put_bytes(name, parquet_bytes(table))

    # finished before manifests named their files: part 1 rewritten in place
    put("part-1.parquet", ["a"])
    put("part-2.parquet", ["b"])
    put("rejected.parquet", ["c"])
    put("superseded.parquet", ["b"])
    run.write_manifest({"last_plan": 2, "parts": ["part-1.parquet", "part-2.parquet"]})
    assert run.prices()["key"].to_pylist() == ["a", "b"]
    assert run.rejected()["key"].to_pylist() == ["c"]
    assert run.superseded()["key"].to_pylist() == ["b"]
    # plan 3 prices a again; its finisher names part 1 without a, under its own folder
    put("part-3.parquet", ["a"])
    ours = run.generation(3, "c")
    put(f"{ours}part-1.parquet", [])
    put(f"{ours}rejected.parquet", ["c"])
    put(f"{ours}superseded.parquet", ["a", "b"])
    names = [f"{ours}part-1.parquet", "part-2.parquet", "part-3.parquet"]
    run.write_manifest({"last_plan": 3, "parts": names, "rejected": f"{ours}rejected.parquet",
                        "superseded": f"{ours}superseded.parquet"})  # fmt: skip
    assert sorted(run.prices()["key"].to_pylist()) == ["a", "b"], "each key once"
    assert run.rejected()["key"].to_pylist() == ["c"]
    assert run.superseded()["key"].to_pylist() == ["a", "b"]
    run.write_manifest(run.manifest() | {"superseded": None})
    assert run.superseded() is None, "the manifest names none"
