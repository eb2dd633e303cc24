"""Run a deployment's pull steps as a flow run runs them; print, as JSON, the steps' output
and the working directory after them (tests/test_infra.py).

python tests/programs/pull_steps.py STEPS_JSON

Run by its path, from another directory, on purpose: the steps must find the checkout from
what this Python imports, not from the working directory or sys.path.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from prefect.deployments.steps.core import run_steps


def main(steps: str) -> None:
    out = asyncio.run(run_steps(json.loads(steps)))
    print(json.dumps([out, os.getcwd()]))


if __name__ == "__main__":
    main(*sys.argv[1:])
