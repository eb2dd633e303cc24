"""Programs the tests run in processes of their own, as `python -m tests.programs.NAME`
from the repository root, with their arguments on the command line."""

import logging
import sys


def log_to_stderr(prefix: str) -> None:
    """vggprice's log lines on stderr, each after ``prefix``, for the test to read."""
    log = logging.getLogger("vggprice")
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
    log.addHandler(handler)
    log.propagate = False
