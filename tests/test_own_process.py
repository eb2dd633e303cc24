"""The own-process runner (tests/own_process.py) in pytester sessions of its own: marked
tests run in fresh pytest processes, a few at a time, and their results come back as if
they had run in place, also when a child dies, leaves half a report, or cannot start.

The sessions run the small test files of tests/programs/own_process_cases (no TensorFlow):
each test there writes the pid of the process it ran in to a file named after it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.own_process import BATCH, REPORTS
from tests.programs.own_process_cases.common import OUT

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
CASES = Path(__file__).with_name("programs") / "own_process_cases"
INI = """[pytest]
markers =
    own_process: runs in a fresh pytest process
    cannot_start: its batch's prepare step fails
"""


@pytest.fixture
def session(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A pytester directory with the runner in its conftest.py; ``session(case, ...)``
    copies case files in as test_<case>.py; ``session.pids`` are the pids by test."""
    out = tmp_path / "pids"
    out.mkdir()
    monkeypatch.setenv(OUT, str(out))
    monkeypatch.delenv(REPORTS, raising=False)  # this is the parent, not a child
    # The children run in pytester's directory: they import tests.* from this checkout.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("COLUMNS", "400")  # summary lines whole, not cut to 80 columns
    pytester.makeini(INI)
    pytester.makeconftest((CASES / "plugin.py").read_text())

    class Session:
        def run(self, *cases: str) -> pytest.RunResult:
            for case in cases:
                pytester.makepyfile(**{f"test_{case}": (CASES / f"{case}.py").read_text()})
            return pytester.runpytest("-p", "no:cacheprovider")

        @property
        def pids(self) -> dict[str, int]:
            return {p.name: int(p.read_text()) for p in out.iterdir()}

    return Session()


def assert_no_internal_error(result: pytest.RunResult) -> None:
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text, text


def test_marked_tests_run_in_fresh_processes_a_batch_at_a_time(session):
    result = session.run("batches")
    result.assert_outcomes(passed=6, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: the child's own assertion*",
            "FAILED test_batches.py::test_marked_fails*",
        ]
    )
    pids = session.pids
    assert pids["in-place"] == os.getpid(), "an unmarked test runs in place"
    first = {pids[f"marked-{n}"] for n in range(BATCH)}
    second = {pids["marked-4"], pids["marked-fails"]}
    assert len(first) == 1 and len(second) == 1, pids
    assert len(first | second | {os.getpid()}) == 3, "two children, neither this process"
    assert_no_internal_error(result)


@pytest.mark.parametrize(("death", "status"), [("exit", "3"), ("segv", "-11")])
def test_a_child_that_dies_fails_the_tests_it_did_not_finish(session, monkeypatch, death, status):
    monkeypatch.setenv("OWN_PROCESS_DEATH", death)
    result = session.run("crashing")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            f"FAILED test_crashing.py::test_dies - the tests' own process ended with status {status} *",
            f"FAILED test_crashing.py::test_after - the tests' own process ended with status {status} *",
        ]
    )
    pids = session.pids
    assert "after" not in pids, "the child was gone before test_after"
    assert pids["before"] == pids["dies"] != os.getpid()
    assert pids["in-place-after"] == os.getpid(), "the session went on"
    assert_no_internal_error(result)


def test_a_report_line_cut_short_is_dropped(session):
    result = session.run("cut_short")
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["FAILED test_cut_short.py::test_cut - the tests' own process ended with status 1 *"]
    )
    assert_no_internal_error(result)


def test_a_batch_that_cannot_start_fails_its_tests_and_the_session_goes_on(session):
    result = session.run("cannot_start", "starts")
    result.assert_outcomes(passed=2, failed=2)
    cannot = "the tests' own process could not run: RuntimeError: the server did not start"
    result.stdout.fnmatch_lines_random(
        [
            f"FAILED test_cannot_start.py::test_needs_a_server - {cannot}",
            f"FAILED test_cannot_start.py::test_same_batch - {cannot}",
        ]
    )
    pids = session.pids
    assert "needs-a-server" not in pids and "same-batch" not in pids, "no child started"
    assert pids["marked-elsewhere"] != os.getpid(), "the next batch ran in a child"
    assert pids["in-place-elsewhere"] == os.getpid()
    assert_no_internal_error(result)
