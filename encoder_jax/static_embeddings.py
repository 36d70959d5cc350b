"""Token embeddings from corpus co-occurrence: PPMI + truncated SVD (Levy, Goldberg & Dagan 2015).

Why this exists: at the compute of one CPU-hour, a small MLM-pretrained encoder has not
yet learned which tokens go together (its frozen features classify AG News barely above
chance, docs/recipes.md), while the positive pointwise mutual information of windowed
co-occurrence, factorised by SVD, gives token vectors whose mean classifies AG News at
0.84 from 2,000 labels, and takes seconds. `mlm.embedding_init=ppmi` starts pretraining
from these vectors, so the encoder's token table holds lexical semantics from step 0.

All functions are numpy/scipy and deterministic.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from encoder_jax import errors


def cooccurrence(docs: Iterable[Sequence[int]], vocab_size: int, window: int,
                 chunk_pairs: int = 4_000_000) -> sp.csr_matrix:
    """Symmetric counts (V, V) float64: pairs of tokens at most `window` apart in a document.

    Pairs are summed into the sparse matrix every `chunk_pairs`, so memory stays bounded by
    the distinct pairs, not by the corpus length.
    """
    counts = sp.csr_matrix((vocab_size, vocab_size), dtype=np.float64)
    rows, cols, pending = [], [], 0

    def flush():
        r, c = np.concatenate(rows), np.concatenate(cols)
        smallest, largest = min(r.min(), c.min()), max(r.max(), c.max())
        if smallest < 0 or largest >= vocab_size:
            raise errors.DataError(f"token ids span {smallest}..{largest}; valid: 0..{vocab_size - 1} "
                                   f"(vocab_size {vocab_size})")
        rows.clear()
        cols.clear()
        return sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(vocab_size, vocab_size)).tocsr()

    for doc in docs:
        ids = np.asarray(doc, np.int64)
        for offset in range(1, min(window, len(ids) - 1) + 1):
            rows.append(ids[:-offset])
            cols.append(ids[offset:])
            pending += len(ids) - offset
        if pending >= chunk_pairs:
            counts, pending = counts + flush(), 0
    if rows:
        counts = counts + flush()
    if counts.nnz == 0:
        raise errors.DataError("no document has two tokens: cannot count co-occurrences")
    return (counts + counts.T).tocsr()


def ppmi(counts: sp.csr_matrix, context_power: float = 0.75) -> sp.csr_matrix:
    """Positive PMI (V, V) with context-distribution smoothing: max(0, log P(w,c) / P(w) P_a(c)).

    P_a(c) ∝ count(c)^context_power dampens the PMI of rare contexts (Levy et al. 2015).
    """
    total = float(counts.sum())
    word = np.asarray(counts.sum(axis=1)).ravel()
    context = word ** context_power
    context = context / max(context.sum(), 1e-30) * total
    coo = counts.tocoo()
    pmi = np.log(coo.data * total / (word[coo.row] * context[coo.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep].astype(np.float32), (coo.row[keep], coo.col[keep])),
                         shape=counts.shape)


def svd_embeddings(matrix: sp.csr_matrix, dim: int, seed: int = 0) -> np.ndarray:
    """(V, dim) float32: U·sqrt(S) of the rank-`dim` truncated SVD, largest singular value first."""
    if dim >= min(matrix.shape):
        raise errors.ConfigError(f"embedding width {dim} must be below the vocabulary size "
                                 f"{min(matrix.shape)} for a truncated SVD")
    v0 = np.random.default_rng(seed).standard_normal(min(matrix.shape))
    u, s, _ = svds(matrix.astype(np.float64), k=dim, v0=v0)
    order = np.argsort(-s)
    return (u[:, order] * np.sqrt(s[order])).astype(np.float32)


def corpus_embeddings(docs: Iterable[Sequence[int]], vocab_size: int, dim: int, *, window: int,
                      std: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (V, dim) float32 with overall standard deviation `std`, seen (V,) bool).

    Rows of tokens that never co-occur (special tokens, unused pieces) are zero and
    `seen` is False for them: the caller keeps its own initialisation there.
    """
    counts = cooccurrence(docs, vocab_size, window)
    seen = np.asarray(counts.sum(axis=1)).ravel() > 0
    vectors = svd_embeddings(ppmi(counts), dim, seed) * seen[:, None]
    spread = vectors[seen].std()
    return (vectors * (std / max(spread, 1e-30))).astype(np.float32), seen
