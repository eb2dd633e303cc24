"""Six marked tests (one of them failing) and one that runs in place."""

from __future__ import annotations

import pytest

from tests.programs.own_process_cases.common import record


@pytest.mark.own_process
@pytest.mark.parametrize("n", range(5))
def test_marked(n):
    record(f"marked-{n}")


@pytest.mark.own_process
def test_marked_fails():
    record("marked-fails")
    assert 1 + 1 == 3, "the child's own assertion"


def test_in_place():
    record("in-place")
