"""The pure pieces of a training step: the train state, the jittable step and eval step.

The train state is `{"step", "params", "opt_state"}`, plus `"model_state"` for tasks
that keep non-parameter state and `"elapsed_s"` for a time-budgeted run. Benchmarks
compile exactly what the trainer (`encoder_jax.train`) runs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from encoder_jax import budget as budget_lib
from encoder_jax.tasks.base import Task


def init_train_state(task: Task, tx: optax.GradientTransformation, rng: jax.Array,
                     params: Any = None, model_state: Any = None, timed: bool = False
                     ) -> dict[str, Any]:
    """Step 0: fresh (or given) params, their optimizer state, and the task's model state.

    `timed` (a time budget) adds `elapsed_s`, the seconds of training so far.
    """
    # The fresh params use `rng` itself, so a task's model state never changes them.
    params = task.init_params(rng) if params is None else params
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if timed:
        state["elapsed_s"] = jnp.zeros((), jnp.float32)
    if task.init_model_state is not None:
        state["model_state"] = (task.init_model_state(jax.random.fold_in(rng, 1))
                                if model_state is None else model_state)
    return state


def all_finite(tree: Any) -> jax.Array:
    """() bool: every float leaf of `tree` is free of NaN and inf.

    Not part of the step: over a whole train state (parameters and two Adam moments) it
    cost ~8% of a translation step on CPU. The step's gradient and update norms stop a
    run at the first non-finite gradient or update; the trainer runs this check on the
    state before each checkpoint (`train.save_checked`).
    """
    checks = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.array(True)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule, accum_steps: int = 1,
                    budget: budget_lib.Budget | None = None):
    """(state, batch, base_key) -> (state, metrics): pure, to be jitted once.

    With a `budget`, `tx` runs at the peak rate and its updates are scaled by the
    schedule read at the elapsed time in `state["elapsed_s"]` (see `encoder_jax.budget`).
    """

    def loss_and_aux(params, model_state, batch, rng, step):
        loss, sums, new_state = task.loss_fn(params, model_state, batch, rng, step, True)
        return loss, (sums, new_state)

    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

    def accumulated(params, model_state, batch, rng, step):
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

        def body(carry, inputs):
            grads_sum, sums_sum, state = carry
            index, micro_batch = inputs
            (_, (sums, state)), grads = grad_fn(params, state, micro_batch,
                                                jax.random.fold_in(rng, index), step)
            return (jax.tree_util.tree_map(jnp.add, grads_sum, grads),
                    jax.tree_util.tree_map(jnp.add, sums_sum, sums), state), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        sums_shape = jax.eval_shape(lambda: loss_and_aux(params, model_state, first, rng, step)[1][0])
        zero = (jax.tree_util.tree_map(jnp.zeros_like, params),
                jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape), model_state)
        (grads, sums, model_state), _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), micro))
        return jax.tree_util.tree_map(lambda g: g / accum_steps, grads), sums, model_state

    def train_step(state, batch, base_key):
        rng = jax.random.fold_in(base_key, state["step"])
        model_state = state.get("model_state")
        if accum_steps == 1:
            (_, (sums, model_state)), grads = grad_fn(state["params"], model_state, batch, rng,
                                                      state["step"])
        else:
            grads, sums, model_state = accumulated(state["params"], model_state, batch, rng,
                                                   state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        learning_rate = schedule(state["step"])
        if budget is not None:
            learning_rate, factor = budget.lr_factor(schedule, state["elapsed_s"])
            updates = jax.tree_util.tree_map(lambda u: (u * factor).astype(u.dtype), updates)
        params = optax.apply_updates(state["params"], updates)
        # No param_norm here: the trainer reads it off the state at log steps
        # (`monitor.param_norm`); in the step it cost another pass over every parameter.
        metrics = {**sums, "grad_norm": optax.global_norm(grads),
                   "update_norm": optax.global_norm(updates), "learning_rate": learning_rate}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if "model_state" in state:
            new_state["model_state"] = model_state
        if "elapsed_s" in state:  # set by the host before each step
            new_state["elapsed_s"] = state["elapsed_s"]
        return new_state, metrics

    return train_step


def make_eval_step(task: Task):
    """(params, model_state, batch, rng, step) -> outputs: the task's eval_fn, or its loss sums."""
    if task.eval_fn is not None:
        return lambda params, model_state, batch, rng, step: task.eval_fn(params, model_state,
                                                                          batch, rng)
    return lambda params, model_state, batch, rng, step: task.loss_fn(
        params, model_state, batch, rng, step, False)[1]
