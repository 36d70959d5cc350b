"""PPMI-SVD token vectors: counts, PMI formula, semantics on a two-topic corpus, MLM init wiring."""

import jax
import numpy as np
import pytest

from encoder_jax import errors, static_embeddings
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
    with pytest.raises(errors.ConfigError, match="below the vocabulary size"):
        static_embeddings.corpus_embeddings(docs, 30, 30, window=2, std=1.0)


def test_mlm_ppmi_init_replaces_seen_rows_and_keeps_head_logits_at_fresh_scale(
        corpus_files, data_cache):
    config = tiny_config(corpus_files, data_cache, **{
        "mlm.embedding_init": "ppmi", "mlm.ppmi_std": 0.7, "mlm.ppmi_docs": 100})
    task = mlm.build(config, None)
    fresh = task.init_params(jax.random.key(0))
    params = task.init_from(jax.device_get(fresh))
    table = np.asarray(params["encoder"]["token_embed"]["embedding"])
    before = np.asarray(fresh["encoder"]["token_embed"]["embedding"])
    changed = (table != before).any(axis=1)
    assert 20 < changed.sum() < table.shape[0]  # the special tokens are never seen: kept fresh
    np.testing.assert_allclose(table[changed].std(), 0.7, rtol=1e-4)
    # The tied head's logits keep their fresh scale: its last LayerNorm shrinks as the table grew.
    factor = config.model.init_std / 0.7
    for key in ("scale", "bias"):
        np.testing.assert_allclose(params["transform_norm"][key],
                                   np.asarray(fresh["transform_norm"][key]) * factor, rtol=1e-6)
    for name in ("block_0", "embed_norm", "position_embed"):
        for a, b in zip(jax.tree_util.tree_leaves(params["encoder"][name]),
                        jax.tree_util.tree_leaves(fresh["encoder"][name])):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(errors.ConfigError, match="mlm.embedding_init='glove'; valid"):
        mlm.build(tiny_config(corpus_files, data_cache, **{"mlm.embedding_init": "glove"}), None)
