"""One of two scorers that both found no int8 model for a model version and make it at
once (tests/test_engines.py): each quantizes, each tries to publish, one gate stands.

python -m tests.programs.int8_maker STORE_URI MODEL_VERSION READY_FILE GO_FILE

Touches READY_FILE once its libraries and the model are loaded, waits for GO_FILE, then
makes the int8 model and prints the gate that stands as JSON (its last line).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.programs import log_to_stderr


def main(store: str, model_version: str, ready: str, go: str) -> None:
    log_to_stderr("MAKER")

    import nncf  # noqa: F401 - loaded before the start

    from tasks.governance.engine_gates import make_int8
    from tasks.model.export import cached_model_file
    from tasks.scoring.ledger import ScoreOptions
    from tasks.store.lake import Lake
    from tasks.store.storage import open_store

    model = Lake(open_store(store)).model(model_version)
    cached_model_file(model)
    Path(ready).touch()
    go_file = Path(go)
    while not go_file.exists():
        time.sleep(0.001)
    print(json.dumps(make_int8(model, ScoreOptions())))


if __name__ == "__main__":
    main(*sys.argv[1:])
