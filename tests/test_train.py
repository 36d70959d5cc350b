"""The generic trainer on the MLM task: learning, exact resume, 1 vs 8 devices, optimizers."""

import ctypes
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from encoder_jax import checkpoint, configs, errors, optim, parallel, train

from conftest import ROOT, tiny_config


def _metrics(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _params(workdir):
    return jax.tree_util.tree_leaves(checkpoint.load_params(workdir))


def test_loss_falls_on_a_tiny_corpus(corpus_files, data_cache, tmp_path):
    config = tiny_config(corpus_files, data_cache, **{
        "train.num_steps": 300, "opt.learning_rate": 5e-3, "opt.warmup_steps": 10,
        "data.batch_size": 16, "eval.max_batches": None,
        "eval.every_steps": 300, "ckpt.every_steps": 300, "model.dropout_rate": 0.0,
        "model.attention_dropout_rate": 0.0, "model.hidden_dim": 64, "model.num_heads": 4,
        "model.mlp_dim": 128, "model.num_layers": 2, "train.log_every": 10})
    result = train.run(config, str(tmp_path))
    losses = [r["loss"] for r in _metrics(str(tmp_path))]
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    assert result["loss"] < result["unigram_loss"], result
    last = _metrics(str(tmp_path))[-1]
    for name in ("tokens_per_s", "step_time_s", "mfu", "peak_memory_mb", "grad_norm", "update_norm"):
        assert name in last
    # param_norm is read off the state at each log step: the final one is the saved params' norm.
    assert all("param_norm" in r for r in _metrics(str(tmp_path)))
    saved = np.sqrt(sum(float(np.sum(np.square(p))) for p in _params(str(tmp_path))))
    assert last["step"] == 300 and last["param_norm"] == pytest.approx(saved, rel=1e-5)
    assert os.path.isfile(tmp_path / "plots" / "loss.png")
    assert os.path.isfile(tmp_path / "tokenizer.model")
    assert json.load(open(tmp_path / "config.json"))["opt"]["name"] == "adamw"


_SIX = {"train.num_steps": 6, "ckpt.every_steps": 2, "eval.every_steps": 100}


@pytest.fixture(scope="module")
def straight_six(corpus_files, data_cache, tmp_path_factory):
    """Six uninterrupted steps, checkpoints every 2: what every interrupted run must end as."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    train.run(tiny_config(corpus_files, data_cache, **_SIX), workdir)
    return workdir


@pytest.fixture(scope="module")
def four_of_six(corpus_files, data_cache, tmp_path_factory):
    """The first 4 of those steps (num_steps=4: the schedule agrees with the 6-step run up to
    step 2, the checkpoint the damage tests fall back to)."""
    workdir = str(tmp_path_factory.mktemp("four") / "run")
    train.run(tiny_config(corpus_files, data_cache, **{**_SIX, "train.num_steps": 4}), workdir)
    return workdir


def _copy(source, tmp_path, name="run"):
    import shutil

    return shutil.copytree(source, str(tmp_path / name))


def test_interrupted_run_resumes_to_the_same_parameters(corpus_files, data_cache, tmp_path,
                                                        straight_six):
    overrides, straight, sliced = _SIX, straight_six, str(tmp_path / "sliced")
    stop = tiny_config(corpus_files, data_cache, **overrides, **{"train.max_steps_per_run": 3})
    train.run(stop, sliced)
    assert checkpoint.Checkpointer(sliced).latest_step() == 3
    first = _params(sliced)
    train.run(tiny_config(corpus_files, data_cache, **overrides), sliced)
    assert any(not np.array_equal(a, b) for a, b in zip(first, _params(sliced)))
    for a, b in zip(_params(straight), _params(sliced)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    steps = [r["step"] for r in _metrics(sliced)]
    assert steps == [1, 2, 3, 4, 5, 6], "each step logged once across the two runs"


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_gradient_accumulation_equals_one_big_batch_past_warmup(name):
    """The trainer's step with 2 or 4 micro-batches of an 8-row batch gives the same metrics and
    parameters as one 8-row batch, over 4 steps of which 2 are past warm-up (clipping on)."""
    import jax.numpy as jnp

    from encoder_jax import configs
    from encoder_jax.tasks.base import Task, stateless

    def loss(params, batch, rng, train_mode):
        del rng, train_mode
        err_B = batch["x"] @ params["w"] + params["b"] - batch["y"]
        rows = jnp.float32(err_B.shape[0])
        return jnp.mean(err_B ** 2), {"loss": jnp.mean(err_B ** 2) * rows, "denominator": rows}

    task = Task(name="toy", init_params=lambda rng: {"w": jax.random.normal(rng, (6,)),
                                                     "b": jnp.zeros(())},
                loss_fn=stateless(loss), train_data=None, example_batch={}, summarize=dict)
    data = np.random.default_rng(0)
    batches = [{"x": data.normal(size=(8, 6)).astype(np.float32),
                "y": data.normal(size=8).astype(np.float32)} for _ in range(4)]
    tx, schedule = optim.build_optimizer(configs.OptConfig(
        name=name, learning_rate=0.05, warmup_steps=2, schedule="constant", grad_clip_norm=5.0), 10)
    runs = {}
    for accum in (1, 2, 4):
        step = jax.jit(train.make_train_step(task, tx, schedule, accum))
        state = train.init_train_state(task, tx, jax.random.key(0))
        start = state["params"]
        losses = []
        for batch in batches:
            state, metrics = step(state, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
        runs[accum] = (state["params"], losses)
    assert float(jnp.abs(runs[1][0]["w"] - start["w"]).sum()) > 1e-3, "the steps moved the params"
    for accum in (2, 4):
        np.testing.assert_allclose(runs[accum][1], runs[1][1], rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(runs[accum][0]), jax.tree_util.tree_leaves(runs[1][0])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


_MULTI_DEVICE = r"""
import faulthandler, json, sys
faulthandler.dump_traceback_later(240, exit=True)  # a hang shows where every thread was
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax
from conftest import tiny_config
from encoder_jax import train, checkpoint, parallel
parallel.maybe_initialize_distributed()  # JAX_COORDINATOR_ADDRESS etc. when one of several processes
assert jax.device_count() == {devices}, jax.devices()
cfg = tiny_config({files!r}, {cache!r}, **{overrides!r})
train.run(cfg, {workdir!r})
# The state as the trainer holds it (restored with its shardings): which leaves are split.
s = train.setup(cfg, train.TrainerConfig.from_config(cfg), {workdir!r})
leaves = jax.tree_util.tree_leaves(s.state)
print(json.dumps({{"leaves": len(leaves),
                  "sharded": sum(not x.sharding.is_fully_replicated for x in leaves)}}))
"""


def _run_on_devices(devices, corpus_files, data_cache, workdir, overrides, processes=1):
    """Trains in `processes` processes (jax.distributed on localhost) with `devices` in all."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = _MULTI_DEVICE.format(root=ROOT, tests=os.path.join(ROOT, "tests"), devices=devices,
                                files=corpus_files, cache=data_cache, overrides=overrides,
                                workdir=workdir)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes))
    procs = [subprocess.Popen([sys.executable, "-c", code], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, "JAX_PROCESS_ID": str(i)})
             for i in range(processes)]
    outputs = [p.communicate(timeout=280) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    return json.loads(outputs[0][0].strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_device_run(corpus_files, data_cache, tmp_path_factory):
    """Three MLM smoke steps on one device: what every device layout must reproduce."""
    workdir = str(tmp_path_factory.mktemp("one_device") / "run")
    _run_on_devices(1, corpus_files, data_cache, workdir, _LAYOUT_STEPS)
    return workdir


_LAYOUT_STEPS = {"train.num_steps": 3, "eval.every_steps": 3, "ckpt.every_steps": 3}
_SHARDED = {"mesh.fsdp": 2, "mesh.min_shard_size": 256}  # below the smoke model's matrices


def _assert_same_run(one, other):
    for a, b in zip(_params(one), _params(other), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    a, b = _metrics(one, "eval")[-1], _metrics(other, "eval")[-1]
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in _metrics(one)],
                               [r["loss"] for r in _metrics(other)], rtol=1e-5)


def test_one_device_and_eight_fsdp_sharded_devices_give_the_same_steps(
        corpus_files, data_cache, tmp_path, one_device_run):
    """Eight devices as 4 data x 2 fsdp, with parameters and optimizer state really split:
    the same steps, eval and parameters as one device."""
    eight = str(tmp_path / "eight")
    layout = _run_on_devices(8, corpus_files, data_cache, eight, {**_LAYOUT_STEPS, **_SHARDED})
    assert layout["sharded"] >= 10, layout  # embeddings, attention and MLP kernels, their moments
    _assert_same_run(one_device_run, eight)


def test_two_processes_train_checkpoint_resume_and_match_one_device(
        corpus_files, data_cache, tmp_path, one_device_run):
    """jax.distributed on localhost: 2 processes x 2 CPU devices (gloo collectives), FSDP
    across the processes; 2 steps, checkpoint, exit, resume for the third: equal to one device."""
    workdir = str(tmp_path / "two_processes")
    overrides = {**_LAYOUT_STEPS, **_SHARDED, "ckpt.every_steps": 2}
    _run_on_devices(4, corpus_files, data_cache, workdir,
                    {**overrides, "train.max_steps_per_run": 2}, processes=2)
    assert checkpoint.Checkpointer(workdir).latest_step() == 2
    layout = _run_on_devices(4, corpus_files, data_cache, workdir, overrides, processes=2)
    assert layout["sharded"] >= 10, layout
    assert checkpoint.Checkpointer(workdir).latest_step() == 3
    _assert_same_run(one_device_run, workdir)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_updates_parameters(name):
    import jax.numpy as jnp
    import ml_collections

    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
              "layer_norm": {"scale": jnp.ones(2)}}
    cfg = ml_collections.ConfigDict(dict(name=name, learning_rate=0.1, warmup_steps=0,
                                         schedule="constant", weight_decay=0.1, grad_clip_norm=1.0))
    tx, _ = optim.build_optimizer(cfg, total_steps=10)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["dense"]["kernel"]).sum()) > 0


def test_weight_decay_skips_biases_and_layer_norm():
    mask = optim.decay_mask({"block": {"mlp": {"kernel": 0, "bias": 0}, "mlp_norm": {"scale": 0, "bias": 0}},
                             "output_bias": 0})
    assert mask == {"block": {"mlp": {"kernel": True, "bias": False},
                              "mlp_norm": {"scale": False, "bias": False}}, "output_bias": False}


def _mlp_grad_lowered():
    """A jitted gradient of a 3-layer MLP (enough buffers for the schedulers to differ)."""
    def loss(ws, x):
        for w in ws:
            x = jax.nn.gelu(x @ w)
        return (x ** 2).mean()

    ws = [jax.random.normal(jax.random.key(i), (256, 256)) / 16 for i in range(3)]
    x = jax.random.normal(jax.random.key(9), (512, 256))
    return jax.jit(jax.grad(loss)).lower(ws, x), (ws, x)


def test_the_memory_scheduler_computes_the_same_step_in_less_memory():
    lowered, args = _mlp_grad_lowered()
    memory, concurrency = (parallel.compile_step(lowered, s) for s in ("memory", "concurrency"))
    for a, b in zip(memory(*args), concurrency(*args)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert (memory.memory_analysis().temp_size_in_bytes
            < concurrency.memory_analysis().temp_size_in_bytes)


def test_a_jaxlib_without_the_scheduler_options_compiles_with_its_defaults(caplog):
    class Lowered:  # a jaxlib that knows none of CPU_SCHEDULER_OPTIONS
        def compile(self, options=None):
            if options:
                raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: No such compile option: 'x'")
            return "compiled with defaults"

    assert parallel.compile_step(Lowered(), "memory") == "compiled with defaults"
    assert "train.cpu_scheduler=memory" in caplog.text
    with pytest.raises(errors.ConfigError, match=r"train.cpu_scheduler='fast'; valid: \['memory', "
                                                 r"'concurrency'\]"):
        configs.section(configs.TrainConfig, {"cpu_scheduler": "fast"}, "train")


_FAULTS_PER_REALLOCATION = """
import resource, sys, threading
import numpy as np
from encoder_jax import parallel

applied = parallel.keep_freed_host_memory()
counts = []

def reallocate():  # like XLA's worker threads: 64 MiB temporaries, allocated and freed per step
    np.empty(2**23).fill(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        np.empty(2**23).fill(1.0)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=reallocate)
thread.start()
thread.join()
print(applied, counts[0])
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="needs glibc's mallopt")
def test_kept_host_memory_is_reused_without_page_faults_and_the_default_is_glibcs(monkeypatch):
    def run(policy):
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_REALLOCATION], check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "ENCODER_JAX_HOST_MALLOC": policy}).stdout.split()
        return out[0] == "True", int(out[1])

    (kept, kept_faults), (default, default_faults) = run("keep"), run("default")
    assert kept and not default
    monkeypatch.setenv("ENCODER_JAX_HOST_MALLOC", "kept")  # checked before any mallopt call
    with pytest.raises(errors.ConfigError, match=r"ENCODER_JAX_HOST_MALLOC='kept'; valid: keep, default"):
        parallel.keep_freed_host_memory()
    # glibc maps each 64 MiB block afresh: >= one fault per 2 MiB (huge) page, 5 blocks
    assert default_faults >= 5 * (2**26 // 2**21)
    assert kept_faults < default_faults // 10


def test_schedule_warms_up_then_decays():
    schedule = optim.learning_rate_schedule(1.0, total_steps=100, warmup_steps=10, decay="linear")
    assert float(schedule(0)) == 0 and float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.5) and float(schedule(100)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="opt.schedule='step'; valid"):
        optim.learning_rate_schedule(1.0, 10, 0, "step")


def test_non_finite_loss_stops_with_a_message_and_keeps_good_checkpoints(corpus_files, data_cache, tmp_path):
    config = tiny_config(corpus_files, data_cache, **{
        "train.num_steps": 8, "ckpt.every_steps": 1, "opt.name": "sgd", "opt.grad_clip_norm": 0.0,
        "opt.learning_rate": 1e30, "opt.warmup_steps": 4, "opt.schedule": "constant"})
    # Step 1 runs at learning rate 0 (warm-up) and is checkpointed; step 2 blows up.
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 2; the last good "
                                                 r"checkpoint is 1 in "):
        train.run(config, str(tmp_path))
    steps = checkpoint.Checkpointer(str(tmp_path)).manager.all_steps()
    assert list(steps) == [1]
    for step in steps:
        params = jax.tree_util.tree_leaves(checkpoint.load_params(str(tmp_path), step))
        assert all(np.isfinite(p).all() for p in params), f"checkpoint {step} holds non-finite values"


def test_all_finite_sees_one_bad_element_in_any_float_leaf():
    import jax.numpy as jnp

    tree = {"a": jnp.ones((3, 4)), "b": [jnp.zeros(2, jnp.bfloat16), jnp.arange(3)]}
    assert bool(train.all_finite(tree))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not bool(train.all_finite({**tree, "a": tree["a"].at[2, 1].set(bad)}))
        assert not bool(train.all_finite({**tree, "b": [tree["b"][0].at[1].set(bad), tree["b"][1]]}))


def test_param_norm_is_read_off_the_params_at_log_steps_only(tmp_path):
    """The step leaves param_norm out; StepLogger.push adds it from the params it is given at
    log steps (the window's last step), and a non-finite one stops the run there."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from encoder_jax import configs, errors
    from encoder_jax.monitor import StepLogger

    rows = []
    writer = SimpleNamespace(write=lambda step, split, scalars: rows.append((step, scalars)))
    logger = StepLogger(SimpleNamespace(summarize=dict), configs.TrainConfig(
        num_steps=10, log_every=2, peak_flops_per_device=1.0), writer=writer,
        progress=SimpleNamespace(update=lambda *a: None), flops_per_step=None,
        checkpointer=checkpoint.Checkpointer(str(tmp_path), use_async=False))
    metrics = {"loss": np.float32(2.0), "grad_norm": np.float32(1.0),
               "update_norm": np.float32(0.1), "learning_rate": np.float32(0.1)}
    logger.push(1, metrics, tokens=8, params={"w": jnp.full(4, 2.0)})
    assert "param_norm" not in logger.pending[1]  # not a log step: nothing computed
    logger.push(2, metrics, tokens=8, params={"w": jnp.full(4, 3.0)})
    logger.flush()
    assert [step for step, _ in rows] == [2]
    assert rows[0][1]["param_norm"] == pytest.approx(6.0)  # step 2's params, not step 1's
    logger.push(4, metrics, tokens=8, params={"w": jnp.ones(4).at[0].set(jnp.nan)})
    with pytest.raises(errors.NonFiniteError, match="non-finite param_norm at step 4"):
        logger.flush()


def test_non_finite_parameters_with_a_finite_loss_stop_before_any_checkpoint(tmp_path):
    """A non-finite norm is caught on the host before its step's checkpoint is written, even
    when the loss is finite; a NaN in the optimizer state that no norm shows is caught by the
    check before the save, and nothing is written for that step."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from encoder_jax import configs, errors
    from encoder_jax.monitor import StepLogger

    saver = checkpoint.Checkpointer(str(tmp_path), use_async=False)
    logger = StepLogger(SimpleNamespace(summarize=dict), configs.TrainConfig(
        num_steps=10, log_every=100, peak_flops_per_device=1.0), writer=None, progress=None,
        flops_per_step=None, checkpointer=saver)
    good = {"loss": np.float32(2.0), "grad_norm": np.float32(1.0), "update_norm": np.float32(0.1),
            "param_norm": np.float32(5.0), "learning_rate": np.float32(0.1)}
    logger.push(1, good, tokens=8)
    logger.push(2, {**good, "param_norm": np.float32(np.inf)}, tokens=8)
    with pytest.raises(errors.NonFiniteError, match="non-finite param_norm at step 2; the last "
                                                    "good checkpoint is None"):
        logger.flush()
    setup = SimpleNamespace(checkpointer=saver, train_iter=None)
    state = {"step": jnp.int32(3), "params": {"w": jnp.ones(4)},
             "opt_state": {"mu": jnp.zeros(4), "count": jnp.int32(3)}}
    train.save_checked(setup, 3, state)
    bad = {**state, "step": jnp.int32(4), "opt_state": {"mu": jnp.zeros(4).at[1].set(jnp.nan),
                                                         "count": jnp.int32(4)}}
    with pytest.raises(errors.NonFiniteError, match="non-finite parameters or optimizer state "
                                                    "at step 4; the last good checkpoint is 3 in "):
        train.save_checked(setup, 4, bad)
    assert list(saver.manager.all_steps()) == [3]
    saver.close()


def _damage(step_dir):
    """What a full disk or a dying node leaves: every file of the step truncated."""
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(os.path.getsize(f.name) // 3, 1))


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes_exactly(
        corpus_files, data_cache, tmp_path, caplog, straight_six, four_of_six):
    overrides, straight, damaged = _SIX, straight_six, _copy(four_of_six, tmp_path)
    _damage(os.path.join(damaged, "checkpoints", "4"))
    with caplog.at_level("WARNING", logger="encoder_jax"):
        train.run(tiny_config(corpus_files, data_cache, **overrides), damaged)
    assert any("checkpoint step 4" in r.getMessage() and "does not restore" in r.getMessage()
               for r in caplog.records)
    aside = os.listdir(os.path.join(damaged, checkpoint.CORRUPT_DIR))
    assert len(aside) == 1 and aside[0].startswith("4-")  # kept for inspection, not deleted
    for a, b in zip(_params(straight), _params(damaged)):  # resumed from step 2: same end point
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_when_no_checkpoint_restores_the_error_names_them(corpus_files, data_cache, tmp_path,
                                                         four_of_six):
    overrides, workdir = _SIX, _copy(four_of_six, tmp_path)
    for step in ("2", "4"):
        _damage(os.path.join(workdir, "checkpoints", step))
    with pytest.raises(ValueError, match=r"no checkpoint in .* restores \(set aside: step 4 -> .*"
                                         r"step 2 -> "):
        train.run(tiny_config(corpus_files, data_cache, **overrides), workdir)


def test_a_crash_between_checkpoints_leaves_every_step_logged_once(corpus_files, data_cache, tmp_path,
                                                                   four_of_six):
    """Steps 3-4 logged but their checkpoint lost (as a crash after logging leaves it), and a
    torn last line: the resumed run drops them and logs 3-6 once."""
    import shutil

    workdir = _copy(four_of_six, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "split": "tr')  # killed mid-write
    train.run(tiny_config(corpus_files, data_cache, **_SIX), workdir)
    train_steps = [r["step"] for r in _metrics(workdir) if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]


def test_a_run_resumed_on_another_host_count_takes_the_global_data_position(tmp_path, monkeypatch,
                                                                            caplog):
    """Checkpoints hold process_<i>-of-<n>.json; a process that has none of its own (the host
    count changed) takes process 0's: every host's position is the global stream's."""
    import grain
    import jax.numpy as jnp

    saver = checkpoint.Checkpointer(str(tmp_path), use_async=False)
    stream = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(7):
        next(stream)
    saver.save(1, {"w": jnp.zeros(3)}, stream)
    saver.close()
    data_dir = str(tmp_path / "checkpoints" / "1" / "data")
    assert [n for n in os.listdir(data_dir) if n.endswith(".json")] == ["process_0-of-1.json"]
    fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with caplog.at_level("WARNING", logger="encoder_jax"):
        checkpoint.restore_data_position(data_dir, fresh)
    assert next(fresh) == 7
    assert any("saved by 1 processes, this run has 2" in r.getMessage() for r in caplog.records)
    os.remove(os.path.join(data_dir, "process_0-of-1.json"))
    with pytest.raises(ValueError, match="holds no data-iterator position"):
        checkpoint.restore_data_position(data_dir, fresh)


def test_readers_skip_a_damaged_newest_checkpoint_without_moving_it(tmp_path, four_of_six, caplog):
    """predict / export / init_from read the newest checkpoint that restores; the run is left as is."""
    workdir = _copy(four_of_six, tmp_path)
    _damage(os.path.join(workdir, "checkpoints", "4"))
    with caplog.at_level("WARNING", logger="encoder_jax"):
        params = jax.tree_util.tree_leaves(checkpoint.load_params(workdir))
    assert any("checkpoint step 4" in r.getMessage() for r in caplog.records)
    for a, b in zip(params, jax.tree_util.tree_leaves(checkpoint.load_params(four_of_six, 2)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
