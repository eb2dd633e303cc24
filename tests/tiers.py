"""Every test's tier, as a pytest marker: `unit`, `integration` or `system`
(docs/testing.md says what each may use and how to run one).

A test's tier is the highest of two:

- the table below: its own entry in TESTS (file, then test function name) or else its
  file's in FILES. A test in neither fails the collection, naming it; so does an entry
  naming a file or a test function that no longer exists;
- what it uses, which the table cannot lower: a fixture of NEEDS or the `s3` case of
  `store_uri` makes it at least integration, a marker of MARKERS what that says.

tests/conftest.py marks each collected test (`pytest -m unit` picks a tier) and runs
every unit test under `unit_guard`: a unit test that starts a process, listens on a
socket or fits a Keras model fails, saying to move it to integration. These are guards
around the test, not stand-ins for the project's code: nothing it calls is replaced.
"""

from __future__ import annotations

import ast
import contextlib
import os
import socket
import subprocess
import sysconfig
import traceback
from pathlib import Path

import pytest

UNIT, INTEGRATION, SYSTEM = "unit", "integration", "system"
TIERS = {  # lowest first
    UNIT: "plain functions on the local store and tiny arrays: no process, server or fit",
    INTEGRATION: "an S3 endpoint, a Prefect server, tiny trainings, subprocesses",
    SYSTEM: "deployed workers, Docker, the whole pipeline, real data",
}

# Each file's tier: its tests' unless TESTS names them. A new test file goes here.
FILES: dict[str, str] = {
    "test_arrivals.py": INTEGRATION,
    "test_catalog.py": UNIT,
    "test_catalog_growth.py": INTEGRATION,
    "test_cli.py": INTEGRATION,  # the CLI in a subprocess
    "test_console.py": INTEGRATION,
    "test_dataset.py": UNIT,
    "test_deployed.py": SYSTEM,
    "test_docker.py": SYSTEM,
    "test_docs.py": UNIT,
    "test_drop_names.py": UNIT,
    "test_engines.py": INTEGRATION,
    "test_faultproxy.py": INTEGRATION,
    "test_fencing.py": INTEGRATION,
    "test_flows_ingest_label.py": INTEGRATION,
    "test_frozen_engine.py": INTEGRATION,  # OpenVINO's convert_model sends telemetry from a process
    "test_floors.py": UNIT,
    "test_generations.py": UNIT,
    "test_gc.py": UNIT,
    "test_hostile.py": UNIT,
    "test_iam.py": INTEGRATION,
    "test_infra.py": INTEGRATION,  # a Prefect server, checkov, hadolint, bash
    "test_labels.py": UNIT,
    "test_lake.py": UNIT,
    "test_lockdown.py": INTEGRATION,
    "test_mlflow.py": INTEGRATION,
    "test_model_writes.py": INTEGRATION,
    "test_own_process.py": INTEGRATION,  # pytest sessions that start pytest processes
    "test_prices.py": UNIT,
    "test_realdata.py": SYSTEM,
    "test_registry.py": UNIT,
    "test_scale.py": INTEGRATION,
    "test_schedules.py": INTEGRATION,  # a Prefect server (`api`); croniter's import runs `file`
    "test_scoring.py": UNIT,
    "test_storage.py": UNIT,
    "test_tiers.py": UNIT,
    "test_training.py": UNIT,
    "test_ui_capture.py": UNIT,
    "test_warm_start.py": INTEGRATION,  # trains
}

# Tests whose tier is not their file's, by file and test function name.
TESTS: dict[str, dict[str, str]] = {
    "test_arrivals.py": {"test_notify_needs_a_prefect_api": UNIT},
    "test_catalog.py": {"test_bad_rows_fail_in_one_line_and_write_nothing": INTEGRATION},  # a run
    "test_console.py": {"test_two_stores_never_share_an_artifact_key": UNIT},
    "test_frozen_engine.py": {"test_runner_choice_and_its_errors": UNIT},
    "test_gc.py": {"test_cli_gc": INTEGRATION},
    "test_hostile.py": {  # tests/programs/peak.py in a subprocess
        "test_extreme_images_stay_within_memory": INTEGRATION,
        "test_huge_file_is_rejected_from_its_size_unread": INTEGRATION,
    },
    "test_infra.py": {
        "test_every_template_is_accounted_for": UNIT,
        "test_helm_values_name_the_kubernetes_pool_and_leave_its_template_alone": UNIT,
        "test_compose_and_helm_run_the_bridge": UNIT,
        "test_score_drop_trigger_starts_a_run_per_drop_with_the_events_parameters": UNIT,
        "test_terraform_scales_from_zero_on_schedule_and_boots_the_right_disk": UNIT,
        "test_terraform_notifies_a_queue_of_drops_for_the_bridge": UNIT,
    },
    "test_mlflow.py": {"test_uris_lose_their_credentials": UNIT},
    "test_registry.py": {"test_processes_promote_at_once": INTEGRATION},
    "test_training.py": {"test_fused_rmsprop_matches_keras_rmsprop": INTEGRATION},  # a fit
}

# Fixtures (or the fixtures they use) that make a test at least integration.
NEEDS: dict[str, str] = {
    "s3_endpoint": INTEGRATION,  # moto's server
    "prefect_server": INTEGRATION,
    "prefect_api": INTEGRATION,
    "tiny_lake": INTEGRATION,  # a training, in a subprocess
    "pytester": INTEGRATION,
}
MARKERS: dict[str, str] = {
    "own_process": INTEGRATION,
    "deployed": SYSTEM,
    "docker": SYSTEM,
    "realdata": SYSTEM,
}


def _highest(*tiers: str) -> str:
    return max(tiers, key=list(TIERS).index)


def stale_entries(tests_dir: Path, files=FILES, tests=TESTS) -> list[str]:
    """Table entries naming a file or a test function that does not exist."""
    problems = []
    for name in sorted(files.keys() | tests.keys()):
        path = tests_dir / name
        if not path.is_file():
            problems.append(f"{name}: no such test file")
            continue
        if name not in files:
            problems.append(f"{name}: named in TESTS but not in FILES")
        tree = ast.parse(path.read_text(), filename=str(path))
        defined = {
            n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        missing = [t for t in tests.get(name, {}) if t not in defined]
        problems += [f"{name}::{t}: no such test function" for t in missing]
    return problems


def tier_for(
    file: str, function: str, fixtures, markers, params: dict, files=FILES, tests=TESTS
) -> str | None:
    """The tier of test ``function`` of ``file`` (relative to tests/), which uses
    ``fixtures`` (all, the fixtures' own included), has ``markers`` and, where it is
    parametrized, ``params``; None when the table names neither it nor its file."""
    table = tests.get(file, {}).get(function) or files.get(file)
    if table is None:
        return None
    used = [t for f, t in NEEDS.items() if f in fixtures]
    used += [t for m, t in MARKERS.items() if m in markers]
    if params.get("store_uri") == "s3":
        used.append(INTEGRATION)
    return _highest(table, *used)


def tier_of(item: pytest.Item, tests_dir: Path) -> str | None:
    """`tier_for` a collected test."""
    inside = item.path.is_relative_to(tests_dir)
    callspec = getattr(item, "callspec", None)
    return tier_for(
        item.path.relative_to(tests_dir).as_posix() if inside else str(item.path),
        getattr(item, "originalname", item.name),
        item.fixturenames,
        {m.name for m in item.iter_markers()},
        callspec.params if callspec is not None else {},
    )


def mark_tiers(items: list[pytest.Item], tests_dir: Path) -> None:
    """Each item marked with its tier; pytest.UsageError naming every test without one
    and every stale entry of the table."""
    problems = stale_entries(tests_dir)
    for item in items:
        tier = tier_of(item, tests_dir)
        if tier is None:
            problems.append(f"{item.nodeid}: no tier")
        else:
            item.add_marker(tier)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise pytest.UsageError(
            f"tests/tiers.py: every test needs one tier, and the table names only what exists:\n"
            f"{lines}\n— add the file to FILES (or the test to TESTS) in tests/tiers.py, or remove the entry"
        )


def _caller() -> str:
    """Where the refused call came from: the innermost frame outside the standard library."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(stdlib):
            return f"{frame.filename}:{frame.lineno}"
    return "the test"


class UnitTierError(RuntimeError):
    """A unit test did what only an integration test may."""


@contextlib.contextmanager
def unit_guard(violations: list[str]):
    """While in the block: starting a process, listening on a socket or fitting a Keras
    model raises UnitTierError, and each attempt is added to ``violations`` (so that one
    the code under test catches still fails the test)."""

    def refuse(what: str):
        def refused(*args, **kwargs):
            message = (f"unit tests {what} ({_caller()} tried): move this test to "
                       "integration in tests/tiers.py")  # fmt: skip
            violations.append(message)
            raise UnitTierError(message)

        return refused

    import _posixsubprocess
    import multiprocessing.process

    patch = pytest.MonkeyPatch()
    with contextlib.suppress(ImportError):  # first: importing TensorFlow may start a process
        import keras

        patch.setattr(keras.Model, "fit", refuse("train no model"))
    processes = refuse("start no process")
    patch.setattr(subprocess.Popen, "__init__", processes)
    patch.setattr(multiprocessing.process.BaseProcess, "start", processes)
    patch.setattr(_posixsubprocess, "fork_exec", processes)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            patch.setattr(os, name, processes)
    patch.setattr(socket.socket, "listen", refuse("start no server"))
    try:
        yield
    finally:
        patch.undo()
