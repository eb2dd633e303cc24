"""Training checkpoints: each epoch's weights and optimizer state, written in the
background while the next epoch trains, and restored on a re-run after a crash."""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from tasks.runtime import get_logger
from tasks.store.lake import Checkpoints

EMPTY_HISTORY = {"loss": [], "val_loss": [], "seconds": []}


class CheckpointWriter:
    """Writes each epoch's checkpoint in the background while the next epoch trains.

    The weights and optimizer state are copied when the epoch ends; the npz goes
    to the store first and ``state.json`` (the marker that the epoch finished)
    after it, so a reader finds the previous checkpoint or this one, never half of
    one. One write is in flight at a time; ``wait`` re-raises a failed write.
    """

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None

    def save(self, model, epoch: int, history: dict) -> None:
        arrays = {f"w{i}": np.array(w) for i, w in enumerate(model.weights)}
        arrays |= {f"o{i}": np.array(v) for i, v in enumerate(model.optimizer.variables)}
        state = {"epoch": epoch, "history": {k: list(v) for k, v in history.items()}}
        self.wait()
        self.pending = self.pool.submit(self._write, arrays, state)

    def _write(self, arrays: dict, state: dict) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.checkpoints.write(state, buf.getvalue())

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def restore_checkpoint(checkpoints: Checkpoints, model) -> tuple[int, dict]:
    """(epochs finished, history) from the last checkpoint, or (0, empty) when there is
    none or it does not fit this model and optimizer (written by other code)."""
    fresh = (0, {k: [] for k in EMPTY_HISTORY})
    latest = checkpoints.latest()
    if latest is None:
        return fresh
    state, body = latest
    with np.load(io.BytesIO(body)) as npz:
        data = dict(npz)  # each array read once (an NpzFile re-reads on every access)
    model.optimizer.build(model.trainable_variables)
    targets = {f"w{i}": w for i, w in enumerate(model.weights)}
    targets |= {f"o{i}": v for i, v in enumerate(model.optimizer.variables)}
    if set(data) != set(targets) or any(
        data[k].shape != tuple(v.shape) for k, v in targets.items()
    ):
        get_logger().warning(
            "%s: checkpoint does not fit this model's variables; training from the start",
            checkpoints.uri(checkpoints.MARKER),
        )
        return fresh
    for k, var in targets.items():
        var.assign(data[k])
    return state["epoch"], {k: list(state["history"].get(k, [])) for k in EMPTY_HISTORY}
