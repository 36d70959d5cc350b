"""launch.py end to end: every experiment's smoke variant trains, resumes; bad input fails in one line."""

import glob
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def launch(*args, env=None, timeout=600):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"ENCODER_JAX_DATA_DIR": str(tmp_path_factory.mktemp("launch_cache"))}


# MLM through launch.py trains, is killed and resumes in the kill -9 and SIGTERM tests below;
# classification and topics run their smoke variants in process (test_classify, test_topics);
# so their plain train-and-resume cases through launch.py run only with -m slow.
IN_CI = ("translate_zh_en.py",)


@pytest.mark.parametrize("experiment", [
    e if os.path.basename(e) in IN_CI else pytest.param(e, marks=pytest.mark.slow)
    for e in EXPERIMENTS], ids=os.path.basename)
def test_smoke_variant_trains_and_resumes(experiment, tmp_path, cache_env):
    workdir = str(tmp_path / "run")
    first = launch("--config", f"{experiment}:smoke", "--workdir", workdir, env=cache_env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        before = f.read()
    again = launch("--config", f"{experiment}:smoke", "--workdir", workdir,
                   "--config.train.num_steps=3", env=cache_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 2" in again.stderr
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        after = f.read()
    assert after.startswith(before) and '"step": 3' in after[len(before):]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    if experiment.endswith("topics_news.py"):  # --mode embed: the trained VAE's latent means
        docs = tmp_path / "docs.csv"
        docs.write_text("title,body\nbank stock,market price\ncup goal,the team won\nchip,code\n")
        embedded = launch("--config", f"{experiment}:smoke", "--workdir", workdir, "--mode", "embed",
                          f"--config.predict.input={docs}", env=cache_env)
        assert embedded.returncode == 0, embedded.stderr[-3000:]
        assert np.load(os.path.join(workdir, "embeddings.npy")).shape[0] == 3
        with open(os.path.join(workdir, "embeddings.ids.txt")) as f:
            assert f.read() == "0\n1\n2\n"
    pinned = PINNED_FIRST_LOSSES.get(os.path.basename(experiment))
    if pinned:
        import json

        losses = [json.loads(line)["loss"] for line in before.splitlines()
                  if json.loads(line)["split"] == "train"]
        np.testing.assert_allclose(losses[:2], pinned, rtol=1e-5, err_msg=(
            "the first two training losses of the smoke variant changed: fine after an intended "
            "change of the model, data, initialisation or loss (update PINNED_FIRST_LOSSES); "
            "a refactoring must leave them equal"))


# Training losses at steps 1 and 2 of the smoke variants whose data is generated here (the MLM
# smoke corpus is the running Python's own documentation, so it differs between Python versions).
PINNED_FIRST_LOSSES = {"classify_news.py": (1.385326862335205, 1.388228178024292),
                       "translate_zh_en.py": (5.7069091796875, 5.690513916015625)}


def _last_line(result):
    return result.stderr.strip().splitlines()[-1]


MLM = os.path.join(ROOT, "experiments", "bert_mlm.py")


def test_unknown_config_key_names_it_and_the_choices(tmp_path):
    result = launch("--config", f"{MLM}:smoke", "--workdir", str(tmp_path), "--config.opt.nme=sgd")
    assert result.returncode == 1
    line = _last_line(result)
    assert line.startswith("error: unknown config key 'opt.nme'") and "'name'" in line


def test_unknown_variant_names_the_choices(tmp_path):
    result = launch("--config", f"{MLM}:huge", "--workdir", str(tmp_path))
    assert result.returncode == 1
    assert _last_line(result) == ("error: bert_mlm variant 'huge'; valid: "
                                  "['default', 'smoke', 'small', 'base', 'large']")


def _tiny_corpus(tmp_path, text="a b c d e f g h\n" * 50):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text(text, encoding="utf-8")
    valid.write_text(text, encoding="utf-8")
    return [f"--config.data.files.train={train}", f"--config.data.files.validation={valid}",
            "--config.tokenizer.vocab_size=30"]


@pytest.fixture(scope="module")
def good_mlm_run(tmp_path_factory, cache_env):
    directory = tmp_path_factory.mktemp("good")
    workdir, corpus = directory / "run", _tiny_corpus(directory)
    ok = launch("--config", f"{MLM}:smoke", "--workdir", str(workdir), *corpus, env=cache_env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    return workdir, corpus


def test_missing_non_utf8_and_too_small_data(tmp_path, cache_env):
    missing = launch("--config", f"{MLM}:smoke", "--workdir", str(tmp_path / "a"),
                     f"--config.data.files.train={tmp_path}/nope.txt", env=cache_env)
    assert _last_line(missing) == f"error: data.files.train: '{tmp_path}/nope.txt' does not exist"
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"fine\n\xc3\x28 broken\n")
    result = launch("--config", f"{MLM}:smoke", "--workdir", str(tmp_path / "b"),
                    f"--config.data.files.train={bad}", f"--config.data.files.validation={bad}",
                    env=cache_env)
    assert result.returncode == 1
    assert _last_line(result).startswith(f"error: data file '{bad}' is not UTF-8 at line 2")
    small = launch("--config", f"{MLM}:smoke", "--workdir", str(tmp_path / "c"),
                   *_tiny_corpus(tmp_path, "tiny text here\n" * 3), env=cache_env)
    assert small.returncode == 1
    assert "fewer than one batch of data.batch_size x data.seq_len = 256" in _last_line(small)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = launch("--config", f"{MLM}:smoke", "--workdir", str(blocker / "run"))
    assert result.returncode == 1
    assert _last_line(result).startswith(f"error: --workdir '{blocker}/run' is not writable")


def test_kill_9_during_a_checkpoint_save_then_a_rerun_ends_as_the_uninterrupted_run(
        tmp_path, cache_env, good_mlm_run):
    """SIGKILL the moment a checkpoint save has started (a half-written step directory), rerun
    the same command: the run finishes with exactly the uninterrupted run's parameters."""
    import random
    import shutil

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fault_sweep

    good, corpus = good_mlm_run
    workdir = str(tmp_path / "run")
    args = ["--config", f"{MLM}:smoke", "--workdir", workdir, *corpus, "--config.ckpt.every_steps=1"]
    point = fault_sweep.kill_once(args, {**os.environ, **cache_env}, workdir, "save", random.Random(0))
    assert point["during_save"] and point["killed"], point
    rerun = launch(*args, env=cache_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert fault_sweep.same_params(workdir, str(good))
    shutil.rmtree(workdir)


def test_sigterm_checkpoints_the_step_in_flight_and_a_rerun_continues(tmp_path, cache_env):
    import json
    import signal
    import time

    workdir = tmp_path / "run"
    args = ["--config", f"{MLM}:smoke", "--workdir", str(workdir), *_tiny_corpus(tmp_path),
            "--config.eval.every_steps=100000", "--config.ckpt.every_steps=100000"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args,
                             "--config.train.num_steps=100000"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **cache_env})
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("preempted at step ") and "SIGTERM" in last, last
    step = int(last.split()[3])
    assert step >= 3 and (workdir / "checkpoints" / str(step)).is_dir()
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert logged == list(range(1, step + 1)), "every step up to the checkpoint flushed, once"
    again = launch(*args, f"--config.train.num_steps={step + 2}", env=cache_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {step}" in again.stderr
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()
              if json.loads(x)["split"] == "train"]
    assert logged == list(range(1, step + 3))


_SWEEP_SAMPLE = ("int field given text", "unknown optimizer", "sequence past max_len",
                 "batch not divisible by accumulation", "corrupt tokenizer in the workdir")


@pytest.mark.parametrize("name", _SWEEP_SAMPLE)
def test_fault_sweep_bad_inputs_sample(name, tmp_path, cache_env, good_mlm_run):
    """A sample of benchmarks/fault_sweep.py's 48 bad inputs, through the sweep's own check:
    exit status 1, one line naming the field or file, no traceback, the workdir unchanged."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fault_sweep

    assert len(fault_sweep.BAD_INPUTS) >= 40
    case = next(c for c in fault_sweep.BAD_INPUTS if c.name == name)
    files = fault_sweep.prepare_files(str(tmp_path / "files"), good_mlm_run[1])
    row = fault_sweep.check_bad_input(case, files, str(good_mlm_run[0]), str(tmp_path / "runs"),
                                      {**os.environ, **cache_env})
    assert row["returncode"] == 1 and row["one_line"] and row["workdir_intact"], row


def test_a_full_disk_is_one_line_and_only_errors_of_the_project_are_shortened():
    import errno

    import launch as launch_module
    from encoder_jax import errors

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    assert launch_module.error_line(full).startswith(
        "no space left on the device writing /runs/x/metrics.jsonl (No space left on device)")
    assert launch_module.error_line(errors.ConfigKeyError("unknown config key 'a.b'")) == \
        "unknown config key 'a.b'"
    for bug in (KeyError("params"), TypeError("unsupported operand"), ValueError("shapes differ"),
                FileNotFoundError(2, "No such file")):
        assert launch_module.error_line(bug) is None, bug  # a bug keeps its traceback


def test_a_save_the_disk_cannot_hold_is_refused_and_leaves_the_saved_ones(tmp_path, monkeypatch):
    import collections
    import shutil

    import jax.numpy as jnp

    from encoder_jax import checkpoint, errors

    saver = checkpoint.Checkpointer(str(tmp_path), use_async=False)
    state = {"w": jnp.ones((256, 256))}
    saver.save(1, state)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 100_000, 100_000))
    with pytest.raises(errors.StorageError, match=r"0\.1 MiB free on the device of .*checkpoints, "
                                                  r"a checkpoint needs about 1\.3 MiB"):
        saver.save(2, state)
    assert saver.latest_step() == 1 and sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert checkpoint.is_disk_full(ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']"))
    saver.close()
