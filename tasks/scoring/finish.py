"""Finishing a drop, once per plan generation: when every shard has its part, one scorer
(holding the finishing claim) moves rows that a later plan re-priced (an object
overwritten in place) into ``superseded.parquet``, so the parts keep exactly one current
row per key; then writes ``rejected.parquet`` and, last, ``_manifest.json`` with the
counts, the drift check and which scorer priced each shard.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from tasks.scoring.ledger import current_shards, release_claim, scorer_name, take_claim
from tasks.scoring.shard import _ROW, _STAMP, REJECTED_SCHEMA
from tasks.store.lake import Lake, ScoreRun
from tasks.store.storage import ObjectInfo

SUPERSEDED_SCHEMA = pa.schema(
    [*_ROW, ("shard", pa.string()), ("price", pa.float64()), ("reason", pa.string()), *_STAMP]
)


DRIFT_FRACTION = 0.2  # flag a drop when more than this share looks unlike training


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


def _move_superseded(run: ScoreRun, plans: dict[int, dict]) -> int:
    """Rows of re-priced objects out of their older shard, into superseded.parquet:
    afterwards the parts hold exactly one current row per key. The superseded rows are
    stored before any part is rewritten, and stored once per (key, shard): a finisher
    that crashed half-way and is run again loses and duplicates nothing."""
    moved, rewrites = [], []
    for shard, keys in sorted(_superseded(run, plans).items()):
        for table, write, value in (
            (run.part(shard), run.write_part, "price"),
            (run.shard_rejections(shard), run.write_shard_rejections, "reason"),
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
    run.write_superseded(rows.filter(pa.array(keep)))
    for write, shard, table in rewrites:
        write(shard, table)
    return sum(t.num_rows for t in moved)


def finish(
    run: ScoreRun, plans: dict[int, dict], listing: list[ObjectInfo], skipped: int, timings: dict
) -> dict | None:
    """The drop's outputs, once per plan generation: None while another scorer holds the
    finishing claim."""
    last = max(plans)
    manifest = run.manifest()
    if manifest is not None and manifest.get("last_plan") == last:
        return manifest | {"skipped": True}
    name = run.finish_name(last)
    claim_id = take_claim(run, name, scorer_name(), 600)
    if claim_id is None:
        return None
    try:
        moved = _move_superseded(run, plans)
        done = sorted(run.done_shards())
        rejected = pa.concat_tables(
            [REJECTED_SCHEMA.empty_table()] + [run.shard_rejections(s) for s in done]
        )
        run.write_rejected(rejected)
        manifest = summarise(run, plans, done, rejected, listing, skipped, moved)
        manifest |= {"timings": timings, "completed_at": datetime.now(UTC).isoformat()}
        run.write_manifest(manifest)
        return manifest | {"skipped": False}
    finally:
        release_claim(run, name, claim_id)


def summarise(run: ScoreRun, plans, done, rejected, listing, skipped, moved) -> dict:
    """The manifest's body: counts, reasons, price quantiles, drift, who scored what."""
    facts = run.shard_facts()
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
    }
