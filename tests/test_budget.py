"""Time-budgeted training: the schedule on the clock, the stop, and the budget across a resume."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax import budget as budget_lib
from encoder_jax import checkpoint, configs, errors, optim, tasks, train

import toy_state_task


def test_the_schedule_is_read_at_the_elapsed_fraction_of_the_budget():
    schedule = optim.learning_rate_schedule(1e-3, 100, 10, "linear")
    b = budget_lib.Budget(seconds=600.0, num_steps=100, peak_lr=1e-3)
    for elapsed, step in ((0.0, 0), (30.0, 5), (60.0, 10), (330.0, 55), (600.0, 100), (900.0, 100)):
        lr, factor = b.lr_factor(schedule, jnp.float32(elapsed))
        np.testing.assert_allclose(float(lr), float(schedule(step)), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(float(factor), float(schedule(step)) / 1e-3, rtol=1e-5, atol=1e-9)


def test_a_step_cap_that_comes_before_the_clock_is_named_with_the_fraction_used():
    b = budget_lib.Budget(seconds=600.0, num_steps=100, peak_lr=1e-3)
    message = budget_lib.step_cap_warning(b, step=100, elapsed_s=240.0)
    assert "train.num_steps=100" in message and "4.0 of the 10 minutes" in message
    assert "40%" in message and "train.time_budget" in message
    assert budget_lib.step_cap_warning(b, step=100, elapsed_s=600.0) is None  # the clock ended it
    assert budget_lib.step_cap_warning(b, step=60, elapsed_s=240.0) is None  # a sliced run, not done
    assert budget_lib.step_cap_warning(None, step=100, elapsed_s=240.0) is None


def test_the_clock_counts_resumed_time_and_skips_pauses(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(budget_lib, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    clock = budget_lib.TrainingClock(budget_lib.Budget(60.0, 10, 1.0), already_s=50.0)
    now[0] += 5
    assert clock.elapsed() == 55.0 and not clock.spent()
    with clock.paused():
        now[0] += 1000
    assert clock.elapsed() == 55.0
    now[0] += 5
    assert clock.spent()
    assert not budget_lib.TrainingClock(None).spent()


def test_a_timed_step_equals_the_stepped_schedule_at_the_same_point():
    """AdamW with warm-up and decay: the update scaled by schedule(virtual)/peak from an optimizer
    at the peak rate equals the scheduled optimizer's update when the virtual step is the step."""
    task = tasks.base.Task(
        name="toy", init_params=lambda rng: {"w": jax.random.normal(rng, (6,)), "b": jnp.zeros(())},
        loss_fn=tasks.base.stateless(lambda p, b, rng, t: (
            jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2), {})),
        train_data=None, example_batch={}, summarize=dict)
    opt = configs.OptConfig(name="adamw", learning_rate=0.05, warmup_steps=2, weight_decay=0.1)
    tx, schedule = optim.build_optimizer(opt, 8)
    flat_tx, _ = optim.build_optimizer(configs.OptConfig(
        name="adamw", learning_rate=0.05, warmup_steps=0, weight_decay=0.1, schedule="constant"), 8)
    b = budget_lib.Budget(seconds=80.0, num_steps=8, peak_lr=0.05)
    stepped = jax.jit(train.make_train_step(task, tx, schedule))
    timed = jax.jit(train.make_train_step(task, flat_tx, schedule, budget=b))
    s1 = train.init_train_state(task, tx, jax.random.key(0))
    s2 = train.init_train_state(task, flat_tx, jax.random.key(0), timed=True)
    data = np.random.default_rng(0)
    for step in range(6):
        batch = {"x": data.normal(size=(8, 6)).astype(np.float32), "y": data.normal(size=8).astype(np.float32)}
        s1, m1 = stepped(s1, batch, jax.random.key(1))
        s2, m2 = timed({**s2, "elapsed_s": jnp.float32(10.0 * step)}, batch, jax.random.key(1))
        np.testing.assert_allclose(float(m2["learning_rate"]), float(m1["learning_rate"]), rtol=1e-6)
    assert float(s2["elapsed_s"]) == 50.0
    for a, c in zip(jax.tree_util.tree_leaves(s1["params"]), jax.tree_util.tree_leaves(s2["params"])):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.fixture
def fake_clock(monkeypatch):
    """Every reading of the training clock advances it by one second."""
    now = [0.0]

    def tick():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(budget_lib, "time", types.SimpleNamespace(perf_counter=tick))
    monkeypatch.setitem(tasks.TASKS, "toy_state", tasks.TaskEntry("toy_state_task"))


def test_a_spent_budget_stops_with_a_checkpoint_and_a_full_evaluation_and_resume_keeps_it(
        fake_clock, tmp_path):
    workdir = str(tmp_path / "run")
    config = toy_state_task.config(**{"train.num_steps": 1000, "train.time_budget": 0.25,
                                      "ckpt.every_steps": 4, "opt.schedule": "linear"})
    final = train.run(config, workdir)
    done = checkpoint.latest_step(workdir)
    assert 3 <= done < 20, done  # 15 clock seconds at about three readings per step
    assert final and json.load(open(os.path.join(workdir, "final_eval.json")))["step"] == done
    state = checkpoint.load_state(workdir)
    assert 14.0 <= float(state["elapsed_s"]) <= 15.0
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "eval"] == [done]
    rates = [r["learning_rate"] for r in records if r["split"] == "train"]
    # Linear decay over the budget, not over the 1000 steps: it is nearly over at the stop.
    assert rates == sorted(rates, reverse=True) and rates[0] < 0.05 and 0.0 < rates[-1] < 0.01
    assert train.run(config, workdir) == final  # resumed with the budget spent: no new step
    assert checkpoint.latest_step(workdir) == done
    with pytest.raises(errors.ConfigError, match="train.time_budget is unset but the run in .* was "
                                                  "started with one"):
        train.run(toy_state_task.config(**{"train.num_steps": 1000, "opt.schedule": "linear"}), workdir)
    assert checkpoint.latest_step(workdir) == done  # nothing set aside
