"""One of several processes that promote models at once (tests/test_registry.py): each
forced, so each wants to swap the champion pointer. Logs vggprice's INFO lines to stderr,
prefixed RACER, so the test can count the compare-and-swap retries.

python -m tests.programs.racer STORE_URI READY_FILE GO_FILE MODELS_JSON

Touches READY_FILE once its connections are warm, waits for GO_FILE, then promotes the
model versions of MODELS_JSON (a JSON list) in order.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.programs import log_to_stderr


def main(store: str, ready: str, go: str, models: str) -> None:
    log_to_stderr("RACER")

    from tasks.governance.registry import promote
    from tasks.store.lake import Lake
    from tasks.store.storage import open_store

    lake = Lake(open_store(store))
    lake.registry().champion()  # connections warm before the start
    Path(ready).touch()
    go_file = Path(go)
    while not go_file.exists():
        time.sleep(0.0002)
    for mv in json.loads(models):
        promote(lake, mv, force=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
