"""Orbax checkpoints of the train state and the grain data-iterator position.

Precedence when a run starts: resume from `<workdir>/checkpoints` if it holds a
step > else initialise from `config.init_from` (another run's params) > else fresh.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class _IteratorSnapshot:
    """The iterator state at save time, so async saving cannot see later positions.

    grain's handler writes `get_state().decode()` for non-`DatasetIterator` items.
    """

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Keeps the last `keep` checkpoints of {state, data} in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None) -> Any:
        """Restores the state (with the shardings of `abstract_state`) and the iterator in place."""
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _reader(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager of <workdir>/checkpoints that knows both items (no warnings)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir!r} has no {CHECKPOINT_DIR}/ directory: is it a run's workdir?")
    return ocp.CheckpointManager(directory, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})


def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint's step in <workdir>/checkpoints (None: none finished)."""
    manager = _reader(workdir)
    step = manager.latest_step()
    manager.close()
    return step


def load_params(workdir: str, step: int | None = None) -> Any:
    """The `params` of a run's checkpoint (latest, or `step`) on this process's first device."""
    return load_state(workdir, step)["params"]


def load_state(workdir: str, step: int | None = None) -> Any:
    """The whole train state of a run's checkpoint (latest, or `step`) on this process's first device.

    Works whatever mesh saved it: every array is restored whole onto one device.
    """
    manager = _reader(workdir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir!r} holds no finished checkpoint")
        metadata = manager.item_metadata(step)["state"]
        tree = getattr(metadata, "item_metadata", None) or metadata
        one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), tree)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return restored["state"]
    finally:
        manager.close()
