"""The test tiers (tests/tiers.py): every test in exactly one, the table kept to what
exists, and the unit tier's guard."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.tiers import INTEGRATION, SYSTEM, TIERS, UNIT, UnitTierError, tier_for, unit_guard

TESTS_DIR = Path(__file__).resolve().parent


def test_every_collected_test_has_exactly_one_tier(request):
    items = request.session.items
    assert items
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        assert len(tiers) == 1, f"{item.nodeid}: {tiers}"
        if any(item.get_closest_marker(m) for m in ("deployed", "docker", "realdata")):
            assert tiers == [SYSTEM], item.nodeid


def test_the_table_sets_a_floor_that_fixtures_and_markers_raise():
    files = {"test_a.py": UNIT, "test_b.py": INTEGRATION}
    tests = {"test_a.py": {"test_spawns": INTEGRATION}}

    def tier(file, function="test_x", fixtures=(), markers=(), params=None):
        return tier_for(file, function, fixtures, markers, params or {}, files, tests)

    assert tier("test_new.py") is None  # no tier: mark_tiers fails the collection
    assert tier("test_a.py") == UNIT
    assert tier("test_a.py", "test_spawns") == INTEGRATION
    assert tier("test_b.py", fixtures=["tmp_path"]) == INTEGRATION
    for fixture in ("s3_endpoint", "prefect_server", "prefect_api", "tiny_lake"):
        assert tier("test_a.py", fixtures=["tmp_path", fixture]) == INTEGRATION, fixture
    assert tier("test_a.py", fixtures=["store_uri"], params={"store_uri": "local"}) == UNIT
    assert tier("test_a.py", fixtures=["store_uri"], params={"store_uri": "s3"}) == INTEGRATION
    assert tier("test_a.py", markers=["own_process"]) == INTEGRATION
    for marker in ("deployed", "docker", "realdata"):
        assert tier("test_a.py", markers=[marker]) == SYSTEM, marker


def test_stale_entries_are_named(tmp_path):
    from tests.tiers import stale_entries

    (tmp_path / "test_a.py").write_text("def test_here():\n    pass\n")
    files = {"test_a.py": UNIT, "test_gone.py": UNIT}
    tests = {"test_a.py": {"test_here": INTEGRATION, "test_renamed": INTEGRATION}}
    assert stale_entries(tmp_path, files, tests) == [
        "test_a.py::test_renamed: no such test function",
        "test_gone.py: no such test file",
    ]
    assert stale_entries(tmp_path, {"test_a.py": UNIT}, {"test_a.py": {"test_here": UNIT}}) == []
    assert stale_entries(TESTS_DIR) == []  # the real table


def test_the_unit_guard_refuses_processes_servers_and_training():
    import keras

    violations: list[str] = []
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    attempts = {
        "subprocess": lambda: subprocess.run(["true"]),
        "os.system": lambda: os.system("true"),
        "multiprocessing": lambda: (
            multiprocessing.get_context("spawn").Process(target=print).start()
        ),
        "listen": lambda: socket.create_server(("127.0.0.1", 0)),
        "fit": lambda: model.fit(np.zeros((4, 2)), np.zeros((4, 1)), verbose=0),
    }
    with unit_guard(violations):
        for name, attempt in attempts.items():
            with pytest.raises(UnitTierError, match="move this test to integration"):
                attempt()
            assert violations, name
    assert len(violations) == len(attempts)
    assert "start no process" in violations[0] and "train no model" in violations[-1]
    assert "tests/test_tiers.py" in violations[0]  # where the attempt came from
