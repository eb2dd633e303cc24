"""The ledger of a drop's scoring, kept in the store (``lake.ScoreRun``): numbered plans
that split the listed objects into shards, and the claims that give each shard to one
scorer at a time.

- **Plans.** The drop is listed as (key, ETag) and every object not yet in a plan (or
  whose ETag changed since) goes into the next numbered plan, split into shards. A plan
  is created with a conditional write, so two scorers that list at once cannot both plan
  the same objects; the plan names its writer, so a create whose response was lost is
  recognised.
- **Claims.** A scorer claims a shard with a conditional create and keeps the claim alive
  with heartbeats (every third of ``claim_seconds``). A claim whose heartbeat stopped (a
  crashed scorer) is taken over by compare-and-swap once it expires. A claim is released
  only while it is still ours.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from tasks.data.images import DEFAULT_MAX_PIXELS
from tasks.runtime import get_logger
from tasks.settings import load_settings
from tasks.store.lake import ScoreRun
from tasks.store.storage import ObjectInfo

MAX_PLAN_RACES = 50


@dataclass(frozen=True)
class ScoreOptions:
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "auto"
    batch_size: int = 256
    claim_seconds: float = 90.0  # a claim without a heartbeat for this long is taken over
    wait: bool = True  # wait for shards that live scorers hold; else stop and say so
    max_bytes: int = 50 * 1024 * 1024  # larger objects are rejected from their size, unread
    max_rows_per_object: int = 10_000  # a Parquet object with more rows is rejected whole


class DropBusy(RuntimeError):
    """Live scorers hold every shard left and the run was told not to wait."""


class DropError(ValueError):
    """The drop does not exist or holds nothing to price; nothing was written."""


def scorer_name() -> str:
    """Who is scoring: host and process (and the worker, when named), as the manifest
    records it."""
    worker = load_settings().worker_name
    return f"{socket.gethostname()}:{os.getpid()}" + (f"@{worker}" if worker else "")


def current_shards(plans: dict[int, dict]) -> dict[str, tuple[str, str]]:
    """object key -> (ETag, shard) of its latest plan."""
    current: dict[str, tuple[str, str]] = {}
    for n in sorted(plans):
        for shard, entries in plans[n]["shards"].items():
            for key, etag in entries:
                current[key] = (etag, shard)
    return current


def plan_work(run: ScoreRun, listing: list[ObjectInfo], shard_size: int) -> dict[int, dict]:
    """Put every object that no plan holds with its current ETag into a new plan;
    returns all plans. Plans are numbered and created with a conditional write: when
    another scorer created the number first, look again at what is left."""
    writer = uuid.uuid4().hex
    for _ in range(MAX_PLAN_RACES):
        plans = run.plans()
        current = current_shards(plans)
        new = [o for o in listing if current.get(o.key, ("", ""))[0] != o.etag]
        if not new:
            return plans
        number = max(plans, default=0) + 1
        shards = {
            run.shard_name(number, i // shard_size): [
                [o.key, o.etag] for o in new[i : i + shard_size]
            ]
            for i in range(0, len(new), shard_size)
        }
        plan = {"writer": writer, "shards": shards, "created_at": datetime.now(UTC).isoformat()}
        if run.create_plan(number, plan) or run.plan(number).get("writer") == writer:
            return plans | {number: plan}  # (the second: our create's answer was lost)
    raise RuntimeError(f"{run.uri()}: other scorers kept planning; run again")


def pending(run: ScoreRun, plans: dict[int, dict]) -> dict[str, list]:
    """Planned shards without a part: shard -> [[key, etag], ...]."""
    done = run.done_shards()
    return {
        shard: entries
        for n in sorted(plans)
        for shard, entries in plans[n]["shards"].items()
        if shard not in done
    }


def take_claim(run: ScoreRun, name: str, owner: str, seconds: float) -> str | None:
    """Claim ``name`` for ``owner``: the claim's id, or None while a live claim holds it."""
    claim_id = uuid.uuid4().hex
    body = {"owner": owner, "claim": claim_id, "expires": time.time() + seconds}
    if run.create_claim(name, body):
        return claim_id
    found = run.read_claim(name)
    if found is None:
        return None  # released just now: the shard was finished
    held, token = found
    if held["claim"] == claim_id:
        return claim_id  # our create was applied; only its answer was lost
    if held["expires"] > time.time():
        return None
    if run.replace_claim(name, body, token):
        get_logger().warning("%s: took over %s from %s (claim expired)", owner, name, held["owner"])
        return claim_id
    found = run.read_claim(name)
    return claim_id if found and found[0]["claim"] == claim_id else None


def renew_claim(run: ScoreRun, name: str, claim_id: str, seconds: float) -> bool:
    """Push the claim's expiry on, if it is still ours."""
    found = run.read_claim(name)
    if found is None or found[0]["claim"] != claim_id:
        return False
    held, token = found
    renewed = held | {"expires": time.time() + seconds}
    if run.replace_claim(name, renewed, token):
        return True
    found = run.read_claim(name)  # a lost answer, or a takeover
    return bool(found and found[0]["claim"] == claim_id)


def release_claim(run: ScoreRun, name: str, claim_id: str) -> None:
    """Delete the claim if it is still ours (not one another scorer took over since)."""
    found = run.read_claim(name)
    if found is not None and found[0]["claim"] == claim_id:
        run.drop_claim(name)


class Heartbeat:
    """Renews this scorer's claims every third of their lifetime, in a thread."""

    def __init__(self, run: ScoreRun, seconds: float):
        self.run, self.seconds = run, seconds
        self.held: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def hold(self, name: str, claim_id: str) -> None:
        with self.lock:
            self.held[name] = claim_id

    def release(self, name: str) -> None:
        with self.lock:
            claim_id = self.held.pop(name, None)
        if claim_id is not None:
            release_claim(self.run, name, claim_id)

    def _beat(self) -> None:
        while not self.stop.wait(self.seconds / 3):
            with self.lock:
                held = dict(self.held)
            for name, claim_id in held.items():
                try:
                    if not renew_claim(self.run, name, claim_id, self.seconds):
                        get_logger().warning("lost the claim on %s (another scorer took it)", name)
                except Exception as err:  # a missed beat is retried at the next one
                    get_logger().warning("heartbeat for %s failed: %s", name, err)
