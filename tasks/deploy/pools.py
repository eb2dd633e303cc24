"""Work pools and deployments on a Prefect server (PREFECT_API_URL), from files in git.

One work pool per worker type, each created from its own base job template
``infra/work-pools/<pool>.json``. The deployments in ``prefect.yaml`` go to a cpu-role and
a gpu-role pool named at deploy time; every flow run, wherever it runs, works in the
vggprice checkout its own Python imports (``enter_checkout``, the pull step).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POOL_DIR = REPO / "infra" / "work-pools"

# pool -> (worker type, the most flow runs at once on the pool; None: no limit). Kubernetes
# and ECS workers let go of a run once its Job or task exists, so a worker's --limit does
# not bound their GPU jobs; the pool's limit does.
POOLS: dict[str, tuple[str, int | None]] = {
    "cpu": ("process", None),
    "gpu": ("process", None),
    "cpu-docker": ("docker", None),
    "gpu-docker": ("docker", None),
    "gpu-k8s": ("kubernetes", 2),
    "gpu-ecs": ("ecs", 2),
}


def pool_kind(pool: str) -> str:
    """The worker type of a pool vggprice knows; ValueError naming them for another."""
    if pool not in POOLS:
        raise ValueError(f"unknown work pool {pool!r}: one of {', '.join(POOLS)}")
    return POOLS[pool][0]


def pool_template(pool: str) -> dict:
    """The base job template of a pool, from infra/work-pools/<pool>.json."""
    return json.loads((POOL_DIR / f"{pool}.json").read_text())


def apply_pools(names: list[str] | None = None) -> dict[str, str]:
    """Create or update each pool with its own type, template and concurrency limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    for name in names or []:
        pool_kind(name)
    done = {}
    with get_client(sync_client=True) as client:
        for name in names or POOLS:
            kind, limit = POOLS[name]
            template = pool_template(name)
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type=kind, base_job_template=template, concurrency_limit=limit
                    )
                )
                done[name] = "created"
                continue
            if pool.type != kind:
                raise ValueError(
                    f"work pool {name!r} is a {pool.type} pool, not {kind}: another tool made "
                    f"it; delete it (prefect work-pool delete {name}) and apply again"
                )
            client.update_work_pool(
                name, WorkPoolUpdate(base_job_template=template, concurrency_limit=limit)
            )
            done[name] = "updated"
    return done


def deploy_all(
    checkout: Path = REPO,
    api_url: str | None = None,
    cpu_pool: str = "cpu",
    gpu_pool: str = "gpu",
    cpu_image: str | None = None,
    gpu_image: str | None = None,
) -> str:
    """`prefect deploy --all` from prefect.yaml: the cpu-role deployments on ``cpu_pool``,
    train and the gpu scorers on ``gpu_pool``, each with the image for a container pool
    (default: the pool's own default image). prefect.yaml reads all four from the
    environment at deploy time."""
    env = os.environ | {
        "VGGPRICE_CPU_POOL": cpu_pool,
        "VGGPRICE_GPU_POOL": gpu_pool,
        "VGGPRICE_CPU_IMAGE": _image_for(cpu_pool, cpu_image),
        "VGGPRICE_GPU_IMAGE": _image_for(gpu_pool, gpu_image),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    prefect = Path(sys.executable).with_name("prefect")
    out = subprocess.run(
        [str(prefect), "--no-prompt", "deploy", "--all"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed: {(out.stderr or out.stdout)[-2000:]}")
    return out.stdout


def _image_for(pool: str, image: str | None) -> str:
    """The image a pool's deployments name: given, else the pool's default ('' for
    process pools, which run no image)."""
    if pool_kind(pool) == "process":
        return ""
    image = image or pool_template(pool)["variables"]["properties"]["image"].get("default")
    if not image:
        raise ValueError(f"work pool {pool!r} needs an image: your registry's tag of "
                         "infra/docker/Dockerfile.gpu (vggprice deploy --gpu-image ...)")  # fmt: skip
    return image


def worker_command(pool: str, limit: int | None = None) -> list[str]:
    """``prefect worker start`` for a pool, with the pool's worker type; ``limit``: flow
    runs at a time."""
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect), "worker", "start", "--pool", pool, "--type", pool_kind(pool)]
    return cmd + (["--limit", str(limit)] if limit else [])


def enter_checkout() -> dict[str, str]:
    """The pull step of every deployment (prefect.yaml), run by each flow run where it
    runs: work in the vggprice checkout that this Python imports (the editable install of
    a checkout's .venv, /opt/vggprice in the images), so the entrypoints resolve there."""
    if not (REPO / "flows").is_dir() or not (REPO / "prefect.yaml").is_file():
        raise FileNotFoundError(
            f"{REPO} is not a vggprice checkout: install vggprice editable (scripts/bootstrap)"
        )
    os.chdir(REPO)
    return {"directory": str(REPO)}


def apply_automations(notify_block_id: str) -> list[str]:
    """Create (or replace, by name) the automations in infra/automations/; those that
    notify send through the given notification block."""
    from prefect.automations import Automation

    names = []
    for path in sorted((REPO / "infra" / "automations").glob("*.json")):
        text = path.read_text().replace("{{ notify_block_id }}", notify_block_id)
        automation = Automation.model_validate(json.loads(text))
        with contextlib.suppress(ValueError):  # ValueError: not there yet
            Automation.read(name=automation.name).delete()
        automation.create()
        names.append(automation.name)
    return names
