"""scripts/ui_capture.py waits, per artifact, for the texts its markdown holds: a drop
with no rejected file shows no rejection table, and the capture must not wait for one."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def _ui_capture():
    spec = importlib.util.spec_from_file_location("ui_capture", REPO / "scripts/ui_capture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_drop_without_rejections_is_not_waited_on_for_their_table():
    capture = _ui_capture()
    clean = "priced by m-1: 20 images\n\n| price | count |\n| --- | --- |"
    assert "rejection reason" not in capture.expected_texts("drop", clean)
    assert "priced by" in capture.expected_texts("drop", clean)
    with_rejections = clean + "\n\n| rejection reason | files |\n| --- | --- |\n| empty | 1 |"
    assert "rejection reason" in capture.expected_texts("drop", with_rejections)
    # the other reports' texts are all required, whatever their markdown holds
    assert capture.expected_texts("eval", "") == capture.EXPECTED["eval"]
