"""The wide part's character n-grams: read off pieces, they are the text's own n-grams."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax import wide
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertForClassification

BUCKETS = 4096
PIECES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u2581", "\u2581新", "华社", "新华", "社",
          "电", "股市", "##ab", "c", "北京大学体育学院"]
SPECIALS = [0, 1, 2, 3, 4]


def expected_ngrams(text: str) -> collections.Counter:
    """Buckets of a text's character unigrams and bigrams, its first character after the start key."""
    points = [ord(c) for c in text]
    grams = [int(wide.hash_pair(wide.UNIGRAM_KEY, p, BUCKETS, np)) for p in points]
    grams += [int(wide.hash_pair(a + 1, b, BUCKETS, np)) for a, b in zip([-1] + points[:-1], points)]
    return collections.Counter(grams)


def row_ngrams(ids, segment_ids, document):
    table = jnp.asarray(wide.char_index_table(PIECES, SPECIALS, BUCKETS))
    buckets, valid = wide.char_buckets(table[jnp.asarray([ids])], jnp.asarray([segment_ids]), BUCKETS)
    in_doc = np.asarray(valid[0]) & (np.asarray(segment_ids) == document)[:, None]
    return collections.Counter(np.asarray(buckets[0])[in_doc].tolist())


def test_numpy_and_jax_hashes_agree():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**21, 500), rng.integers(0, 2**21, 500)
    assert np.array_equal(wide.hash_pair(a, b, 262144, np),
                          np.asarray(wide.hash_pair(jnp.asarray(a), jnp.asarray(b), 262144)))


def test_table_rows_hold_a_pieces_ngrams_and_end_characters():
    table = wide.char_index_table(PIECES, SPECIALS, BUCKETS)
    assert table.shape == (len(PIECES), wide.INDEX_WIDTH) and table.dtype == np.float32
    assert (table[SPECIALS, :wide.CHAR_SLOTS] == -1).all() and (table[SPECIALS, wide.CHAR_SLOTS:] == 0).all()
    assert (table[5, :wide.CHAR_SLOTS] == -1).all()  # the bare word mark has no characters
    row = table[7]  # "华社": 2 unigrams + 1 inner bigram
    assert (row[:3] >= 0).all() and (row[3:wide.CHAR_SLOTS] == -1).all()
    assert list(row[wide.CHAR_SLOTS:]) == [ord("华"), ord("社")]
    assert list(table[12, wide.CHAR_SLOTS:]) == [ord("a"), ord("b")]  # WordPiece's ## dropped
    assert (table[14, :wide.CHAR_SLOTS] >= 0).all()  # 8 characters: 15 n-grams, all kept


@pytest.mark.parametrize("pieces", [[6, 7, 10], [5, 8, 9, 10]])  # ▁新|华社|电, ▁|新华|社|电
def test_row_ngrams_are_the_texts_whatever_the_segmentation(pieces):
    ids = [2] + pieces + [3, 0, 0]
    segments = [1] * (len(pieces) + 2) + [0, 0]
    assert row_ngrams(ids, segments, 1) == expected_ngrams("新华社电")


def test_packed_documents_do_not_share_a_bigram():
    ids = [2, 11, 3, 2, 13, 12, 3, 0]  # [CLS] 股市 [SEP] [CLS] c ##ab [SEP] pad
    segments = [1, 1, 1, 2, 2, 2, 2, 0]
    assert row_ngrams(ids, segments, 1) == expected_ngrams("股市")
    assert row_ngrams(ids, segments, 2) == expected_ngrams("cab")  # no (市, c) bigram


def test_char_part_is_silent_at_first_and_its_index_gets_no_gradient():
    cfg = EncoderConfig(vocab_size=len(PIECES), hidden_dim=16, num_layers=1, num_heads=2,
                        mlp_dim=32, max_len=16)
    model = BertForClassification(cfg, 3, wide_buckets=BUCKETS, wide_chars=True)
    ids_BxL = jnp.array([[2, 6, 7, 10, 3, 0], [2, 5, 8, 9, 10, 3]], jnp.int32)
    params = model.init(jax.random.key(0), ids_BxL)["params"]
    params = wide.fill_char_index(params, type("T", (), {"vocab_size": len(PIECES),
                                                         "id_to_piece": PIECES.__getitem__})(),
                                  SPECIALS, BUCKETS)
    apply = lambda p: model.apply({"params": p}, ids_BxL, segment_ids=(ids_BxL > 0).astype(jnp.int32),
                                  return_parts=True)
    assert np.array_equal(apply(params)[1], np.zeros((2, 3)))  # zero-initialised
    params["wide_char"]["embedding"] = jax.random.normal(jax.random.key(1), (BUCKETS, 3))
    wide_BxC = apply(params)[1]
    # The same text in two segmentations: the same character evidence (token n-grams differ).
    chars_only = lambda p: p | {"wide_unigram": jax.tree.map(jnp.zeros_like, p["wide_unigram"]),
                                "wide_bigram": jax.tree.map(jnp.zeros_like, p["wide_bigram"])}
    both = apply(chars_only(params))[1]
    assert np.allclose(both[0], both[1], atol=1e-5) and not np.allclose(wide_BxC[0], 0)
    grads = jax.grad(lambda p: apply(p)[1].sum())(params)
    assert not np.asarray(grads["wide_char_index"]).any()
    assert np.abs(grads["wide_char"]["embedding"]).sum() > 0
    with pytest.raises(ValueError, match="wide_char_index has shape"):
        wide.fill_char_index(params, type("T", (), {"vocab_size": 3, "id_to_piece": PIECES.__getitem__})(),
                             SPECIALS, BUCKETS)
