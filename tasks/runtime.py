"""Small bridges between plain functions and Prefect: logging and retry policy."""

from __future__ import annotations

import logging
from typing import Any

# Bad input is final: retrying a corrupt file or a wrong parameter cannot help.
PERMANENT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotImplementedError)


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    """The run logger (shown in the Prefect UI) inside a run, plain logging outside."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if TaskRunContext.get() or FlowRunContext.get():
        return get_run_logger()
    return logging.getLogger("vggprice")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry network and I/O hiccups, not bad input."""
    return not isinstance(getattr(state, "data", None), PERMANENT_ERRORS)


TASK_RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_transient}
