"""The one training loop: init or restore, sharded jitted step, eval, checkpoints, logs.

Tasks plug in through `encoder_jax.tasks.base.Task`, chosen by name in the
registry `encoder_jax.tasks`. The train state and the pure step live in
`encoder_jax.step` (re-exported here); `train.time_budget` is `encoder_jax.budget`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from encoder_jax import checkpoint as checkpoint_lib
from encoder_jax import budget as budget_lib
from encoder_jax import configs, errors, monitor, optim, parallel, preemption, reporting, tasks
from encoder_jax import workdir as workdir_lib
from encoder_jax.step import all_finite, init_train_state, make_eval_step, make_train_step  # noqa: F401
from encoder_jax.tasks.base import Task
from encoder_jax.monitor import (BestKeeper, StepLogger, compiled_flops, measure_peak_flops,
                                 metric_mode, peak_memory_bytes)

log = logging.getLogger("encoder_jax")

__all__ = ["run", "predict", "build_task", "init_train_state", "make_train_step", "evaluate",
           "TrainerConfig", "BestKeeper", "metric_mode", "measure_peak_flops",
           "peak_memory_bytes", "compiled_flops"]


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """The sections the trainer reads, each read once from the experiment config."""

    task: str
    seed: int
    opt: configs.OptConfig
    train: configs.TrainConfig
    ckpt: configs.CheckpointConfig
    eval: configs.EvalConfig
    mesh: configs.MeshConfig

    @classmethod
    def from_config(cls, config) -> "TrainerConfig":
        read = lambda kind, name: configs.section(kind, config.get(name), name)
        ckpt = read(configs.CheckpointConfig, "ckpt")
        if ckpt.average_last > ckpt.keep:
            raise errors.ConfigError(f"ckpt.average_last={ckpt.average_last} exceeds ckpt.keep="
                                     f"{ckpt.keep}: keep at least as many checkpoints as are averaged")
        return cls(task=config.task, seed=int(config.seed), opt=read(configs.OptConfig, "opt"),
                   train=read(configs.TrainConfig, "train"), ckpt=ckpt,
                   eval=read(configs.EvalConfig, "eval"), mesh=read(configs.MeshConfig, "mesh"))


def build_task(config, workdir: str | None) -> Task:
    """The task named by `config.task`, built for this process's data shard."""
    module = tasks.load(config.task)
    return module.build(config, workdir, jax.process_index(), jax.process_count())


def to_host(tree: Any) -> Any:
    """A pytree of global arrays as host numpy (gathered from every process)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def evaluate(task: Task, eval_step, state, batch_sharding, eval_key) -> dict[str, float]:
    """Runs the whole held-out split; sums stay on device until the end.

    A task with `summarize_eval` gets every batch's outputs on the host instead
    (per-example predictions for metrics that do not decompose into sums).
    """
    outputs = (eval_step(state["params"], state.get("model_state"),
                         parallel.put_batch(host_batch, batch_sharding),
                         jax.random.fold_in(eval_key, index), state["step"])
               for index, host_batch in enumerate(task.eval_batches()))
    if task.summarize_eval is not None:
        return task.summarize_eval(to_host(out) for out in outputs)
    totals = None
    for sums in outputs:
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        raise errors.ConfigError("the evaluation split yields no batch")
    return task.summarize({k: np.asarray(jax.device_get(v), np.float64) for k, v in totals.items()})


def predict(config, workdir: str) -> str:
    """--mode predict: the task's `predict(config, trained run)`; returns the output path."""
    module = tasks.load(config.task, "predict")
    return module.predict(config, workdir_lib.load_trained(
        workdir, word_segmenter=configs.word_segmenter(config)))


@dataclasses.dataclass
class Setup:
    """Everything `run` needs before its first step."""

    task: Task
    state: dict[str, Any]
    abstract: Any
    shardings: Any
    batch_sharding: Any
    checkpointer: checkpoint_lib.Checkpointer
    train_iter: Any
    compiled_for: Any  # host batch on device -> compiled step for its shape
    train_key: jax.Array
    eval_key: jax.Array
    budget: budget_lib.Budget | None = None  # train.time_budget


def restore_or_init(task, tx, trainer: TrainerConfig, init_key, abstract, shardings, checkpointer,
                    train_iter) -> dict[str, Any]:
    """Resume from the workdir > initialise from a pretrained source (`task.init_from`) > fresh."""
    timed = trainer.train.time_budget is not None
    if checkpointer.latest_step() is not None:
        check_timed_resume(os.path.dirname(checkpointer.directory), timed)
        state = checkpointer.restore(abstract, train_iter)
        log.info("resumed from %s at step %d", checkpointer.directory, int(state["step"]))
        return state
    state = jax.jit(lambda rng: init_train_state(task, tx, rng, timed=timed),
                    out_shardings=shardings)(init_key)
    if task.init_from is None:
        return state
    params = jax.device_put(task.init_from(jax.device_get(state["params"])), shardings["params"])
    return jax.jit(lambda p, m: init_train_state(task, tx, init_key, p, m, timed),
                   out_shardings=shardings)(params, state.get("model_state"))


def check_timed_resume(workdir: str, timed: bool) -> None:
    """A resume must keep `train.time_budget` set or unset: only timed checkpoints hold `elapsed_s`."""
    saved = workdir_lib.read_json_if_exists(workdir_lib.path(workdir, workdir_lib.CONFIG_FILE)) or {}
    was_timed = (saved.get("train") or {}).get("time_budget") is not None
    if "train" in saved and was_timed != timed:
        raise errors.ConfigError(
            f"train.time_budget is {'set' if timed else 'unset'} but the run in {workdir} was started "
            f"{'without' if timed else 'with'} one (its checkpoints differ): keep it as it was, or "
            f"use a new --workdir")


def check_batch_rows(batch_rows: dict[str, int], accum_steps: int, local_devices: int) -> None:
    """One line naming the field when a batch does not split over the devices or micro-batches."""
    for index, (field, rows) in enumerate(batch_rows.items()):
        if rows < 1 or rows % local_devices:
            raise errors.ConfigError(
                f"{field} gives {rows} rows per process, which do not split over its "
                f"{local_devices} devices: use a multiple of {local_devices} rows per process")
        if index == 0 and rows % accum_steps:
            raise errors.ConfigError(
                f"{field} gives {rows} rows per process, which do not split into "
                f"opt.grad_accum_steps={accum_steps} micro-batches: use a multiple of {accum_steps}")


def setup(config, trainer: TrainerConfig, workdir: str) -> Setup:
    """Builds the task, mesh, shardings, optimizer, state (resumed or fresh) and the step compiler."""
    mesh = parallel.make_mesh(trainer.mesh.fsdp)
    task = build_task(config, workdir)
    check_batch_rows(task.batch_rows, trainer.opt.grad_accum_steps, jax.local_device_count())
    tx, schedule = optim.build_optimizer(trainer.opt, trainer.train.num_steps, task.trainable,
                                         task.lr_scale)
    budget = budget_lib.from_minutes(trainer.train.time_budget, trainer.train.num_steps,
                                     trainer.opt.learning_rate)
    if budget is not None:  # the optimizer at the peak rate; the step scales by the clock's rate
        tx, _ = optim.build_optimizer(dataclasses.replace(trainer.opt, schedule="constant",
                                                          warmup_steps=0),
                                      trainer.train.num_steps, task.trainable, task.lr_scale)
    init_key, train_key, eval_key = jax.random.split(jax.random.key(trainer.seed), 3)
    abstract = jax.eval_shape(lambda rng: init_train_state(task, tx, rng, timed=budget is not None),
                              init_key)
    shardings = parallel.state_shardings(abstract, mesh, trainer.mesh.min_shard_size)
    batch_sharding = parallel.batch_sharding(mesh)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=trainer.ckpt.keep,
                                               use_async=trainer.ckpt.use_async)
    train_iter = iter(task.train_data)
    state = restore_or_init(task, tx, trainer, init_key, abstract, shardings, checkpointer, train_iter)
    monitor.log_parameter_counts(task, abstract, mesh)
    step_fn = jax.jit(make_train_step(task, tx, schedule, trainer.opt.grad_accum_steps, budget),
                      in_shardings=(shardings, batch_sharding, None),
                      out_shardings=(shardings, None), donate_argnums=0)
    compiled: dict[tuple, Any] = {}

    def compiled_for(batch):
        """The step compiled once per batch shape (tasks may pad to a few fixed lengths)."""
        signature = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if signature not in compiled:
            compiled[signature] = parallel.compile_step(step_fn.lower(abstract, batch, train_key),
                                                        trainer.train.cpu_scheduler)
            parallel.release_freed_host_memory()
        return compiled[signature]

    return Setup(task, state, abstract, shardings, batch_sharding, checkpointer, train_iter,
                 compiled_for, train_key, eval_key, budget)


def average_checkpoints(task: Task, s: Setup, state, eval_step, writer, workdir: str,
                        count: int) -> dict[str, float]:
    """Averages the params of the last `count` checkpoints into <workdir>/averaged; evaluates them."""
    s.checkpointer.wait()
    steps = sorted(s.checkpointer.manager.all_steps())[-count:]
    trees = [checkpoint_lib.load_params(workdir, step) for step in steps]
    mean = jax.tree_util.tree_map(
        lambda *xs: (sum(np.asarray(x, np.float64) for x in xs) / len(xs)).astype(xs[0].dtype), *trees)
    params = jax.device_put(mean, s.shardings["params"])
    summary = {}
    if task.eval_batches is not None:
        summary = evaluate(task, eval_step, {**state, "params": params}, s.batch_sharding, s.eval_key)
        writer.write(steps[-1], "averaged", summary)
        log.info("averaged checkpoints %s: %s", steps, {k: round(v, 4) for k, v in summary.items()})
    saver = checkpoint_lib.Checkpointer(workdir_lib.path(workdir, workdir_lib.AVERAGED_DIR), keep=1,
                                        use_async=False)
    saver.save(steps[-1], {"params": params}, force=True)
    saver.close()
    if jax.process_index() == 0:
        workdir_lib.write_json(workdir_lib.path(workdir, "averaged.json"), {"steps": steps, **summary})
    return summary


def before_step(task: Task, s: Setup, step: int, state: dict[str, Any],
                clock: budget_lib.TrainingClock) -> dict[str, Any]:
    """The task's replacement state (if any), and the clock's elapsed time for a timed schedule."""
    if task.before_step is not None:  # a replacement state, placed as the state is
        new = task.before_step(step, state)
        state = state if new is None else jax.device_put(new, s.shardings)
    if "elapsed_s" in state:
        state = {**state, "elapsed_s": jax.device_put(jnp.float32(clock.elapsed()),
                                                      s.shardings["elapsed_s"])}
    return state


_state_finite = jax.jit(all_finite)


def save_checked(s: "Setup", step: int, state: dict[str, Any], force: bool = False) -> None:
    """Checkpoints `state` at `step` once every float in it is finite.

    The step's loss, gradient and update norms (`monitor.FINITE_CHECKED`) stop a run at
    its first non-finite value; an optimizer-state entry that never reaches the update
    is caught here, so no checkpoint holds a NaN or inf.
    """
    if not bool(_state_finite(state)):
        raise monitor.non_finite_error("parameters or optimizer state", step, s.checkpointer)
    s.checkpointer.save(step, state, s.train_iter, force=force)


def save_unless_saved(s: "Setup", state: dict[str, Any]) -> int:
    """Checkpoints the state's step unless that step is already saved; returns the step."""
    step = int(state["step"])
    s.checkpointer.wait()
    if s.checkpointer.latest_step() != step:
        log.warning("saving step %d", step)
        save_checked(s, step, state, force=True)
        s.checkpointer.wait()
    return step


def stop_on_signal(logger, s: "Setup", state: dict[str, Any], signal_name: str) -> None:
    """A stop request between steps: flush the metrics, checkpoint, raise `Preempted`."""
    logger.flush()
    raise preemption.Preempted(save_unless_saved(s, state), signal_name)


def run(config, workdir: str) -> dict[str, Any]:
    """Trains `config.task` in `workdir` (resuming), or runs its `fit` (EM); returns final eval."""
    module = tasks.load(config.task)
    if hasattr(module, "fit"):
        return module.fit(config, workdir)
    return train_steps(config, workdir)


def train_steps(config, workdir: str) -> dict[str, Any]:
    """The gradient-step loop of `run`."""
    trainer = TrainerConfig.from_config(config)
    workdir_lib.check_writable(workdir)
    is_lead = jax.process_index() == 0
    s = setup(config, trainer, workdir)
    task, state, num_steps = s.task, s.state, trainer.train.num_steps
    start = int(state["step"])
    if is_lead:
        workdir_lib.write_config(workdir, config)
    keeper = BestKeeper(workdir, trainer.eval, is_lead)
    # The example has the largest batch shape; a run that stopped early compiles nothing.
    example = parallel.put_batch(task.example_batch, s.batch_sharding)
    flops = None if keeper.stopped else compiled_flops(s.compiled_for(example))
    eval_step = jax.jit(make_eval_step(task), in_shardings=(
        s.shardings["params"], s.shardings.get("model_state"), s.batch_sharding, None, None))
    writer = reporting.MetricWriter(workdir, enabled=is_lead)
    writer.drop_after(start)  # records a crash left past the restored checkpoint
    progress = reporting.Progress(num_steps, start, enabled=is_lead)
    logger = StepLogger(task, trainer.train, writer, progress, flops, s.checkpointer)
    final_eval: dict[str, float] = {}
    clock = budget_lib.TrainingClock(s.budget, float(state.get("elapsed_s", 0.0)))

    def evaluate_now(done):
        with clock.paused():
            summary = evaluate(task, eval_step, state, s.batch_sharding, s.eval_key)
            writer.write(done, "eval", summary)
            log.info("eval at step %d: %s", done, {k: round(v, 4) for k, v in summary.items()})
            if task.on_eval is not None and is_lead:
                task.on_eval(done, summary, state)
            if keeper.update(done, summary, state["params"]) and task.on_best and is_lead:
                task.on_best(done, summary)
        logger.restart_clock()  # keep eval time out of throughput
        return summary

    signals = preemption.StopSignals().__enter__()
    try:
        stop_after = trainer.train.max_steps_per_run
        last = num_steps if not stop_after else min(num_steps, start + stop_after)
        for step in range(start, last):
            if keeper.stopped or clock.spent():
                break
            if preemption.agreed(signals.requested):
                stop_on_signal(logger, s, state, signals.signal_name or "a signal on another host")
            state = before_step(task, s, step, state, clock)
            host_batch = next(s.train_iter)
            batch = parallel.put_batch(host_batch, s.batch_sharding)
            state, metrics = s.compiled_for(batch)(state, batch, s.train_key)
            logger.push(step + 1, metrics, task.tokens_in_batch(host_batch), state["params"])
            done, out_of_time = step + 1, clock.spent()
            if task.eval_batches is not None and (done % trainer.eval.every_steps == 0
                                                  or done == num_steps or out_of_time):
                logger.flush()
                final_eval = evaluate_now(done)
            if keeper.stopped or out_of_time:  # checkpoint this step, then leave the loop
                last = done
            if done % trainer.ckpt.every_steps == 0 or done == last:
                logger.flush()
                save_checked(s, done, state, force=done == last)
        logger.flush()
        finished = int(state["step"]) >= num_steps or keeper.stopped or clock.spent()
        budget_lib.warn_on_step_cap(s.budget, int(state["step"]), clock.elapsed())
        if finished and not final_eval and task.eval_batches is not None:  # resumed a finished run
            final_eval = evaluate(task, eval_step, state, s.batch_sharding, s.eval_key)
        if finished and trainer.ckpt.average_last > 1:
            average_checkpoints(task, s, state, eval_step, writer, workdir, trainer.ckpt.average_last)
    except KeyboardInterrupt:
        logger.flush()
        save_unless_saved(s, state)
        raise
    finally:
        signals.__exit__(None, None, None)
        for closeable in (keeper, writer, progress, s.checkpointer):
            closeable.close()
    if is_lead:
        reporting.plot_curves(workdir)
    if is_lead and finished:
        workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.FINAL_EVAL_FILE),
                               {"step": int(state["step"]), **final_eval})
    return final_eval
