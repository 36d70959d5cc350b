"""The seams new tasks build on: config sections, the run directory, the task registry,
model state and the step reaching the loss, and one pretrained-weights path."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from encoder_jax import checkpoint, configs, pretrained, tasks, train
from encoder_jax import workdir as workdir_lib
from encoder_jax.data.labels import LabelSpace
from encoder_jax.layers import EncoderConfig
from encoder_jax.tasks import classify

from conftest import ROOT
import toy_state_task

EXPERIMENTS = {"bert_mlm.py": ("smoke", "default", "small", "base", "large"),
               "classify_news.py": ("ag_news", "ag_news_tfds", "thucnews", "csv", "smoke")}
SECTIONS = {"opt": configs.OptConfig, "train": configs.TrainConfig, "ckpt": configs.CheckpointConfig,
            "eval": configs.EvalConfig, "mesh": configs.MeshConfig, "tokenizer": configs.TokenizerConfig,
            "mlm": configs.MaskedLmConfig, "finetune": configs.FinetuneConfig,
            "predict": configs.PredictConfig, "sweep": configs.SweepConfig, "cv": configs.CvConfig}


def experiment(name, variant):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "experiments", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


# ----------------------------------------------------------------------------- config boundary


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in EXPERIMENTS.items() for v in vs])
def test_every_experiment_section_reads_into_its_dataclass(name, variant):
    config = experiment(name, variant)
    data_kind = configs.TextDataConfig if config.task == "mlm" else configs.ClassifyDataConfig
    read = {"data": configs.section(data_kind, config.data, "data")}
    for section, kind in SECTIONS.items():
        if section in config:
            read[section] = configs.section(kind, config[section], section)
    assert read["opt"].learning_rate == config.opt.learning_rate
    assert read["data"].batch_size == config.data.batch_size
    ignore = classify.TASK_MODEL_FIELDS if config.task == "classify" else ()
    scratch = config.model.get("scratch")
    encoder = EncoderConfig.from_config(config.model, 100, ignore=ignore,
                                        **(scratch.to_dict() if scratch else {}))
    assert encoder.vocab_size == 100 and encoder.dtype == jnp.float32


def test_section_errors_name_the_field_and_the_valid_choices():
    with pytest.raises(KeyError, match=r"unknown config key opt.lr; valid: \['b1', 'b2'"):
        configs.section(configs.OptConfig, {"lr": 1.0}, "opt")
    with pytest.raises(TypeError, match=r"^opt.learning_rate='fast' must be float$"):
        configs.section(configs.OptConfig, {"learning_rate": "fast"}, "opt")
    with pytest.raises(TypeError, match=r"^train.num_steps=1.5 must be int$"):
        configs.section(configs.TrainConfig, {"num_steps": 1.5}, "train")
    with pytest.raises(TypeError, match=r"^eval.batch_size=True must be int or None$"):
        configs.section(configs.EvalConfig, {"batch_size": True}, "eval")
    with pytest.raises(KeyError, match=r"unknown config key data.files.test"):
        configs.section(configs.TextDataConfig, {"files": {"test": "x"}}, "data")
    with pytest.raises(KeyError, match=r"unknown config key model.hidden; valid: \["):
        EncoderConfig.from_config({"hidden": 3}, 10)


def test_section_defaults_live_in_one_place_and_convert_values():
    opt = configs.section(configs.OptConfig, ml_collections.ConfigDict({"learning_rate": 1}), "opt")
    assert opt.learning_rate == 1.0 and isinstance(opt.learning_rate, float)
    assert opt == configs.section(configs.OptConfig, opt, "opt"), "an instance passes through"
    assert configs.section(configs.OptConfig, None, "opt") == configs.OptConfig()
    data = configs.section(configs.ClassifyDataConfig, {"pad_lengths": [8, 16]}, "data")
    assert data.pad_lengths == (8, 16) and data.files == configs.FilesConfig()


def test_encoder_config_json_round_trip_keeps_dtypes():
    config = EncoderConfig(vocab_size=50, hidden_dim=8, num_layers=1, num_heads=2, mlp_dim=16,
                           dtype=jnp.bfloat16)
    values = json.loads(json.dumps(config.to_json()))
    assert values["dtype"] == "bfloat16" and values["param_dtype"] == "float32"
    assert EncoderConfig.from_json(values) == EncoderConfig.from_json(config.to_json())
    assert EncoderConfig.from_json(values).dtype == jnp.dtype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"model.dtype='float8'; valid: float32, bfloat16"):
        EncoderConfig.from_json({**values, "dtype": "float8"})


# ----------------------------------------------------------------------------- run directory


def test_json_files_are_written_atomically_and_bad_ones_are_named(tmp_path):
    path = str(tmp_path / "best.json")
    workdir_lib.write_json(path, {"step": 3})
    assert workdir_lib.read_json(path) == {"step": 3} and os.listdir(tmp_path) == ["best.json"]
    with open(path, "w") as f:
        f.write('{"step": ')  # what a crash in the middle of a plain write leaves
    with pytest.raises(ValueError, match=rf"^{path} is not valid JSON"):
        workdir_lib.read_json(path)


def test_model_record_round_trip_and_older_records(tmp_path):
    encoder = EncoderConfig(vocab_size=30, hidden_dim=8, num_layers=1, num_heads=2, mlp_dim=16)
    record = workdir_lib.ModelRecord("classify", encoder, {"num_classes": 3, "pooling": "mean"})
    workdir_lib.write_model_record(str(tmp_path), record)
    assert workdir_lib.read_model_record(str(tmp_path)) == record
    older = {"encoder": encoder.to_json(), "num_classes": 3, "pooling": "mean"}  # no "task"
    assert workdir_lib.ModelRecord.from_json(older) == record
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"task": "mlm", "model": {
        "hidden_dim": 8, "num_layers": 1, "num_heads": 2, "mlp_dim": 16, "dtype": "float32"}}))
    old = workdir_lib.read_model_record(str(legacy), vocab_size=30)
    assert old.task == "mlm" and old.encoder == encoder
    assert workdir_lib.read_model_record(str(tmp_path / "nowhere")) is None


def test_label_space_is_recorded_once_and_must_agree(tmp_path):
    space = LabelSpace(("a", "b"), "name", 0)
    workdir_lib.record_label_space(str(tmp_path), space)
    workdir_lib.record_label_space(str(tmp_path), space)
    assert workdir_lib.read_label_space(str(tmp_path)) == space
    with pytest.raises(ValueError, match=r"labels.json records classes \['a', 'b'\] but the data"):
        workdir_lib.record_label_space(str(tmp_path), LabelSpace(("a", "c"), "name", 0))


def test_load_trained_prefers_the_best_checkpoint_and_names_what_is_missing(tmp_path):
    from encoder_jax.data.wordpiece import WordPieceTokenizer

    run = str(tmp_path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model or vocab.txt"):
        workdir_lib.load_trained(run)
    WordPieceTokenizer(vocab).save(run)
    with pytest.raises(FileNotFoundError, match="has no model.json"):
        workdir_lib.load_trained(run)
    encoder = EncoderConfig(vocab_size=7, hidden_dim=8, num_layers=1, num_heads=2, mlp_dim=16)
    workdir_lib.write_model_record(run, workdir_lib.ModelRecord("mlm", encoder))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint: train there first"):
        workdir_lib.load_trained(run)
    for directory, value in ((run, 1.0), (os.path.join(run, workdir_lib.BEST_DIR), 2.0)):
        saver = checkpoint.Checkpointer(directory, keep=1, use_async=False)
        saver.save(5, {"params": {"encoder": {"w": np.full(2, value, np.float32)}}}, force=True)
        saver.close()
    trained = workdir_lib.load_trained(run)
    assert trained.encoder_config == encoder and trained.tokenizer.vocab_size == 7
    assert float(trained.params["encoder"]["w"][0]) == 2.0, "the best evaluation's params"
    assert float(workdir_lib.load_trained(run, step=5).params["encoder"]["w"][0]) == 1.0
    source = pretrained.from_run(run)
    assert source.config == encoder and source.source == f"init_from={run!r}"


# ----------------------------------------------------------------------------- tasks


def test_registry_names_unknown_tasks_and_missing_modes():
    assert tasks.load("classify", "predict").__name__ == "encoder_jax.tasks.classify"
    names = sorted(tasks.TASKS)
    assert {"classify", "mlm", "translate"} <= set(names)
    with pytest.raises(ValueError, match=rf"^task='nope'; valid: {re.escape(str(names))}$"):
        tasks.load("nope")
    able = sorted(n for n, e in tasks.TASKS.items() if "predict" in e.modes)
    assert "mlm" not in able and "classify" in able
    with pytest.raises(ValueError, match=rf"^task='mlm' has no predict mode; tasks with one: "
                                         rf"{re.escape(str(able))}$"):
        tasks.load("mlm", "predict")


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "toy_state", tasks.TaskEntry("toy_state_task"))


def _toy_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def _model_state(workdir, step):
    return checkpoint.load_state(workdir, step)["model_state"]


def test_model_state_is_carried_checkpointed_and_resumed_and_the_step_reaches_the_loss(
        toy_task, tmp_path):
    straight, sliced, accumulated = (str(tmp_path / n) for n in ("straight", "sliced", "accum"))
    train.run(toy_state_task.config(), straight)
    train.run(toy_state_task.config(**{"train.max_steps_per_run": 4}), sliced)
    train.run(toy_state_task.config(), sliced)
    assert [r["step_seen"] for r in _toy_metrics(straight)] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in _toy_metrics(sliced)] == [1, 2, 3, 4, 5, 6]
    state = _model_state(straight, 6)
    assert int(state["count"]) == 6 * toy_state_task.ROWS
    assert float(jnp.abs(state["mean"]).sum()) > 0
    resumed = _model_state(sliced, 6)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    train.run(toy_state_task.config(**{"opt.grad_accum_steps": 2}), accumulated)
    micro = _model_state(accumulated, 6)
    assert int(micro["count"]) == 6 * toy_state_task.ROWS, "model state threads through micro-batches"
    np.testing.assert_allclose(micro["second_moment"], state["second_moment"], rtol=1e-5)


_EIGHT_DEVICES = r"""
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
from encoder_jax import tasks, train
import toy_state_task
assert jax.device_count() == 8
tasks.TASKS["toy_state"] = tasks.TaskEntry("toy_state_task")
train.run(toy_state_task.config(**{{"mesh.fsdp": 2, "mesh.min_shard_size": 64}}), {workdir!r})
"""


def test_model_state_is_sharded_over_eight_devices_with_the_same_result(toy_task, tmp_path):
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    train.run(toy_state_task.config(), one)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    code = _EIGHT_DEVICES.format(root=ROOT, tests=os.path.join(ROOT, "tests"), workdir=eight)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _model_state(one, 6), _model_state(eight, 6)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    from jax.sharding import PartitionSpec as P

    from encoder_jax.parallel import fsdp_spec

    assert fsdp_spec((16, 16), 2, 64) == P(None, "fsdp") or fsdp_spec((16, 16), 2, 64) == P("fsdp", None)
    assert fsdp_spec((6, 32), 4, 64) == P(None, "fsdp")
    assert fsdp_spec((7, 9), 2, 1) == P(), "no dimension divides"
    assert fsdp_spec((16, 16), 2, 10 ** 6) == P(), "small arrays stay replicated"
    assert fsdp_spec((16, 16), 1, 1) == P()


def test_init_train_state_gives_the_same_params_with_or_without_model_state():
    import optax

    task = toy_state_task.build(toy_state_task.config(), None)
    state = train.init_train_state(task, optax.sgd(0.1), jax.random.key(0))
    assert set(state) == {"step", "params", "opt_state", "model_state"}
    task.init_model_state = None
    assert set(train.init_train_state(task, optax.sgd(0.1), jax.random.key(0))) == {
        "step", "params", "opt_state"}


def test_mlm_continues_from_another_run_through_the_one_pretrained_path(corpus_files, data_cache,
                                                                        tmp_path):
    from conftest import tiny_config

    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train.run(tiny_config(corpus_files, data_cache, **{"train.num_steps": 1}), first)
    config = tiny_config(corpus_files, data_cache, **{
        "train.num_steps": 1, "init_from": first, "opt.learning_rate": 0.0,
        "model.hidden_dim": 64, "tokenizer.vocab_size": 300})  # replaced by the run's shape
    train.run(config, second)
    want, got = checkpoint.load_params(first), checkpoint.load_params(second)
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(got)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)  # encoder and MLM head: learning rate 0
    assert open(os.path.join(first, "tokenizer.model"), "rb").read() == \
        open(os.path.join(second, "tokenizer.model"), "rb").read()
    assert workdir_lib.read_model_record(second) == workdir_lib.read_model_record(first)


def test_the_last_checkpoints_are_averaged_evaluated_and_preferred(toy_task, tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match="ckpt.average_last=20 exceeds ckpt.keep=10"):
        train.run(toy_state_task.config(**{"ckpt.average_last": 20}), run)
    train.run(toy_state_task.config(**{"ckpt.average_last": 3}), run)
    want = np.mean([checkpoint.load_params(run, step)["w"] for step in (4, 5, 6)], axis=0)
    np.testing.assert_allclose(checkpoint.load_params(os.path.join(run, "averaged"))["w"], want,
                               rtol=1e-6)
    assert workdir_lib.checkpoint_source(run).endswith("averaged")
    record = workdir_lib.read_json(os.path.join(run, "averaged.json"))
    assert record["steps"] == [4, 5, 6] and "loss" in record
    averaged = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
                if r["split"] == "averaged"]
    assert len(averaged) == 1 and averaged[0]["step"] == 6


def test_config_choices_match_the_modules_that_use_them_and_fail_early():
    from encoder_jax import configs, optim
    from encoder_jax.data import classification, labels, sources, text, tokenizer

    choices = configs.CHOICES
    assert set(choices[configs.TextDataConfig]["format"]) == {"auto", *sources.FILE_FORMATS}
    assert set(choices[configs.TokenizerConfig]["model_type"]) == set(tokenizer.MODEL_TYPES)
    assert set(choices[configs.TokenizerConfig]["word_segmenter"]) == set(text.WORD_SEGMENTERS)
    assert set(choices[configs.OptConfig]["schedule"]) == set(optim.SCHEDULES)
    assert set(choices[configs.ClassifyDataConfig]["text_mode"]) == set(classification.TEXT_MODES)
    assert set(choices[configs.ClassifyDataConfig]["label_format"]) == set(labels.LABEL_FORMATS)
    with pytest.raises(ValueError, match=r"^tokenizer.model_type='word'; valid: \['unigram', 'bpe', 'char'\]$"):
        configs.section(configs.TokenizerConfig, {"model_type": "word"}, "tokenizer")
    with pytest.raises(ValueError, match=r"^opt.learning_rate=nan must be >= 0.0$"):
        configs.section(configs.OptConfig, {"learning_rate": float("nan")}, "opt")
    with pytest.raises(ValueError, match=r"^train.num_steps=0 must be >= 1$"):
        configs.section(configs.TrainConfig, {"num_steps": 0}, "train")
