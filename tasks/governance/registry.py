"""The model registry: which model version serves, and the champion/challenger gate."""

from __future__ import annotations

import time
import uuid

from prefect import task

from tasks.governance import tracking
from tasks.governance.evaluation import TestImages, evaluate, gate_images, read_metrics
from tasks.reports import emit, line_key, publish_markdown
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.store.lake import Lake, NotInLake, line_of

MARGIN = 0.01  # a challenger must beat the champion's RMSE by this fraction
BASELINE_MARGIN = 0.05  # ... and always the mean-price baseline's RMSE by this fraction
MAX_RACES = 20  # re-decide this often when other promotions keep winning
RECENT = 32  # promotion ids the pointer remembers, newest first


class LineError(ValueError):
    """Which model line to score with is unknown or ambiguous (the message lists them)."""


def resolve_champion(lake: Lake, line: str | None) -> dict:
    """The champion of the line named, or of the store's only line; LineError when the
    line has none or several lines need a choice (the message lists them)."""
    if line:
        champion = lake.registry(line).champion()
        if champion is None:
            raise LineError(f"no model line {line!r} with a champion in {lake.uri} "
                            f"(lines: {', '.join(lake.lines()) or 'none'})")  # fmt: skip
        return champion
    champions = lake.champions()
    if len(champions) > 1:
        raise LineError(f"{lake.uri} holds several model lines ({', '.join(champions)}): "
                        "pass --line NAME")  # fmt: skip
    if not champions:
        raise NotInLake(f"no champion in {lake.uri}: train and promote a model (vggprice run)")
    return next(iter(champions.values()))


def resolve_model(lake: Lake, model_version: str | None, line: str | None = None) -> str:
    """A pinned model version, or the champion of the line (see resolve_champion)."""
    if model_version:
        lake.model(model_version).lineage()  # complete, or NotInLake listing the known
        return model_version
    return resolve_champion(lake, line)["model_version"]


def decide(
    challenger_rmse: float,
    champion_rmse: float | None,
    margin: float,
    baseline_rmse: float | None = None,
) -> tuple[bool, str]:
    """Promote when the challenger beats the mean-price baseline (always predicting the
    mean train price) by more than ``BASELINE_MARGIN``, and there is no champion or the
    challenger's RMSE is lower than the champion's by more than ``margin`` (a fraction:
    0.01 = 1 %) on the same labels. A model that learned nothing never serves, not even
    as the first champion."""
    if baseline_rmse is not None:
        floor = baseline_rmse * (1 - BASELINE_MARGIN)
        if not challenger_rmse < floor:
            return False, (
                f"RMSE {challenger_rmse:.3f} does not beat the mean-price baseline's "
                f"{baseline_rmse:.3f} by more than {BASELINE_MARGIN:.0%} (needs < {floor:.3f}): "
                "train longer or on more images, or promote it anyway with --force"
            )
    if champion_rmse is None:
        return True, "no champion yet"
    bar = champion_rmse * (1 - margin)
    if challenger_rmse < bar:
        return True, (
            f"RMSE {challenger_rmse:.3f} beats the champion's {champion_rmse:.3f} "
            f"by more than {margin:.1%}"
        )
    return False, (
        f"RMSE {challenger_rmse:.3f} does not beat the champion's {champion_rmse:.3f} "
        f"by more than {margin:.1%} (needs < {bar:.3f})"
    )


def _summary(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    keys = ("rmse", "baseline_rmse", "mae", "mape", "mse_scaled", "noise_floor_rmse", "n",
            "labels_version", "images")  # fmt: skip
    return {k: metrics[k] for k in keys if k in metrics}


def _metrics_on(lake: Lake, mv: str, labels_version: str, images: TestImages | None = None
                ) -> dict:  # fmt: skip
    if images is None:
        return read_metrics(lake, mv, labels_version) or evaluate(lake, mv, labels_version)
    return evaluate(lake, mv, labels_version, images=images)


def promote(
    lake: Lake, model_version: str, margin: float = MARGIN, force: bool = False,
    tracking_uri: str | None = None,
) -> dict:  # fmt: skip
    """Gate a challenger against the champion; record the decision either way.

    The pointer is swapped only if it is still the one the decision was made against
    (compare-and-swap); when another promotion got there first the gate runs again
    against the new champion. The pointer names this promotion, so a write whose
    response was lost is recognised as this promotion's own success. Right after the
    decision is recorded, a ``tracking_uri``'s registry is brought up to date with the
    line (registered versions, the champion and challenger aliases)."""
    lineage = lake.model(model_version).lineage()
    labels_version = lineage["labels_version"]
    challenger = _metrics_on(lake, model_version, labels_version)
    line = line_of(lineage["dataset_version"])  # each model line has its own champion
    registry = lake.registry(line)
    promotion_id = uuid.uuid4().hex
    for _ in range(MAX_RACES):
        champion, token = registry.champion_versioned()
        same = champion is not None and champion["model_version"] == model_version
        champion_metrics, compared = None, challenger
        if champion is not None and not same:
            # The same labelled images for both, which neither trained on: the
            # challenger's test split less the champion's own train split.
            images, overlap = gate_images(lake, model_version, champion["model_version"])
            champion_metrics = _metrics_on(lake, champion["model_version"], labels_version,
                                           images)  # fmt: skip
            if overlap:
                compared = _metrics_on(lake, model_version, labels_version, images)
        if same:
            promoted, reason = False, "already the champion"
        elif force:
            promoted, reason = True, "forced by a person (--force)"
        else:
            promoted, reason = decide(
                compared["rmse"],
                champion_metrics["rmse"] if champion_metrics else None,
                margin,
                compared.get("baseline_rmse"),
            )
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if not promoted:
            break
        pointer = {
            "model_version": model_version,
            "line": line,
            "dataset_version": lineage["dataset_version"],
            "labels_version": labels_version,
            "metrics": _summary(challenger),
            "promoted_at": now,
            "reason": reason,
            "forced": force,
            "promotion_id": promotion_id,
            "replaced": champion["model_version"] if champion else None,
            # Every pointer carries the ids of the promotions before it, so a write whose
            # response was lost is recognised even after later promotions replaced it.
            "recent_promotions": [promotion_id, *(champion or {}).get("recent_promotions", [])][
                :RECENT
            ],
        }
        if registry.swap_champion(pointer, token):
            break
        current = registry.champion() or {}
        if promotion_id in current.get("recent_promotions", []):
            break  # our write was applied; only its response was lost
        get_logger().info("another promotion changed the champion meanwhile; deciding again")
    else:
        raise RuntimeError(f"{model_version}: the champion kept changing; promote again")
    decision = {
        "time": now,
        "promotion_id": promotion_id,
        "challenger": {"model_version": model_version, "metrics": _summary(compared)},
        "champion": (
            {"model_version": champion["model_version"], "metrics": _summary(champion_metrics)}
            if champion
            else None
        ),
        "labels_version": labels_version,
        "line": line,
        "margin": margin,
        "forced": force,
        "promoted": promoted,
        "reason": reason,
    }
    ns = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns / 1e9)) + f"-{ns % 10**9:09d}"
    registry.record_decision(stamp, model_version, decision)
    tracking.record_line(tracking_uri, lake, line)  # MLflow follows the lake, never leads
    get_logger().info(
        "%s %s: %s", model_version, "promoted" if promoted else "not promoted", reason
    )
    key = line_key(lake.uri, line, "champion")
    publish_markdown(key, decision_markdown(decision), f"champion/challenger decision ({line})")
    if not promoted and not same:
        emit("vggprice.challenger.rejected", f"vggprice.model.{model_version}", decision)
    return decision


def decision_markdown(d: dict) -> str:
    def rmse(side: dict | None) -> str:
        m = (side or {}).get("metrics") or {}
        return f"{m['rmse']:.3f}" if "rmse" in m else "-"

    champ = d["champion"]["model_version"] if d["champion"] else "(none)"
    verdict = "**promoted**" if d["promoted"] else "**kept the champion**"
    return f"""# Champion/challenger: {verdict}

| | model | test RMSE on `{d["labels_version"]}` |
| --- | --- | --- |
| challenger | `{d["challenger"]["model_version"]}` | {rmse(d["challenger"])} |
| champion | `{champ}` | {rmse(d["champion"])} |

Reason: {d["reason"]} (margin {d["margin"]:.1%}{", forced" if d["forced"] else ""}).
"""


@task(name="promote-model", **TASK_RETRIES)
def promote_model(
    store_uri: str, model_version: str, margin: float = MARGIN, force: bool = False,
    tracking_uri: str | None = None,
):  # fmt: skip
    """The champion/challenger gate as a task."""
    from tasks.store.storage import open_store

    return promote(Lake(open_store(store_uri)), model_version, margin, force, tracking_uri)
