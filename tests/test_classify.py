"""Classification: head, data, metrics vs scikit-learn, freezing, optimizers, init_from, search, bad input."""

import csv
import itertools
import json
import logging
import os
import random
import sys

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from encoder_jax import checkpoint, errors, metrics, optim, parallel, search, train, wide as wide_lib
from encoder_jax import workdir as workdir_lib
from encoder_jax.data import batching, classification as data_lib
from encoder_jax.data.sources import DataError
from encoder_jax.data.text import special_ids
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertForClassification
from encoder_jax.tasks import classify

from conftest import ROOT, override

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import classify_news  # noqa: E402

TOPICS = {"sports": "ball goal team match player score coach league win season",
          "tech": "computer software chip internet phone data code robot cloud app",
          "money": "bank market stock price trade profit fund dollar share economy"}
FILLER = ["the", "a", "of", "in", "today", "new", "big"]


def write_csv(path, rows, header=("title", "body", "topic")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def make_rows(count, seed):
    """Topic-word headlines + bodies; the topic is learnable from the words."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        topic = list(TOPICS)[i % len(TOPICS)]
        words = TOPICS[topic].split()
        rows.append([" ".join(rng.choices(words, k=3)),
                     " ".join(rng.choices(words + FILLER, k=rng.randint(3, 12))), topic])
    return rows


@pytest.fixture(scope="module")
def news(tmp_path_factory):
    """{'train', 'dev'}: 120 / 45 rows of title,body,topic (45 is not a multiple of 8)."""
    directory = tmp_path_factory.mktemp("news")
    return {"train": write_csv(directory / "train.csv", make_rows(120, 0)),
            "dev": write_csv(directory / "dev.csv", make_rows(45, 1)), "dir": str(directory)}


def news_config(news, data_cache, **overrides):
    """classify_news.py:smoke on the tiny csv, shrunk for speed; overrides as 'a.b' -> value."""
    config = classify_news.get_config("smoke")
    config.data.files.train, config.data.files.validation = news["train"], news["dev"]
    config.data.text_fields, config.data.label_field = "title,body", "topic"
    config.data.data_dir = data_cache
    config.data.max_len, config.data.pad_lengths = 32, (32,)
    config.tokenizer.vocab_size = 300
    config.train.peak_flops_per_device = 1e12  # skip the matmul benchmark
    config.ckpt.use_async = False
    return override(config, overrides)


def build(config, workdir=None):
    return classify.build(config, workdir)


def tokenizer_for(news, data_cache):
    """The sentencepiece model the task trains on the tiny csv (cached after the first build)."""
    from encoder_jax.data.tokenizer import get_tokenizer

    config = news_config(news, data_cache)
    source = data_lib.open_splits(config.data, data_cache)["train"]
    texts = lambda: (v for i in range(len(source)) for k, v in source[i].items() if k != "label")
    return get_tokenizer(config.tokenizer, workdir=None, cache_dir=data_cache,
                         corpus_id=repr(source), texts=texts)


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


# ----------------------------------------------------------------------------- model and data


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_head_gives_batch_by_classes_logits_for_single_texts_and_pairs(pooling):
    cfg = EncoderConfig(vocab_size=50, hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=16)
    model = BertForClassification(cfg, num_classes=5, pooling=pooling)
    ids_BxL = jnp.array([[2, 7, 8, 3, 0, 0], [2, 9, 3, 10, 11, 3]], jnp.int32)
    segment_ids_BxL = (ids_BxL > 0).astype(jnp.int32)
    type_ids_BxL = jnp.array([[0] * 6, [0, 0, 0, 1, 1, 1]], jnp.int32)
    params = model.init(jax.random.key(0), ids_BxL)["params"]
    logits_BxC = model.apply({"params": params}, ids_BxL, segment_ids=segment_ids_BxL,
                             type_ids=type_ids_BxL)
    assert logits_BxC.shape == (2, 5) and logits_BxC.dtype == jnp.float32
    assert params["classifier"]["kernel"].shape == (16, 5)
    # The pair's B-segment type ids reach the model: other type ids, other logits.
    other = model.apply({"params": params}, ids_BxL, segment_ids=segment_ids_BxL)
    assert np.allclose(logits_BxC[0], other[0]) and not np.allclose(logits_BxC[1], other[1])

def test_wide_part_starts_silent_ignores_padding_and_learns_only_seen_ngrams():
    cfg = EncoderConfig(vocab_size=50, hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=16)
    wide, deep = BertForClassification(cfg, 3, wide_buckets=64), BertForClassification(cfg, 3)
    ids_BxL = jnp.array([[2, 7, 8, 3, 0, 0], [2, 9, 10, 11, 12, 3]], jnp.int32)
    params = wide.init(jax.random.key(0), ids_BxL)["params"]
    assert params["wide_unigram"]["embedding"].shape == (50, 3)
    assert params["wide_bigram"]["embedding"].shape == (64, 3)
    deep_params = {k: v for k, v in params.items() if not k.startswith("wide_")}
    # Zero-initialised: a fresh wide part leaves the encoder's logits exactly as they were.
    assert np.array_equal(wide.apply({"params": params}, ids_BxL),
                          deep.apply({"params": deep_params}, ids_BxL))
    trained = jax.tree.map(lambda x: x, params)
    trained["wide_unigram"]["embedding"] = jax.random.normal(jax.random.key(1), (50, 3))
    trained["wide_bigram"]["embedding"] = jax.random.normal(jax.random.key(2), (64, 3))
    padded = jnp.pad(ids_BxL, ((0, 0), (0, 4)))
    apply = lambda p, ids: wide.apply({"params": p}, ids, segment_ids=(ids > 0).astype(jnp.int32))
    assert np.allclose(apply(trained, ids_BxL), apply(trained, padded), atol=1e-5)
    # Gradients reach only the rows of n-grams the batch holds (padding's id 0 is never one).
    grads = jax.grad(lambda p: apply(p, ids_BxL).sum())(params)
    touched_unigrams = set(np.flatnonzero(np.abs(grads["wide_unigram"]["embedding"]).sum(1)))
    assert touched_unigrams == {2, 3, 7, 8, 9, 10, 11, 12}
    touched_bigrams = np.flatnonzero(np.abs(grads["wide_bigram"]["embedding"]).sum(1))
    assert 1 <= len(touched_bigrams) <= 10  # 4 + 6 (previous, token) pairs, some may collide


def test_wide_buckets_is_recorded_and_a_negative_count_names_the_field(tmp_path):
    cfg = EncoderConfig(vocab_size=50, hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=16)
    model_cfg = classify_news.get_config("smoke").model
    model_cfg.wide_buckets = 32
    record = classify.model_record(cfg, 4, model_cfg)
    assert classify.build_model(record).wide_buckets == 32
    workdir_lib.write_model_record(str(tmp_path), record)  # a run to resume: same wide part only
    assert classify.model_record(cfg, 4, model_cfg, str(tmp_path)).fields["wide_buckets"] == 32
    model_cfg.wide_buckets = 64
    with pytest.raises(errors.ConfigError, match=r"^model\.wide_buckets=64; valid: 32, as in the resumed"):
        classify.model_record(cfg, 4, model_cfg, str(tmp_path))
    model_cfg.wide_buckets, model_cfg.wide_chars = 32, True
    with pytest.raises(errors.ConfigError, match=r"^model\.wide_chars=True; valid: False, as in the resumed"):
        classify.model_record(cfg, 4, model_cfg, str(tmp_path))
    assert classify.build_model(classify.model_record(cfg, 4, model_cfg)).wide_chars
    model_cfg.wide_buckets = 0
    with pytest.raises(errors.ConfigError, match=r"^model\.wide_chars=True needs model\.wide_buckets > 0"):
        classify.model_record(cfg, 4, model_cfg)
    with pytest.raises(TypeError, match=r"^model\.wide_chars='yes' must be bool"):
        classify.model_record(cfg, 4, ml_collections.ConfigDict({"pooling": "first", "wide_chars": "yes"}))
    model_cfg.wide_chars = False
    old = workdir_lib.ModelRecord("classify", cfg, {"num_classes": 4, "pooling": "mean"})
    assert classify.build_model(old).wide_buckets == 0  # records written before the field
    model_cfg.wide_buckets = -1
    with pytest.raises(errors.ConfigError, match=r"^model\.wide_buckets=-1; valid"):
        classify.model_record(cfg, 4, model_cfg)
    with pytest.raises(TypeError, match=r"^model\.wide_buckets='many' must be int"):
        classify.model_record(cfg, 4, ml_collections.ConfigDict({"pooling": "first", "wide_buckets": "many"}))


def test_encoding_pairs_types_and_longest_first_truncation(news, data_cache):
    tokenizer = tokenizer_for(news, data_cache)
    pair = data_lib.EncodingConfig(max_len=10, pad_lengths=(10,), text_mode="pair", num_texts=2)
    ids, types = data_lib.encode_texts(tokenizer, ["ball goal team match", "bank " * 20], pair)
    assert len(ids) == 10 and ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert list(ids).count(tokenizer.sep_id) == 2
    first_sep = list(ids).index(tokenizer.sep_id)
    assert set(types[:first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
    assert data_lib.truncate_pair([1] * 3, [2] * 9, 6) == ([1] * 3, [2] * 3)
    joined = data_lib.EncodingConfig(max_len=8, pad_lengths=(8,), num_texts=2)
    ids, types = data_lib.encode_texts(tokenizer, ["ball goal", "bank " * 20], joined)
    assert len(ids) == 8 and not types.any()


def test_train_batches_keys_shapes_dtypes_and_exact_resume(news, data_cache):
    config = news_config(news, data_cache, **{"data.pad_lengths": (16, 24, 32)})
    task = build(config)
    it = iter(task.train_data)
    first = next(it)
    assert sorted(first) == sorted(data_lib.BATCH_KEYS)
    assert first["ids"].shape[0] == 8 and first["ids"].shape[1] in (16, 24, 32)
    for key, dtype in (("ids", np.int32), ("type_ids", np.int32), ("segment_ids", np.int32),
                       ("label", np.int32), ("weight", np.float32), ("index", np.int32)):
        assert first[key].dtype == dtype, key
    assert (first["weight"] == 1).all()
    # The longest row fills the padded length up to the next allowed length.
    longest = int(first["segment_ids"].sum(1).max())
    assert first["ids"].shape[1] == min(n for n in (16, 24, 32) if n >= longest)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = iter(task.train_data)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_training_split_encoded_once_streams_the_same_batches_as_encoding_on_the_fly(
        news, data_cache, monkeypatch):
    config = news_config(news, data_cache, **{"data.pad_lengths": (16, 24, 32)})
    take = lambda: list(itertools.islice(iter(build(config).train_data), 20))  # 160 rows: > 1 epoch
    in_memory = take()
    monkeypatch.setattr(data_lib, "ENCODE_ONCE_MAX_RECORDS", 0)
    on_the_fly = take()
    for a, b in zip(in_memory, on_the_fly, strict=True):
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # `index` is the position in the repeated stream: the second epoch's rows do not repeat it.
    assert len({int(i) for batch in in_memory for i in batch["index"]}) == 20 * 8


def test_eval_batches_count_every_example_exactly_once():
    examples = [{"ids": np.arange(2 + i % 7, dtype=np.int32), "type_ids": np.zeros(2 + i % 7, np.int32),
                 "label": i % 3, "index": i} for i in range(45)]
    batches = list(batching.eval_batches(examples, global_batch=8, pad_lengths=(4, 8)))
    assert len(batches) == 6  # 45 = 5 * 8 + 5: the last batch is padded, not dropped
    weights = np.concatenate([b["weight"] for b in batches])
    indices = np.concatenate([b["index"] for b in batches])[weights > 0]
    assert weights.sum() == 45 and sorted(indices) == list(range(45))
    assert all(b["ids"].shape == (8, b["ids"].shape[1]) for b in batches)
    assert (batches[-1]["weight"] == 0).sum() == 3 and (batches[-1]["segment_ids"][5:] == 0).all()


# ----------------------------------------------------------------------------- metrics


def test_whole_split_metrics_equal_scikit_learn_on_fixed_logits(news, data_cache):
    """A fake model with fixed logits per example; eval batch 8 over 45 rows (partial last batch)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    config = news_config(news, data_cache, **{"eval.batch_size": 8})
    task = build(config)
    dev = data_lib.open_splits(config.data, data_cache)["validation"]  # TFDS record order
    labels_N = np.array([sorted(TOPICS).index(dev[i]["label"]) for i in range(len(dev))])
    logits_NxC = np.random.default_rng(0).normal(size=(len(dev), 3)).astype(np.float32)
    logits_NxC[np.arange(0, 45, 2), labels_N[::2]] += 1.5  # better than chance, not perfect

    def fake_eval(params, model_state, batch, rng, step):
        logits_BxC = jnp.asarray(logits_NxC)[jnp.maximum(batch["index"], 0)]
        return {"logits": logits_BxC, "label": batch["label"], "weight": batch["weight"],
                "index": batch["index"], "loss": optax.softmax_cross_entropy_with_integer_labels(
                    logits_BxC, batch["label"])}

    sharding = parallel.batch_sharding(parallel.make_mesh(1))
    state = {"params": {}, "step": jnp.zeros((), jnp.int32)}
    summary = train.evaluate(task, jax.jit(fake_eval), state, sharding, jax.random.key(0))
    preds_N = logits_NxC.argmax(-1)
    probs_NxC = metrics.softmax(logits_NxC)
    assert summary["num_examples"] == 45
    assert summary["accuracy"] == pytest.approx(accuracy_score(labels_N, preds_N))
    for average in ("macro", "micro", "weighted"):
        assert summary[f"f1_{average}"] == pytest.approx(f1_score(labels_N, preds_N, average=average))
        assert summary[f"precision_{average}"] == pytest.approx(
            precision_score(labels_N, preds_N, average=average, zero_division=0))
        assert summary[f"recall_{average}"] == pytest.approx(recall_score(labels_N, preds_N, average=average))
    assert summary["roc_auc_macro"] == pytest.approx(
        roc_auc_score(labels_N, probs_NxC, multi_class="ovr", average="macro"))
    assert summary["loss"] == pytest.approx(float(np.mean(
        -np.log(probs_NxC[np.arange(45), labels_N]))), rel=1e-5)
    assert 0.4 < summary["accuracy"] < 1.0  # the comparison is not trivial


def test_class_absent_from_the_split_skips_its_roc_auc_with_a_warning(caplog, tmp_path):
    labels_N = np.array([0, 1, 0, 1, 0])
    probs_NxC = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1],
                          [0.3, 0.3, 0.4]])
    with caplog.at_level(logging.WARNING, logger="encoder_jax"):
        report = metrics.classification_report(labels_N, probs_NxC, ["a", "b", "c"])
    assert report["roc_auc_skipped"] == ["c"] and "ROC-AUC skipped" in caplog.text
    assert report["per_class"]["c"]["roc_auc"] is None and report["per_class"]["c"]["support"] == 0
    assert np.isfinite(report["roc_auc_macro"])
    assert report["confusion_matrix"] == [[2, 0, 1], [1, 1, 0], [0, 0, 0]]
    paths = metrics.write_report(report, labels_N, probs_NxC, str(tmp_path))
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert "| c |" in open(paths[1], encoding="utf-8").read()


def test_label_smoothing_and_padded_rows_in_the_loss():
    logits_BxC = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]])
    labels_B, weights_B = jnp.array([0, 2, 1]), jnp.array([1.0, 1.0, 0.0])
    loss, sums = classify.classification_loss(logits_BxC, labels_B, weights_B, 0.1)
    log_probs = jax.nn.log_softmax(logits_BxC[:2])
    targets = np.array([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], [0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3]])
    assert float(loss) == pytest.approx(float(-(targets * log_probs).sum(-1).mean()), rel=1e-6)
    assert float(sums["denominator"]) == 2 and float(sums["accuracy"]) == 1


def test_augmentation_deletes_and_masks_only_regular_tokens():
    ids_BxL = jnp.array([[2, 10, 11, 12, 13, 3, 0, 0]] * 4, jnp.int32)
    batch = {"ids": ids_BxL, "type_ids": jnp.zeros_like(ids_BxL), "segment_ids": (ids_BxL > 0).astype(jnp.int32)}
    specials = (0, 1, 2, 3, 4)
    same = classify.augment_tokens(jax.random.key(0), batch, delete_rate=0.0, mask_rate=0.0,
                                   mask_id=4, special_ids=specials)
    assert np.array_equal(same["ids"], ids_BxL)
    out = classify.augment_tokens(jax.random.key(1), batch, delete_rate=0.5, mask_rate=0.0,
                                  mask_id=4, special_ids=specials)
    for row, seg in zip(np.asarray(out["ids"]), np.asarray(out["segment_ids"])):
        real = row[seg > 0]
        assert real[0] == 2 and real[-1] == 3 and (row[seg == 0] == 0).all()
        assert list(real[1:-1]) == sorted(real[1:-1])  # survivors keep their order
    assert int(out["segment_ids"].sum()) < int(batch["segment_ids"].sum())
    masked = classify.augment_tokens(jax.random.key(2), batch, delete_rate=0.0, mask_rate=1.0,
                                     mask_id=4, special_ids=specials)
    assert np.array_equal(masked["ids"][:, [0, 5]], ids_BxL[:, [0, 5]])
    assert (masked["ids"][:, 1:5] == 4).all()


# ----------------------------------------------------------------------------- optimisation


def run_steps(task, opt_cfg, steps=3, lr_scale=None):
    tx, schedule = optim.build_optimizer(opt_cfg, 10, task.trainable, lr_scale)
    state = train.init_train_state(task, tx, jax.random.key(0))
    params = state["params"]
    step = jax.jit(train.make_train_step(task, tx, schedule))
    batches = iter(task.train_data)
    for _ in range(steps):
        state, sums = step(state, next(batches), jax.random.key(1))
    return params, state, sums


def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state(news, data_cache):
    config = news_config(news, data_cache, **{"finetune.trainable": "top:1", "model.num_layers": 2})
    task = build(config)
    before, state, _ = run_steps(task, config.opt)
    from flax import traverse_util

    old, new = traverse_util.flatten_dict(before), traverse_util.flatten_dict(state["params"])
    mask = traverse_util.flatten_dict(task.trainable(before))
    assert any(mask.values()) and not all(mask.values())
    for path, value in old.items():
        if mask[path]:
            assert path[1:2] in (("block_1",), ("pooler",)) or path[0] == "classifier", path
        else:
            assert np.array_equal(np.asarray(value), np.asarray(new[path])), path
    assert any(not np.array_equal(old[p], new[p]) for p in old if mask[p])
    trained = sum(int(np.size(old[p])) for p in old if mask[p])
    moments = sum(int(np.size(x)) for x in leaves(state["opt_state"]) if np.ndim(x) > 0)
    assert moments == 2 * trained  # adamw: mu and nu for trained params only


@pytest.fixture(scope="module")
def params_and_grads(news, data_cache):
    """The tiny task's init params and one batch's gradients (compiled once for all optimizers)."""
    task = build(news_config(news, data_cache))
    params = task.init_params(jax.random.key(0))
    grad_fn = jax.jit(jax.grad(lambda p, b: task.loss_fn(p, None, b, jax.random.key(1), 0, True)[0]))
    return params, grad_fn(params, next(iter(task.train_data)))


@pytest.mark.parametrize("wide_loss", ["joint", "separate"])
def test_separate_wide_loss_trains_each_part_alone(news, data_cache, wide_loss):
    task = build(news_config(news, data_cache, **{"model.wide_buckets": 64,
                                                  "finetune.wide_loss": wide_loss}))
    batch = next(iter(task.train_data))
    grad = jax.jit(jax.grad(lambda p: task.loss_fn(p, None, batch, jax.random.key(1), 0, True)[0]))
    params = task.init_params(jax.random.key(0))
    params["wide_bigram"]["embedding"] = jnp.full_like(params["wide_bigram"]["embedding"], 0.3)
    other = jax.tree.map(lambda x: x, params)
    other["classifier"]["kernel"] = params["classifier"]["kernel"] * 50.0  # another deep part
    wide_grad, wide_grad_other = grad(params)["wide_unigram"], grad(other)["wide_unigram"]
    assert np.abs(wide_grad["embedding"]).sum() > 0
    # Separate: the wide part's gradient does not see the deep part; joint: it does.
    same = np.allclose(wide_grad["embedding"], wide_grad_other["embedding"], atol=1e-6)
    assert same == (wide_loss == "separate")
    with pytest.raises(errors.ConfigError, match=r"finetune\.wide_loss='sum'; valid: \['joint'"):
        build(news_config(news, data_cache, **{"finetune.wide_loss": "sum"}))


def test_wide_chars_table_comes_from_the_tokenizer_and_is_never_trained(news, data_cache):
    config = news_config(news, data_cache, **{"model.wide_buckets": 64, "model.wide_chars": True})
    task = build(config)
    params = task.init_params(jax.random.key(0))
    tokenizer = tokenizer_for(news, data_cache)
    expected = wide_lib.tokenizer_char_table(tokenizer, special_ids(tokenizer), 64)
    assert np.array_equal(params["wide_char_index"], expected) and (expected[:, 0] >= 0).mean() > 0.5
    tx, _ = optim.build_optimizer(config.opt, 10, lr_scale=task.lr_scale)
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    for _ in range(2):  # the first step's learning rate is 0 (warm-up)
        updates, state = tx.update(grads, state, params)
    assert not np.asarray(updates["wide_char_index"]).any()
    assert np.asarray(updates["wide_char"]["embedding"]).any()


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop"])
def test_each_optimizer_updates_every_parameter(news, data_cache, params_and_grads, name):
    params, grads = params_and_grads
    config = news_config(news, data_cache, **{"opt.name": name, "opt.warmup_steps": 0})
    tx, _ = optim.build_optimizer(config.opt, 10)
    state = tx.init(params)
    new = params
    for _ in range(2):
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    changed = [not np.array_equal(a, b) for a, b in zip(leaves(params), leaves(new))]
    assert all(np.isfinite(x).all() for x in leaves(new)) and np.mean(changed) > 0.9


def test_layer_lr_decay_scales_updates_by_depth(params_and_grads, news, data_cache):
    scale = optim.layer_lr_decay_scale(0.5, num_layers=2)
    assert scale(("encoder", "token_embed", "embedding")) == 0.125
    assert scale(("encoder", "block_0", "mlp", "wi", "kernel")) == 0.25
    assert scale(("encoder", "block_1", "mlp", "wi", "kernel")) == 0.5
    assert scale(("encoder", "pooler", "kernel")) == 1.0 and scale(("classifier", "bias")) == 1.0
    params, _ = params_and_grads
    config = news_config(news, data_cache, **{"opt.name": "sgd", "opt.learning_rate": 0.1,
                                              "opt.warmup_steps": 0, "opt.schedule": "constant",
                                              "opt.grad_clip_norm": 0.0})
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    # One block (num_layers=1 here): embeddings 0.25, block_0 0.5, head 1; frozen: no update.
    tx, _ = optim.build_optimizer(config.opt, 10, lambda p: optim.trainable_mask(p, "re:block_0|classifier"),
                                  optim.layer_lr_decay_scale(0.5, num_layers=1))
    updates, _ = tx.update(ones, tx.init(params), params)
    assert np.allclose(updates["encoder"]["block_0"]["mlp"]["wi"]["kernel"], -0.05)
    assert np.allclose(updates["classifier"]["kernel"], -0.1)
    assert not np.asarray(updates["encoder"]["token_embed"]["embedding"]).any()


def test_wide_tables_get_their_own_learning_rate_factor_on_top_of_layer_decay():
    scale = optim.product_of_scales(optim.layer_lr_decay_scale(0.5, num_layers=2), None,
                                    optim.prefix_lr_scale("wide_", 100.0))
    assert scale(("wide_bigram", "embedding")) == 100.0
    assert scale(("encoder", "block_0", "mlp", "wi", "kernel")) == 0.25
    assert scale(("encoder", "wide_x", "embedding")) == 0.125  # only top-level names match
    assert optim.product_of_scales(None, None) is None


# ----------------------------------------------------------------------------- whole runs


def read_metrics(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_smoke_variant_runs_resumes_reports_and_predicts(news, data_cache, tmp_path):
    workdir = str(tmp_path / "run")
    overrides = {"eval.every_steps": 2, "ckpt.every_steps": 2}
    first = train.run(news_config(news, data_cache, **overrides, **{"train.num_steps": 2}), workdir)
    config = news_config(news, data_cache, **overrides, **{"train.num_steps": 4})
    result = train.run(config, workdir)  # resumes at step 2
    assert [r["step"] for r in read_metrics(workdir, "train")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(workdir, "eval")] == [2, 4]
    assert checkpoint.Checkpointer(workdir).latest_step() == 4
    assert json.load(open(os.path.join(workdir, "final_eval.json")))["step"] == 4
    assert result["num_examples"] == first["num_examples"] == 45
    for name in ("report/report.json", "report/report.md", "report/confusion_matrix.png",
                 "report/roc_curves.png", "report_best/report.json", "best.json", "labels.json",
                 "model.json", "tokenizer.model"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    report = json.load(open(os.path.join(workdir, "report", "report.json")))
    assert report["step"] == 4 and sum(map(sum, report["confusion_matrix"])) == 45
    assert json.load(open(os.path.join(workdir, "labels.json")))["names"] == sorted(TOPICS)

    jsonl = tmp_path / "new.jsonl"
    jsonl.write_text("\n".join(json.dumps({"title": t, "body": b}) for t, b, _ in make_rows(5, 9)) + "\n")
    config.predict.input, config.predict.output = str(jsonl), str(tmp_path / "out.jsonl")
    lines = [json.loads(x) for x in open(train.predict(config, workdir), encoding="utf-8")]
    assert [x["index"] for x in lines] == list(range(5))
    for line in lines:
        assert line["label"] in TOPICS and abs(sum(line["probabilities"].values()) - 1) < 1e-4
        assert line["label"] == max(line["probabilities"], key=line["probabilities"].get)
    config.predict.input = write_csv(tmp_path / "new.csv", make_rows(3, 9))
    assert len(open(train.predict(config, workdir)).readlines()) == 3


def test_early_stopping_keeps_the_best_checkpoint_and_stays_stopped(news, data_cache, tmp_path):
    workdir = str(tmp_path / "stop")
    config = news_config(news, data_cache, **{
        "opt.learning_rate": 0.0, "train.num_steps": 8, "eval.every_steps": 1, "ckpt.every_steps": 8,
        "eval.early_stop_patience": 1, "eval.best_metric": "loss"})
    train.run(config, workdir)
    best = json.load(open(os.path.join(workdir, "best.json")))
    assert best["stopped"] and best["step"] == 1 and best["mode"] == "min"
    assert json.load(open(os.path.join(workdir, "final_eval.json")))["step"] == 2
    assert checkpoint.Checkpointer(os.path.join(workdir, workdir_lib.BEST_DIR)).latest_step() == 1
    train.run(config, workdir)  # a stopped run does not train on
    assert [r["step"] for r in read_metrics(workdir, "train")][-1] == 2


def make_mlm_workdir(path, tokenizer):
    """An MLM run's workdir as train.run leaves it (config.json, tokenizer.model, checkpoint)."""
    import bert_mlm
    from encoder_jax.models import BertForMaskedLM

    config = bert_mlm.get_config("smoke")
    os.makedirs(path)
    tokenizer.save(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    model = BertForMaskedLM(EncoderConfig.from_config(config.model, tokenizer.vocab_size))
    params = model.init(jax.random.key(7), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 2), jnp.int32))
    params = jax.tree_util.tree_map(lambda x: x + 0.5, params["params"])  # unlike any fresh init
    saver = checkpoint.Checkpointer(path, keep=1, use_async=False)
    saver.save(3, {"step": jnp.asarray(3, jnp.int32), "params": params}, force=True)
    saver.close()
    return params


def test_init_from_restores_the_mlm_encoder_and_tokenizer_exactly(data_cache, news, tmp_path):
    mlm_dir = str(tmp_path / "mlm")
    want = make_mlm_workdir(mlm_dir, tokenizer_for(news, data_cache))["encoder"]
    workdir = str(tmp_path / "cls")
    config = news_config(news, data_cache, **{"init_from": mlm_dir, "opt.learning_rate": 0.0,
                                              "train.num_steps": 1, "eval.best_metric": None})
    train.run(config, workdir)
    got = checkpoint.load_params(workdir)["encoder"]
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(got)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(want), leaves(got)))
    assert open(os.path.join(workdir, "tokenizer.model"), "rb").read() == \
        open(os.path.join(mlm_dir, "tokenizer.model"), "rb").read()
    mlm_model = json.load(open(os.path.join(mlm_dir, "config.json")))["model"]
    recorded = json.load(open(os.path.join(workdir, "model.json")))["encoder"]
    assert all(recorded[k] == mlm_model[k] for k in ("hidden_dim", "num_layers", "mlp_dim", "max_len"))

    clash = news_config(news, data_cache, **{"init_from": mlm_dir, "model.hidden_dim": 64})
    with pytest.raises(ValueError, match=r"model.hidden_dim=64 but init_from=.* has hidden_dim=32"):
        build(clash, str(tmp_path / "clash"))
    from encoder_jax import pretrained

    params = build(news_config(news, data_cache)).init_params(jax.random.key(0))
    wrong = jax.tree_util.tree_map(lambda x: np.zeros((x.shape[0] + 1, *x.shape[1:])), want)
    source = pretrained.PretrainedEncoder(None, lambda: {"encoder": wrong}, None, "init_from='x'")
    with pytest.raises(ValueError, match=r"token_embed/embedding has shape .*vocab or hidden size differ"):
        pretrained.graft_encoder(params, source)


def test_reinit_top_blocks_takes_only_the_top_blocks_and_pooler_from_the_fresh_params():
    from encoder_jax import pretrained

    def params(value):
        return {"encoder": {n: {"kernel": np.full((2,), value)} for n in
                            ("token_embed", "block_0", "block_1", "block_2", "pooler")},
                "classifier": {"kernel": np.full((2,), value)}}

    mixed = pretrained.reinit_top_blocks(params(1.0), params(0.0), 2)
    kept = {n: float(v["kernel"][0]) for n, v in mixed["encoder"].items()}
    assert kept == {"token_embed": 1.0, "block_0": 1.0, "block_1": 0.0, "block_2": 0.0, "pooler": 0.0}
    unchanged = params(1.0)
    assert pretrained.reinit_top_blocks(unchanged, params(0.0), 0) is unchanged
    with pytest.raises(errors.ConfigError, match="finetune.reinit_top_layers=4 exceeds the encoder's 3"):
        pretrained.reinit_top_blocks(params(1.0), params(0.0), 4)


def test_curve_legend_names_a_run_directory_by_its_last_component():
    summary = {"metric": "accuracy", "points": [
        {"setting": {"data.max_train_examples": n, "init_from": init}, "metrics": {"accuracy": (acc, 0.0)}}
        for n, init, acc in ((10, None, 0.5), (20, None, 0.6), (10, "/data/runs/pre_ag/", 0.7))]}
    lines, baseline = search.curve_points(summary, "data.max_train_examples")
    assert lines == {"init_from=None": [(10, 0.5, 0.0), (20, 0.6, 0.0)],
                     "init_from=pre_ag": [(10, 0.7, 0.0)]} and baseline == []


def test_sweep_runs_by_index_then_completes_its_tables_baseline_and_curve(news, data_cache, tmp_path):
    """A label-efficiency sweep: runs by index, then the rest; each run's rows also fit the
    linear baseline; the table and curve.png show both against data.max_train_examples."""
    config = news_config(news, data_cache, **{
        "train.num_steps": 2, "eval.every_steps": 2, "ckpt.every_steps": 2,
        "sweep.grid": '{"data.max_train_examples": [40, null]}', "sweep.baseline": True,
        "sweep.curve": "data.max_train_examples"})
    sweep_dir = str(tmp_path / "sweep")
    config.sweep.index = 1  # one run, as a cluster task would
    search.search(config, sweep_dir, "sweep")
    assert os.path.isfile(os.path.join(sweep_dir, "point_01", "seed_0", "final_eval.json"))
    assert not os.path.exists(os.path.join(sweep_dir, "point_00", "seed_0", "final_eval.json"))
    assert "| 0 | data.max_train_examples=40 | 0/1 |" in open(os.path.join(sweep_dir, "results.md")).read()
    config.sweep.index = None
    summary = search.search(config, sweep_dir, "sweep")  # runs point 0, reuses point 1
    assert [p["runs"] for p in summary["points"]] == [1, 1] and summary["best"] is not None
    table = list(csv.DictReader(open(os.path.join(sweep_dir, "results.csv"))))
    assert [r["setting"] for r in table] == ["data.max_train_examples=40",
                                             "data.max_train_examples=None"]
    markdown = open(os.path.join(sweep_dir, "results.md")).read()
    assert "**Best setting:**" in markdown and "| baseline accuracy |" in markdown
    lines, baseline = search.curve_points(summary, "data.max_train_examples")
    assert [x for x, _ in baseline] == [40, 120]  # None: all 120 training rows
    assert [x for x, _, _ in lines["(config as given)"]] == [40, 120]
    assert os.path.getsize(os.path.join(sweep_dir, "curve.png")) > 1000
    with pytest.raises(errors.ConfigError, match="sweep.curve='opt.learning_rate' is not a sweep.grid"):
        search.curve_points(summary, "opt.learning_rate")
    config.sweep.curve = "opt.learning_rate"  # refused before any run trains
    with pytest.raises(errors.ConfigError, match=r"grid fields: \['data.max_train_examples'\]"):
        search.search(config, str(tmp_path / "never"), "sweep")
    assert not os.path.exists(tmp_path / "never")


def test_cross_validation_holds_out_each_stratified_fold_once(news, data_cache, tmp_path):
    cv_dir = str(tmp_path / "cv")
    config = news_config(news, data_cache, **{
        "train.num_steps": 2, "eval.every_steps": 2, "ckpt.every_steps": 2, "cv.folds": 2,
        "data.max_train_examples": 60})
    config.data.files.validation = None  # cross-validation needs no held-out file
    summary = search.search(config, cv_dir, "cv")
    sizes = [json.load(open(os.path.join(cv_dir, "point_00", f"fold_{k}", "final_eval.json")))["num_examples"]
             for k in range(2)]
    assert sizes == [30, 30]
    mean, std = summary["points"][0]["metrics"]["accuracy"]
    runs = list(csv.DictReader(open(os.path.join(cv_dir, "runs.csv"))))
    accs = [float(r["accuracy"]) for r in runs]
    assert mean == pytest.approx(np.mean(accs)) and std == pytest.approx(np.std(accs, ddof=1))
    assert " ± " in open(os.path.join(cv_dir, "results.md")).read()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("rows, overrides, message", [
    ([["a b", "c d", "7"]], {"data.label_format": "index", "data.num_classes": 3},
     r"label '7' is out of range; valid: 0..2"),
    ([["a b", "c d", "weather"]], {"data.classes_file": "CLASSES"},
     r"unknown label name 'weather'; valid: \['money', 'sports', 'tech'\]"),
    ([["  ", "", "tech"]], {}, r"record \d+: text field text_0 is empty"),
    ([["a b", "c d", "tech"]], {"data.label_field": "category"}, r"has no column 'category'"),
    ([["a b", "c d", "tech"]], {"data.text_mode": "pair", "data.text_fields": "title"},
     r"text_mode='pair' needs two or more data.text_fields"),
    ([["a b", "c d", "tech"]], {"finetune.trainable": "middle"}, r"finetune.trainable='middle'; valid"),
])
def test_bad_inputs_fail_with_a_clear_message(news, data_cache, tmp_path, rows, overrides, message):
    good = [[" ".join(TOPICS[t].split()[:3]), "x y", t] for t in TOPICS] * 3
    if overrides.get("data.label_format") == "index":
        good = [[a, b, str(i % 3)] for i, (a, b, _) in enumerate(good)]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(sorted(TOPICS)) + "\n")
    overrides = {k: (str(classes) if v == "CLASSES" else v) for k, v in overrides.items()}
    config = news_config(news, data_cache, **overrides)
    config.data.files.train = write_csv(tmp_path / "bad.csv", good + rows)
    with pytest.raises((DataError, ValueError), match=message):
        build(config)


def test_bad_sweep_grids_name_the_field(news, data_cache, tmp_path):
    config = news_config(news, data_cache, **{"sweep.grid": '{"opt.learning_rat": [1]}'})
    with pytest.raises(ValueError, match=r"'opt.learning_rat' is not a config field"):
        search.search(config, str(tmp_path), "sweep")
    config.sweep.grid = "{lr: 1}"
    with pytest.raises(ValueError, match=r"sweep.grid is not JSON"):
        search.plan(config, str(tmp_path), "sweep")


def test_linear_baseline_on_the_same_rows_writes_the_same_report(news, data_cache, tmp_path):
    """--mode baseline reads the rows a fine-tuning run would (here a 60-row subset), scores the
    dev split with the classifier's metrics, and names its features and fit time."""
    workdir = str(tmp_path / "baseline")
    report = classify.baseline(news_config(news, data_cache, **{"data.max_train_examples": 60}),
                               workdir)
    assert report["num_train"] == 60 and report["num_examples"] == 45
    assert report["features"] == "word" and report["model"] == "svm" and report["fit_seconds"] >= 0
    assert report["accuracy"] > 0.8  # topic words separate the classes
    saved = json.load(open(os.path.join(workdir, "baseline", "report.json")))
    assert saved["accuracy"] == report["accuracy"] and "confusion_matrix" in saved


def test_baseline_features_probabilities_and_bad_input():
    from encoder_jax import baselines, errors

    assert baselines.choose_features("auto", ["体育新闻 比赛 结果"] * 3) == "char"
    assert baselines.choose_features("auto", ["sports news today"] * 3) == "word"
    texts = ["stock market bank", "football match goal", "bank profit fund", "goal team match"]
    for model in ("svm", "logreg"):
        report, probs_NxC = baselines.fit_and_evaluate(
            texts, [0, 1, 0, 1], ["market fund", "team goal"], np.array([0, 1]),
            ["money", "sport", "unseen"], {"model": model, "C": 10.0})
        assert report["accuracy"] == 1.0
        np.testing.assert_allclose(probs_NxC.sum(1), 1.0)
        assert probs_NxC[:, 2].max() < 1e-6  # a class absent from training never wins
    with pytest.raises(errors.DataError, match="fewer than 2 classes"):
        baselines.fit_and_evaluate(texts, [0, 0, 0, 0], texts, np.zeros(4, int), ["a", "b"])
    with pytest.raises(errors.ConfigError, match=r"baseline.model='tree'; valid: \['svm', 'logreg'\]"):
        baselines.fit_and_evaluate(texts, [0, 1, 0, 1], texts, np.array([0, 1, 0, 1]), ["a", "b"],
                                   {"model": "tree"})
