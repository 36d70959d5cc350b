"""Stopping a run cleanly on SIGTERM (SLURM, Kubernetes, preemptible VMs) or Ctrl-C.

`StopSignals` turns the first SIGTERM / SIGINT into a request the train loop sees after the
step in flight: it flushes metrics, saves a checkpoint of that step (unless one exists) and
raises `Preempted`, which `launch.py` reports in one line with exit status `EXIT_CODE`. A
second Ctrl-C interrupts at once (KeyboardInterrupt). With several processes, `agreed`
makes every host stop after the same step.
"""

from __future__ import annotations

import logging
import signal
import threading

import numpy as np

log = logging.getLogger("encoder_jax")

EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, rerun the same command to continue
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after `step`, with that step checkpointed."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted at step {step} by {signal_name}: checkpoint saved; rerun "
                         f"the same command to continue")
        self.step, self.signal_name = step, signal_name


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set `requested` instead of killing."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping after the current step", self.signal_name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def agreed(requested: bool) -> bool:
    """Whether any process asked to stop (every process gets the same answer)."""
    import jax

    if jax.process_count() == 1:
        return requested
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(requested))).any())
