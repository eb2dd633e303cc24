"""The model registry: which model version serves, and the champion/challenger gate."""

from __future__ import annotations

import time

from prefect import task

from tasks.evaluation import evaluate, read_metrics
from tasks.reports import emit, publish_markdown
from tasks.runtime import TASK_RETRIES, get_logger
from tasks.storage import (
    CHAMPION_KEY,
    DECISIONS_PREFIX,
    ObjectNotFound,
    Store,
    model_prefix,
    open_store,
)


def read_champion(store: Store) -> dict | None:
    try:
        return store.get_json(CHAMPION_KEY)
    except ObjectNotFound:
        return None


def decide(challenger_rmse: float, champion_rmse: float | None, margin: float) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger's RMSE is lower than the
    champion's by more than ``margin`` (a fraction: 0.01 = 1 %) on the same labels."""
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
    keys = ("rmse", "mae", "mape", "mse_scaled", "noise_floor_rmse", "n", "labels_version")
    return {k: metrics[k] for k in keys if k in metrics}


def promote(store: Store, model_version: str, margin: float = 0.01, force: bool = False) -> dict:
    """Gate a challenger against the champion; record the decision either way."""
    lineage = store.get_json(model_prefix(model_version) + "lineage.json")
    labels_version = lineage["labels_version"]
    challenger = read_metrics(store, model_version) or evaluate(store, model_version)
    champion = read_champion(store)
    same = champion is not None and champion["model_version"] == model_version
    champion_metrics = None
    if champion is not None and not same:
        # Compare on the same labels: re-evaluate the champion on the challenger's.
        champion_metrics = read_metrics(
            store, champion["model_version"], labels_version
        ) or evaluate(store, champion["model_version"], labels_version)
    if same:
        promoted, reason = False, "already the champion"
    elif force:
        promoted, reason = True, "forced by a person (--force)"
    else:
        promoted, reason = decide(
            challenger["rmse"], champion_metrics["rmse"] if champion_metrics else None, margin
        )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    decision = {
        "time": now,
        "challenger": {"model_version": model_version, "metrics": _summary(challenger)},
        "champion": (
            {"model_version": champion["model_version"], "metrics": _summary(champion_metrics)}
            if champion
            else None
        ),
        "labels_version": labels_version,
        "margin": margin,
        "forced": force,
        "promoted": promoted,
        "reason": reason,
    }
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}"
    store.put_json(f"{DECISIONS_PREFIX}{stamp}-{model_version}.json", decision)
    if promoted:
        store.put_json(  # a single atomic write: readers see the old pointer or the new
            CHAMPION_KEY,
            {
                "model_version": model_version,
                "dataset_version": lineage["dataset_version"],
                "labels_version": labels_version,
                "metrics": _summary(challenger),
                "promoted_at": now,
                "reason": reason,
                "forced": force,
            },
        )
    get_logger().info(
        "%s %s: %s", model_version, "promoted" if promoted else "not promoted", reason
    )
    publish_markdown("champion", decision_markdown(decision), "champion/challenger decision")
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
def promote_model(store_uri: str, model_version: str, margin: float = 0.01, force: bool = False):
    """The champion/challenger gate as a task."""
    return promote(open_store(store_uri), model_version, margin, force)
