"""Exactly once through pauses, skewed clocks, late finishers and shards that stop making
progress: fenced parts, takeovers timed on the taker's own clock, a manifest written by
compare-and-swap, and a progress bound per shard."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.scoring.finish import finish, publish
from tasks.scoring.ledger import ScoreOptions, pending, plan_work
from tasks.scoring.runner import in_threads, locate_drop, score_drop
from tasks.scoring.shard import work
from tasks.store.claims import ClaimWatch, Heartbeat, take_claim, worker_name
from tasks.store.lake import Lake
from tasks.store.storage import open_store
from tests.conftest import copy_lake
from tests.test_scale import assert_exactly_once, png, put_images

REPO = Path(__file__).resolve().parents[1]
TTL = 3.0


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: 'T' for stopped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def wait_until_stopped(proc: subprocess.Popen, stop: Path) -> None:
    for _ in range(3000):
        if proc.poll() is not None:
            pytest.fail(f"the scorer exited before it stopped: {proc.stderr.read()[-3000:]}")
        if stop.exists() and process_state(proc.pid) == "T":
            return
        time.sleep(0.1)
    pytest.fail("the scorer never stopped itself")


def test_a_paused_scorer_cannot_write_after_losing_its_claim(store_uri, tiny_lake, tmp_path):
    """A scorer stopped (SIGSTOP) right before it creates its part, for longer than a
    claim lifetime: another scorer takes the shard over and finishes the drop; resumed,
    the paused one's part is refused, and nothing it did shows in the outputs."""
    lake, mv = copy_lake(tiny_lake.lake, store_uri), tiny_lake.model_version
    keys = put_images(lake, "paused", 4)
    stop = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.programs.paused_scorer", lake.uri, "paused", str(stop),
         str(TTL)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run = lake.score_run("paused", mv)
    try:
        wait_until_stopped(proc, stop)
        shard = run.PART.match(stop.read_text().rsplit("/", 1)[-1]).group(1)
        held = run.read_claim(shard)
        assert held is not None and held[0]["owner"].endswith(f":{proc.pid}"), held
        assert shard not in run.done_shards()
        manifest = score_drop(lake, "paused", options=ScoreOptions(shard_size=2, claim_seconds=TTL))
        assert manifest["skipped"] is False
        assert run.shard_facts()[shard]["scorer"] == worker_name(), "taken over by this scorer"
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    refused = [line for line in err.splitlines() if "refused the late part" in line]
    assert len(refused) == 1 and f"shard {shard}:" in refused[0], err[-3000:]
    assert "SCORER done skipped=True" in err, "it saw the drop finished"
    final = assert_exactly_once(lake, "paused", mv, keys)
    assert run.prices().num_rows == 4, "one row per key"
    assert final["finisher"] == manifest["finisher"], "the manifest is the finisher's"
    assert final["counts"] == {"listed": 4, "priced": 4, "rejected": 0}
    assert final["last_plan"] == max(run.plans()) == 1
    assert set(final["scorers"].values()) == {worker_name()}
    assert len(run.names("_shards/")) == len(run.names("_rejected/")) == 2, (
        "the late attempt's side files are gone: one set per shard"
    )


@pytest.mark.parametrize("skew", [600.0, -600.0], ids=["ahead", "behind"])
def test_a_skewed_clock_takes_over_only_a_claim_that_stopped_changing(store_uri, skew):
    """A taker whose clock is ten minutes off never takes a claim whose heartbeat keeps
    renewing it; it takes one over once it has seen it unchanged for a claim lifetime
    on its own clock, whatever the claim's wall-clock expiry says."""
    run = Lake(open_store(store_uri)).score_run("skew", "m-1")
    ttl = 1.5
    claim = take_claim(run, "00000001-00000", "holder:1", ttl)
    assert claim is not None
    watch = ClaimWatch(clock=lambda: time.monotonic() + skew)
    tokens, looks = set(), 0
    with Heartbeat(run, ttl) as heartbeat:
        heartbeat.hold("00000001-00000", claim)
        end = time.monotonic() + 3 * ttl
        while time.monotonic() < end:
            assert take_claim(run, "00000001-00000", "taker:2", ttl, watch) is None
            tokens.add(run.read_claim("00000001-00000")[1])
            looks += 1
            time.sleep(0.05)
    assert looks > 10 and len(tokens) >= 4, "the heartbeat kept changing the claim"
    held, token = run.read_claim("00000001-00000")
    assert held["claim"] == claim
    # The holder is gone (no more renewals); its claim says it is valid for an hour.
    assert run.replace_claim("00000001-00000", held | {"expires": time.time() + 3600}, token)
    fresh = ClaimWatch(clock=lambda: time.monotonic() + skew)
    assert take_claim(run, "00000001-00000", "taker:2", ttl, fresh) is None, "first look"
    taken, looks = None, 1
    while taken is None and looks < 400:
        time.sleep(0.05)
        taken = take_claim(run, "00000001-00000", "taker:2", ttl, fresh)
        looks += 1
    assert taken is not None and looks > 2, looks
    assert run.read_claim("00000001-00000")[0]["claim"] == taken


def test_a_late_finisher_cannot_lower_last_plan(store_uri, tiny_lake):
    """A finisher holding the plans of an earlier generation, after a later one was
    finished: it keeps the newer manifest, and its own, published anyway, loses to the
    one that covers the later plan (compare-and-swap)."""
    lake, mv = copy_lake(tiny_lake.lake, store_uri), tiny_lake.model_version
    keys = put_images(lake, "late", 4)
    options = ScoreOptions(shard_size=2, claim_seconds=TTL)
    first = score_drop(lake, "late", options=options)
    run, source = lake.score_run("late", mv), locate_drop(lake, "late")
    stale_plans, stale_listing = run.plans(), source.listing()[0]
    lake.store.put_bytes("drops/late/img-0001.png", png(77, (40, 40)))  # a new ETag
    second = score_drop(lake, "late", options=options)
    assert second["last_plan"] == 2 and second["superseded_rows"] == 1
    _, token = run.manifest_versioned()
    late = finish(run, stale_plans, stale_listing, 0, {}, TTL)
    assert late["skipped"] is True and late["last_plan"] == 2, "the newer manifest wins"
    assert run.claims() == {}, "no finishing claim left behind"
    old = {k: v for k, v in first.items() if k != "skipped"}
    kept = publish(run, old, "late-finisher")
    assert kept["skipped"] is True and kept["last_plan"] == 2
    assert run.manifest_versioned()[1] == token, "the newer manifest untouched"
    # compare-and-swap: a write against a token read before someone else's write fails
    manifest, token = run.manifest_versioned()
    assert run.replace_manifest(manifest | {"note": "another finisher"}, token)
    assert not run.replace_manifest(old, token)
    final = assert_exactly_once(lake, "late", mv, keys)
    assert final["last_plan"] == max(run.plans()) == 2
    assert final["counts"] == {"listed": 4, "priced": 4, "rejected": 0}


def test_a_run_whose_drop_was_planned_further_meanwhile_finishes_every_plan(tiny_lake, tmp_path,
                                                                            caplog):  # fmt: skip
    """Between scoring and finishing, another scorer overwrote a file and planned it:
    the finisher re-reads the plans and stops (PlansChanged), and the run lists again,
    scores the newer plan and finishes both."""
    lake, mv = copy_lake(tiny_lake.lake, str(tmp_path / "lake")), tiny_lake.model_version
    keys = put_images(lake, "moving", 4)
    threads, calls = in_threads(2), []

    def scorers_then_another_planner(job, options):
        facts = threads(job, options)
        if not calls:  # once: another scorer plans an overwritten file, then pauses
            lake.store.put_bytes("drops/moving/img-0002.png", png(88, (40, 40)))
            plan_work(job.run, job.source.listing()[0], options.shard_size)
        calls.append(len(facts))
        return facts

    with caplog.at_level(logging.INFO, logger="vggprice"):
        manifest = score_drop(lake, "moving", options=ScoreOptions(shard_size=2),
                              run_scorers=scorers_then_another_planner)  # fmt: skip
    assert calls == [2, 1], "the second plan's shard scored by the same run"
    relisted = [r for r in caplog.records if "planned further by another scorer" in r.getMessage()]
    assert len(relisted) == 1, "its finisher met PlansChanged once"
    assert manifest["skipped"] is False and manifest["last_plan"] == 2
    assert manifest["superseded_rows"] == 1
    assert_exactly_once(lake, "moving", mv, keys)
    assert manifest["counts"] == {"listed": 4, "priced": 4, "rejected": 0}


class FastClock:
    """A monotonic clock that moves ``step`` seconds at every look: a scorer on it sees
    each object take far longer than it does."""

    def __init__(self, step: float):
        self.step, self.now, self.lock = step, 0.0, threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            self.now += self.step
            return self.now


def test_a_shard_past_its_progress_bound_is_given_up_and_finished_by_another(tiny_lake, tmp_path,
                                                                            caplog):  # fmt: skip
    lake, mv = copy_lake(tiny_lake.lake, str(tmp_path / "lake")), tiny_lake.model_version
    keys = put_images(lake, "slow", 4)
    run, source = lake.score_run("slow", mv), locate_drop(lake, "slow")
    plan_work(run, source.listing()[0], 2)
    # bound: 10 s + 5 s per object = 20 s per shard; the clock moves 8 s at every look,
    # and a claim lives for a day on it, so the bound, not the claim, stops the shard.
    slow = ScoreOptions(shard_size=2, claim_seconds=86_400.0, shard_base_seconds=10.0,
                        shard_seconds_per_object=5.0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="vggprice"):
        assert work(run, source, slow, watch=ClaimWatch(FastClock(8.0))) == []
    gave_up = [r.getMessage() for r in caplog.records if "gave up shard" in r.getMessage()]
    assert len(gave_up) == 2 and all("ran past its bound" in m for m in gave_up), gave_up
    assert run.claims() == {} and run.done_shards() == set(), "released, nothing written"
    assert len(pending(run, run.plans())) == 2
    manifest = score_drop(lake, "slow", options=ScoreOptions(shard_size=2))
    assert manifest["timings"]["shards_scored_here"] == 2
    assert_exactly_once(lake, "slow", mv, keys)
    assert manifest["counts"] == {"listed": 4, "priced": 4, "rejected": 0}
