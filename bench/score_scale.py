"""Scoring spread over scorers: one drop priced by 1 and 2 local scorer processes, and by
the work-pool fan-out with 1 and 2 workers, against bare Keras predict in the same run.

Prints images/s for each, the ratio to bare ``model.predict`` on the decoded array,
and the per-partition overhead: seconds from a scorer's launch to its first shard
priced (process start, imports, model load, one shard; for the pool also the
worker's pickup and the flow run's start). On a 2-core machine two scorers cannot be twice as fast:
the point is that the overhead is small and the work spreads.

    .venv/bin/python bench/score_scale.py [--images 4000] [--shard-size 250] [--no-pool]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import prepared_store
from PIL import Image

from tasks.data.loading import load_data
from tasks.governance.registry import promote
from tasks.model.export import load_stored_model, predict_prices
from tasks.model.train_settings import TrainSettings
from tasks.model.training import train
from tasks.scoring.finish import finish
from tasks.scoring.ledger import plan_work
from tasks.scoring.runner import list_drop, locate_drop
from tasks.store.lake import Lake

REPO = Path(__file__).resolve().parents[1]
SCORER = """
import sys
from tasks.store.lake import Lake
from tasks.scoring.runner import ScoreOptions, locate_drop, work
from tasks.store.storage import open_store
lake = Lake(open_store(sys.argv[1]))
run = lake.score_run(sys.argv[2], sys.argv[3])
work(run, locate_drop(lake, sys.argv[2]), ScoreOptions(shard_size=int(sys.argv[4]),
     precision="float32", claim_seconds=60), int(sys.argv[5]))
"""


def overheads(lake: Lake, drop: str, mv: str, launched: float) -> list[float]:
    """Per scorer: seconds from the launch to its first shard priced (process start,
    imports, model load, and that shard's own work)."""
    first: dict[str, float] = {}
    for facts in lake.score_run(drop, mv).shard_facts().values():
        done = facts["started"] + facts["seconds"]
        first[facts["scorer"]] = min(first.get(facts["scorer"], 1e18), done)
    return sorted(t - launched for t in first.values())


def local_processes(lake: Lake, drop: str, mv: str, n: int, shard_size: int) -> tuple:
    """n scorer processes (one predict thread each), then the finishing step."""
    run, source = lake.score_run(drop, mv), locate_drop(lake, drop)
    listing, skipped = list_drop(lake, source)
    plans = plan_work(run, listing, shard_size)
    # The cores are shared between the scorers, as `vggprice score --workers N` does.
    env = os.environ | {"TF_NUM_INTRAOP_THREADS": str(max(1, len(os.sched_getaffinity(0)) // n))}
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", SCORER, lake.uri, drop, mv, str(shard_size),
                               str(i)], cwd=REPO, env=env) for i in range(n)]  # fmt: skip
    for p in procs:
        assert p.wait() == 0
    manifest = finish(run, plans, listing, skipped, {"seconds": time.time() - t0})
    return time.time() - t0, manifest, overheads(lake, drop, mv, t0)


def pool_fan_out(lake: Lake, drop: str, n: int, shard_size: int, api: str) -> tuple:
    """score-drop on the cpu pool fanning out n partitions on the gpu pool (n workers)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.deploy.pools import worker_command

    threads = str(max(1, len(os.sched_getaffinity(0)) // n))  # the cores shared, as above
    env = os.environ | {"PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1",
                        "TF_NUM_INTRAOP_THREADS": threads}  # fmt: skip
    workers = [subprocess.Popen(worker_command(p, 1), env=env | {"VGGPRICE_WORKER_NAME": f"w{i}"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for i, p in enumerate(["cpu"] + ["gpu"] * n)]  # fmt: skip
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            time.sleep(3)  # the workers register before the clock starts
            t0 = time.time()
            parent = run_deployment(
                "score-drop/score-drop",
                parameters={"drop": drop, "store": lake.uri, "score_pool": "gpu",
                            "partitions": n, "shard_size": shard_size, "precision": "float32"},
                timeout=1800, poll_interval=1,
            )  # fmt: skip
            seconds = time.time() - t0
            assert parent.state.is_completed(), parent.state
            with get_client(sync_client=True) as client:
                children = [r for r in client.read_flow_runs() if r.parent_task_run_id
                            and r.expected_start_time.timestamp() >= t0 - 1]  # fmt: skip
            launched = min(r.expected_start_time.timestamp() for r in children)
    finally:
        for w in workers:
            w.terminate()
            w.wait()
    mv = lake.registry().champion()["model_version"]
    return seconds, lake.score_run(drop, mv).manifest(), overheads(lake, drop, mv, launched)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--no-pool", action="store_true", help="skip the work-pool fan-out")
    args = ap.parse_args()
    lake, dv, lv, what = prepared_store()
    settings = TrainSettings(weights="none", freeze=15, epochs=1, views=1, train_limit=500,
                             test_limit=args.images)  # fmt: skip
    mv = train(lake, dv, lv, settings)["model_version"]
    promote(lake, mv, force=True)  # a bench model need not beat the mean-price baseline
    images = load_data(lake, dv, lv, {"test": args.images}, 0).test.images
    drops = ["p1", "p2"] + ([] if args.no_pool else ["f1", "f2"])
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        for drop in drops:
            lake.store.put_bytes(f"drops/{drop}/img-{i:06d}.png", buf.getvalue())
    n = len(images)
    print(f"{what}: {n} PNG images of 28x28 per drop, shards of {args.shard_size}, "
          f"model {mv} (48x48 VGG16), float32")  # fmt: skip

    model = load_stored_model(lake.model(mv))
    predict_prices(model, images[:256])
    t0 = time.time()
    predict_prices(model, images)
    bare = time.time() - t0
    print(f"bare keras predict on the decoded array   {n / bare:8.1f} images/s")

    def show(label: str, seconds: float, manifest: dict, over: list[float]) -> None:
        assert manifest["counts"]["priced"] == n, manifest["counts"]
        spread = sorted(manifest["scorer_counts"].values())
        print(f"{label:40s}  {n / seconds:8.1f} images/s  ratio {bare / seconds:5.2f}x  "
              f"overhead {', '.join(f'{o:.1f}' for o in over)} s  shards/scorer {spread}")  # fmt: skip

    for k in (1, 2):
        show(
            f"{k} local scorer process(es)", *local_processes(lake, f"p{k}", mv, k, args.shard_size)
        )
    if args.no_pool:
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.deploy.pools import apply_pools, deploy_all
    from tests.servers import running_prefect_server

    home = Path(tempfile.mkdtemp(prefix="vggprice-bench-prefect-"))
    with running_prefect_server(home) as api:
        with temporary_settings({PREFECT_API_URL: api}):
            apply_pools()
        deploy_all(REPO, api_url=api)
        for k in (1, 2):
            show(
                f"pool fan-out, {k} worker(s)",
                *pool_fan_out(lake, f"f{k}", k, args.shard_size, api),
            )


if __name__ == "__main__":
    main()
