"""PPMI-SVD token vectors: counts, PMI formula, semantics on a two-topic corpus, MLM init wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax import errors, static_embeddings
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertForMaskedLM
from encoder_jax.tasks import mlm

from conftest import tiny_config


def test_cooccurrence_counts_pairs_within_the_window_both_ways():
    counts = static_embeddings.cooccurrence([[1, 2, 3], [3, 1]], vocab_size=5, window=1).toarray()
    expected = np.zeros((5, 5))
    for a, b in ((1, 2), (2, 3), (3, 1)):
        expected[a, b] += 1
        expected[b, a] += 1
    np.testing.assert_array_equal(counts, expected)
    wide = static_embeddings.cooccurrence([[1, 2, 3]], vocab_size=5, window=2).toarray()
    assert wide[1, 3] == wide[3, 1] == 1 and wide[0].sum() == 0


def test_ppmi_matches_its_formula_and_drops_negative_pmi():
    counts = static_embeddings.cooccurrence([[1, 2, 1, 2, 3, 4, 3, 4, 1, 3]], vocab_size=5, window=1)
    dense = counts.toarray().astype(np.float64)
    total, word = dense.sum(), dense.sum(1)
    context = word ** 0.75 / (word ** 0.75).sum() * total
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.maximum(np.log(dense * total / np.outer(word, context)), 0.0)
    expected[~np.isfinite(expected)] = 0.0
    np.testing.assert_allclose(static_embeddings.ppmi(counts).toarray(), expected, rtol=1e-5)
    assert (static_embeddings.ppmi(counts).data > 0).all()


def _two_topic_docs(count: int, seed: int) -> list[list[int]]:
    """Documents drawing tokens 5..14 (topic A) or 15..24 (topic B), never both."""
    rng = np.random.default_rng(seed)
    return [list(rng.integers(5, 15, 12) + 10 * (i % 2)) for i in range(count)]


def test_tokens_of_one_topic_get_closer_vectors_than_tokens_across_topics():
    table, seen = static_embeddings.corpus_embeddings(_two_topic_docs(200, 0), vocab_size=30, dim=4,
                                                      window=3, std=0.5)
    assert table.shape == (30, 4) and table.dtype == np.float32
    np.testing.assert_array_equal(seen, (np.arange(30) >= 5) & (np.arange(30) < 25))
    np.testing.assert_array_equal(table[~seen], 0.0)
    np.testing.assert_allclose(table[seen].std(), 0.5, rtol=1e-5)
    unit = table[seen] / np.linalg.norm(table[seen], axis=1, keepdims=True)
    cosine = unit @ unit.T
    within = (cosine[:10, :10].sum() - 10) / 90
    across = cosine[:10, 10:].mean()
    assert within > across + 0.5, (within, across)


def test_corpus_embeddings_are_deterministic_and_bad_inputs_are_named():
    docs = _two_topic_docs(50, 1)
    a, _ = static_embeddings.corpus_embeddings(docs, 30, 4, window=2, std=1.0, seed=3)
    b, _ = static_embeddings.corpus_embeddings(docs, 30, 4, window=2, std=1.0, seed=3)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(errors.DataError, match="two tokens"):
        static_embeddings.cooccurrence([[1], []], 5, 2)
    with pytest.raises(errors.DataError, match="vocab_size 20"):
        static_embeddings.cooccurrence([[1, 25]], 20, 2)
    with pytest.raises(errors.DataError, match=r"span -1\.\.1; valid: 0\.\.19"):
        static_embeddings.cooccurrence([[1, -1]], 20, 2)
    chunked = static_embeddings.cooccurrence(docs, 30, 2, chunk_pairs=7)  # many partial sums
    np.testing.assert_array_equal(chunked.toarray(), static_embeddings.cooccurrence(docs, 30, 2).toarray())
    with pytest.raises(errors.ConfigError, match="below the vocabulary size"):
        static_embeddings.corpus_embeddings(docs, 30, 30, window=2, std=1.0)


def _tied_logits_std(config, params, vocab_size: int) -> float:
    model = BertForMaskedLM(EncoderConfig.from_config(config.model, vocab_size))
    ids = jax.random.randint(jax.random.key(3), (4, 16), 5, vocab_size)
    positions = jnp.tile(jnp.arange(0, 16, 2), (4, 1))
    return float(jnp.std(model.apply({"params": params}, ids, positions)))


def test_mlm_ppmi_init_replaces_seen_rows_and_keeps_head_logits_at_fresh_scale(
        corpus_files, data_cache):
    config = tiny_config(corpus_files, data_cache, **{
        "mlm.embedding_init": "ppmi", "mlm.ppmi_std": 0.7, "mlm.ppmi_docs": 100})
    task = mlm.build(config, None)
    fresh = jax.device_get(task.init_params(jax.random.key(0)))
    params = task.init_from(fresh)
    table = np.asarray(params["encoder"]["token_embed"]["embedding"])
    before = np.asarray(fresh["encoder"]["token_embed"]["embedding"])
    changed = (table != before).any(axis=1)
    assert changed.sum() > 20
    assert not changed[[0, 2, 3, 4]].any()  # [PAD] [CLS] [SEP] [MASK] never co-occur: kept fresh
    np.testing.assert_allclose(table[changed].std(), 0.7, rtol=1e-4)
    # The table grew ~40x; the tied head's last LayerNorm shrinks so logits keep their fresh size.
    fresh_std = _tied_logits_std(config, fresh, table.shape[0])
    assert 0.5 < _tied_logits_std(config, params, table.shape[0]) / fresh_std < 2.0
    unscaled = {**params, "transform_norm": fresh["transform_norm"]}
    assert _tied_logits_std(config, unscaled, table.shape[0]) / fresh_std > 10.0
    for name in ("block_0", "embed_norm", "position_embed"):
        for a, b in zip(jax.tree_util.tree_leaves(params["encoder"][name]),
                        jax.tree_util.tree_leaves(fresh["encoder"][name])):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(errors.ConfigError, match="mlm.embedding_init='glove'; valid"):
        mlm.build(tiny_config(corpus_files, data_cache, **{"mlm.embedding_init": "glove"}), None)
    with pytest.raises(errors.ConfigError,
                       match=r"model.hidden_dim=256 below the vocabulary size \d+ \(tokenizer.vocab_size"):
        mlm.build(tiny_config(corpus_files, data_cache, **{"mlm.embedding_init": "ppmi",
                                                           "model.hidden_dim": 256}), None)
    with pytest.raises(errors.ConfigError, match="mlm.ppmi_std=0.0 must be >="):
        mlm.build(tiny_config(corpus_files, data_cache, **{"mlm.ppmi_std": 0.0}), None)


def test_electra_ppmi_init_rescales_the_generator_head_and_keeps_bfloat16_params(
        corpus_files, data_cache):
    config = tiny_config(corpus_files, data_cache, **{
        "mlm.embedding_init": "ppmi", "mlm.objective": "electra", "model.param_dtype": "bfloat16"})
    task = mlm.build(config, None)
    fresh = jax.device_get(task.init_params(jax.random.key(0)))
    params = task.init_from(fresh)
    for before, after in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(params)):
        assert before.dtype == after.dtype and before.shape == after.shape
    factor = config.model.init_std / config.mlm.ppmi_std
    np.testing.assert_allclose(np.asarray(params["generator"]["transform_norm"]["scale"], np.float32),
                               factor, rtol=1e-2)
    assert "transform_norm" not in params  # the discriminator's head is not tied to the table
