"""What the trainer watches: step metrics and throughput (MFU, memory), the best evaluation.

`StepLogger` fetches each step's metrics one step late (no host sync per step),
checks them for non-finite values, and writes window means every
`train.log_every` steps. `BestKeeper` keeps the params of the best evaluation by
`eval.best_metric` and decides early stopping.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from encoder_jax import errors
from encoder_jax import checkpoint as checkpoint_lib
from encoder_jax import configs
from encoder_jax import workdir as workdir_lib

log = logging.getLogger("encoder_jax")

NORM_METRICS = ("grad_norm", "param_norm", "update_norm", "learning_rate")
# Checked after every step: in a step a NaN or inf reaches the parameters through a
# non-finite update (update_norm), which a non-finite gradient (grad_norm) or
# optimizer-state entry causes. param_norm is checked at log steps, where
# `StepLogger.push` adds it; the whole state is checked before each checkpoint.
FINITE_CHECKED = ("loss", "grad_norm", "update_norm", "param_norm")
LOG_STEP_ONLY = ("param_norm",)  # absent from the other steps' metrics


@jax.jit
def param_norm(params: Any) -> jax.Array:
    """() float32: the global L2 norm of the parameters (a log-step metric, not part of the step)."""
    return optax.global_norm(params)


def non_finite_error(what: str, step: int, checkpointer) -> errors.NonFiniteError:
    """The one-line error for non-finite `what` at `step`, naming the last good checkpoint."""
    return errors.NonFiniteError(
        f"non-finite {what} at step {step}; the last good checkpoint is "
        f"{checkpointer.latest_step()} in {checkpointer.directory} (lower opt.learning_rate "
        f"or set opt.grad_clip_norm)")


@functools.cache
def measure_peak_flops(dim: int = 2048, repeats: int = 10) -> float:
    """Best achieved float32 matmul FLOP/s of one device: the CPU's stand-in for a data-sheet peak.

    The best of several runs, so that a busy machine understates the peak least; measured
    once per process on the default device (a second run in a notebook reuses it, and its
    MFU has the same base).
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
    """XLA's FLOP count of a compiled computation, where the backend gives one."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0)) or None if analysis else None


def log_parameter_counts(task, abstract: Any, mesh) -> None:
    """Logs the parameter count, devices and mesh, and how many parameters train."""
    leaves = jax.tree_util.tree_leaves(abstract["params"])
    num_params = sum(int(np.prod(a.shape)) for a in leaves)
    log.info("task %s: %s parameters, %d devices, mesh %s", task.name, f"{num_params:,}",
             jax.device_count(), dict(mesh.shape))
    if task.trainable is not None:
        mask = jax.tree_util.tree_leaves(task.trainable(abstract["params"]))
        trained = sum(int(np.prod(a.shape)) for a, m in zip(leaves, mask) if m)
        log.info("training %s of %s parameters (%.1f%%); the rest are frozen", f"{trained:,}",
                 f"{num_params:,}", 100.0 * trained / max(num_params, 1))


class StepLogger:
    """Host side of finished steps: non-finite check, window sums, one log line per window."""

    def __init__(self, task, train_cfg: configs.TrainConfig, writer, progress,
                 flops_per_step: float | None, checkpointer: checkpoint_lib.Checkpointer):
        self.task, self.writer, self.progress = task, writer, progress
        self.num_steps, self.log_every = train_cfg.num_steps, train_cfg.log_every
        self.flops_per_step = flops_per_step
        self.peak = train_cfg.peak_flops_per_device or measure_peak_flops()
        self.checkpointer = checkpointer
        self.pending = None
        self.restart_clock()

    def restart_clock(self) -> None:
        self.window = {"sums": None, "steps": 0, "tokens": 0, "t0": time.perf_counter()}

    def logs_at(self, done_step: int) -> bool:
        """Whether step `done_step` ends a window (writes a log line and the scalars)."""
        return done_step % self.log_every == 0 or done_step == self.num_steps

    def push(self, done_step: int, metrics: Any, tokens: int, params: Any = None) -> None:
        """Takes step `done_step`'s (device) metrics; absorbs the previous step's.

        `params` (the state's after the step) give `param_norm` at log steps.
        """
        self.flush()
        if params is not None and self.logs_at(done_step):
            metrics = {**metrics, "param_norm": param_norm(params)}
        self.pending = (done_step, metrics, tokens)

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._absorb(*pending)

    def _absorb(self, done_step: int, metrics: Any, tokens: int) -> None:
        metrics = jax.device_get(metrics)
        checked = [name for name in FINITE_CHECKED if name in metrics or name not in LOG_STEP_ONLY]
        bad = [name for name in checked if not np.isfinite(metrics[name])]
        if bad:  # checked before this step's checkpoint is written, so none holds non-finite values
            raise non_finite_error(", ".join(bad), done_step, self.checkpointer)
        window = self.window
        sums = {k: v for k, v in metrics.items() if k not in LOG_STEP_ONLY}
        window["sums"] = sums if window["sums"] is None else {
            k: window["sums"][k] + sums[k] for k in sums}
        window["steps"] += 1
        window["tokens"] += tokens
        if not self.logs_at(done_step):
            return
        scalars = self._scalars(metrics)
        self.writer.write(done_step, "train", scalars)
        self.progress.update(done_step, {"loss": scalars["loss"],
                                         "tok/s": round(scalars["tokens_per_s"])})
        self.restart_clock()

    def _scalars(self, last_metrics: Any) -> dict[str, float]:
        """The window's means, norms, throughput, memory and MFU."""
        window = self.window
        elapsed = time.perf_counter() - window["t0"]
        sums, steps = window["sums"], window["steps"]
        scalars = self.task.summarize({k: sums[k] for k in sums if k not in NORM_METRICS})
        step_time = elapsed / steps
        scalars.update({k: float(sums[k]) / steps for k in ("grad_norm", "update_norm")},
                       learning_rate=float(last_metrics["learning_rate"]),
                       step_time_s=step_time, tokens_per_s=window["tokens"] / elapsed,
                       peak_memory_mb=peak_memory_bytes() / 2 ** 20)
        if "param_norm" in last_metrics:  # given with the params (`push`)
            scalars["param_norm"] = float(last_metrics["param_norm"])
        if self.flops_per_step:
            scalars["mfu"] = self.flops_per_step / (step_time * self.peak)
            scalars["tflops_per_step"] = self.flops_per_step / 1e12
        return scalars


def metric_mode(metric: str, mode: str = "auto") -> str:
    """'max' or 'min': 'auto' minimises losses, perplexities and error rates."""
    if mode not in ("auto", "max", "min"):
        raise errors.ConfigError(f"eval.best_mode={mode!r}; valid: auto, max, min")
    if mode != "auto":
        return mode
    return "min" if any(w in metric for w in ("loss", "perplexity", "error")) else "max"


class BestKeeper:
    """Keeps the params of the best evaluation by `eval.best_metric` and decides early stopping.

    The best params go to <workdir>/best (an Orbax checkpoint `load_params` reads);
    best.json records the metric, best step/value and evaluations since, so a
    resumed run keeps counting. `eval.early_stop_patience` = evaluations without
    improvement before stopping (0: never).
    """

    def __init__(self, workdir: str, eval_cfg: configs.EvalConfig, is_lead: bool):
        eval_cfg = configs.section(configs.EvalConfig, eval_cfg, "eval")
        self.metric = eval_cfg.best_metric
        self.mode = metric_mode(self.metric or "", eval_cfg.best_mode)
        self.patience = eval_cfg.early_stop_patience
        self.is_lead = is_lead
        self.path = workdir_lib.path(workdir, workdir_lib.BEST_FILE)
        self.record = {"metric": self.metric, "mode": self.mode, "step": None, "value": None,
                       "evals_since_best": 0, "stopped": False}
        saved = workdir_lib.read_json_if_exists(self.path) if self.metric else None
        if saved is not None and (saved.get("metric"), saved.get("mode")) == (self.metric, self.mode):
            self.record = saved
        self.checkpointer = (checkpoint_lib.Checkpointer(
            os.path.join(workdir, workdir_lib.BEST_DIR), keep=1, use_async=False)
            if self.metric else None)

    @property
    def stopped(self) -> bool:
        return bool(self.record["stopped"])

    def update(self, step: int, summary: dict[str, float], params: Any) -> bool:
        """Records one evaluation; saves params if it is the best so far (returns True then)."""
        if not self.metric:
            return False
        if self.metric not in summary:
            raise errors.ConfigError(f"eval.best_metric={self.metric!r} is not an evaluation metric; "
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
            workdir_lib.write_json(self.path, self.record)
        return improved

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
