"""Hashed n-gram features of the classifier's wide part (Wide & Deep).

Token bigrams are hashed from the ids. Character unigrams and bigrams are read off the pieces:
a table row per vocabulary id holds the hashed n-grams inside that piece and the code points
of its first and last character, so the bigram across two pieces is hashed in the model. The
n-grams of a row are then those of its normalised text, spaces removed; this is the evidence a
character n-gram TF-IDF classifier uses, and what pieces alone miss on Chinese.

The table is a float32 parameter (`wide_char_index`, exact for ids below 2^24) that the
classification task fills from its tokenizer and never trains, so every loading path
(checkpoints, exports, the server) finds it with the weights.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

CHAR_SLOTS = 15  # hashed n-grams kept per piece: the unigrams and inner bigrams of 8 characters
INDEX_WIDTH = CHAR_SLOTS + 2  # + first and last code point
UNIGRAM_KEY = 0x200000  # the "previous" key of a character unigram: above every code point + 1
_PIECE_MARKS = ("\u2581", "##")  # sentencepiece's word start, WordPiece's continuation


def hash_pair(previous, current, num_buckets: int, xp=jnp):
    """Bucket in [0, num_buckets) of each (previous, current) pair of non-negative integers.

    murmur3's finaliser over both, so colliding pairs are spread, not banded; `xp` is jnp in
    the model and np when the character table is built, with identical results.
    """
    u32 = xp.uint32
    with np.errstate(over="ignore"):  # numpy warns on uint32 wrap-around, which is the point
        h = xp.asarray(previous).astype(u32) * u32(0x9E3779B1) + xp.asarray(current).astype(u32)
        h = (h ^ (h >> u32(16))) * u32(0x85EBCA6B)
        h = (h ^ (h >> u32(13))) * u32(0xC2B2AE35)
        return ((h ^ (h >> u32(16))) % u32(num_buckets)).astype(xp.int32)


def piece_text(piece: str) -> str:
    """A vocabulary piece's characters without its word-boundary marks."""
    for mark in _PIECE_MARKS:
        piece = piece.replace(mark, "")
    return piece


def char_index_table(pieces: Iterable[str], special_ids: Iterable[int], num_buckets: int
                     ) -> np.ndarray:
    """float32 (V, INDEX_WIDTH): per piece its n-gram buckets (-1: none), first and last code point.

    Special tokens get no n-grams and code points 0, so the first character of a text pairs
    with the start key (0), as the first token does in `models.bigram_buckets`.
    """
    pieces, specials = list(pieces), set(int(i) for i in special_ids)
    table = np.full((len(pieces), INDEX_WIDTH), -1.0, np.float32)
    table[:, CHAR_SLOTS:] = 0.0
    for row, piece in enumerate(pieces):
        text = "" if row in specials else piece_text(piece)
        if not text:
            continue
        points = np.array([ord(c) for c in text], np.int64)
        unigrams = hash_pair(np.full_like(points, UNIGRAM_KEY), points, num_buckets, np)
        bigrams = hash_pair(points[:-1] + 1, points[1:], num_buckets, np)
        grams = np.concatenate([unigrams, bigrams])[:CHAR_SLOTS]
        table[row, :len(grams)] = grams
        table[row, CHAR_SLOTS:] = points[0], points[-1]
    return table


def tokenizer_char_table(tokenizer, special_ids: Iterable[int], num_buckets: int) -> np.ndarray:
    """`char_index_table` of every piece of a sentencepiece or WordPiece tokenizer."""
    return char_index_table((tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)),
                            special_ids, num_buckets)


def char_buckets(index_BxLxW: jax.Array, segment_ids_BxL: jax.Array, num_buckets: int
                 ) -> tuple[jax.Array, jax.Array]:
    """(B, L, CHAR_SLOTS + 1) int32 buckets and bool validity of each token's character n-grams.

    The last slot is the bigram (previous piece's last character, this piece's first); a
    text's first character pairs with the start key 0 (packed neighbours do not leak).
    """
    real_BxL = segment_ids_BxL > 0
    inner_BxLxK = index_BxLxW[..., :CHAR_SLOTS].astype(jnp.int32)
    first_BxL = index_BxLxW[..., CHAR_SLOTS].astype(jnp.int32)
    last_BxL = index_BxLxW[..., CHAR_SLOTS + 1].astype(jnp.int32)
    same_doc_BxL = jnp.pad(segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1], ((0, 0), (1, 0)))
    previous_BxL = jnp.pad(last_BxL[:, :-1], ((0, 0), (1, 0)))
    previous_BxL = jnp.where(same_doc_BxL & (previous_BxL > 0), previous_BxL + 1, 0)
    across_BxL = hash_pair(previous_BxL, first_BxL, num_buckets)
    buckets = jnp.concatenate([jnp.maximum(inner_BxLxK, 0), across_BxL[..., None]], axis=-1)
    valid = jnp.concatenate([inner_BxLxK >= 0, (first_BxL > 0)[..., None]], axis=-1)
    return buckets, valid & real_BxL[..., None]


def fill_char_index(params: dict, tokenizer, special_ids: Iterable[int], num_buckets: int) -> dict:
    """`params` with `wide_char_index` set from `tokenizer` (a vocabulary-size mismatch is an error)."""
    table = tokenizer_char_table(tokenizer, special_ids, num_buckets)
    if params["wide_char_index"].shape != table.shape:
        raise ValueError(f"wide_char_index has shape {params['wide_char_index'].shape}, the "
                         f"tokenizer gives {table.shape}: model.vocab_size must be the tokenizer's")
    return {**params, "wide_char_index": jnp.asarray(table)}
