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
      loss_fn: (params, model_state, batch, rng, step, train) -> (scalar loss, metric sums
        incl. "denominator", new model_state). `step` is the optimizer step (int32
        scalar: annealing, curricula); `model_state` is the non-parameter state
        (None for tasks without one), returned updated.
      train_data: a grain IterDataset of host-local numpy batches (its iterator is checkpointed).
      example_batch: host-local numpy batch with the train shapes (zeros are fine).
      summarize: metric sums (host floats) -> scalars to log.
      eval_batches: () -> iterable of host-local, full-size (padded) eval batches, or None.
      tokens_in_batch: host batch -> number of real tokens (throughput).
      init_model_state: optional rng -> non-parameter state (EM statistics, running
        averages); carried, sharded and checkpointed with the train state.
      trainable: params -> bool mask of trained leaves (None: all train).
      init_from: params -> params loaded from a pretrained source (None: fresh).
      eval_fn: optional (params, model_state, batch, rng) -> outputs; default: loss_fn's
        sums without dropout.
      summarize_eval: optional; when set, evaluation hands it eval_fn's per-batch outputs
        (host numpy, every batch in order) instead of summing them; -> scalars to log.
      on_eval: (step, summary, train state) -> None, for reports after each evaluation.
      on_best: (step, summary) -> None, after an evaluation that improved `eval.best_metric`.
      lr_scale: optional parameter path -> learning-rate factor (e.g. layer-wise decay).
      before_step: optional (step, train state) -> a replacement train state or None, called
        on every process before step `step` runs (e.g. VaDE fits its mixture prior to the
        encoder's latent means at the step its pretraining ends); it must be deterministic,
        so a resumed run that replays the step replays the change.
      batch_rows: config field -> this process's rows per batch (or the multiple every
        batch's rows are), the train batch first; the trainer checks that each splits over
        the local devices (and the train batch into `opt.grad_accum_steps` micro-batches).
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable[..., tuple[jax.Array, Sums, Any]]
    train_data: Any
    example_batch: Batch
    summarize: Callable[[dict[str, float]], dict[str, float]]
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    tokens_in_batch: Callable[[Batch], int] = lambda b: int(np.size(next(iter(b.values()))))
    init_model_state: Callable[[jax.Array], Any] | None = None
    trainable: Callable[[Any], Any] | None = None
    init_from: Callable[[Any], Any] | None = None
    eval_fn: Callable[..., Any] | None = None
    summarize_eval: Callable[[Iterable[dict[str, np.ndarray]]], dict[str, float]] | None = None
    on_eval: Callable[[int, dict[str, float], dict[str, Any]], None] | None = None
    on_best: Callable[[int, dict[str, float]], None] | None = None
    lr_scale: Callable[[tuple[str, ...]], float] | None = None
    before_step: Callable[[int, dict[str, Any]], dict[str, Any] | None] | None = None
    batch_rows: dict[str, int] = dataclasses.field(default_factory=dict)


def stateless(loss: Callable[[Any, Batch, jax.Array, bool], tuple[jax.Array, Sums]]):
    """Adapts `loss(params, batch, rng, train) -> (loss, sums)` to the Task.loss_fn signature."""

    def loss_fn(params, model_state, batch, rng, step, train):
        del step
        value, sums = loss(params, batch, rng, train)
        return value, sums, model_state

    return loss_fn
