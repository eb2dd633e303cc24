"""Imports every module that knows of MLflow and runs tracking with no URI set; prints
whether mlflow was imported (it must not be, with tracking off).

python -m tests.programs.no_mlflow LAKE_DIR MODEL_VERSION
"""

from __future__ import annotations

import sys

import flows.catalog  # noqa: F401 - the flows and the CLI import tracking
import flows.cli
import flows.pipeline  # noqa: F401
from tasks.governance import tracking
from tasks.settings import load_settings
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore


def main(lake_dir: str, model_version: str) -> None:
    lake = Lake(LocalStore(lake_dir))
    uri = load_settings().mlflow_tracking_uri
    results = [
        tracking.record_model(uri, lake, model_version),
        tracking.record_line(uri, lake, "demo"),
    ]
    flows.cli.build_parser().parse_args(["promote", model_version])
    print(results, "mlflow" in sys.modules)


if __name__ == "__main__":
    main(*sys.argv[1:])
