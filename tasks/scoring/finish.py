"""Finishing a drop, once per plan generation: when every shard has its part, one scorer
(holding the finishing claim, kept alive by a heartbeat like a shard's) re-reads the
plans (a later plan means a later generation to finish: ``PlansChanged``), moves rows
that a later plan re-priced (an object overwritten in place) into
``superseded.parquet``, so the parts keep exactly one current row per key; then writes
``rejected.parquet`` and, last, ``_manifest.json`` with the counts, the drift check and
which scorer priced each shard, by compare-and-swap: a manifest that already covers the
same or a later plan wins, so ``last_plan`` never goes down (``publish``).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.runtime import get_logger
from tasks.scoring.ledger import (
    WATCH,
    ClaimWatch,
    Heartbeat,
    Lease,
    ShardGivenUp,
    current_shards,
    scorer_name,
    take_claim,
)
from tasks.scoring.shard import _ROW, _STAMP, REJECTED_SCHEMA
from tasks.store.lake import Lake, ScoreRun
from tasks.store.storage import ObjectInfo

SUPERSEDED_SCHEMA = pa.schema(
    [*_ROW, ("shard", pa.string()), ("price", pa.float64()), ("reason", pa.string()), *_STAMP]
)


DRIFT_FRACTION = 0.2  # flag a drop when more than this share looks unlike training
MAX_MANIFEST_RACES = 50


class PlansChanged(RuntimeError):
    """A plan newer than the ones this finisher was given exists: list and plan again."""


def _superseded(run: ScoreRun, plans: dict[int, dict]) -> dict[str, set[str]]:
    """shard -> object keys in it that a later plan re-priced."""
    current = current_shards(plans)
    stale: dict[str, set[str]] = {}
    for n in plans:
        for shard, entries in plans[n]["shards"].items():
            for key, _ in entries:
                if current[key][1] != shard:
                    stale.setdefault(shard, set()).add(key)
    return stale


def _move_superseded(
    run: ScoreRun, plans: dict[int, dict], attempts: dict[str, Any], lease: Lease
) -> int:
    """Rows of re-priced objects out of their older shard, into superseded.parquet:
    afterwards the parts hold exactly one current row per key. The superseded rows are
    stored before any part is rewritten, and stored once per (key, shard): a finisher
    that crashed half-way and is run again loses and duplicates nothing."""
    moved, rewrites = [], []
    for shard, keys in sorted(_superseded(run, plans).items()):
        attempt = attempts[shard]
        for table, write, value in (
            (run.part(shard), run.write_part, "price"),
            (
                run.shard_rejections(shard, attempt),
                lambda s, t, a=attempt: run.write_shard_rejections(s, a, t),
                "reason",
            ),
        ):
            stale = np.isin(np.asarray(table["object"].to_pylist(), dtype=object), list(keys))
            if not stale.any():
                continue
            old = table.filter(pa.array(stale))
            other = "reason" if value == "price" else "price"
            old = old.append_column("shard", pa.array([shard] * old.num_rows, pa.string()))
            old = old.append_column(
                other, pa.nulls(old.num_rows, SUPERSEDED_SCHEMA.field(other).type)
            )
            moved.append(old.select(SUPERSEDED_SCHEMA.names).cast(SUPERSEDED_SCHEMA))
            rewrites.append((write, shard, table.filter(pa.array(~stale))))
    if not moved:
        return 0
    earlier = run.superseded()
    rows = pa.concat_tables(([earlier] if earlier is not None else []) + moved)
    seen, keep = set(), []
    for pair in zip(rows["key"].to_pylist(), rows["shard"].to_pylist(), strict=True):
        keep.append(pair not in seen)
        seen.add(pair)
    lease.check()
    run.write_superseded(rows.filter(pa.array(keep)))
    for write, shard, table in rewrites:
        lease.check()
        write(shard, table)
    return sum(t.num_rows for t in moved)


def finish(
    run: ScoreRun, plans: dict[int, dict], listing: list[ObjectInfo], skipped: int,
    timings: dict, seconds: float = 90.0, watch: ClaimWatch | None = None,
) -> dict | None:  # fmt: skip
    """The drop's outputs, once per plan generation: None while another scorer holds the
    finishing claim (or this one lost it). Raises PlansChanged when a later plan than
    ``plans`` holds exists. ``seconds``: the finishing claim's lifetime."""
    last = max(plans)
    found = run.manifest()
    if found is not None and found.get("last_plan", 0) >= last:
        return found | {"skipped": True}
    watch = watch or WATCH
    name, owner = run.finish_name(last), scorer_name()
    with Heartbeat(run, seconds, watch.clock) as heartbeat:
        since = watch.clock()
        claim_id = take_claim(run, name, owner, seconds, watch)
        if claim_id is None:
            return None
        lease = heartbeat.hold(name, claim_id, since)
        try:
            if max(run.plans()) > last:
                raise PlansChanged(f"{run.uri(run.MARKER)}: plans after {last} exist")
            done = sorted(run.done_shards())
            attempts = {s: run.attempt(s) for s in done}
            moved = _move_superseded(run, plans, attempts, lease)
            rejected = pa.concat_tables(
                [REJECTED_SCHEMA.empty_table()]
                + [run.shard_rejections(s, attempts[s]) for s in done]
            )
            lease.check()
            run.write_rejected(rejected)
            manifest = summarise(run, plans, done, rejected, listing, skipped, moved, attempts)
            manifest |= {"timings": timings, "completed_at": datetime.now(UTC).isoformat()}
            lease.check()
            return publish(run, manifest, claim_id)
        except ShardGivenUp as why:
            get_logger().warning("%s: stopped finishing %s: %s", owner, run.uri(run.MARKER), why)
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


def summarise(run: ScoreRun, plans, done, rejected, listing, skipped, moved, attempts) -> dict:
    """The manifest's body: counts, reasons, price quantiles, drift, who scored what
    (the facts of each shard's winning attempt)."""
    facts = run.shard_facts(attempts)
    priced = run.read_tables([run.part_name(s) for s in done], ["price"])
    prices = priced["price"].to_numpy() if priced is not None else np.zeros(0)
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
        "parts": [run.part_name(s) for s in done],
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
