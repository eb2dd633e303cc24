"""Tests marked `own_process` run, a few at a time, in a fresh pytest process whose reports
come back to this one as pytest-xdist carries them.

TensorFlow keeps native memory from every model.fit of a process (about 100-400 MB a
training, clear_session does not give it back: tensorflow/tensorflow#61791), so the suite's
memory would grow with each fit. The fresh process is started with subprocess (a new
interpreter), never forked from this one, which may have TensorFlow and its threads loaded.

tests/conftest.py registers an `OwnProcessRunner`; tests/test_own_process.py registers one
in pytester's sessions, from a conftest.py of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPORTS = "VGGPRICE_TEST_REPORTS"  # set in an own-process child: where it writes its reports
BATCH = 4  # marked tests per fresh process: ~5 s of start-up against ~0.25 GB a training
MARKER = "own_process"


def in_child() -> bool:
    """Whether this pytest process is an own-process child (it runs its tests in place)."""
    return bool(os.environ.get(REPORTS))


class OwnProcessRunner:
    """The pytest plugin. ``prepare(batch)`` runs in this process before a batch's child
    starts (e.g. a server that must outlive the child); whatever it raises fails the batch's
    tests, not the session."""

    def __init__(
        self,
        config: pytest.Config,
        prepare: Callable[[list[pytest.Item]], None] | None = None,
        batch: int = BATCH,
    ) -> None:
        self.config = config
        self.prepare = prepare
        self.batch = batch
        self.from_child: dict[str, list[pytest.TestReport]] = {}  # not yet shown, by test
        self.sent: set[str] = set()  # tests already run in a child

    # --- in the child: every report to the file the parent named ----------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if in_child():
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
            with open(os.environ[REPORTS], "a") as f:
                f.write(json.dumps(data) + "\n")

    # --- in the parent: marked tests run in children ------------------------------------

    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if item.get_closest_marker(MARKER) is None or in_child():
            return None
        if item.nodeid not in self.sent:
            self._run_in_child(item)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self.from_child.pop(item.nodeid):
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _run_in_child(self, item: pytest.Item) -> None:
        """Run this test and the next marked ones of its file (``batch`` in all) in one
        fresh pytest process; keep each test's reports for its turn."""
        config = item.config
        batch = [
            i
            for i in item.session.items
            if i.get_closest_marker(MARKER) and i.path == item.path and i.nodeid not in self.sent
        ][: self.batch]
        lines: list[str] = []
        try:  # whatever goes wrong here fails these tests, not the whole session
            if self.prepare is not None:
                self.prepare(batch)
            with tempfile.TemporaryDirectory(prefix="vggprice-own-process-") as base:
                out = Path(base) / "reports.jsonl"
                cmd = [sys.executable, "-m", "pytest", *(i.nodeid for i in batch), "-q", "-p",
                       "no:cacheprovider", "--basetemp", str(Path(base) / "tmp"), "-o", "addopts="]  # fmt: skip
                child = subprocess.run(cmd, cwd=config.rootpath, env=os.environ | {REPORTS: str(out)},
                                       capture_output=True, text=True)  # fmt: skip
                ended = (f"the tests' own process ended with status {child.returncode} before this "
                         f"test did:\n{child.stdout[-4000:]}{child.stderr[-4000:]}")  # fmt: skip
                lines = out.read_text(errors="replace").splitlines() if out.exists() else []
        except Exception as err:  # noqa: BLE001 - a full disk, a server that did not start, ...
            ended = f"the tests' own process could not run: {err.__class__.__name__}: {err}"
        for line in lines:
            try:  # a line cut short (the child killed mid-write, a full disk) is dropped
                data = json.loads(line)
            except ValueError:
                continue
            report = config.hook.pytest_report_from_serializable(config=config, data=data)
            self.from_child.setdefault(report.nodeid, []).append(report)
        for i in batch:
            self.sent.add(i.nodeid)
            reports = self.from_child.setdefault(i.nodeid, [])
            if not any(r.when == "teardown" for r in reports):  # the child died before it ended
                reports.append(pytest.TestReport(i.nodeid, i.location, {}, "failed", ended, "call"))
