"""A marked test in a file of its own (a batch of its own) and one that runs in place."""

from __future__ import annotations

import pytest

from tests.programs.own_process_cases.common import record


@pytest.mark.own_process
def test_marked_elsewhere():
    record("marked-elsewhere")


def test_in_place_elsewhere():
    record("in-place-elsewhere")
