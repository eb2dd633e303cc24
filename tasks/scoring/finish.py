"""Finishing a drop, once per plan generation: when every shard has its part, one scorer
(holding the finishing claim ``finish-<last plan>``, kept alive by a heartbeat like a
shard's) re-reads the plans (a later plan means a later generation to finish:
``PlansChanged``) and publishes the drop's outputs.

**Nothing a finisher writes can be another generation's.** The parts and each shard's
rejections are written once, by their scorer, and never rewritten. A finisher writes
its outputs under a folder of its own, ``_generations/<last plan>-<claim id>/``: a copy
of each part that holds rows a later plan re-priced (an object overwritten in place),
without them; ``rejected.parquet`` (the current rejections); ``superseded.parquet`` (the
older rows, with those of earlier generations, once per (key, shard)). Last it writes
``_manifest.json``, which names exactly the objects it covers (``parts``, ``rejected``,
``superseded``), by compare-and-swap: a manifest that already covers the same or a later
plan wins, so ``last_plan`` never goes down (``publish``). A finisher paused between
reading and writing that wakes after a newer generation was finished writes only into
its own folder, which no manifest names; readers read what the newest manifest names
(manifests from before they named ``rejected`` and ``superseded``: the fixed names).

**Nothing is taken from a listing.** The finisher reads every planned shard's part by
its name (a listing may lag) and checks that the current rows account for every listed
object, none twice; otherwise it leaves the drop unfinished, with one log line saying
why, for the next run.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.runtime import get_logger
from tasks.scoring.ledger import current_shards
from tasks.scoring.shard import _ROW, _STAMP, REJECTED_SCHEMA
from tasks.store.claims import WATCH, ClaimWatch, Heartbeat, ShardGivenUp, take_claim, worker_name
from tasks.store.lake import Lake, ScoreRun, parquet_bytes
from tasks.store.storage import ObjectInfo, ObjectNotFound

SUPERSEDED_SCHEMA = pa.schema(
    [*_ROW, ("shard", pa.string()), ("price", pa.float64()), ("reason", pa.string()), *_STAMP]
)


DRIFT_FRACTION = 0.2  # flag a drop when more than this share looks unlike training
MAX_MANIFEST_RACES = 50


class PlansChanged(RuntimeError):
    """A plan newer than the ones this finisher was given exists: list and plan again."""


def read_parts(run: ScoreRun, plans: dict[int, dict]) -> tuple[dict[str, pa.Table], list[str]]:
    """Every planned shard's part, read by its name (not from a listing, which may lag),
    and the planned shards that have none."""
    parts, missing = {}, []
    for shard in sorted(s for plan in plans.values() for s in plan["shards"]):
        try:
            parts[shard] = run.part(shard)
        except ObjectNotFound:
            missing.append(shard)
    return parts, missing


def _attempt(part: pa.Table) -> str | None:
    """The attempt the part names (None: a part from before attempts)."""
    value = (part.schema.metadata or {}).get(ScoreRun.ATTEMPT)
    return value.decode() if value else None


def _as_superseded(rows: pa.Table, shard: str, value: str) -> pa.Table:
    other = "reason" if value == "price" else "price"
    rows = rows.append_column("shard", pa.array([shard] * rows.num_rows, pa.string()))
    rows = rows.append_column(other, pa.nulls(rows.num_rows, SUPERSEDED_SCHEMA.field(other).type))
    return rows.select(SUPERSEDED_SCHEMA.names).cast(SUPERSEDED_SCHEMA)


def current_rows(
    run: ScoreRun, plans: dict[int, dict], parts: dict[str, pa.Table]
) -> tuple[dict[str, pa.Table], pa.Table, pa.Table]:
    """Split the parts and the shards' rejections by the plans: (shard -> its current
    priced rows, the current rejections, the superseded rows). An object's current rows
    are those of its latest planned shard; the superseded rows include those an earlier
    finisher stored (``run.superseded``), once per (key, shard)."""
    current = current_shards(plans)
    priced, rejected, moved = {}, [REJECTED_SCHEMA.empty_table()], []
    for shard, part in parts.items():
        rejections = run.shard_rejections(shard, _attempt(part))
        for table, value in ((part, "price"), (rejections, "reason")):
            keep = pa.array([current[o][1] == shard for o in table["object"].to_pylist()],
                            pa.bool_())  # fmt: skip
            if value == "price":
                priced[shard] = table.filter(keep)
            else:
                rejected.append(table.filter(keep))
            moved.append(_as_superseded(table.filter(pc.invert(keep)), shard, value))
    earlier = run.superseded()
    rows = pa.concat_tables([SUPERSEDED_SCHEMA.empty_table()] + moved
                            + ([earlier.cast(SUPERSEDED_SCHEMA)] if earlier is not None else []))  # fmt: skip
    seen, keep = set(), []
    for pair in zip(rows["key"].to_pylist(), rows["shard"].to_pylist(), strict=True):
        keep.append(pair not in seen)
        seen.add(pair)
    return priced, pa.concat_tables(rejected), rows.filter(pa.array(keep, pa.bool_()))


def unaccounted(
    listing: list[ObjectInfo], priced: list[pa.Table], rejected: pa.Table
) -> str | None:
    """Why the current rows do not add up to the listing (a row key twice, or a listed
    object with no row; a Parquet object may hold no images), or None."""
    tables = [*priced, rejected]
    keys = Counter(k for t in tables for k in t["key"].to_pylist())
    twice = sorted(k for k, n in keys.items() if n > 1)
    if twice:
        return f"{len(twice)} rows twice in the parts and rejections (first: {twice[0]})"
    objects = {o for t in tables for o in t["object"].to_pylist()}
    lost = [o.key for o in listing
            if o.key not in objects and not o.key.lower().endswith(".parquet")]  # fmt: skip
    if lost:
        return f"{len(lost)} of {len(listing)} listed objects have no row (first: {lost[0]})"
    return None


def write_generation(
    run: ScoreRun, folder: str, parts: dict[str, pa.Table], priced: dict[str, pa.Table],
    rejected: pa.Table, superseded: pa.Table,
) -> dict:  # fmt: skip
    """This finisher's outputs, under ``folder`` only (a part without superseded rows is
    named as it is); the names the manifest gives them."""
    names = []
    for shard, rows in sorted(priced.items()):
        name = run.part_name(shard)
        if rows.num_rows != parts[shard].num_rows:
            name = folder + name
            run.put_bytes(name, parquet_bytes(rows))  # keeps the metadata naming the attempt
        names.append(name)
    rejected_name = run.generation_table(folder, "rejected")
    superseded_name = run.generation_table(folder, "superseded") if superseded.num_rows else None
    run.put_bytes(rejected_name, parquet_bytes(rejected))
    if superseded_name:
        run.put_bytes(superseded_name, parquet_bytes(superseded))
    return {"parts": names, "rejected": rejected_name, "superseded": superseded_name}


def finish(
    run: ScoreRun, plans: dict[int, dict], listing: list[ObjectInfo], skipped: int,
    timings: dict, seconds: float = 90.0, watch: ClaimWatch | None = None,
) -> dict | None:  # fmt: skip
    """The drop's outputs, once per plan generation: None while another scorer holds the
    finishing claim (or this one lost it), or when the parts do not add up yet (logged:
    the next run finishes). Raises PlansChanged when a later plan than ``plans`` holds
    exists. ``seconds``: the finishing claim's lifetime."""
    last = max(plans)
    found = run.manifest()
    if found is not None and found.get("last_plan", 0) >= last:
        return found | {"skipped": True}
    watch = watch or WATCH
    name, owner = run.finish_name(last), worker_name()
    log = get_logger()
    with Heartbeat(run, seconds, watch.clock) as heartbeat:
        since = watch.clock()
        claim_id = take_claim(run, name, owner, seconds, watch)
        if claim_id is None:
            return None
        lease = heartbeat.hold(name, claim_id, since)
        try:
            if max(run.plans()) > last:
                raise PlansChanged(f"{run.uri(run.MARKER)}: plans after {last} exist")
            parts, missing = read_parts(run, plans)
            if not missing:
                priced, rejected, superseded = current_rows(run, plans, parts)
            why = (f"{len(missing)} planned shards have no part (first: {missing[0]})"
                   if missing else unaccounted(listing, list(priced.values()), rejected))  # fmt: skip
            if why:
                log.warning("%s: left %s unfinished for the next run: %s", owner,
                            run.uri(run.MARKER), why)  # fmt: skip
                return None
            if max(run.plans()) > last:  # (a newer generation: nothing of ours is needed)
                raise PlansChanged(f"{run.uri(run.MARKER)}: plans after {last} exist")
            lease.check()
            folder = run.generation(last, claim_id)
            names = write_generation(run, folder, parts, priced, rejected, superseded)
            manifest = summarise(run, plans, priced, rejected, listing, skipped,
                                 superseded.num_rows, {s: _attempt(p) for s, p in parts.items()})  # fmt: skip
            manifest |= names | {"timings": timings, "completed_at": datetime.now(UTC).isoformat()}
            lease.check()
            published = publish(run, manifest, claim_id)
            if published["skipped"]:  # a manifest of the same or a later plan won
                run.store.delete_prefix(run.key(folder))  # ours: no manifest names it
            return published
        except ShardGivenUp as why:
            log.warning("%s: stopped finishing %s: %s", owner, run.uri(run.MARKER), why)
            return None
        finally:
            heartbeat.release(name)


def publish(run: ScoreRun, manifest: dict, writer: str) -> dict:
    """Write the manifest by compare-and-swap, unless one that covers the same or a
    later plan is there (it wins: ``last_plan`` never goes down). The manifest written
    or found, with ``skipped`` (True: another finisher's). ``writer`` names ours, so a
    write whose answer was lost is recognised."""
    manifest = manifest | {"finisher": writer}
    for _ in range(MAX_MANIFEST_RACES):
        found = run.manifest_versioned()
        if found is not None and found[0].get("last_plan", 0) >= manifest["last_plan"]:
            theirs = found[0]
            if theirs.get("finisher") != writer:
                get_logger().info("%s: kept the manifest of plan %s (ours covers plan %s)",
                                  run.uri(run.MARKER), theirs.get("last_plan"), manifest["last_plan"])  # fmt: skip
            return theirs | {"skipped": theirs.get("finisher") != writer}
        if run.replace_manifest(manifest, found[1] if found is not None else None):
            return manifest | {"skipped": False}
    raise RuntimeError(
        f"{run.uri(run.MARKER)}: other finishers kept writing the manifest; run again"
    )


def summarise(run: ScoreRun, plans, priced, rejected, listing, skipped, moved, attempts) -> dict:
    """The manifest's body: counts, reasons, price quantiles, drift, who scored what
    (the facts of each shard's winning attempt). ``priced``: shard -> its current rows;
    ``moved``: the superseded rows."""
    facts = run.shard_facts(attempts)
    done = sorted(priced)
    prices = np.concatenate([np.zeros(0)] + [priced[s]["price"].to_numpy() for s in done])
    stats = Lake(run.store).model(run.model_version).config().get("train_stats", {})
    n = len(prices)
    reasons = Counter(r.split(":")[0] for r in rejected["reason"].to_pylist())
    pixel_out = sum(facts[s]["pixel_out_of_range"] for s in done if s in facts)
    price_out = int(
        (
            (prices < stats.get("price_p01", -np.inf)) | (prices > stats.get("price_p99", np.inf))
        ).sum()
    )
    drift = {
        "pixel_out_of_range_fraction": pixel_out / n if n else 0.0,
        "price_out_of_range_fraction": price_out / n if n else 0.0,
        "pixel_mean": sum(facts[s]["pixel_mean_sum"] for s in done if s in facts) / n
        if n
        else None,
        "train_pixel_mean": stats.get("pixel_mean"),
        "price_mean": float(prices.mean()) if n else None,
        "train_price_mean": stats.get("price_mean"),
    }
    worst = max(drift["pixel_out_of_range_fraction"], drift["price_out_of_range_fraction"])
    # None: the model recorded no training statistics, so there is nothing to compare.
    drift["flagged"] = bool(worst > DRIFT_FRACTION) if stats else None
    quantiles = {f"p{p}": float(np.percentile(prices, p)) for p in (5, 25, 50, 75, 95)} if n else {}
    scorers = {s: facts[s]["scorer"] for s in done if s in facts}
    return {
        "drop_id": run.drop_id,
        "model_version": run.model_version,
        "counts": {"listed": len(listing), "priced": n, "rejected": rejected.num_rows},
        "skipped_keys": skipped,
        "superseded_rows": moved,
        "rejections": dict(reasons),
        "prices": {"quantiles": quantiles, "mean": float(prices.mean()) if n else None},
        "drift": drift,
        "listing": [[o.key, o.size, o.etag] for o in listing],
        "last_plan": max(plans),
        "scorers": scorers,
        "scorer_counts": dict(Counter(scorers.values())),
        # which engine/precision priced how many shards (facts from before engines: keras)
        "engines": dict(
            Counter(
                f"{facts[s].get('engine', 'keras')}/{facts[s].get('precision', 'auto')}"
                for s in done
                if s in facts
            )
        ),  # fmt: skip
        # and why each was the one (``auto``'s choice, a gate's verdict)
        "engine_reasons": {
            f"{facts[s]['engine']}/{facts[s]['precision']}": facts[s]["engine_reason"]
            for s in done
            if s in facts and facts[s].get("engine_reason")
        },
    }
