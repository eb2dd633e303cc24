"""A marked test whose process dies mid-test, how it dies set by OWN_PROCESS_DEATH: `exit`
(os._exit(3)) or `segv` (SIGSEGV, as a crash in native code)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.programs.own_process_cases.common import record


@pytest.mark.own_process
def test_before():
    record("before")


@pytest.mark.own_process
def test_dies():
    record("dies")
    if os.environ["OWN_PROCESS_DEATH"] == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.own_process
def test_after():
    record("after")


def test_in_place_after():
    record("in-place-after")
