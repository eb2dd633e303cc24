"""Bulk scoring of drops: every listed object priced or rejected exactly once, by any
number of scorers on any machines, through crashes and lost responses.

``score_drop`` is the one runner: the CLI, the flows, the tests and the benchmarks call
it. It finds the drop and the model, plans the work in the ledger (``ledger.py``), has
scorers run the ``work`` loop (``shard.py``) until every shard has its part, and finishes
the drop (``finish.py``). Where the scorers run is a parameter (``ScorerRunner``): threads
of this process by default, Prefect tasks on a thread pool or a Dask cluster, or flow
runs on a work pool (``flows/score.py``); the guarantees come from the ledger, not from
where they run. Its progress bar counts the shards whose part exists, so it moves
whichever runner does the work.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tasks.governance.registry import resolve_model
from tasks.runtime import ProgressLog, get_logger, progress
from tasks.scoring.finish import PlansChanged, finish
from tasks.scoring.ledger import DropBusy, DropError, ScoreOptions, pending, plan_work
from tasks.scoring.shard import work
from tasks.store.lake import DropSource, Lake, ScoreRun
from tasks.store.storage import ObjectInfo, open_store


def locate_drop(lake: Lake, drop: str) -> DropSource:
    """A drop id in the store's drops/, or an explicit s3:// URI or directory (its id
    is derived from the whole URI, so two URIs with one last segment never collide)."""
    if "://" in drop or drop.startswith(("/", ".", "~")):
        uri = drop.rstrip("/")
        source = open_store(uri)
        name = uri.rsplit("/", 1)[-1] or "drop"
        return DropSource(
            source, "", f"{name}-{hashlib.sha256(source.uri.encode()).hexdigest()[:8]}"
        )
    drop_id = drop.strip("/")
    if not drop_id or "/" in drop_id:
        raise DropError(f"invalid drop id {drop!r}: use a single name or a URI")
    return lake.drop(drop_id)


def list_drop(lake: Lake, source: DropSource) -> tuple[list[ObjectInfo], int]:
    """The drop's objects, or DropError when it has none (nothing is written then)."""
    listing, skipped = source.listing()
    if listing:
        return listing, skipped
    where = source.store.uri_for(source.prefix.rstrip("/")) if source.prefix else source.store.uri
    if skipped:
        raise DropError(f"drop {source.drop_id} ({where}) is empty: {skipped} folder markers "
                        "or hidden files, no images")  # fmt: skip
    known = ", ".join(lake.drop_ids()[:10]) or "none"
    raise DropError(f"no such drop {source.drop_id!r} at {where} (drops in the store: {known})")


@dataclass
class Job:
    """What the scorers of one run work on."""

    run: ScoreRun
    source: DropSource
    shards: dict[str, list]


# Runs scorers (each the ``work`` loop) somewhere, returns the facts of their shards.
ScorerRunner = Callable[[Job, ScoreOptions], list[dict]]


def in_threads(count: int = 2) -> ScorerRunner:
    """Scorers as ``count`` threads of this process (the default), so one shard decodes
    while another predicts (predict holds the model's lock and uses every core)."""

    def run(job: Job, options: ScoreOptions) -> list[dict]:
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [pool.submit(work, job.run, job.source, options, i) for i in range(count)]
            return [facts for f in futures for facts in f.result()]

    return run


class ShardProgress:
    """The drop's progress bar in a terminal: planned shards whose part exists, read
    from the ledger every ``every`` seconds, so it moves whichever runner does the work
    (threads, Dask, flow runs on a pool). Off a terminal it reads the ledger every
    ``quiet_every`` seconds and logs a line at least every 30 s (shards done, rate, time
    left), besides each scorer's line per shard."""

    def __init__(self, run: ScoreRun, plans: dict[int, dict], every: float = 1.0,
                 quiet_every: float = 10.0):  # fmt: skip
        self.run = run
        self.planned = {s for plan in plans.values() for s in plan["shards"]}
        self.bar = progress(len(self.planned), f"drop {run.drop_id}", "shard")
        self.lines = ProgressLog(f"drop {run.drop_id}", len(self.planned), "shards",
                                 enabled=self.bar.disable)  # fmt: skip
        self.every = every if not self.bar.disable else quiet_every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="drop-progress", daemon=True)

    def __enter__(self) -> ShardProgress:
        if not self.bar.disable or self.lines.enabled:
            self.update()
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
            self.update()
        self.bar.close()

    def update(self) -> None:
        done = len(self.planned & self.run.done_shards())
        self.bar.update(done - self.bar.n)
        self.lines.advance(done - self.lines.done)

    def _poll(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.update()
            except Exception:  # a missed look at the ledger: the next one catches up
                continue


def score_drop(
    lake: Lake,
    drop: str,
    model_version: str | None = None,
    options: ScoreOptions | None = None,
    run_scorers: ScorerRunner | None = None,
    line: str | None = None,
) -> dict:
    """Price every image of a drop exactly once, joining any scorers already at it;
    returns the manifest (``skipped``: it was finished before this run)."""
    options = options or ScoreOptions()
    run_scorers = run_scorers or in_threads()
    log = get_logger()
    mv = resolve_model(lake, model_version, line)
    source = locate_drop(lake, drop)
    listing, skipped = list_drop(lake, source)
    run = lake.score_run(source.drop_id, mv)
    t0 = time.time()
    plans = plan_work(run, listing, options.shard_size)
    todo = pending(run, plans)
    log.info("drop %s: %d objects listed (%d skipped), %d shards to score with %s",
             source.drop_id, len(listing), skipped, len(todo), mv)  # fmt: skip
    with ShardProgress(run, plans):
        return _score_until_finished(run, source, plans, listing, skipped, options, run_scorers,
                                     t0)  # fmt: skip


def _score_until_finished(
    run: ScoreRun, source: DropSource, plans: dict[int, dict], listing: list[ObjectInfo],
    skipped: int, options: ScoreOptions, run_scorers: ScorerRunner, t0: float,
) -> dict:  # fmt: skip
    """Run scorers until every shard has its part, then finish (or wait for the scorers
    that hold what is left, or stop and say so when told not to wait). When another
    scorer planned more meanwhile, list and plan again and go on with every plan."""
    scored, todo = 0, pending(run, plans)
    while True:
        if todo:
            scored += len(run_scorers(Job(run, source, todo), options))
            todo = pending(run, plans)
        if not todo:
            timings = {"seconds": round(time.time() - t0, 3), "shards_scored_here": scored}
            try:
                manifest = finish(run, plans, listing, skipped, timings, options.claim_seconds)
            except PlansChanged:
                get_logger().info("drop %s: planned further by another scorer; listing again",
                                  source.drop_id)  # fmt: skip
                listing, skipped = source.listing()
                plans = plan_work(run, listing, options.shard_size)
                todo = pending(run, plans)
                continue
            if manifest is not None:
                return manifest
        held = {c["owner"] for n, c in run.claims().items() if n in todo or run.is_finish_name(n)}
        if not options.wait:
            left = f"{len(todo)} shards" if todo else "the finishing step"
            raise DropBusy(
                f"drop {source.drop_id}: {scored} shards priced here, {left} held by live "
                f"scorers ({', '.join(sorted(held)) or 'just released'}); run again later, "
                "or without --no-wait to wait for them"
            )
        time.sleep(min(options.claim_seconds / 3, 2.0))
        todo = pending(run, plans)


def drops_needing_scores(lake: Lake, model_version: str) -> list[str]:
    """Drops with images and no complete manifest for this model, or with objects added
    or overwritten since it was written."""
    todo = []
    for drop_id in lake.drop_ids():
        listing, _ = lake.drop(drop_id).listing()
        if not listing:
            continue
        manifest = lake.score_run(drop_id, model_version).manifest()
        scored = {k: etag for k, _, etag in (manifest or {}).get("listing", [])}
        if any(scored.get(o.key) != o.etag for o in listing):
            todo.append(drop_id)
    return todo
