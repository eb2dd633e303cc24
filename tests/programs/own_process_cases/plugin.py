"""conftest.py of the pytester sessions: the suite's own-process runner, whose prepare step
fails for a batch holding a test marked `cannot_start` (as a Prefect server that does not
start fails the real suite's batch)."""

from __future__ import annotations

import pytest

from tests.own_process import OwnProcessRunner


def prepare(batch: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("cannot_start") for item in batch):
        raise RuntimeError("the server did not start")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(OwnProcessRunner(config, prepare=prepare), "own-process")
