"""A drop's current prices as one table: what ``vggprice prices`` writes.

Every listed object of a drop is in exactly one current row, priced (the parts) or
rejected (each shard's rejections). An object overwritten in place is planned again, and
its row in the newer shard is the current one; the older row is superseded (it stays in
its older part, which is never rewritten, and is left out here). A finished drop is read
as its manifest names it: the parts without superseded rows, the rejections and the
superseded rows of its generation (``finish.py``). So the tables hold one row per image,
finished drop or not, and ``finished`` says whether the manifest covers every plan.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.governance.registry import resolve_model
from tasks.scoring.runner import locate_drop
from tasks.scoring.shard import PRICED_SCHEMA, REJECTED_SCHEMA
from tasks.store.lake import Lake, NotInLake

FORMATS = (".csv", ".parquet")


@dataclass(frozen=True)
class Prices:
    """The current rows of one drop priced by one model version."""

    drop_id: str
    model_version: str
    uri: str  # the scores folder: parts, rejected.parquet, superseded.parquet, manifest
    finished: bool  # the manifest covers every plan
    prices: pa.Table  # a row per image: key, object, price, model_version, scored_at, ...
    rejected: pa.Table  # key, object, reason, model_version, scored_at
    superseded: int  # older rows of re-priced objects, left out


def current_prices(
    lake: Lake, drop: str, model_version: str | None = None, line: str | None = None,
    from_user: bool = False,
) -> Prices:  # fmt: skip
    """The current prices and rejections of ``drop`` (an id under drops/, or, typed by a
    person (``from_user``), the URI a drop was scored from) by ``model_version``
    (default: the line's champion).
    NotInLake, naming what to run, when that model has priced nothing of the drop."""
    mv = resolve_model(lake, model_version, line)
    drop_id = locate_drop(lake, drop, from_user=from_user).drop_id
    run = lake.score_run(drop_id, mv)
    plans = run.plans()
    done = sorted(run.done_shards())
    if not done:
        raise NotInLake(
            f"{run.uri()}: drop {drop_id!r} has no prices by {mv} yet — run "
            f"'vggprice score {drop}" + (f" --model {mv}'" if model_version else "'")
        )
    manifest = run.manifest()
    finished = manifest is not None and manifest.get("last_plan", 0) >= max(plans, default=0)
    if finished and "rejected" in manifest:  # it names exactly the rows it covers
        old = manifest["superseded"]
        return Prices(drop_id, mv, run.uri(), True,
                      _concat(PRICED_SCHEMA, [run.read_tables(manifest["parts"])]),
                      _concat(REJECTED_SCHEMA, [run.read_tables([manifest["rejected"]])]),
                      run.read_tables([old], ["key"]).num_rows if old else 0)  # fmt: skip
    earlier = run.superseded()
    owner = _owners(plans, set(done))
    priced, rejected = [], []
    left_out = set(zip(*(earlier[c].to_pylist() for c in ("key", "shard")), strict=True)) \
        if earlier is not None else set()  # fmt: skip
    for shard in done:
        attempt = run.attempt(shard)
        for table, into in ((run.part(shard), priced),
                            (run.shard_rejections(shard, attempt), rejected)):  # fmt: skip
            objects = np.asarray(table["object"].to_pylist(), dtype=object)
            keep = np.array([owner.get(o) == shard for o in objects], dtype=bool)
            left_out |= {(k, shard) for k in table.filter(pa.array(~keep))["key"].to_pylist()}
            into.append(table.filter(pa.array(keep, pa.bool_())))
    return Prices(
        drop_id=drop_id,
        model_version=mv,
        uri=run.uri(),
        finished=finished,
        prices=_concat(PRICED_SCHEMA, priced),
        rejected=_concat(REJECTED_SCHEMA, rejected),
        superseded=len(left_out),  # each older row once, moved by a finisher or not
    )


def _owners(plans: dict[int, dict], done: set[str]) -> dict[str, str]:
    """object -> the shard whose row is current: its latest planned shard that has a
    part (an object planned again and not yet re-priced keeps its older row)."""
    owner = {}
    for n in sorted(plans):
        for shard, entries in plans[n]["shards"].items():
            if shard in done:
                for key, _ in entries:
                    owner[key] = shard
    return owner


def _concat(schema: pa.Schema, tables: list[pa.Table]) -> pa.Table:
    tables = [t.select(schema.names).cast(schema).replace_schema_metadata(None) for t in tables]
    return pa.concat_tables([schema.empty_table(), *tables]).combine_chunks()


def rejected_path(out: Path) -> Path:
    """Where the rejections go next to ``out``: ``prices.csv`` -> ``prices-rejected.csv``."""
    return out.with_name(f"{out.stem}-rejected{out.suffix}")


def check_out(out: str | Path) -> dict[str, Path]:
    """Where the prices and the rejections go; ValueError naming the file and what to
    do when they cannot go there."""
    out = Path(out).expanduser()
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"{out}: --out must end in .csv or .parquet")
    if not out.parent.is_dir():
        raise ValueError(f"{out}: no directory {out.parent} — create it or pick another --out")
    return {"prices": out, "rejected": rejected_path(out)}


def write_prices(prices: Prices, out: str | Path) -> dict[str, str]:
    """The prices to ``out`` (.csv or .parquet) and the rejections beside it, in the same
    format (``check_out``). Each file is whole or as it was: written to a temporary file
    beside it and then renamed over it."""
    paths = check_out(out)
    for name, table in (("prices", prices.prices), ("rejected", prices.rejected)):
        _write(table, paths[name])
    return {name: str(path) for name, path in paths.items()}


# A text cell starting with one of these runs as a formula when a spreadsheet opens the
# CSV (OWASP's "CSV injection"): such cells get a leading single quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(table: pa.Table) -> pa.Table:
    """``table`` with every text cell that a spreadsheet would run as a formula prefixed
    with ``'``; numbers and other cells as they were."""
    import pyarrow.compute as pc

    columns = []
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            starts = pc.utf8_slice_codeunits(column, 0, 1)
            risky = pc.is_in(starts, value_set=pa.array(FORMULA_STARTS, column.type))
            column = pc.if_else(risky, pc.binary_join_element_wise("'", column, ""), column)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=table.schema)


def _write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # the user's umask
    try:
        if path.suffix.lower() == ".csv":
            import pyarrow.csv as csv

            csv.write_csv(spreadsheet_safe(table), tmp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary(prices: Prices, rows: int = 5) -> dict:
    """What the command prints: where the prices are, the counts, the first rows."""
    p = prices.prices
    head = p.select(["key", "price"]).slice(0, rows).to_pylist()
    reasons = prices.rejected.select(["key", "reason"]).slice(0, rows).to_pylist()
    return {
        "drop_id": prices.drop_id,
        "model_version": prices.model_version,
        "scores_uri": prices.uri,
        "finished": prices.finished,
        "counts": {
            "priced": p.num_rows,
            "rejected": prices.rejected.num_rows,
            "superseded": prices.superseded,
        },  # fmt: skip
        "first_prices": head,
        "first_rejected": reasons,
    }
