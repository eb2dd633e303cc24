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
import os
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
from tasks.store.lake import DropSource, Lake, ScoreRun, drop_name_problem, shown
from tasks.store.storage import ObjectInfo, open_store


def locate_drop(lake: Lake, drop: str, *, from_user: bool = False) -> DropSource:
    """The drop named ``drop``: a folder under the store's drops/ (what listings, events
    and queue messages name; DropError for a name that cannot be a drop). Only what a
    person typed (``from_user``) may name another place: an explicit s3:// URI, or a
    directory path (one that is no drop name of the store). Its id is derived from the
    whole URI, so two URIs with one last segment never collide."""
    name = drop.rstrip("/") or drop
    if from_user and ("://" in drop or _typed_path(lake, name)):
        path = name if "://" in drop else os.path.abspath(os.path.expanduser(name))
        source = open_store(path)
        last = name.rsplit("/", 1)[-1]
        last = last if last and last.isprintable() and "\\" not in last else "drop"
        return DropSource(
            source, "", f"{last}-{hashlib.sha256(source.uri.encode()).hexdigest()[:8]}"
        )
    if problem := drop_name_problem(name):
        raise DropError(f"invalid drop id {drop!r}: {problem} — use the drop's folder "
                        "name under drops/")  # fmt: skip
    return lake.drop(name)


def _typed_path(lake: Lake, name: str) -> bool:
    """Whether a typed DROP names a directory: not a drop name, or '~'/'~user' when the
    store has no drop of that name."""
    if drop_name_problem(name):
        return True
    return name.startswith("~") and name not in lake.drop_ids()


def list_drop(lake: Lake, source: DropSource) -> tuple[list[ObjectInfo], int]:
    """The drop's objects, or DropError when it has none (nothing is written then)."""
    listing, skipped = source.listing()
    if listing:
        return listing, skipped
    where = source.store.uri_for(source.prefix.rstrip("/")) if source.prefix else source.store.uri
    if skipped:
        raise DropError(f"drop {source.drop_id} ({where}) is empty: {skipped} folder markers "
                        "or hidden files, no images")  # fmt: skip
    known = ", ".join([d for d in lake.drop_ids() if not drop_name_problem(d)][:10]) or "none"
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
    from_user: bool = False,
) -> dict:
    """Price every image of a drop exactly once, joining any scorers already at it;
    returns the manifest (``skipped``: it was finished before this run). ``drop`` is a
    drop's name in the store; ``from_user``: what a person typed (``locate_drop``)."""
    options = options or ScoreOptions()
    run_scorers = run_scorers or in_threads()
    log = get_logger()
    mv = resolve_model(lake, model_version, line)
    source = locate_drop(lake, drop, from_user=from_user)
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


@dataclass
class DropScan:
    """What a look at drops/ found: the drops to price, the folder names that are not
    drops and the drops that could not be looked at (name -> why, one line each)."""

    todo: list[str]
    not_drops: dict[str, str]
    failed: dict[str, str]


def scan_drops(lake: Lake, model_version: str) -> DropScan:
    """Drops with images and no complete manifest for this model, or with objects added
    or overwritten since it was written; one listing of drops/'s folders, then one of
    each drop. A name that is not a drop, or a drop that cannot be read, is recorded
    and logged, never raised."""
    log, scan = get_logger(), DropScan([], {}, {})
    for drop_id in lake.drop_ids():
        if problem := drop_name_problem(drop_id):
            scan.not_drops[shown(drop_id)] = problem
            log.info("folder %s skipped, not a drop: %s", shown(drop_id), problem)
            continue
        try:
            listing, _ = lake.drop(drop_id).listing()
            if not listing:
                continue
            manifest = lake.score_run(drop_id, model_version).manifest()
        except Exception as err:  # one drop's trouble: the others are still looked at
            scan.failed[drop_id] = one_line(err)
            log.error("drop %s not looked at: %s", drop_id, scan.failed[drop_id])
            continue
        scored = {k: etag for k, _, etag in (manifest or {}).get("listing", [])}
        if any(scored.get(o.key) != o.etag for o in listing):
            scan.todo.append(drop_id)
    return scan


def drops_needing_scores(lake: Lake, model_version: str) -> list[str]:
    """The drops that ``scan_drops`` finds to price."""
    return scan_drops(lake, model_version).todo


def one_line(err: BaseException) -> str:
    """An error as one line: its message's first line (with its type, unless it is bad
    input, which says what it is)."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    return lines[0] if isinstance(err, (ValueError, FileNotFoundError)) else (
        f"{type(err).__name__}: {lines[0]}")  # fmt: skip


class ScanIncomplete(RuntimeError):
    """A scan priced every drop it could; ``result`` is its summary, whose ``failed``
    names each drop it could not price and why."""

    def __init__(self, result: dict):
        self.result = result
        failed = result["failed"]
        super().__init__("\n".join([f"{len(failed)} drops not priced (every other drop was):",
                                    *self.lines()]))  # fmt: skip

    def lines(self) -> list[str]:
        return [f"drop {d}: not priced: {why}" for d, why in self.result["failed"].items()]

    def __reduce__(self):
        return type(self), (self.result,)
