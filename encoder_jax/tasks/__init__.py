"""The task registry: task name -> module and the modes it supports, consulted once per run.

A task module provides `build(config, workdir, shard_index, shard_count) -> Task`
(training by the one trainer) or, for a model fitted without gradient steps (EM),
`fit(config, workdir) -> final metrics`; and, for each optional mode it declares,
`predict(config, run)`, `embed(config, workdir)` etc.
Modules are imported by name only when chosen, so a task's heavy dependencies
(scikit-learn for classification, sacrebleu for translation) load only for it.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from encoder_jax import errors

MODES = ("train", "predict", "export", "embed", "baseline")


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """Where a task lives and which modes beyond training it supports."""

    module: str
    modes: tuple[str, ...] = ("train",)


TASKS = {
    "mlm": TaskEntry("encoder_jax.tasks.mlm"),
    "classify": TaskEntry("encoder_jax.tasks.classify", ("train", "predict", "baseline")),
    "translate": TaskEntry("encoder_jax.tasks.translate", ("train", "predict")),
    "gmm_topics": TaskEntry("encoder_jax.tasks.topics.gmm_topics", ("train", "embed")),
    "vae_topics": TaskEntry("encoder_jax.tasks.topics.vae_topics", ("train", "embed")),
}


def load(name: str, mode: str = "train") -> ModuleType:
    """The module of task `name`; an unknown task, or a mode it lacks, is a one-line error."""
    if name not in TASKS:
        raise errors.ConfigError(f"task={name!r}; valid: {sorted(TASKS)}")
    entry = TASKS[name]
    if mode not in entry.modes:
        able = sorted(n for n, e in TASKS.items() if mode in e.modes)
        raise errors.ConfigError(f"task={name!r} has no {mode} mode; tasks with one: {able}")
    return importlib.import_module(entry.module)
