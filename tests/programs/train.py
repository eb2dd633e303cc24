"""`train` on a local lake; prints its frozen-feature facts as JSON (when it extracted
any), then the model version last.

python -m tests.programs.train LAKE_DIR DATASET_VERSION LABELS_VERSION SETTINGS_JSON
"""

from __future__ import annotations

import json
import sys

from tasks.model.train_settings import TrainSettings
from tasks.model.training import train
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore


def main(lake_dir: str, dv: str, lv: str, settings: str) -> None:
    result = train(Lake(LocalStore(lake_dir)), dv, lv, TrainSettings(**json.loads(settings)))
    if result.get("features"):
        print(json.dumps(result["features"], separators=(",", ":")))
    print(result["model_version"])


if __name__ == "__main__":
    main(*sys.argv[1:])
