"""What the case files share: where each test writes the pid of the process it ran in."""

from __future__ import annotations

import os
from pathlib import Path

OUT = "OWN_PROCESS_OUT"  # the directory the pytester test reads the pids from


def record(name: str) -> None:
    Path(os.environ[OUT], name).write_text(str(os.getpid()))
