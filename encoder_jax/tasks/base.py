"""What a task hands the one generic trainer."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import numpy as np

Batch = dict[str, Any]
Sums = dict[str, jax.Array]


@dataclasses.dataclass
class Task:
    """A pluggable objective: model init, loss, data, and how to read its metrics.

    Attributes:
      name: task name, e.g. "mlm".
      init_params: rng -> params (called under `jax.eval_shape` and jit).
      loss_fn: (params, batch, rng, train) -> (scalar loss, metric sums incl. "denominator").
      train_data: a grain IterDataset of host-local numpy batches (its iterator is checkpointed).
      example_batch: host-local numpy batch with the train shapes (zeros are fine).
      eval_batches: () -> iterable of host-local, full-size (padded) eval batches, or None.
      summarize: metric sums (host floats) -> scalars to log.
      tokens_in_batch: host batch -> number of real tokens (throughput).
      trainable: params -> bool mask of trained leaves (None: all train).
      init_from: params -> params loaded from a pretrained source (None: fresh).
      on_eval: (step, summary) -> None, for reports after each evaluation.
      eval_fn: optional (params, batch, rng) -> sums; default: loss_fn without dropout.
      artifacts: files written into the workdir (e.g. the tokenizer), for the run log.
      summarize_eval: optional; when set, evaluation hands it eval_fn's per-batch outputs
        (host numpy, every batch in order) instead of summing them; -> scalars to log.
      on_best: (step, summary) -> None, after an evaluation that improved `eval.best_metric`.
      lr_scale: optional parameter path -> learning-rate factor (e.g. layer-wise decay).
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable[[Any, Batch, jax.Array, bool], tuple[jax.Array, Sums]]
    train_data: Any
    example_batch: Batch
    summarize: Callable[[dict[str, float]], dict[str, float]]
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    tokens_in_batch: Callable[[Batch], int] = lambda b: int(np.size(next(iter(b.values()))))
    trainable: Callable[[Any], Any] | None = None
    init_from: Callable[[Any], Any] | None = None
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    eval_fn: Callable[[Any, Batch, jax.Array], Sums] | None = None
    artifacts: tuple[str, ...] = ()
    summarize_eval: Callable[[Iterable[dict[str, np.ndarray]]], dict[str, float]] | None = None
    on_best: Callable[[int, dict[str, float]], None] | None = None
    lr_scale: Callable[[tuple[str, ...]], float] | None = None
