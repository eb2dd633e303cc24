"""Emit one Prefect event for each resource id given and wait until they are sent, from a
process of its own (its events client is bound to the PREFECT_API_URL of its environment).

python -m tests.programs.emit EVENT PAYLOAD_JSON RESOURCE_ID [RESOURCE_ID ...]
"""

from __future__ import annotations

import json
import sys

from prefect.events import emit_event
from prefect.events.worker import EventsWorker


def main(event: str, payload: str, *resource_ids: str) -> None:
    for rid in resource_ids:
        emit_event(event=event, resource={"prefect.resource.id": rid}, payload=json.loads(payload))
    EventsWorker.drain_all()


if __name__ == "__main__":
    main(*sys.argv[1:])
