"""Nightly retraining of catalog lines: one schedule per line on the one ``retrain-catalog``
deployment, each carrying its line's parameters (source, prices, name, settings, store).

A line's schedule has the slug ``catalog-<name>``, so scheduling a line again replaces its
schedule, and other lines' schedules (and the deployment's own) are left alone.
`prefect deploy` keeps them too: prefect.yaml gives ``retrain-catalog`` no ``schedules``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

CATALOG_DEPLOYMENT = "catalog/retrain-catalog"  # flow name / deployment name (prefect.yaml)
DEFAULT_CRON = "0 3 * * *"
DEFAULT_TIMEZONE = "UTC"
SLUG_PREFIX = "catalog-"


def schedule_slug(name: str) -> str:
    """The slug of a line's schedule on the retrain-catalog deployment."""
    return SLUG_PREFIX + name


def cron_schedule(cron: str, timezone: str = DEFAULT_TIMEZONE):
    """Prefect's cron schedule for ``cron`` in ``timezone``; a ValueError in one line
    naming the bad expression or zone."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as err:
        field = err.errors()[0]["loc"][0]
        if field == "timezone":
            raise ValueError(f"--timezone {timezone!r} is not a time zone: use an IANA name "
                             "such as UTC or Europe/Berlin") from None  # fmt: skip
        raise ValueError(f"--cron {cron!r} is not a cron expression: five fields, minute hour "
                         'day-of-month month day-of-week, e.g. "0 3 * * *"') from None  # fmt: skip


def next_run(
    cron: str, timezone: str = DEFAULT_TIMEZONE, after: datetime | None = None
) -> datetime:
    """When a schedule of ``cron`` in ``timezone`` next runs (after ``after``, default now),
    by Prefect's own scheduling rules."""
    from prefect.server.schemas.schedules import CronSchedule

    schedule = CronSchedule(cron=cron, timezone=timezone)
    return asyncio.run(schedule.get_dates(n=1, start=after))[0]


def catalog_parameters(
    name: str, source: str, prices: str, store: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """The parameters of a line's scheduled run of catalog_flow."""
    return {"source": source, "prices": prices, "name": name, "store": store,
            "settings": settings}  # fmt: skip


def _deployment(client, deployment: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        raise ValueError(f"no deployment {deployment} on the Prefect API — run vggprice deploy "
                         "(PREFECT_API_URL names the server)") from None  # fmt: skip


def _line_schedules(client, deployment_id) -> dict[str, Any]:
    """{line: schedule} for the catalog lines scheduled on a deployment."""
    return {
        s.slug[len(SLUG_PREFIX) :]: s
        for s in client.read_deployment_schedules(deployment_id)
        if s.slug and s.slug.startswith(SLUG_PREFIX)
    }


def schedule_catalog(
    name: str,
    parameters: dict[str, Any],
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    deployment: str = CATALOG_DEPLOYMENT,
) -> dict[str, Any]:
    """Put line ``name``'s one schedule on the retrain-catalog deployment: created, or the
    line's existing schedule replaced (cron, time zone, parameters; active again)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    from tasks.store.lake import check_line_name

    check_line_name(name)
    schedule = cron_schedule(cron, timezone)
    slug = schedule_slug(name)
    with get_client(sync_client=True) as client:
        found = _deployment(client, deployment)
        existing = _line_schedules(client, found.id).get(name)
        if existing is None:
            create = DeploymentScheduleCreate(schedule=schedule, active=True, parameters=parameters,
                                              slug=slug)  # fmt: skip
            try:
                client.create_deployment_schedules(found.id, [create])
            except httpx.HTTPStatusError:  # another deployer created it first: replace it
                existing = _line_schedules(client, found.id).get(name)
                if existing is None:
                    raise
        if existing is not None:
            client.update_deployment_schedule(found.id, existing.id, active=True,
                                              schedule=schedule, parameters=parameters)  # fmt: skip
    return {
        "deployment": deployment,
        "line": name,
        "slug": slug,
        "cron": cron,
        "timezone": timezone,
        "next_run": next_run(cron, timezone).isoformat(),
        "replaced": existing is not None,
        "parameters": parameters,
    }


def unschedule_catalog(name: str, deployment: str = CATALOG_DEPLOYMENT) -> dict[str, Any]:
    """Delete line ``name``'s schedule from the retrain-catalog deployment (the others
    stay); a ValueError naming the scheduled lines when it has none."""
    from prefect.client.orchestration import get_client

    from tasks.store.lake import check_line_name

    check_line_name(name)
    with get_client(sync_client=True) as client:
        found = _deployment(client, deployment)
        lines = _line_schedules(client, found.id)
        if name not in lines:
            known = ", ".join(sorted(lines)) or "none"
            raise ValueError(f"line {name!r} has no schedule on {deployment} (scheduled lines: "
                             f"{known}) — nothing removed")  # fmt: skip
        client.delete_deployment_schedule(found.id, lines[name].id)
    return {"deployment": deployment, "line": name, "removed": schedule_slug(name)}
