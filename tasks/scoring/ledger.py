"""The ledger of a drop's scoring, kept in the store (``lake.ScoreRun``): numbered plans
that split the listed objects into shards, which scorers then share out by the claims
of ``tasks.store.claims`` (one scorer at a time on each shard).

- **Plans.** The drop is listed as (key, ETag) and every object not yet in a plan (or
  whose ETag changed since) goes into the next numbered plan, split into shards. A plan
  is created with a conditional write, so two scorers that list at once cannot both plan
  the same objects; the plan names its writer, so a create whose response was lost is
  recognised.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from tasks.data.images import DEFAULT_MAX_PIXELS
from tasks.store.lake import ScoreRun
from tasks.store.storage import ObjectInfo

MAX_PLAN_RACES = 50


@dataclass(frozen=True)
class ScoreOptions:
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    engine: str = "auto"  # auto, keras or openvino (tasks/scoring/engines.py)
    precision: str = "auto"  # auto, float32, bf16 or int8 (openvino only)
    batch_size: int = 256
    claim_seconds: float = 90.0  # a claim unchanged for this long is taken over
    wait: bool = True  # wait for shards that live scorers hold; else stop and say so
    max_bytes: int = 50 * 1024 * 1024  # larger objects are rejected from their size, unread
    max_rows_per_object: int = 10_000  # a Parquet object with more rows is rejected whole
    # A shard not finished within base + per object (or per image, when a Parquet file
    # holds more images than the shard has objects) is given up and released.
    shard_base_seconds: float = 600.0
    shard_seconds_per_object: float = 2.0
    # The int8 gate: int8's RMSE (price units, on the model's test images) may exceed
    # float32's by the larger of this fraction of it and this many price units.
    int8_max_drop_fraction: float = 0.02
    int8_max_drop_price: float = 0.5
    int8_calibration_images: int = 300  # a seeded sample of the model's train split
    int8_validation_images: int | None = 2000  # of its test split (None: all of it)


class DropBusy(RuntimeError):
    """Live scorers hold every shard left and the run was told not to wait."""


class DropError(ValueError):
    """The drop does not exist or holds nothing to price; nothing was written."""


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
