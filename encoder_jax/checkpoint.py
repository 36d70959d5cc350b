"""Orbax checkpoints of the train state and the grain data-iterator position.

Precedence when a run starts: resume from `<workdir>/checkpoints` if it holds a
step (the newest that restores; damaged ones are set aside) > else initialise from
`config.init_from` (another run's params) > else fresh.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from encoder_jax import errors

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"  # checkpoints that failed to restore, set aside
log = logging.getLogger("encoder_jax")


DISK_FULL_MARKS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT, raised directly or wrapped in a message by Orbax's async writers."""
    if isinstance(error, OSError) and error.errno in (28, 122):
        return True
    return any(mark in str(error) for mark in DISK_FULL_MARKS)


@contextlib.contextmanager
def _disk_full_as_one_line(directory: str):
    try:
        yield
    except errors.StorageError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise errors.StorageError(
            f"no space left on the device while writing a checkpoint in {directory}; the "
            f"checkpoints already saved are intact: free space and rerun the same command to "
            f"continue") from None


class _IteratorSnapshot:
    """The iterator state at save time, so async saving cannot see later positions.

    grain's handler writes `get_state().decode()` for non-`DatasetIterator` items.
    """

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


def restore_data_position(directory: str, data_iterator) -> None:
    """Sets the iterator to the position saved in a checkpoint's `data/` directory.

    Each process saved `process_<i>-of-<n>.json`. Every task's input pipeline reads one
    global stream and each host keeps its rows, so all hosts hold the same position: a run
    resumed on a different number of hosts takes process 0's.
    """
    own = os.path.join(directory, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if not os.path.isfile(own):
        saved = sorted(glob.glob(os.path.join(directory, "process_*-of-*.json")))
        if not saved:
            raise errors.DataError(f"{directory} holds no data-iterator position (process_*.json)")
        log.warning("%s was saved by %s processes, this run has %d: every process resumes the "
                    "global data position from %s", directory, saved[0].rsplit("-of-", 1)[1][:-5],
                    jax.process_count(), os.path.basename(saved[0]))
        own = saved[0]
    with open(own) as f:
        data_iterator.set_state(json.loads(f.read()))
    if hasattr(data_iterator, "start_prefetch"):
        data_iterator.start_prefetch()


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

    def check_space(self, state: Any) -> None:
        """Refuses to start a save the disk cannot hold (a half-written checkpoint helps nobody).

        Needs the state's bytes plus a tenth and 1 MiB for metadata; a disk that fills
        anyway (another writer) is reported the same way when the save fails.
        """
        needed = sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(state))
        needed = int(needed * 1.1) + 2 ** 20
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise errors.StorageError(
                f"{free / 2 ** 20:.1f} MiB free on the device of {self.directory}, a checkpoint "
                f"needs about {needed / 2 ** 20:.1f} MiB; the checkpoints already saved are "
                f"intact: free space and rerun the same command to continue")

    def save(self, step: int, state: Any, data_iterator=None, force: bool = False) -> bool:
        if force or self.manager.should_save(step):
            self.check_space(state)
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        with _disk_full_as_one_line(self.directory):  # an async save's failure surfaces here
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None) -> Any:
        """Restores the state (with the shardings of `abstract_state`) and the iterator in place.

        Without `step`, tries the checkpoints newest first: one that fails to restore (truncated
        or missing files, bad metadata) is named in a warning, moved to
        `<workdir>/checkpoints_corrupt/<step>-<time>` (kept, not deleted) and the previous one is
        tried; if none restores, a one-line error names them.
        """
        if step is not None:
            return self._restore_step(step, abstract_state, data_iterator)
        set_aside = []
        for candidate in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore_step(candidate, abstract_state, data_iterator)
            except Exception as e:  # whatever a damaged checkpoint raises: fall back to an older one
                moved = self._set_aside(candidate)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log.warning("checkpoint step %d in %s does not restore (%s); moved to %s, trying "
                            "the previous one", candidate, self.directory, reason, moved)
                set_aside.append(f"step {candidate} -> {moved}")
        raise errors.DataError(f"no checkpoint in {self.directory} restores (set aside: "
                               f"{'; '.join(set_aside)}); remove the checkpoints/ directory to start over")

    def _restore_step(self, step: int, abstract_state: Any, data_iterator) -> Any:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        if data_iterator is not None:
            restore_data_position(os.path.join(self.directory, str(step), "data"), data_iterator)
        return state

    def _set_aside(self, step: int) -> str:
        """Moves a step's directory to <workdir>/checkpoints_corrupt/ (the lead process only)."""
        target = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR,
                              f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        source = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.isdir(source):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(source, target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        with _disk_full_as_one_line(self.directory):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with _disk_full_as_one_line(self.directory):
            self.manager.wait_until_finished()
        self.manager.close()


def _reader(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager of <workdir>/checkpoints that knows both items (no warnings)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise errors.MissingFileError(f"{workdir!r} has no {CHECKPOINT_DIR}/ directory: is it a run's workdir?")
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

    Works whatever mesh saved it: every array is restored whole onto one device. Without
    `step`, a newest checkpoint that does not restore is named in a warning and the previous
    one is read (nothing is moved: readers leave the run as it is).
    """
    manager = _reader(workdir)
    try:
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise errors.MissingFileError(f"{workdir!r} holds no finished checkpoint")
        failures = []
        for candidate in steps:
            try:
                return _restore_on_one_device(manager, candidate)
            except Exception as e:  # a damaged checkpoint: try the one before it
                if step is not None:
                    raise
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log.warning("checkpoint step %d in %s does not restore (%s); reading an older one",
                            candidate, manager.directory, reason)
                failures.append(f"step {candidate} ({reason})")
        raise errors.DataError(f"no checkpoint in {manager.directory} restores: {'; '.join(failures)}")
    finally:
        manager.close()


def _restore_on_one_device(manager: ocp.CheckpointManager, step: int) -> Any:
    metadata = manager.item_metadata(step)["state"]
    tree = getattr(metadata, "item_metadata", None) or metadata
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), tree)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]
