"""`train` on any store, meeting other trainings at a rendezvous after the last epoch
(before the model is written), so that attempts of one version publish when the test
says; prints the result as JSON on its last line.

python -m tests.programs.train_race STORE_URI DATASET_VERSION LABELS_VERSION SETTINGS_JSON
    READY_FILE [WAIT_FILE ...]

After its last epoch it creates READY_FILE, then waits until every WAIT_FILE exists.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tasks.model.train_settings import TrainSettings
from tasks.model.training import train
from tasks.store.lake import Lake
from tasks.store.storage import open_store

WAIT_S = 600  # the test's own timeout ends a lost rendezvous sooner


def main(store: str, dv: str, lv: str, settings: str, ready: str, *wait: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    settings_ = TrainSettings(**json.loads(settings))

    def rendezvous(epoch: int, history: dict, fit) -> None:
        if epoch < settings_.epochs:
            return
        Path(ready).touch()
        deadline = time.monotonic() + WAIT_S
        while not all(Path(w).exists() for w in wait):
            if time.monotonic() > deadline:
                raise SystemExit(f"rendezvous: {wait} not all there after {WAIT_S} s")
            time.sleep(0.2)

    result = train(Lake(open_store(store)), dv, lv, settings_, on_epoch=rendezvous)
    keys = ("model_version", "attempt", "won", "winner", "skipped")
    print(json.dumps({k: result.get(k) for k in keys}))


if __name__ == "__main__":
    main(*sys.argv[1:])
