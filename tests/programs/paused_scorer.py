"""A scorer process that stops itself (SIGSTOP) right before it creates its first shard's
part, as a scorer paused by the OS, a VM migration or a long GC would
(tests/test_fencing.py). It touches STOP_FILE first, so the test knows it stopped, and
goes on where it was after SIGCONT. Logs vggprice's lines to stderr, prefixed SCORER.

python -m tests.programs.paused_scorer STORE_URI DROP_ID STOP_FILE CLAIM_SECONDS
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tests.programs import log_to_stderr


def main(store_uri: str, drop: str, stop: str, ttl: str) -> None:
    log_to_stderr("SCORER")

    from tasks.scoring.ledger import ScoreOptions
    from tasks.scoring.runner import in_threads, score_drop
    from tasks.store.lake import Lake
    from tasks.store.storage import open_store

    store = open_store(store_uri)
    create = store.put_if_absent

    def pause_before_the_part(key: str, data: bytes) -> bool:
        if key.rsplit("/", 1)[-1].startswith("part-") and not Path(stop).exists():
            Path(stop).write_text(key)
            os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, every thread
        return create(key, data)

    store.put_if_absent = pause_before_the_part  # the real create runs, only later
    options = ScoreOptions(shard_size=2, claim_seconds=float(ttl))
    manifest = score_drop(Lake(store), drop, options=options, run_scorers=in_threads(1))
    print(f"SCORER done skipped={manifest['skipped']}", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
