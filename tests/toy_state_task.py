"""A tiny task for trainer tests: linear regression with non-parameter state and a step-aware loss.

model_state holds a running mean of the inputs (D,), a row count, and a (D, D)
second-moment matrix large enough to be FSDP-sharded in multi-device tests. The
loss reports the step it was given, so tests see that `step` reaches `loss_fn`.
Registered by tests as task "toy_state" (`tasks.TASKS`), never by the library.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from encoder_jax.tasks.base import Task

DIM, ROWS = 16, 8


def example(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    x = rng.normal(size=DIM).astype(np.float32)
    return {"x": x, "y": np.asarray(x @ np.linspace(-1, 1, DIM), np.float32)}


def config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({
        "task": "toy_state", "seed": 0,
        "opt": {"name": "sgd", "learning_rate": 0.05, "warmup_steps": 0, "schedule": "constant"},
        "train": {"num_steps": 6, "log_every": 1},
        "ckpt": {"every_steps": 1, "keep": 10, "use_async": False},
        "eval": {"every_steps": 100},
        "mesh": {"fsdp": 1, "min_shard_size": 2 ** 14}})
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def build(config, workdir, shard_index=0, shard_count=1) -> Task:
    del config, workdir
    rows = ROWS // shard_count
    data = (grain.MapDataset.range(10 ** 6).map(example).to_iter_dataset()
            .batch(ROWS).map(lambda b: {k: v[shard_index * rows:(shard_index + 1) * rows]
                                        for k, v in b.items()}))

    def init_model_state(rng):
        del rng
        return {"mean": jnp.zeros(DIM), "count": jnp.zeros((), jnp.int32),
                "second_moment": jnp.zeros((DIM, DIM))}

    def loss_fn(params, model_state, batch, rng, step, train):
        del rng
        pred_B = batch["x"] @ params["w"]
        count_B = jnp.ones_like(batch["y"])
        loss = jnp.mean((pred_B - batch["y"]) ** 2)
        sums = {"loss": loss * count_B.sum(), "step_seen": step.astype(jnp.float32) * count_B.sum(),
                "denominator": count_B.sum()}
        if train:
            model_state = {
                "mean": 0.9 * model_state["mean"] + 0.1 * batch["x"].mean(0),
                "count": model_state["count"] + batch["x"].shape[0],
                "second_moment": model_state["second_moment"] + batch["x"].T @ batch["x"]}
        return loss, sums, model_state

    eval_set = [{k: np.stack([example(10 ** 7 + i)[k] for i in range(ROWS)]) for k in ("x", "y")}]
    return Task(name="toy_state", init_params=lambda rng: {"w": jnp.zeros(DIM)},
                loss_fn=loss_fn, train_data=data, example_batch=eval_set[0],
                summarize=lambda s: {k: float(v) / float(s["denominator"]) for k, v in s.items()
                                     if k != "denominator"},
                eval_batches=lambda: iter(eval_set), init_model_state=init_model_state)
