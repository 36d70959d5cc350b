"""Scores of a clustering against known labels, and topic coherence of top words.

Labels are used only for scoring: `scores(labels_N, clusters_N)` gives NMI and ARI
(scikit-learn) and cluster accuracy (the best one-to-one map of clusters to labels,
found by the Hungarian method in scipy; clusters left over count as wrong).
`composition` lists what each cluster holds; `npmi_coherence` scores topics' top words
by their normalised pointwise mutual information over the documents of a corpus.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import numpy as np

from encoder_jax import errors


def _check(labels_N, clusters_N) -> tuple[np.ndarray, np.ndarray]:
    labels, clusters = np.asarray(labels_N), np.asarray(clusters_N)
    if labels.ndim != 1 or labels.shape != clusters.shape or labels.size == 0:
        raise errors.DataError(f"labels {labels.shape} and clusters {clusters.shape} must be the "
                               f"same non-empty 1-D shape")
    return labels, clusters


def cluster_accuracy(labels_N, clusters_N) -> float:
    """Accuracy under the best one-to-one assignment of clusters to labels."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics.cluster import contingency_matrix

    labels, clusters = _check(labels_N, clusters_N)
    counts_LxC = contingency_matrix(labels, clusters)
    rows, cols = linear_sum_assignment(counts_LxC, maximize=True)
    return float(counts_LxC[rows, cols].sum() / labels.size)


def scores(labels_N, clusters_N) -> dict[str, float]:
    """{"nmi", "ari", "accuracy", "clusters"} of a clustering against the true labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels, clusters = _check(labels_N, clusters_N)
    return {"nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters)),
            "accuracy": cluster_accuracy(labels, clusters),
            "clusters": float(len(np.unique(clusters)))}


def composition(labels_N, clusters_N, label_names: Sequence[str] | None = None,
                top: int = 3) -> list[dict]:
    """Per cluster (largest first): its size and its `top` labels with their fractions."""
    labels, clusters = _check(labels_N, clusters_N)
    rows = []
    for cluster in np.unique(clusters):
        held = labels[clusters == cluster]
        values, counts = np.unique(held, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        name = (lambda v: label_names[int(v)]) if label_names is not None else (lambda v: v.item())
        rows.append({"cluster": cluster.item(), "size": int(held.size),
                     "labels": [(name(values[i]), round(float(counts[i] / held.size), 4))
                                for i in order]})
    return sorted(rows, key=lambda r: -r["size"])


def npmi_coherence(topics: Sequence[Sequence[str]], documents: Iterable[Iterable[str]]) -> list[float]:
    """Mean NPMI over the word pairs of each topic, from document co-occurrence.

    NPMI(a, b) = log(p(a, b) / (p(a) p(b))) / -log p(a, b), in [-1, 1]: 1 when a and b
    always occur together, 0 when independent, -1 when never together (also when a word
    never occurs). `documents` yields each document's tokens (repeats are ignored).
    """
    vocabulary = {word for topic in topics for word in topic}
    single: dict[str, int] = dict.fromkeys(vocabulary, 0)
    joint: dict[tuple[str, str], int] = {}
    count = 0
    for document in documents:
        present = sorted(vocabulary.intersection(document))
        count += 1
        for word in present:
            single[word] += 1
        for pair in itertools.combinations(present, 2):
            joint[pair] = joint.get(pair, 0) + 1
    if count == 0:
        raise errors.DataError("npmi_coherence needs at least one document")

    def npmi(a: str, b: str) -> float:
        both = joint.get((min(a, b), max(a, b)), 0) / count
        if both == 0:
            return -1.0
        if both == 1.0:
            return 1.0
        return math.log(both / (single[a] / count * single[b] / count)) / -math.log(both)

    return [float(np.mean([npmi(a, b) for a, b in itertools.combinations(topic, 2)]))
            if len(topic) > 1 else 0.0 for topic in topics]
