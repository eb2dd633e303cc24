"""Reads or decodes one hostile file and reports how much memory that took, for
tests/test_hostile.py: peak RSS of this process above what it held just before.

python -m tests.programs.peak decode FILE MODE SIZE   # images.prepare on the file's bytes
python -m tests.programs.peak read FOLDER KEY         # shard.read_object from a local drop

Prints one JSON line: {"outcome": ..., "peak_kb": ..., "baseline_kb": ...}. The peak is
the kernel's high-water mark (VmHWM), reset just before the work (/proc/self/clear_refs);
where that reset is refused, the process's peak since it started (ru_maxrss).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(what: str, *args: str) -> None:
    from tasks.data.images import ImageRejected, prepare
    from tasks.scoring.ledger import ScoreOptions
    from tasks.scoring.shard import read_object
    from tasks.store.lake import DropSource
    from tasks.store.storage import LocalStore

    if what == "decode":
        path, mode, size = args
        data = Path(path).read_bytes()

        def work() -> str:
            try:
                return f"prepared {prepare(data, mode, int(size)).shape}"
            except ImageRejected as err:
                return f"rejected: {err}"
    elif what == "read":
        folder, key = args
        source = DropSource(LocalStore(folder), "", "peak")

        def work() -> str:
            body, why = read_object(source, key, ScoreOptions().max_bytes)
            return f"read {len(body)} bytes" if body is not None else f"rejected: {why}"
    else:
        raise SystemExit(f"unknown command {what!r}: use decode or read")

    reset = _reset_peak()
    baseline = _status("VmRSS")
    outcome = work()
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": outcome, "peak_kb": peak, "baseline_kb": baseline}))


if __name__ == "__main__":
    main(*sys.argv[1:])
