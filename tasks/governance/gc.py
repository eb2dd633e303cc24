"""Garbage collection (``vggprice gc``): what the store's writers leave behind and
nothing will ever read, removed once it is older than an age.

The kinds, and why each is an orphan:

- ``training-attempt``: a model's ``attempts/<id>/`` that its ``lineage.json`` does not
  name (a losing trainer that died before removing its files);
- ``int8-attempt``: an int8 engine's attempt that its ``gate.json`` does not name (the
  losing makers, which never remove theirs);
- ``checkpoints``: the checkpoints of a model that is complete (a losing trainer writes
  them again after the winner removed them);
- ``score-side-file``: a scoring attempt's rejections or facts whose shard's part names
  another attempt (a scorer that died between them and its losing part);
- ``generation``: a finisher's ``_generations/<plan>-<claim>/`` of an older plan than
  the drop's newest manifest covers, which that manifest does not name (a finisher that
  lost, or lapsed before publishing);
- ``claim``: a work claim (scoring, feature extraction) left unchanged for longer than
  the lifetime it states (``claims.claim_lapsed``): its holder has stopped;
- ``temp-file``: a local store's hidden temp and lock files (``storage.temp_files``),
  outside the drops;
- ``float-conversion``: a converted OpenVINO float model that died before its rename,
  in this machine's cache directory: the caller lists them (``conversions``; the CLI
  passes ``ov_runtime.unfinished_conversions``), so governance does not reach up into
  scoring.

Never touched: a model's published attempt and its ``lineage.json``, a published int8
attempt and its ``gate.json``, champions and decisions, datasets, labels, features, a
model without ``lineage.json`` (it may still be training), the checkpoints of such a
model, an engine without ``gate.json``, parts, plans and manifests, side files of a shard
without a part, a claim that is not past its lifetime (nor one rewritten since it was
judged), and anything in a drop. When in doubt, kept.

Age is the newest stored mtime of what would go (S3: ``LastModified``) against this
machine's clock minus ``CLOCK_SKEW``: a clock behind the store's only keeps more, and
one up to ``CLOCK_SKEW`` ahead removes nothing younger than the age.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.store.claims import claim_lapsed
from tasks.store.lake import Lake
from tasks.store.storage import ObjectInfo

CLOCK_SKEW = timedelta(minutes=10)
AGE = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_age(text: str) -> timedelta:
    """``30m``, ``12h``, ``7d`` (or seconds, ``90s``) as a timedelta; ValueError else."""
    m = AGE.match(str(text).strip())
    if not m:
        raise ValueError(f"--older-than {text!r}: not an age — give a whole number and a "
                         "unit: s, m, h or d (e.g. 30m, 12h, 7d)")  # fmt: skip
    return timedelta(**{UNITS[m.group(2)]: int(m.group(1))})


@dataclass(frozen=True)
class Orphan:
    """One thing to remove: its kind, where it is, its bytes, and how it goes."""

    kind: str
    where: str
    bytes: int
    remove: Callable[[], bool] = field(compare=False, repr=False)


@dataclass
class GcReport:
    dry_run: bool
    older_than: timedelta
    removed: list[Orphan]

    def as_dict(self) -> dict:
        kinds: dict[str, dict] = {}
        for o in self.removed:
            k = kinds.setdefault(o.kind, {"count": 0, "bytes": 0})
            k["count"] += 1
            k["bytes"] += o.bytes
        return {
            "dry_run": self.dry_run,
            "older_than_seconds": int(self.older_than.total_seconds()),
            "removed": len(self.removed),
            "bytes_freed": sum(o.bytes for o in self.removed),
            "kinds": kinds,
            "items": [{"kind": o.kind, "where": o.where, "bytes": o.bytes} for o in self.removed],
        }


def collect_garbage(
    lake: Lake, older_than: timedelta, dry_run: bool = False, now: datetime | None = None,
    conversions: Iterable[Path] = (),
) -> GcReport:  # fmt: skip
    """Remove (``dry_run``: only list) the orphans older than ``older_than`` at ``now``
    (default: this machine's clock); ``conversions``: this machine's unfinished float
    conversions (folders), judged by the same age."""
    now_s = (now or datetime.now(UTC)).timestamp() - CLOCK_SKEW.total_seconds()
    cutoff = now_s - older_than.total_seconds()
    found = list(_candidates(lake, cutoff, now_s, conversions))
    removed = found if dry_run else [o for o in found if o.remove()]
    return GcReport(dry_run, older_than, sorted(removed, key=lambda o: (o.kind, o.where)))


def _group(lake: Lake, kind: str, where: str, objects: list[ObjectInfo], cutoff: float):
    """The objects as one orphan, when every one of them is older than the cutoff."""
    if objects and max(o.mtime for o in objects) < cutoff:
        store = lake.store

        def remove() -> bool:
            for o in objects:
                store.delete(o.key)
            return True

        yield Orphan(kind, where, sum(o.size for o in objects), remove)


def _candidates(lake: Lake, cutoff: float, now_s: float, conversions: Iterable[Path]):
    store = lake.store
    for version in lake.model_versions():
        model = lake.model(version)
        published = model.lineage().get("attempt")
        attempts: dict[str, list[ObjectInfo]] = {}
        for o in store.list(model.key(model.ATTEMPTS)):
            attempts.setdefault(o.key[len(model.key(model.ATTEMPTS)) :].split("/")[0], []).append(o)
        for attempt, objects in attempts.items():
            if attempt != published:
                where = model.attempt(attempt).uri()
                yield from _group(lake, "training-attempt", where, objects, cutoff)
        engine = model.engine()
        gate = engine.gate()
        for attempt in engine.attempts() if gate and gate.get("attempt") else []:
            if attempt != gate.get("attempt"):
                prefix = engine.attempt_prefix(attempt)
                yield from _group(lake, "int8-attempt", store.uri_for(prefix.rstrip("/")),
                                  list(store.list(prefix)), cutoff)  # fmt: skip
        checkpoints = model.checkpoints()
        yield from _group(lake, "checkpoints", checkpoints.uri(),
                          list(store.list(checkpoints.prefix)), cutoff)  # fmt: skip
    for run in lake.score_runs():
        side = set(run.losing_side_files())
        for o in store.list(run.prefix) if side else []:
            if o.key[len(run.prefix) :] in side:
                yield from _group(lake, "score-side-file", store.uri_for(o.key), [o], cutoff)
        for folder, objects in run.stale_generations().items():
            where = store.uri_for(run.key(folder).rstrip("/"))
            yield from _group(lake, "generation", where, objects, cutoff)
    for holder in lake.claim_holders():
        for name, o in holder.claim_objects().items():
            yield from _lapsed_claim(holder, name, o, cutoff, now_s)
    for o in store.temp_files():  # (a drop's hidden files are the user's)
        if o.mtime < cutoff and not o.key.startswith(lake.drops_prefix()):
            yield Orphan("temp-file", store.uri_for(o.key), o.size,
                         lambda key=o.key: store.remove_temp(key))  # fmt: skip
    for folder in conversions:
        yield from _conversion(folder, cutoff)


def _lapsed_claim(holder, name: str, info: ObjectInfo, cutoff: float, now_s: float):
    """A claim older than the cutoff and past its own lifetime; removed only if it is
    still the version that was judged (a takeover since keeps it)."""
    if info.mtime >= cutoff:
        return
    found = holder.read_claim(name)
    if found is None or not claim_lapsed(found[0], now_s - info.mtime):
        return

    def remove() -> bool:
        again = holder.read_claim(name)
        if again is None or again[1] != found[1]:
            return False
        holder.drop_claim(name)
        return True

    yield Orphan("claim", holder.store.uri_for(info.key), info.size, remove)


def _conversion(folder: Path, cutoff: float):
    files = [Path(d) / n for d, _, names in os.walk(folder) for n in names]
    stats = [p.lstat() for p in files] + [folder.lstat()]
    if max(s.st_mtime for s in stats) < cutoff:
        yield Orphan("float-conversion", str(folder), sum(s.st_size for s in stats[:-1]),
                     lambda: shutil.rmtree(folder, ignore_errors=True) or True)  # fmt: skip
