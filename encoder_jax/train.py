"""The one training loop: init or restore, sharded jitted step, eval, checkpoints, logs.

Tasks plug in through `encoder_jax.tasks.base.Task`; see `TASKS`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from encoder_jax import checkpoint as checkpoint_lib
from encoder_jax import optim, parallel, reporting
from encoder_jax.tasks.base import Task

log = logging.getLogger("encoder_jax")

TASKS = {"mlm": "encoder_jax.tasks.mlm"}


def build_task(config, workdir: str | None) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"task={config.task!r}; valid: {sorted(TASKS)}")
    module = importlib.import_module(TASKS[config.task])
    return module.build(config, workdir, jax.process_index(), jax.process_count())


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule, accum_steps: int = 1):
    """(state, batch, base_key) -> (state, metrics): pure, to be jitted once."""

    def grads_and_sums(params, batch, rng):
        grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
        if accum_steps == 1:
            (_, sums), grads = grad_fn(params, batch, rng, True)
            return grads, sums
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

        def body(carry, inputs):
            index, micro_batch = inputs
            (_, sums), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index), True)
            return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        sums_shape = jax.eval_shape(lambda: task.loss_fn(params, first, rng, True)[1])
        zero = (jax.tree_util.tree_map(jnp.zeros_like, params),
                jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
        (grads, sums), _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), micro))
        return jax.tree_util.tree_map(lambda g: g / accum_steps, grads), sums

    def train_step(state, batch, base_key):
        rng = jax.random.fold_in(base_key, state["step"])
        grads, sums = grads_and_sums(state["params"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**sums, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params),
                   "update_norm": optax.global_norm(updates),
                   "learning_rate": schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def measure_peak_flops(dim: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 matmul FLOP/s of one device: the CPU's stand-in for a data-sheet peak."""
    x = jnp.ones((dim, dim), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * dim ** 3 / float(np.median(times))


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it, else the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def compiled_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0)) or None if analysis else None


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"--workdir {workdir!r} is not writable: {e.strerror}") from None


def evaluate(task: Task, eval_step, params, batch_sharding, eval_key) -> dict[str, float]:
    """Runs the whole held-out split; sums stay on device until the end."""
    totals = None
    for index, host_batch in enumerate(task.eval_batches()):
        sums = eval_step(params, parallel.put_batch(host_batch, batch_sharding),
                         jax.random.fold_in(eval_key, index))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("the evaluation split yields no batch")
    return task.summarize({k: np.asarray(jax.device_get(v), np.float64) for k, v in totals.items()})


def run(config, workdir: str) -> dict[str, Any]:
    """Trains `config.task` in `workdir`, resuming if it holds a checkpoint; returns final eval."""
    check_workdir(workdir)
    is_lead = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh.fsdp)
    task = build_task(config, workdir)
    num_steps = config.train.num_steps
    tx, schedule = optim.build_optimizer(config.opt, num_steps, task.trainable)

    def init_state(rng):
        params = task.init_params(rng)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    root_key = jax.random.key(config.seed)
    init_key, train_key, eval_key = jax.random.split(root_key, 3)
    abstract = jax.eval_shape(init_state, init_key)
    shardings = parallel.state_shardings(abstract, mesh, config.mesh.get("min_shard_size", 2 ** 14))
    batch_sharding = parallel.batch_sharding(mesh)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt.keep,
                                               use_async=config.ckpt.get("use_async", True))
    train_iter = iter(task.train_data)
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract, train_iter)
        log.info("resumed from %s at step %d", checkpointer.directory, int(state["step"]))
    else:
        state = jax.jit(init_state, out_shardings=shardings)(init_key)
        if task.init_from is not None:
            params = jax.device_put(task.init_from(jax.device_get(state["params"])),
                                    shardings["params"])
            state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                       "opt_state": tx.init(p)}, out_shardings=shardings)(params)
    start = int(state["step"])
    if is_lead:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(abstract["params"]))
    log.info("task %s: %s parameters, %d devices, mesh %s", task.name, f"{num_params:,}",
                 jax.device_count(), dict(mesh.shape))

    train_step = make_train_step(task, tx, schedule, config.opt.get("grad_accum_steps", 1))
    example = parallel.put_batch(task.example_batch, batch_sharding)
    compiled = jax.jit(train_step, in_shardings=(shardings, batch_sharding, None),
                       out_shardings=(shardings, None), donate_argnums=0
                       ).lower(state, example, train_key).compile()
    flops_per_step = compiled_flops(compiled)
    peak = config.train.get("peak_flops_per_device") or measure_peak_flops()
    eval_step = jax.jit(task.eval_fn or (lambda p, b, r: task.loss_fn(p, b, r, False)[1]),
                        in_shardings=(shardings["params"], batch_sharding, None))

    writer = reporting.MetricWriter(workdir, enabled=is_lead)
    progress = reporting.Progress(num_steps, start, enabled=is_lead)
    log_every, eval_every = config.train.log_every, config.eval.every_steps
    ckpt_every = config.ckpt.every_steps
    window = {"sums": None, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
    pending = None
    final_eval: dict[str, float] = {}

    def absorb(done_step, metrics, tokens):
        """Host side of one finished step: non-finite check, window sums, logging."""
        metrics = jax.device_get(metrics)
        if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {done_step}; the last good checkpoint is "
                f"{checkpointer.latest_step()} in {checkpointer.directory} (lower opt.learning_rate "
                f"or set opt.grad_clip_norm)")
        window["sums"] = metrics if window["sums"] is None else {
            k: window["sums"][k] + metrics[k] for k in metrics}
        window["steps"] += 1
        window["tokens"] += tokens
        if done_step % log_every and done_step != num_steps:
            return
        elapsed = time.perf_counter() - window["t0"]
        sums, steps = window["sums"], window["steps"]
        scalars = task.summarize({k: sums[k] for k in sums if k not in (
            "grad_norm", "param_norm", "update_norm", "learning_rate")})
        step_time = elapsed / steps
        scalars.update({k: float(sums[k]) / steps for k in ("grad_norm", "update_norm")},
                       param_norm=float(metrics["param_norm"]),
                       learning_rate=float(metrics["learning_rate"]),
                       step_time_s=step_time, tokens_per_s=window["tokens"] / elapsed,
                       peak_memory_mb=peak_memory_bytes() / 2 ** 20)
        if flops_per_step:
            scalars["mfu"] = flops_per_step / (step_time * peak)
            scalars["tflops_per_step"] = flops_per_step / 1e12
        writer.write(done_step, "train", scalars)
        progress.update(done_step, {"loss": scalars["loss"], "tok/s": round(scalars["tokens_per_s"])})
        window.update(sums=None, steps=0, tokens=0, t0=time.perf_counter())

    def flush():
        nonlocal pending
        if pending is not None:
            absorb(*pending)
            pending = None

    try:
        for step in range(start, num_steps):
            host_batch = next(train_iter)
            tokens = task.tokens_in_batch(host_batch)
            state, metrics = compiled(state, parallel.put_batch(host_batch, batch_sharding), train_key)
            flush()
            pending = (step + 1, metrics, tokens)
            done = step + 1
            if task.eval_batches is not None and (done % eval_every == 0 or done == num_steps):
                flush()
                final_eval = evaluate(task, eval_step, state["params"], batch_sharding, eval_key)
                writer.write(done, "eval", final_eval)
                log.info("eval at step %d: %s", done,
                             {k: round(v, 4) for k, v in final_eval.items()})
                if task.on_eval is not None and is_lead:
                    task.on_eval(done, final_eval)
                window["t0"] = time.perf_counter()  # keep eval time out of throughput
            if done % ckpt_every == 0 or done == num_steps:
                flush()
                checkpointer.save(done, state, train_iter, force=done == num_steps)
        flush()
        if not final_eval and task.eval_batches is not None:  # resumed a finished run
            final_eval = evaluate(task, eval_step, state["params"], batch_sharding, eval_key)
    except KeyboardInterrupt:
        step_now = int(state["step"])
        log.warning("interrupted: saving step %d", step_now)
        checkpointer.save(step_now, state, train_iter, force=True)
        raise
    finally:
        checkpointer.close()
        writer.close()
        progress.close()
    if is_lead:
        reporting.plot_curves(workdir)
        with open(os.path.join(workdir, "final_eval.json"), "w", encoding="utf-8") as f:
            json.dump({"step": num_steps, **final_eval}, f, indent=2)
    return final_eval
