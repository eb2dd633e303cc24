"""Nightly retraining of catalog lines, on a real Prefect server: `vggprice deploy --catalog
NAME ...` deploys prefect.yaml and puts one schedule per line, with the line's parameters,
on the retrain-catalog deployment; again for a line replaces its schedule, another line
adds one, a redeploy keeps them, `--remove` deletes one line's; bad input is one line and
writes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from flows.cli import main
from tasks.deploy.schedules import CATALOG_DEPLOYMENT, next_run, schedule_catalog

SOURCE, PRICES = "s3://shop/photos/", "s3://shop/prices.csv"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A Prefect server of this module's own, named to this process and the commands it
    starts (`prefect deploy`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.servers import running_prefect_server

    with (
        running_prefect_server(tmp_path_factory.mktemp("prefect")) as url,
        temporary_settings({PREFECT_API_URL: url}),
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("PREFECT_API_URL", url)
        yield url


def _deploy(capsys, *args: str) -> tuple[int, dict | list[str]]:
    """`vggprice deploy ARGS --json`: (status, its JSON result, or its stderr lines)."""
    capsys.readouterr()
    code = main(["deploy", *args, "--json"])
    out = capsys.readouterr()
    if code:
        return code, [line for line in out.err.splitlines() if line.strip()]
    return code, json.loads(out.out[out.out.index("{") :])


def _line_schedules() -> dict[str, object]:
    """{slug: schedule} of the retrain-catalog deployment, read back from the server."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(CATALOG_DEPLOYMENT)
        return {s.slug: s for s in client.read_deployment_schedules(deployment.id)}


def _server_state() -> dict:
    """Everything a deploy writes: pools, deployments and every deployment's schedules."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {
            "pools": {p.name: p.updated for p in client.read_work_pools()},
            "deployments": {
                d.name: (d.updated, sorted((s.slug or "", s.updated) for s in d.schedules))
                for d in client.read_deployments()
            },
        }


def test_each_line_has_one_schedule_with_its_parameters(api, tmp_path, capsys):
    from prefect.client.orchestration import get_client

    from flows.catalog import catalog_settings
    from tasks.model.train_settings import TrainSettings

    store = tmp_path / "lake"
    code, result = _deploy(capsys, "--catalog", "shoes", "--source", SOURCE, "--prices", PRICES,
                           "--set", "epochs=3", "--store", str(store))  # fmt: skip
    assert code == 0, result
    assert CATALOG_DEPLOYMENT in result["deployments"]
    made = result["schedule"]
    assert (made["deployment"], made["line"]) == (CATALOG_DEPLOYMENT, "shoes")
    assert (made["cron"], made["timezone"], made["replaced"]) == ("0 3 * * *", "UTC", False)
    when = datetime.fromisoformat(made["next_run"])
    assert (when.hour, when.minute, when.utcoffset()) == (3, 0, timedelta(0))
    assert timedelta(0) < when - datetime.now(UTC) <= timedelta(days=1)

    schedules = _line_schedules()
    assert set(schedules) == {"catalog-shoes"}
    shoes = schedules["catalog-shoes"]
    assert (shoes.schedule.cron, shoes.schedule.timezone, shoes.active) == (
        "0 3 * * *",
        "UTC",
        True,
    )
    params = shoes.parameters
    assert {k: params[k] for k in ("source", "prices", "name")} == {
        "source": SOURCE, "prices": PRICES, "name": "shoes"}  # fmt: skip
    assert params["store"] == str(store.resolve())
    # What the scheduled run builds is what `vggprice run --set epochs=3` trains with.
    assert TrainSettings(**params["settings"]) == catalog_settings(epochs=3)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(CATALOG_DEPLOYMENT)
        assert deployment.parameters == {"train_pool": "gpu"}, "the deployment's own kept"
        # The server accepts a run of the deployment with the schedule's parameters.
        run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
        assert run.parameters["settings"]["epochs"] == 3

        client.update_deployment_schedule(deployment.id, shoes.id, active=False)  # paused in the UI

    # Again for the same line: its one schedule replaced (and active again), not a second one.
    code, result = _deploy(capsys, "--catalog", "shoes", "--source", SOURCE, "--prices", PRICES,
                           "--cron", "30 4 * * 1", "--timezone", "Europe/Berlin",
                           "--store", str(store))  # fmt: skip
    assert code == 0, result
    assert result["schedule"]["replaced"] is True
    when = datetime.fromisoformat(result["schedule"]["next_run"]).astimezone(
        ZoneInfo("Europe/Berlin")
    )
    assert (when.weekday(), when.hour, when.minute) == (0, 4, 30)
    schedules = _line_schedules()
    assert set(schedules) == {"catalog-shoes"}
    again = schedules["catalog-shoes"]
    assert again.id == shoes.id
    assert (again.schedule.cron, again.schedule.timezone) == ("30 4 * * 1", "Europe/Berlin")
    assert again.active is True
    assert "epochs" not in again.parameters["settings"], "the new call's settings, not the old"

    # A second line: a second schedule; the redeploy that came with it kept the first.
    code, result = _deploy(capsys, "--catalog", "bags", "--source", "/data/bags",
                           "--prices", "/data/bags.parquet", "--store", str(store))  # fmt: skip
    assert code == 0, result
    schedules = _line_schedules()
    assert set(schedules) == {"catalog-shoes", "catalog-bags"}
    assert schedules["catalog-shoes"].schedule.cron == "30 4 * * 1"
    assert schedules["catalog-bags"].parameters["name"] == "bags"
    assert schedules["catalog-bags"].parameters["source"] == "/data/bags"

    # --remove deletes that line's only, and writes nothing else.
    before = _server_state()
    code, result = _deploy(capsys, "--catalog", "bags", "--remove")
    assert code == 0, result
    assert result == {"deployment": CATALOG_DEPLOYMENT, "line": "bags", "removed": "catalog-bags"}
    assert set(_line_schedules()) == {"catalog-shoes"}
    after = _server_state()
    assert after["pools"] == before["pools"], "--remove deploys nothing"
    assert after["deployments"]["retrain-nightly"] == before["deployments"]["retrain-nightly"]

    code, err = _deploy(capsys, "--catalog", "bags", "--remove")
    assert code == 2 and len(err) == 1, err
    assert (
        "line 'bags' has no schedule on catalog/retrain-catalog (scheduled lines: shoes)" in err[0]
    )


BAD = [
    (("--catalog", "shoes", "--source", SOURCE, "--prices", PRICES, "--cron", "61 3 * * *"),
     "--cron '61 3 * * *' is not a cron expression"),
    (("--catalog", "shoes", "--source", SOURCE, "--prices", PRICES, "--cron", "0 3 * *"),
     "--cron '0 3 * *' is not a cron expression: five fields, minute hour day-of-month month "
     'day-of-week, e.g. "0 3 * * *"'),  # the message whole, its closing quote too
    (("--catalog", "shoes", "--source", SOURCE, "--prices", PRICES, "--timezone", "Mars/Base"),
     "--timezone 'Mars/Base' is not a time zone"),
    (("--catalog", "Shoes!", "--source", SOURCE, "--prices", PRICES),
     "invalid catalog name 'Shoes!'"),
    (("--catalog", "demo", "--source", SOURCE, "--prices", PRICES), "invalid catalog name 'demo'"),
    (("--catalog", "Shoes!", "--remove"), "invalid catalog name 'Shoes!'"),
    (("--catalog", "shoes", "--source", SOURCE, "--prices", PRICES, "--set", "epochs=many"),
     "epochs: Input should be a valid integer"),
    (("--catalog", "shoes", "--source", SOURCE, "--prices", PRICES, "--set", "colour=red"),
     "--set 'colour=red': expected NAME=VALUE with NAME one of"),
    (("--catalog", "shoes", "--source", SOURCE), "a catalog schedule needs --prices too"),
    (("--catalog", "shoes", "--remove", "--source", SOURCE),
     "--remove takes only --catalog NAME, not --source"),
    (("--source", SOURCE, "--cron", "0 1 * * *"), "--source, --cron go with --catalog NAME"),
]  # fmt: skip


BAD_IDS = ["cron-range", "cron-fields", "timezone", "line-name", "line-demo", "remove-line-name",
           "set-value", "set-name", "no-prices", "remove-and-source", "no-catalog"]  # fmt: skip


@pytest.mark.parametrize("args,message", BAD, ids=BAD_IDS)
def test_bad_input_is_one_line_and_writes_nothing(api, tmp_path, capsys, args, message):
    before = _server_state()
    code, err = _deploy(capsys, *args, "--store", str(tmp_path / "lake"))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("vggprice: error: ") and message in err[0], err
    assert _server_state() == before, "nothing is written"
    assert not (tmp_path / "lake").exists()


def test_scheduling_needs_the_deployment(api):
    with pytest.raises(ValueError, match="no deployment catalog/nope on the Prefect API — run "
                                         "vggprice deploy"):  # fmt: skip
        schedule_catalog("shoes", {"name": "shoes"}, deployment="catalog/nope")


def test_next_run_follows_the_cron_in_its_time_zone():
    after = datetime(2026, 3, 28, 4, 0, tzinfo=UTC)  # a Saturday; Berlin moves to CEST next day
    assert next_run("0 3 * * *", "UTC", after) == datetime(2026, 3, 29, 3, 0, tzinfo=UTC)
    berlin = next_run("30 4 * * 1", "Europe/Berlin", after)
    assert berlin == datetime(2026, 3, 30, 4, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    assert berlin.utcoffset() == timedelta(hours=2)
