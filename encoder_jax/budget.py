"""Time-budgeted training ("Cramming", Geiping & Goldstein 2023): the schedule runs on the clock.

With `train.time_budget` (minutes) the learning-rate schedule is a function of
elapsed training time instead of the step: the schedule built for
`train.num_steps` is read at the virtual step `elapsed / budget * num_steps`, so
warm-up takes `opt.warmup_steps / train.num_steps` of the budget and the decay
ends when the budget is spent (or at `train.num_steps`, whichever comes first).
The trainer then stops with a checkpoint and a full evaluation.

Elapsed time is the wall time of the training loop (compilation, steps and
checkpoint saves; evaluation excluded), carried in the train state as
`elapsed_s`, so a resumed run continues the same budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Budget:
    """A time budget in seconds over a schedule shaped for `num_steps` steps peaking at `peak_lr`."""

    seconds: float
    num_steps: int
    peak_lr: float

    def virtual_step(self, elapsed_s):
        """() float: where in the step-shaped schedule `elapsed_s` seconds of training are."""
        return jnp.clip(elapsed_s / self.seconds, 0.0, 1.0) * self.num_steps

    def lr_factor(self, schedule, elapsed_s):
        """(learning rate now, its ratio to the peak) for an optimizer built with the peak rate."""
        learning_rate = schedule(self.virtual_step(elapsed_s))
        return learning_rate, (learning_rate / self.peak_lr if self.peak_lr
                               else jnp.zeros_like(learning_rate))


def step_cap_warning(budget: Budget | None, step: int, elapsed_s: float) -> str | None:
    """A warning when `train.num_steps` stopped a timed run before its clock was spent, else None.

    The schedule is read at the elapsed fraction of the budget, so such a run ends with
    its learning rate not yet decayed.
    """
    if budget is None or step < budget.num_steps or elapsed_s >= 0.99 * budget.seconds:
        return None
    return (f"train.num_steps={budget.num_steps} was reached after {elapsed_s / 60:.1f} of the "
            f"{budget.seconds / 60:g} minutes of train.time_budget: the learning-rate schedule "
            f"stopped at {elapsed_s / budget.seconds:.0%} of its length, before its decay ended; "
            f"raise train.num_steps to use the whole budget")


def warn_on_step_cap(budget: Budget | None, step: int, elapsed_s: float) -> None:
    """Logs `step_cap_warning`'s message when there is one."""
    message = step_cap_warning(budget, step, elapsed_s)
    if message:
        logging.getLogger("encoder_jax").warning(message)


def from_minutes(minutes: float | None, num_steps: int, peak_lr: float) -> Budget | None:
    return None if minutes is None else Budget(float(minutes) * 60.0, num_steps, peak_lr)


class TrainingClock:
    """Seconds of training so far: `already_s` from the checkpoint plus this run's, pauses excluded."""

    def __init__(self, budget: Budget | None, already_s: float = 0.0):
        self.budget = budget
        self._now = time.perf_counter
        self._start = self._now()
        self._already = float(already_s)
        self._paused = 0.0

    def elapsed(self) -> float:
        return self._already + self._now() - self._start - self._paused

    def spent(self) -> bool:
        """True once a budget is set and used up."""
        return self.budget is not None and self.elapsed() >= self.budget.seconds

    @contextlib.contextmanager
    def paused(self):
        """Time inside the block (evaluation) does not count."""
        begin = self._now()
        try:
            yield
        finally:
            self._paused += self._now() - begin
