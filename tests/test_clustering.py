"""Clustering scores against brute force and hand-computed values."""

import itertools

import numpy as np
import pytest

from encoder_jax import clustering


def test_cluster_accuracy_is_the_best_one_to_one_map():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    clusters = np.where(rng.random(200) < 0.7, (labels + 1) % 3, rng.integers(0, 4, 200))
    best = max(np.mean(np.array(perm)[clusters] == labels)
               for perm in itertools.permutations(range(4)))  # clusters 0..3 -> labels (4th: none)
    assert clustering.cluster_accuracy(labels, clusters) == pytest.approx(best)
    assert clustering.cluster_accuracy(labels, (labels * 7 + 2) % 5) == 1.0  # any renaming


def test_scores_and_composition():
    labels = np.array([0, 0, 0, 1, 1, 2])
    perfect = clustering.scores(labels, np.array([5, 5, 5, 9, 9, 1]))
    assert perfect == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "accuracy": 1.0,
                       "clusters": 3.0}
    one_blob = clustering.scores(labels, np.zeros(6, int))
    assert one_blob["nmi"] == pytest.approx(0.0) and one_blob["accuracy"] == pytest.approx(0.5)
    rows = clustering.composition(labels, np.array([1, 1, 0, 0, 0, 0]), ["a", "b", "c"])
    assert rows[0] == {"cluster": 0, "size": 4, "labels": [("b", 0.5), ("a", 0.25), ("c", 0.25)]}
    with pytest.raises(ValueError, match="same non-empty 1-D shape"):
        clustering.scores(labels, labels[:3])


def test_npmi_is_one_for_together_zero_for_independent_minus_one_for_apart():
    docs = [["a", "b", "x"], ["a", "y"], ["b", "y"], ["x"]]  # a, b independent: p = 1/2 each, 1/4 both
    assert clustering.npmi_coherence([["a", "b"]], docs) == [pytest.approx(0.0, abs=1e-12)]
    together = [["c", "d"], ["c", "d"], ["e"]]
    apart = [["c"], ["d"], ["e"]]
    assert clustering.npmi_coherence([["c", "d"]], together) == [pytest.approx(1.0)]
    assert clustering.npmi_coherence([["c", "d"], ["c", "missing"]], apart) == [-1.0, -1.0]
    docs = [["c", "d"], ["c", "d"], ["c"], ["e"]]  # p(c) = 3/4, p(d) = 1/2, p(c, d) = 1/2
    expected = np.log(0.5 / (0.75 * 0.5)) / -np.log(0.5)
    assert clustering.npmi_coherence([["c", "d"]], docs) == [pytest.approx(expected)]
