"""Encoder shapes, dtypes, masks that do not leak, tied MLM weights."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax.layers import (Dropout, EncoderBlock, EncoderConfig, FeedForward, SelfAttention,
                                attention_mask, layer_norm, residual)
from encoder_jax import errors
from encoder_jax.models import BertEncoder, BertForClassification, BertForMaskedLM, bigram_buckets


CFG = EncoderConfig(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4, mlp_dim=64,
                    max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0)
CFG_BIGRAMS = EncoderConfig(**{**CFG.__dict__, "bigram_buckets": 64})


def _ids(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 5, CFG.vocab_size)


def _init(model, ids, *args):
    return model.init(jax.random.key(0), ids, *args)["params"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_encoder_shapes_and_dtypes(dtype):
    cfg = EncoderConfig(**{**CFG.__dict__, "dtype": dtype})
    ids = _ids((3, 10))
    model = BertEncoder(cfg)
    params = _init(model, ids)
    hidden, pooled = model.apply({"params": params}, ids)
    assert hidden.shape == (3, 10, 32) and hidden.dtype == dtype
    assert pooled.shape == (3, 32)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_attention_mask_blocks_padding_and_other_documents():
    mask = attention_mask(jnp.array([[1, 1, 2, 0]]))[0, 0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_padding_does_not_change_real_tokens():
    model = BertEncoder(CFG)
    ids = _ids((2, 12))
    mask = jnp.arange(12)[None, :] < jnp.array([[7], [12]])
    params = _init(model, ids)
    out_a, _ = model.apply({"params": params}, ids, mask=mask)
    other = jnp.where(mask, ids, _ids((2, 12), seed=9))
    assert not np.array_equal(other, ids)
    out_b, _ = model.apply({"params": params}, other, mask=mask)
    np.testing.assert_allclose(out_a[0, :7], out_b[0, :7], atol=1e-6)
    np.testing.assert_allclose(out_a[1], out_b[1], atol=1e-6)


@pytest.mark.parametrize("cfg", [CFG, CFG_BIGRAMS], ids=["plain", "bigrams"])
def test_packed_document_does_not_see_its_neighbour(cfg):
    model = BertEncoder(cfg)
    ids = _ids((1, 12))
    segments = jnp.array([[1] * 5 + [2] * 4 + [3] * 3])
    positions = jnp.array([list(range(5)) + list(range(4)) + list(range(3))])
    params = _init(model, ids)
    changed = ids.at[0, 5:9].set(_ids((4,), seed=3))
    assert not np.array_equal(changed, ids)
    run = lambda x: model.apply({"params": params}, x, segment_ids=segments, positions=positions)[0]
    out_a, out_b = run(ids), run(changed)
    np.testing.assert_allclose(out_a[0, :5], out_b[0, :5], atol=1e-6)
    np.testing.assert_allclose(out_a[0, 9:], out_b[0, 9:], atol=1e-6)
    assert not np.allclose(out_a[0, 5:9], out_b[0, 5:9])


@pytest.mark.parametrize("cfg", [CFG, CFG_BIGRAMS], ids=["plain", "bigrams"])
def test_packed_row_equals_separate_rows(cfg):
    model = BertEncoder(cfg)
    doc_a, doc_b = _ids((1, 5), 1), _ids((1, 4), 2)
    params = _init(model, doc_a)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 4])
    positions = jnp.array([list(range(5)) + list(range(4))])
    out, _ = model.apply({"params": params}, packed, segment_ids=segments, positions=positions)
    alone_a, _ = model.apply({"params": params}, doc_a)
    alone_b, _ = model.apply({"params": params}, doc_b)
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], alone_b[0], atol=1e-5)


def test_bigram_buckets_restart_at_each_document_and_spread_pairs():
    packed = bigram_buckets(jnp.array([[5, 6, 7, 8, 0]]), jnp.array([[1, 1, 2, 2, 0]]), 1000)
    alone = bigram_buckets(jnp.array([[7, 8]]), jnp.array([[1, 1]]), 1000)
    np.testing.assert_array_equal(packed[0, 2:4], alone[0])
    assert packed[0, 1] != alone[0, 1]  # (5, 6) vs (7, 8)
    previous, current = np.meshgrid(np.arange(50), np.arange(50))
    pairs = jnp.asarray(np.stack([previous.ravel(), current.ravel()], 1))
    buckets = np.asarray(bigram_buckets(pairs, jnp.ones_like(pairs), 4096)[:, 1])
    assert buckets.min() >= 0 and buckets.max() < 4096
    # 2,500 random pairs in 4,096 buckets fill about 4096 * (1 - exp(-2500 / 4096)) = 1,873.
    assert len(set(buckets.tolist())) > 1750


def test_bigram_embedding_makes_the_encoder_see_token_order_at_the_input():
    model = BertEncoder(CFG_BIGRAMS)
    ids = _ids((1, 6))
    params = _init(model, ids)
    assert params["bigram_embed"]["embedding"].shape == (64, 32)
    with_bigrams, _ = model.apply({"params": params}, ids)
    params["bigram_embed"]["embedding"] = jnp.zeros((64, 32))
    plain, _ = BertEncoder(CFG).apply({"params": {k: v for k, v in params.items() if k != "bigram_embed"}},
                                      ids)
    np.testing.assert_allclose(model.apply({"params": params}, ids)[0], plain, atol=1e-6)
    assert not np.allclose(with_bigrams, plain, atol=1e-3)


def test_negative_bigram_buckets_is_a_one_line_error_naming_the_field():
    with pytest.raises(errors.ConfigError, match="model.bigram_buckets=-1"):
        EncoderConfig(**{**CFG.__dict__, "bigram_buckets": -1})


def test_mlm_head_is_tied_to_token_embeddings():
    model = BertForMaskedLM(CFG)
    ids, positions = _ids((2, 8)), jnp.array([[1, 3], [0, 7]])
    params = _init(model, ids, positions)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    big = [jax.tree_util.keystr(p) for p, leaf in flat if leaf.shape[0] == CFG.vocab_size and leaf.ndim == 2]
    assert big == ["['encoder']['token_embed']['embedding']"]  # no separate decoder matrix
    logits = model.apply({"params": params}, ids, positions)
    assert logits.shape == (2, 2, CFG.vocab_size) and logits.dtype == jnp.float32
    # Scaling the embedding table changes the output layer too.
    scaled = jax.tree_util.tree_map(lambda x: x, params)
    scaled["encoder"]["token_embed"]["embedding"] = params["encoder"]["token_embed"]["embedding"] * 2
    hidden = model.apply({"params": params}, ids, positions, method=lambda m, i, p: m.encoder(i)[0])
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    h = model.apply({"params": params}, picked, method=lambda m, h: m.transform_norm(
        jax.nn.gelu(m.transform(h), approximate=False)))
    expected = h @ params["encoder"]["token_embed"]["embedding"].T + params["output_bias"][None, None]
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_sparse_head_matches_dense_positions():
    model = BertForMaskedLM(CFG)
    ids = _ids((1, 6))
    params = _init(model, ids, jnp.zeros((1, 6), jnp.int32))
    all_positions = jnp.arange(6)[None]
    dense = model.apply({"params": params}, ids, all_positions)
    sparse = model.apply({"params": params}, ids, jnp.array([[4, 1]]))
    np.testing.assert_allclose(sparse[0], dense[0, jnp.array([4, 1])], atol=1e-5)


def test_remat_gives_the_same_encoder_output():
    ids = _ids((2, 6))
    base = BertEncoder(CFG)
    params = _init(base, ids)
    remat = BertEncoder(EncoderConfig(**{**CFG.__dict__, "remat": True}))
    np.testing.assert_allclose(base.apply({"params": params}, ids)[0],
                               remat.apply({"params": params}, ids)[0], atol=1e-6)


def test_remat_modes_read_old_booleans_and_reject_unknown_ones():
    assert EncoderConfig(**{**CFG.__dict__, "remat": True}).remat == "block"
    assert EncoderConfig(**{**CFG.__dict__, "remat": False}).remat == "none"
    assert EncoderConfig.from_json({**CFG.to_json(), "remat": True}).remat == "block"
    with pytest.raises(errors.ConfigError, match=r"model.remat='ffn'; valid: \['none', 'block', 'mlp'\]"):
        EncoderConfig(**{**CFG.__dict__, "remat": "ffn"})


def test_dropout_threefry_is_flax_dropout_and_hash_drops_at_its_rate():
    import flax.linen as nn

    x = jnp.ones((200, 500))
    rngs = lambda seed: {"dropout": jax.random.key(seed)}
    ours = Dropout(0.1).apply({}, x, False, rngs=rngs(0))
    np.testing.assert_array_equal(ours, nn.Dropout(0.1).apply({}, x, False, rngs=rngs(0)))
    hashed = lambda seed, y=x: Dropout(0.1, "hash").apply({}, y, False, rngs=rngs(seed))
    out = hashed(0)
    np.testing.assert_array_equal(out, hashed(0))  # one key, one mask
    assert not np.array_equal(out, hashed(1)) and not np.array_equal(out, ours)
    assert abs(float((out == 0).mean()) - 0.1) < 0.005  # 100,000 draws
    assert abs(float(out.mean()) - 1.0) < 0.01  # inverted: the expectation is kept
    # Neighbouring positions, rows and keys are not correlated (a weak hash would show here).
    dropped = np.asarray(out == 0, np.float32)
    for a, b in ((dropped[:, 1:], dropped[:, :-1]), (dropped[1:], dropped[:-1]),
                 (dropped, np.asarray(hashed(1) == 0, np.float32))):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
    np.testing.assert_array_equal(Dropout(0.1, "hash").apply({}, x, True), x)
    with pytest.raises(errors.ConfigError, match=r"model.dropout_rng='philox'; valid: \['threefry', 'hash'\]"):
        EncoderConfig(**{**CFG.__dict__, "dropout_rng": "philox"})


def test_hash_dropout_masks_do_not_depend_on_sharding():
    script = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from encoder_jax.layers import Dropout
x = jnp.ones((64, 256))
f = jax.jit(lambda x: Dropout(0.1, "hash").apply({}, x, False, rngs={"dropout": jax.random.key(0)}))
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
sharded = f(jax.device_put(x, NamedSharding(mesh, P("data", "fsdp"))))
assert len(sharded.sharding.device_set) == 8
np.testing.assert_array_equal(np.asarray(sharded), np.asarray(f(x)))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)


def test_residual_puts_the_norm_before_the_sublayer_or_after_the_sum():
    x = jnp.arange(6.0).reshape(1, 2, 3)
    sublayer, norm = (lambda h: 2 * h + 1), (lambda h: h / 3 - 1)
    no_dropout = lambda h, deterministic: h
    np.testing.assert_allclose(residual(x, sublayer, norm, no_dropout, True, True),
                               x + sublayer(norm(x)))
    np.testing.assert_allclose(residual(x, sublayer, norm, no_dropout, False, True),
                               norm(x + sublayer(x)))


@pytest.mark.parametrize("pre_norm", [True, False])
def test_encoder_equals_a_hand_written_pre_or_post_ln_forward(pre_norm):
    """The whole encoder against its definition, block by block from the same parameters."""
    cfg = EncoderConfig(**{**CFG.__dict__, "pre_norm": pre_norm})
    model, ids = BertEncoder(cfg), _ids((2, 6))
    params = _init(model, ids)
    assert ("final_norm" in params) == pre_norm
    x = model.apply({"params": params}, ids, method=lambda m, i: m.embed_norm(
        m.token_embed(i) + m.position_embed(jnp.arange(6)[None]) + m.type_embed(jnp.zeros_like(i))))
    mask = attention_mask(jnp.ones((2, 6), jnp.int32))
    for index in range(cfg.num_layers):
        p = params[f"block_{index}"]
        norm = lambda name, h: layer_norm(cfg, name).apply({"params": p[name]}, h)
        attend = lambda h: SelfAttention(cfg).apply({"params": p["attention"]}, h, mask)
        mlp = lambda h: FeedForward(cfg).apply({"params": p["mlp"]}, h)
        if pre_norm:
            x = x + attend(norm("attention_norm", x))
            x = x + mlp(norm("mlp_norm", x))
        else:
            x = norm("attention_norm", x + attend(x))
            x = norm("mlp_norm", x + mlp(x))
    if pre_norm:
        x = layer_norm(cfg, "final_norm").apply({"params": params["final_norm"]}, x)
    np.testing.assert_allclose(model.apply({"params": params}, ids)[0], x, atol=2e-5)


def test_gradients_never_cross_packed_documents_with_dropout_on():
    """Training mode, dropout 0.3 on hidden states and attention probabilities: the output of
    document A has exactly zero gradient with respect to every input of document B."""
    cfg = EncoderConfig(**{**CFG.__dict__, "dropout_rate": 0.3, "attention_dropout_rate": 0.3})
    block = EncoderBlock(cfg)
    x = jax.random.normal(jax.random.key(1), (1, 9, 32))
    mask = attention_mask(jnp.array([[1] * 5 + [2] * 4]))
    params = block.init(jax.random.key(0), x, mask)["params"]

    def doc_a_output(inputs, key):
        out = block.apply({"params": params}, inputs, mask, False, rngs={"dropout": key})
        return (out[:, :5] * jnp.arange(1.0, 6.0)[None, :, None]).sum()

    for seed in range(3):
        grads = jax.grad(doc_a_output)(x, jax.random.key(seed))
        assert float(jnp.abs(grads[:, :5]).sum()) > 0
        np.testing.assert_array_equal(grads[:, 5:], 0.0)
    assert not np.allclose(doc_a_output(x, jax.random.key(0)), doc_a_output(x, jax.random.key(1)))


def test_dropout_is_active_only_in_training():
    cfg = EncoderConfig(**{**CFG.__dict__, "dropout_rate": 0.5, "attention_dropout_rate": 0.5})
    model = BertEncoder(cfg)
    ids = _ids((2, 6))
    params = _init(model, ids)
    eval_a = model.apply({"params": params}, ids)[0]
    eval_b = model.apply({"params": params}, ids)[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    train = lambda k: model.apply({"params": params}, ids, deterministic=False,
                                  rngs={"dropout": jax.random.key(k)})[0]
    assert not np.allclose(train(1), eval_a)
    np.testing.assert_array_equal(train(1), train(1))


def test_classifier_pools_the_first_token_or_the_mean_of_real_tokens():
    ids = _ids((2, 7))
    mask = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
    for pooling in ("first", "mean"):
        model = BertForClassification(CFG, num_classes=5, pooling=pooling)
        params = _init(model, ids)
        logits = model.apply({"params": params}, ids, mask=mask)
        assert logits.shape == (2, 5) and logits.dtype == jnp.float32
        hidden, pooled = BertEncoder(CFG).apply({"params": params["encoder"]}, ids, mask=mask)
        if pooling == "mean":
            pooled = jnp.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
        head = params["classifier"]
        np.testing.assert_allclose(logits, pooled @ head["kernel"] + head["bias"][None], atol=1e-5)
        padded_changed = ids.at[1, 4:].set(_ids((3,), seed=9))
        np.testing.assert_allclose(model.apply({"params": params}, padded_changed, mask=mask),
                                   logits, atol=1e-6)


def test_bad_model_config_names_the_field():
    with pytest.raises(ValueError, match="model.hidden_dim=30 is not divisible by model.num_heads=4"):
        EncoderConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="model.activation='swish'; valid"):
        EncoderConfig(activation="swish")
