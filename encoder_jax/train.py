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

TASKS = {"mlm": "encoder_jax.tasks.mlm", "classify": "encoder_jax.tasks.classify"}
BEST_DIR = "best"  # <workdir>/best: params of the best evaluation (eval.best_metric)


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


def measure_peak_flops(dim: int = 2048, repeats: int = 10) -> float:
    """Best achieved float32 matmul FLOP/s of one device: the CPU's stand-in for a data-sheet peak.

    The best of several runs, so that a busy machine understates the peak least.
    """
    x = jnp.ones((dim, dim), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * dim ** 3 / min(times)


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


def to_host(tree: Any) -> Any:
    """A pytree of global arrays as host numpy (gathered from every process)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def evaluate(task: Task, eval_step, params, batch_sharding, eval_key) -> dict[str, float]:
    """Runs the whole held-out split; sums stay on device until the end.

    A task with `summarize_eval` gets every batch's outputs on the host instead
    (per-example predictions for metrics that do not decompose into sums).
    """
    outputs = (eval_step(params, parallel.put_batch(host_batch, batch_sharding),
                         jax.random.fold_in(eval_key, index))
               for index, host_batch in enumerate(task.eval_batches()))
    if task.summarize_eval is not None:
        return task.summarize_eval(to_host(out) for out in outputs)
    totals = None
    for sums in outputs:
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("the evaluation split yields no batch")
    return task.summarize({k: np.asarray(jax.device_get(v), np.float64) for k, v in totals.items()})


def metric_mode(metric: str, mode: str = "auto") -> str:
    """'max' or 'min': 'auto' minimises losses, perplexities and error rates."""
    if mode not in ("auto", "max", "min"):
        raise ValueError(f"eval.best_mode={mode!r}; valid: auto, max, min")
    if mode != "auto":
        return mode
    return "min" if any(w in metric for w in ("loss", "perplexity", "error")) else "max"


class BestKeeper:
    """Keeps the params of the best evaluation by `eval.best_metric` and decides early stopping.

    The best params go to <workdir>/best (an Orbax checkpoint `load_params` reads);
    best.json records the metric, best step/value and evaluations since, so a
    resumed run keeps counting. `eval.early_stop_patience` = evaluations without
    improvement before stopping (0 / None: never).
    """

    def __init__(self, workdir: str, eval_cfg, is_lead: bool):
        self.metric = eval_cfg.get("best_metric")
        self.mode = metric_mode(self.metric or "", eval_cfg.get("best_mode", "auto"))
        self.patience = eval_cfg.get("early_stop_patience") or 0
        self.is_lead = is_lead
        self.path = os.path.join(workdir, "best.json")
        self.record = {"metric": self.metric, "mode": self.mode, "step": None, "value": None,
                       "evals_since_best": 0, "stopped": False}
        if self.metric and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                saved = json.load(f)
            if (saved.get("metric"), saved.get("mode")) == (self.metric, self.mode):
                self.record = saved
        self.checkpointer = (checkpoint_lib.Checkpointer(os.path.join(workdir, BEST_DIR), keep=1,
                                                         use_async=False) if self.metric else None)

    @property
    def stopped(self) -> bool:
        return bool(self.record["stopped"])

    def update(self, step: int, summary: dict[str, float], params: Any) -> bool:
        """Records one evaluation; saves params if it is the best so far (returns True then)."""
        if not self.metric:
            return False
        if self.metric not in summary:
            raise ValueError(f"eval.best_metric={self.metric!r} is not an evaluation metric; "
                             f"valid: {sorted(summary)}")
        value, best = float(summary[self.metric]), self.record["value"]
        improved = best is None or (value > best if self.mode == "max" else value < best)
        if improved:
            self.record.update(step=step, value=value, evals_since_best=0)
            if self.checkpointer.latest_step() != step:
                self.checkpointer.save(step, {"params": params}, force=True)
        else:
            self.record["evals_since_best"] += 1
        self.record["stopped"] = bool(self.patience and self.record["evals_since_best"] >= self.patience)
        if self.record["stopped"]:
            log.info("early stopping at step %d: %s has not improved on %.4f (step %d) for %d "
                     "evaluations", step, self.metric, self.record["value"], self.record["step"],
                     self.patience)
        if self.is_lead:
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(self.record, f, indent=2)
        return improved

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()


def load_trained_params(workdir: str) -> Any:
    """A finished run's params: the best evaluation's (<workdir>/best) if kept, else the latest."""
    def has_steps(directory):
        path = os.path.join(directory, checkpoint_lib.CHECKPOINT_DIR)
        return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))

    source = next((d for d in (os.path.join(workdir, BEST_DIR), workdir) if has_steps(d)), None)
    if source is None:
        raise FileNotFoundError(f"--workdir {workdir!r} holds no checkpoint: train there first")
    log.info("loading params from %s", source)
    return checkpoint_lib.load_params(source)


def predict(config, workdir: str) -> str:
    """--mode predict: the task module's `predict(config, workdir, params)`; returns the output path."""
    if config.task not in TASKS:
        raise ValueError(f"task={config.task!r}; valid: {sorted(TASKS)}")
    module = importlib.import_module(TASKS[config.task])
    if not hasattr(module, "predict"):
        raise ValueError(f"task={config.task!r} has no predict mode")
    return module.predict(config, workdir, load_trained_params(workdir))


def run(config, workdir: str) -> dict[str, Any]:
    """Trains `config.task` in `workdir`, resuming if it holds a checkpoint; returns final eval."""
    check_workdir(workdir)
    is_lead = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh.fsdp)
    task = build_task(config, workdir)
    num_steps = config.train.num_steps
    tx, schedule = optim.build_optimizer(config.opt, num_steps, task.trainable, task.lr_scale)

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
    if task.trainable is not None:
        mask = jax.tree_util.tree_leaves(task.trainable(abstract["params"]))
        trained = sum(int(np.prod(a.shape)) for a, m in zip(
            jax.tree_util.tree_leaves(abstract["params"]), mask) if m)
        log.info("training %s of %s parameters (%.1f%%); the rest are frozen", f"{trained:,}",
                 f"{num_params:,}", 100.0 * trained / max(num_params, 1))

    train_step = make_train_step(task, tx, schedule, config.opt.get("grad_accum_steps", 1))
    example = parallel.put_batch(task.example_batch, batch_sharding)
    step_fn = jax.jit(train_step, in_shardings=(shardings, batch_sharding, None),
                      out_shardings=(shardings, None), donate_argnums=0)
    compiled_steps: dict[tuple, Any] = {}

    def compiled_for(batch):
        """The step compiled once per batch shape (tasks may pad to a few fixed lengths)."""
        signature = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if signature not in compiled_steps:
            compiled_steps[signature] = step_fn.lower(abstract, batch, train_key).compile()
        return compiled_steps[signature]

    keeper = BestKeeper(workdir, config.eval, is_lead)
    # The example has the largest batch shape; a run that stopped early compiles nothing.
    flops_per_step = None if keeper.stopped else compiled_flops(compiled_for(example))
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
        stop_after = config.train.get("max_steps_per_run")
        last = num_steps if not stop_after else min(num_steps, start + stop_after)
        for step in range(start, last):
            if keeper.stopped:
                break
            host_batch = next(train_iter)
            tokens = task.tokens_in_batch(host_batch)
            batch = parallel.put_batch(host_batch, batch_sharding)
            state, metrics = compiled_for(batch)(state, batch, train_key)
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
                if keeper.update(done, final_eval, state["params"]) and task.on_best and is_lead:
                    task.on_best(done, final_eval)
                if keeper.stopped:  # early stopping: checkpoint this step, then leave the loop
                    last = done
                window["t0"] = time.perf_counter()  # keep eval time out of throughput
            if done % ckpt_every == 0 or done == last:
                flush()
                checkpointer.save(done, state, train_iter, force=done == last)
        flush()
        finished = int(state["step"]) >= num_steps or keeper.stopped
        if finished and not final_eval and task.eval_batches is not None:  # resumed a finished run
            final_eval = evaluate(task, eval_step, state["params"], batch_sharding, eval_key)
    except KeyboardInterrupt:
        step_now = int(state["step"])
        log.warning("interrupted: saving step %d", step_now)
        checkpointer.save(step_now, state, train_iter, force=True)
        raise
    finally:
        checkpointer.close()
        keeper.close()
        writer.close()
        progress.close()
    if is_lead:
        reporting.plot_curves(workdir)
    if is_lead and finished:
        with open(os.path.join(workdir, "final_eval.json"), "w", encoding="utf-8") as f:
            json.dump({"step": int(state["step"]), **final_eval}, f, indent=2)
    return final_eval
