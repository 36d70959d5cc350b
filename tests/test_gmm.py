"""Gaussian mixture EM in JAX against scikit-learn and scipy, on small synthetic data."""

import warnings

import jax
import numpy as np
import pytest

from encoder_jax import gmm

K, D = 3, 4
TRUE_MEANS = np.array([[0.0, 0, 0, 0], [4, 4, 0, 0], [0, -4, 4, 1]])


def blobs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    scales = np.array([0.5, 1.0, 0.8])
    return (TRUE_MEANS[labels] + rng.normal(size=(n, D)) * scales[labels, None]).astype(np.float32), labels


def start_parameters(covariance_type, seed=1):
    """Deliberately poor but valid starting weights, means and precisions."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.5, 0.3, 0.2])
    means = rng.normal(size=(K, D)) * 2
    if covariance_type == "full":
        a = rng.normal(size=(K, D, D)) * 0.3
        precisions = np.einsum("kij,klj->kil", a, a) + np.eye(D)[None] * 0.5
    elif covariance_type == "diag":
        precisions = rng.uniform(0.3, 2.0, size=(K, D))
    else:
        precisions = rng.uniform(0.3, 2.0, size=K)
    return weights, means, precisions


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_em_equals_scikit_learn_from_the_same_start(covariance_type):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    X, _ = blobs()
    weights, means, precisions = start_parameters(covariance_type)
    iterations = 6
    reference = []
    for max_iter in range(1, iterations + 1):
        sk = GaussianMixture(K, covariance_type=covariance_type, weights_init=weights,
                             means_init=means, precisions_init=precisions, max_iter=max_iter,
                             tol=0.0, reg_covar=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sk.fit(X.astype(np.float64))
        reference.append(sk.lower_bound_)
    ours = gmm.fit(None, X, K, covariance_type, start=gmm.from_parameters(
        weights, means, precisions, covariance_type), max_iter=iterations, tol=0.0)
    assert int(ours.iterations) == iterations
    np.testing.assert_allclose(np.asarray(ours.lower_bounds), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.weights_K, sk.weights_, atol=1e-5)
    np.testing.assert_allclose(ours.means_KxD, sk.means_, atol=1e-4)
    np.testing.assert_allclose(ours.covariances, sk.covariances_, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(gmm.predict(ours, X), sk.predict(X))
    np.testing.assert_allclose(gmm.score(ours, X), sk.score(X), rtol=1e-5)
    np.testing.assert_allclose(gmm.bic(ours, X), sk.bic(X), rtol=1e-5)
    np.testing.assert_allclose(gmm.aic(ours, X), sk.aic(X), rtol=1e-5)


def test_log_densities_equal_scipy_across_e_step_chunks():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(3)
    X = rng.normal(size=(gmm.CHUNK_ROWS + 37, D)).astype(np.float32)  # two chunks, one padded
    weights, means, precisions = start_parameters("full")
    model = gmm.from_parameters(weights, means, precisions, "full")
    ours = np.asarray(gmm.log_gaussian_prob(X, model.means_KxD, model.precisions_cholesky, "full"))
    for k in range(K):
        expected = multivariate_normal(means[k], np.linalg.inv(precisions[k])).logpdf(X)
        np.testing.assert_allclose(ours[:, k], expected, rtol=1e-4, atol=1e-3)


def test_fit_recovers_a_synthetic_mixture_and_bic_picks_its_size():
    from scipy.optimize import linear_sum_assignment

    X, _ = blobs(n=900, seed=5)
    model = gmm.fit(jax.random.key(0), X, K, "full", n_init=2)
    assert bool(model.converged)
    distance = np.linalg.norm(np.asarray(model.means_KxD)[:, None] - TRUE_MEANS[None], axis=-1)
    rows, cols = linear_sum_assignment(distance)
    assert distance[rows, cols].max() < 0.25, distance
    np.testing.assert_allclose(np.asarray(model.weights_K)[rows], [1 / 3] * 3, atol=0.06)
    bics = [gmm.bic(gmm.fit(jax.random.key(1), X, k, "full", n_init=2), X) for k in range(1, 6)]
    assert int(np.argmin(bics)) + 1 == K, bics


def test_responsibilities_stay_finite_with_a_collapsing_component():
    """A component sitting on 50 identical points: reg_covar keeps it positive definite."""
    X, _ = blobs(n=200)
    X = np.concatenate([X, np.tile([[9.0, 9, 9, 9]], (50, 1))]).astype(np.float32)
    for covariance_type in gmm.COVARIANCE_TYPES:
        model = gmm.fit(jax.random.key(0), X, K + 1, covariance_type, max_iter=50)
        proba = np.asarray(gmm.predict_proba(model, X))
        assert np.isfinite(proba).all() and np.isfinite(float(model.lower_bound))
        np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
        assert (np.asarray(model.weights_K) > 0).all()


def test_samples_follow_the_mixture():
    weights, means, precisions = start_parameters("full")
    model = gmm.from_parameters(weights, means, precisions, "full")
    points, components = gmm.sample(jax.random.key(0), model, 60_000)
    points, components = np.asarray(points), np.asarray(components)
    np.testing.assert_allclose(np.bincount(components, minlength=K) / len(components), weights, atol=0.01)
    for k in range(K):
        mine = points[components == k]
        np.testing.assert_allclose(mine.mean(0), means[k], atol=0.05)
        np.testing.assert_allclose(np.cov(mine.T), np.linalg.inv(precisions[k]), atol=0.08)


def test_bad_inputs_are_one_line_errors():
    X, _ = blobs(n=20)
    with pytest.raises(ValueError, match=r"num_components=21 must be in 1..20"):
        gmm.fit(jax.random.key(0), X, 21)
    with pytest.raises(ValueError, match=r"covariance_type='tied'; valid"):
        gmm.fit(jax.random.key(0), X, 2, "tied")
    broken = X.copy()
    broken[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"1 of 20 points hold NaN or inf \(first: row 7\)"):
        gmm.fit(jax.random.key(0), broken, 2)
