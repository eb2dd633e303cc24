"""The claims that give each piece of shared work to one worker at a time: a drop's
shards to scorers (``tasks.scoring``), a catalog's feature shards to extractors
(``tasks.model.features``), a drop's finishing to one finisher. They are kept under the
entry that holds the work (``lake.Claims``: ``_claims/<name>.json``).

A worker claims a name with a conditional create and keeps the claim alive with
heartbeats (every third of its lifetime, ``seconds``); each renewal changes the claim
object, so its version token changes. No wall clock decides who owns a claim: another
worker takes a claim over (compare-and-swap on its token) only once it has watched the
same token for a whole claim lifetime on its own monotonic clock (``ClaimWatch``); and a
holder that has had no successful renewal for a claim lifetime, on its own monotonic
clock, stops working on it (``Lease``). A claim is released only while it is still ours.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from tasks.runtime import get_logger
from tasks.settings import load_settings
from tasks.store.lake import Claims

Clock = Callable[[], float]  # seconds on a clock that only moves forward (time.monotonic)


def worker_name() -> str:
    """Who is working (scoring, extracting, finishing): host and process (and the
    worker, when named in the settings), as manifests and claims record it."""
    worker = load_settings().worker_name
    return f"{socket.gethostname()}:{os.getpid()}" + (f"@{worker}" if worker else "")


class ClaimWatch:
    """What this process has seen of other workers' claims: claim -> (version token,
    when this process first saw that token, on ``clock``). A claim may be taken over
    only once one token has been seen for a whole claim lifetime: the holder's heartbeat
    would have changed it. Only differences of this process's own clock count, so the
    clocks of other hosts (and how far they are off) decide nothing."""

    def __init__(self, clock: Clock = time.monotonic):
        self.clock = clock
        self.seen: dict[str, tuple[str, float]] = {}
        self.lock = threading.Lock()

    def unchanged_for(self, where: str, token: str) -> float:
        """Seconds this process has seen ``token`` as the claim's version (0: new)."""
        now = self.clock()
        with self.lock:
            seen = self.seen.get(where)
            if seen is None or seen[0] != token:
                self.seen[where] = (token, now)
                return 0.0
            return now - seen[1]

    def forget(self, where: str) -> None:
        with self.lock:
            self.seen.pop(where, None)


WATCH = ClaimWatch()  # this process's watch on the real monotonic clock


def _where(entry: Claims, name: str) -> str:
    return f"{entry.store.uri} {entry.prefix} {name}"


def take_claim(
    entry: Claims, name: str, owner: str, seconds: float, watch: ClaimWatch | None = None
) -> str | None:
    """Claim ``name`` for ``owner``: the claim's id, or None while another claim holds
    it that this process has not seen unchanged for ``seconds`` (nor for the lifetime
    the holder wrote into it, when that is longer)."""
    watch = watch or WATCH
    claim_id = uuid.uuid4().hex
    # "expires" is for people reading the claim; no decision reads it.
    body = {"owner": owner, "claim": claim_id, "seconds": seconds, "beat": 0,
            "expires": time.time() + seconds}  # fmt: skip
    if entry.create_claim(name, body):
        return claim_id
    found = entry.read_claim(name)
    if found is None:
        return None  # released just now: the shard was finished
    held, token = found
    if held["claim"] == claim_id:
        return claim_id  # our create was applied; only its answer was lost
    quiet = watch.unchanged_for(_where(entry, name), token)
    if quiet < max(seconds, float(held.get("seconds", 0))):
        return None
    if entry.replace_claim(name, body, token):
        watch.forget(_where(entry, name))
        get_logger().warning("%s: took over %s from %s (its claim unchanged for %.1f s here)",
                             owner, name, held["owner"], quiet)  # fmt: skip
        return claim_id
    found = entry.read_claim(name)
    return claim_id if found and found[0]["claim"] == claim_id else None


def claim_lapsed(claim: dict, unchanged_seconds: float) -> bool:
    """Whether a claim left unchanged this long is past the lifetime its holder wrote
    into it: the holder has stopped working on it (``Lease``) and any worker may take it
    over (``take_claim``). A claim without a lifetime it states is never lapsed."""
    seconds = claim.get("seconds") if isinstance(claim, dict) else None
    return isinstance(seconds, int | float) and unchanged_seconds >= max(float(seconds), 0.0)


def renew_claim(entry: Claims, name: str, claim_id: str, seconds: float) -> bool:
    """Write the claim again (a new version token), if it is still ours."""
    found = entry.read_claim(name)
    if found is None or found[0]["claim"] != claim_id:
        return False
    held, token = found
    renewed = held | {"beat": held.get("beat", 0) + 1, "expires": time.time() + seconds}
    if entry.replace_claim(name, renewed, token):
        return True
    found = entry.read_claim(name)  # a lost answer, or a takeover
    return bool(found and found[0]["claim"] == claim_id)


def release_claim(entry: Claims, name: str, claim_id: str) -> None:
    """Delete the claim if it is still ours (not one another worker took over since)."""
    found = entry.read_claim(name)
    if found is not None and found[0]["claim"] == claim_id:
        entry.drop_claim(name)


class ShardGivenUp(RuntimeError):
    """This worker stopped working on a shard (its claim lost or lapsed, or the shard
    ran past its bound); the message says why."""


@dataclass
class Lease:
    """One held claim as its holder sees it: ``renewed`` is when (on ``clock``) the
    last successful renewal began; ``lost`` says why it is no longer ours."""

    name: str
    claim_id: str
    seconds: float
    clock: Clock
    renewed: float
    lost: str | None = None

    def problem(self) -> str | None:
        """Why this worker must not write for the claim any more, or None."""
        if self.lost:
            return self.lost
        quiet = self.clock() - self.renewed
        if quiet >= self.seconds:
            return f"no successful renewal of the claim on {self.name} for {quiet:.1f} s " \
                   f"(its lifetime is {self.seconds:g} s)"  # fmt: skip
        return None

    def check(self) -> None:
        if why := self.problem():
            raise ShardGivenUp(why)


class Heartbeat:
    """Renews a worker's claims (a scorer's, an extractor's: ``role``, for its messages)
    every third of their lifetime, in a thread, timing their leases on ``clock``."""

    def __init__(self, entry: Claims, seconds: float, clock: Clock = time.monotonic,
                 role: str = "scorer"):  # fmt: skip
        self.entry, self.seconds, self.clock, self.role = entry, seconds, clock, role
        self.held: dict[str, Lease] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def hold(self, name: str, claim_id: str, since: float | None = None) -> Lease:
        """Keep the claim alive; ``since``: when (on the clock) taking it began."""
        lease = Lease(name, claim_id, self.seconds, self.clock,
                      self.clock() if since is None else since)  # fmt: skip
        with self.lock:
            self.held[name] = lease
        return lease

    def release(self, name: str) -> None:
        with self.lock:
            lease = self.held.pop(name, None)
        if lease is not None:
            release_claim(self.entry, name, lease.claim_id)

    def _beat(self) -> None:
        while not self.stop.wait(self.seconds / 3):
            with self.lock:
                held = list(self.held.values())
            for lease in held:
                if lease.lost:
                    continue
                began = self.clock()
                try:
                    if renew_claim(self.entry, lease.name, lease.claim_id, self.seconds):
                        lease.renewed = began
                    else:
                        lease.lost = f"lost the claim on {lease.name} (another {self.role} took it)"
                        get_logger().warning("%s", lease.lost)
                except Exception as err:  # a missed beat is retried at the next one
                    get_logger().warning("heartbeat for %s failed: %s", lease.name, err)


def work_in_turn(
    entry: Claims, names: list, owner: str, seconds: float, done: Callable[[str], bool],
    work: Callable[[str, Lease], None], start: int = 0, watch: ClaimWatch | None = None,
    what: str = "shard", role: str = "scorer",
) -> None:  # fmt: skip
    """The loop every worker of a ledger runs (scorers over a drop's shards, extractors
    over feature shards): claim each of ``names`` in turn, from ``start`` round, for
    ``owner``, and ``work(name, lease)`` on it while heartbeats keep the claim alive;
    then release it. A name that another worker holds is skipped, and so is one that is
    ``done`` once claimed (finished by another since the list was read); ``work``
    raising ShardGivenUp gives the name up (logged, released, the loop goes on).
    ``entry``: what holds the claims (``lake.Claims``)."""
    watch = watch or WATCH
    names = names[start % len(names) :] + names[: start % len(names)] if names else []
    with Heartbeat(entry, seconds, watch.clock, role) as heartbeat:
        for name in names:
            since = watch.clock()
            claim_id = take_claim(entry, name, owner, seconds, watch)
            if claim_id is None:
                continue
            lease = heartbeat.hold(name, claim_id, since)
            try:
                if not done(name):
                    work(name, lease)
            except ShardGivenUp as why:
                get_logger().warning("%s: gave up %s %s and released it for another %s: %s",
                                     owner, what, name, role, why)  # fmt: skip
            finally:
                heartbeat.release(name)
