"""Encoder shapes, dtypes, masks that do not leak, tied MLM weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax.layers import EncoderConfig, attention_mask
from encoder_jax.models import BertEncoder, BertForClassification, BertForMaskedLM


CFG = EncoderConfig(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4, mlp_dim=64,
                    max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0)


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


def test_packed_document_does_not_see_its_neighbour():
    model = BertEncoder(CFG)
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


def test_packed_row_equals_separate_rows():
    model = BertEncoder(CFG)
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


def test_pre_norm_and_remat_variants_run():
    ids = _ids((2, 6))
    base = BertEncoder(CFG)
    params = _init(base, ids)
    remat = BertEncoder(EncoderConfig(**{**CFG.__dict__, "remat": True}))
    np.testing.assert_allclose(base.apply({"params": params}, ids)[0],
                               remat.apply({"params": params}, ids)[0], atol=1e-6)
    pre = BertEncoder(EncoderConfig(**{**CFG.__dict__, "pre_norm": True}))
    pre_params = _init(pre, ids)
    assert "final_norm" in pre_params
    assert pre.apply({"params": pre_params}, ids)[0].shape == (2, 6, 32)


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


def test_classifier_head_shapes_for_both_poolings():
    ids = _ids((3, 7))
    for pooling in ("first", "mean"):
        model = BertForClassification(CFG, num_classes=5, pooling=pooling)
        params = _init(model, ids)
        logits = model.apply({"params": params}, ids, mask=jnp.ones((3, 7), bool))
        assert logits.shape == (3, 5) and logits.dtype == jnp.float32


def test_bad_model_config_names_the_field():
    with pytest.raises(ValueError, match="model.hidden_dim=30 is not divisible by model.num_heads=4"):
        EncoderConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="model.activation='swish'; valid"):
        EncoderConfig(activation="swish")
