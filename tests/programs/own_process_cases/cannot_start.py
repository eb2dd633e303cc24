"""Marked tests whose batch cannot start (plugin.py's prepare step fails for it)."""

from __future__ import annotations

import pytest

from tests.programs.own_process_cases.common import record


@pytest.mark.own_process
@pytest.mark.cannot_start
def test_needs_a_server():
    record("needs-a-server")


@pytest.mark.own_process
def test_same_batch():
    record("same-batch")
