"""Small bridges between plain functions and the frameworks: logging, the retry
policy, and Keras's process-wide state (precision policy, random seeds) held in a
scope and restored after it."""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from collections.abc import Iterator
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


def progress(total: int, desc: str, unit: str):
    """A progress bar in a terminal; elsewhere a no-op (the log lines are the progress)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty())


@contextlib.contextmanager
def keras_precision(policy: str) -> Iterator[None]:
    """Keras's global dtype policy set for the layers built inside, restored after."""
    import keras

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python, NumPy, TensorFlow and Keras seeded for what runs inside (initial
    weights, dropout), and each put back as it was after."""
    import keras
    import numpy as np
    import tensorflow as tf
    from keras.src.backend.common import global_state
    from tensorflow.python.eager import context

    names = ("global_random_seed", "global_seed_generator")
    saved = (
        random.getstate(),
        np.random.get_state(),
        context.global_seed(),
        {n: global_state.get_global_attribute(n) for n in names},
    )
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        py, npy, tf_seed, attrs = saved
        random.setstate(py)
        np.random.set_state(npy)
        tf.random.set_seed(tf_seed)
        for n, v in attrs.items():
            global_state.set_global_attribute(n, v)
