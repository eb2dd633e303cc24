"""Work pools and deployments on a Prefect server (PREFECT_API_URL), from files in git."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOLS = {"cpu": "process-cpu.json", "gpu": "process-gpu.json"}


def apply_pools(pools: dict[str, str] | None = None) -> dict[str, str]:
    """Create or update each work pool from its base job template in infra/work-pools/."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    done = {}
    with get_client(sync_client=True) as client:
        for name, file in (pools or POOLS).items():
            template = json.loads((REPO / "infra" / "work-pools" / file).read_text())
            try:
                client.read_work_pool(name)
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
                done[name] = "updated"
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type="process", base_job_template=template)
                )
                done[name] = "created"
    return done


def deploy_all(checkout: Path = REPO, api_url: str | None = None) -> str:
    """`prefect deploy --all` from prefect.yaml, with workers pulling from ``checkout``."""
    env = os.environ | {"VGGPRICE_CHECKOUT": str(checkout)}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    prefect = Path(sys.executable).with_name("prefect")
    out = subprocess.run(
        [str(prefect), "--no-prompt", "deploy", "--all"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed: {(out.stderr or out.stdout)[-2000:]}")
    return out.stdout


def worker_command(pool: str, limit: int | None = None) -> list[str]:
    """``prefect worker start`` for a process pool; ``limit``: flow runs at a time."""
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect), "worker", "start", "--pool", pool, "--type", "process"]
    return cmd + (["--limit", str(limit)] if limit else [])


def render_job_template(template: dict, values: dict | None = None):
    """A base job template's job_configuration with its placeholders filled from the
    variables' defaults (and ``values``): what a worker would start, for checking."""
    import re

    props = template["variables"]["properties"]
    given = {k: v.get("default") for k, v in props.items()} | (values or {})
    whole = re.compile(r"^\{\{\s*(\w+)\s*\}\}$")
    part = re.compile(r"\{\{\s*(\w+)\s*\}\}")

    def fill(node):
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, str):
            m = whole.match(node)
            if m:
                return given.get(m.group(1))
            return part.sub(lambda m: str(given.get(m.group(1), "")), node)
        return node

    return fill(template["job_configuration"])


def apply_automations(notify_block_id: str) -> list[str]:
    """Create (or replace, by name) the automations in infra/automations/, sending
    their notifications through the given notification block."""
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
