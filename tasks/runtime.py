"""Small bridges between plain functions and the frameworks: logging, the retry
policy, and Keras's process-wide state (precision policy, random seeds) held in a
scope and restored after it."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import random
import re
import sys
import tempfile
import time
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


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class ProgressLog:
    """Progress of a long step as log lines, where no progress bar shows (off a terminal,
    in a worker, in the Prefect UI): a first line ``first`` seconds in (the early
    estimate), then one at least every ``every`` seconds while ``advance`` is called:
    done of total, the rate, and the time left at that rate. VGGPRICE_PROGRESS_SECONDS
    sets ``every`` (and caps ``first``) for every step."""

    def __init__(self, what: str, total: int, unit: str, every: float | None = None,
                 first: float = 5.0, enabled: bool | None = None):  # fmt: skip
        if every is None:
            every = float(os.environ.get("VGGPRICE_PROGRESS_SECONDS", "30"))
        first = min(first, every)
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.enabled = not sys.stderr.isatty() if enabled is None else enabled
        self.done, self.lines = 0, 0
        self.log = get_logger()  # the run's, also when advanced from another thread
        self.started = time.monotonic()
        self.next = self.started + first

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        now = time.monotonic()
        if not self.enabled or now < self.next or self.done >= self.total or not self.done:
            return
        rate = self.done / (now - self.started)
        self.log.info(
            "%s: %d/%d %s, %.1f %s/s, about %s left", self.what, self.done, self.total,
            self.unit, rate, self.unit, _duration((self.total - self.done) / rate),
        )  # fmt: skip
        self.lines += 1
        self.next = now + self.every


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


# What TensorFlow's native code prints while it loads on a machine without NVIDIA
# devices: written to file descriptor 2 before any Python logging exists (so
# TF_CPP_MIN_LOG_LEVEL does not reach the first two), and nothing a user can act on; and
# its failed CUDA probe (an ERROR line, so a user's TF_CPP_MIN_LOG_LEVEL=2 shows it).
NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|Could not find cuda drivers"
    r"|cpu_feature_guard\.cc|To enable the following instructions|oneDNN custom operations"
    r"|failed call to cuInit"
)


def has_gpu_device() -> bool:
    """An NVIDIA (or WSL GPU) device node exists: TensorFlow's CUDA lines then matter."""
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))


@contextlib.contextmanager
def native_stderr_filtered(noise: re.Pattern = NATIVE_NOISE) -> Iterator[None]:
    """File descriptor 2 goes to a temporary file inside; after, every line written there
    (by native code or Python) is passed on to stderr except those matching ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            kept = [line for line in text.splitlines(True) if not noise.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietFirstImport(importlib.abc.MetaPathFinder):
    """The first import of one module runs with native stderr filtered; then it is gone."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            with native_stderr_filtered():
                run(module)
                # The CUDA probe runs with the first devices listed: here, filtered too.
                module.config.list_physical_devices()

        spec.loader.exec_module = exec_module  # this loader instance only
        return spec


def quiet_tensorflow_start() -> None:
    """On a machine without NVIDIA devices, TensorFlow's start-up lines (its CUDA probe,
    CPU flags) are left out when it is first imported, however it is imported (Keras
    imports it), whatever TF_CPP_MIN_LOG_LEVEL is; any other line printed meanwhile is kept. A no-op once TensorFlow is
    loaded, or where a GPU device exists."""
    if "tensorflow" in sys.modules or has_gpu_device():
        return
    if not any(isinstance(f, _QuietFirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFirstImport("tensorflow"))
