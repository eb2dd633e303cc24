"""A marked test whose process dies while it writes a report: the reports file ends in half
a line."""

from __future__ import annotations

import os

import pytest

from tests.own_process import REPORTS


@pytest.mark.own_process
def test_first():
    pass


@pytest.mark.own_process
def test_cut():
    path = os.environ[REPORTS]
    with open(path) as f:
        last = f.read().splitlines()[-1]  # this test's setup report, written whole
    with open(path, "a") as f:
        f.write(last[: len(last) // 2])  # the next report, cut short
    os._exit(1)
