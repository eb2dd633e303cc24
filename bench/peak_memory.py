"""Peak resident memory of a command and of every process it starts, sampled twice a
second from /proc (Linux). For the test suite:

    .venv/bin/python bench/peak_memory.py scripts/test

Prints the largest resident set of a single process (normally pytest itself) and the
largest memory of the whole process tree at one moment (pytest plus the servers, workers
and scorers the tests start) as the sum of proportional set sizes: pages shared between
processes (TensorFlow's libraries, mapped once, are most of a scorer's resident set) count
once, split between them. Containers run by dockerd are not in the tree.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in PROC.iterdir():
        if p.name.isdigit():
            try:
                parent = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(parent, []).append(int(p.name))
    return kids


def _field(pid: int, name: str, field: str) -> int:
    """A "Field:  N kB" line of /proc/PID/<name>, in bytes; 0 once the process is gone."""
    try:
        for line in (PROC / str(pid) / name).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
    except OSError:
        return "?"


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    proc = subprocess.Popen(sys.argv[1:])
    peak_tree, peak_one, peak_name = 0, 0, ""
    start = time.time()
    while proc.poll() is None:
        kids, todo, total = _children(), [proc.pid], 0
        while todo:
            pid = todo.pop()
            rss = _field(pid, "status", "VmRSS:")
            total += _field(pid, "smaps_rollup", "Pss:")
            if rss > peak_one:
                peak_one, peak_name = rss, _name(pid)
            todo += kids.get(pid, [])
        peak_tree = max(peak_tree, total)
        time.sleep(0.5)
    print(f"\ncommand: {' '.join(sys.argv[1:])}: status {proc.returncode}, "
          f"{time.time() - start:.0f} s")  # fmt: skip
    print(f"peak of one process: {peak_one / 1e9:.2f} GB ({peak_name.strip()})")
    print(f"peak of the process tree (proportional set sizes): {peak_tree / 1e9:.2f} GB")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
