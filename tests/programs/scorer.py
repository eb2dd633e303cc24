"""One scorer process on a drop (tests/test_scale.py): loads the champion model, touches
GO_FILE.ready-PID, waits for GO_FILE, then scores the drop in shards of 10.

python -m tests.programs.scorer STORE_URI DROP_ID GO_FILE CLAIM_SECONDS
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tasks.model.export import get_model
from tasks.scoring.ledger import ScoreOptions
from tasks.scoring.runner import score_drop
from tasks.store.lake import Lake
from tasks.store.storage import open_store


def main(store: str, drop: str, go: str, ttl: str) -> None:
    lake = Lake(open_store(store))
    get_model(lake.model(lake.registry().champion()["model_version"]))  # loaded before the start
    Path(go + f".ready-{os.getpid()}").touch()
    while not Path(go).exists():
        time.sleep(0.01)
    score_drop(lake, drop, options=ScoreOptions(shard_size=10, claim_seconds=float(ttl)))


if __name__ == "__main__":
    main(*sys.argv[1:])
