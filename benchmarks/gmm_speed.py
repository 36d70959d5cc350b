"""EM speed: encoder_jax.gmm (one jit) vs sklearn.mixture.GaussianMixture, same data and start.

    python benchmarks/gmm_speed.py                                  # n=100k, d=256, K=16, full
    python benchmarks/gmm_speed.py --n 20000 --d 64 --k 8 --covariance_type diag --iters 20

Both run exactly --iters EM iterations (tol=0) from the same weights, means and precisions
(one k-means++ seeding), in float32 for ours and float32 input for scikit-learn; reported:
wall seconds (ours: median of --repeats after a compile run, compile time separately),
the final mean log-likelihood of each, and the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import jax
import numpy as np


def synthetic(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """Points from k random Gaussians with random full covariances (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    labels = rng.integers(0, k, n)
    points = np.empty((n, d), np.float32)
    for component in range(k):
        rows = labels == component
        mixing = rng.normal(size=(d, d)) / np.sqrt(d)
        points[rows] = centres[component] + rng.normal(size=(int(rows.sum()), d)) @ mixing
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--covariance_type", default="full")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    from encoder_jax import gmm

    X = synthetic(args.n, args.d, args.k)
    start = gmm.initialize(jax.random.key(0), jax.numpy.asarray(X), num_components=args.k,
                           covariance_type=args.covariance_type, kmeans_iter=0)
    cholesky = np.asarray(start.precisions_cholesky, np.float64)
    precisions = (np.einsum("kij,klj->kil", cholesky, cholesky) if args.covariance_type == "full"
                  else cholesky ** 2)
    weights = np.asarray(start.weights_K, np.float64)
    weights /= weights.sum()  # scikit-learn checks the sum in float64
    start = gmm.from_parameters(weights, start.means_KxD, precisions, args.covariance_type)

    def ours():
        model = gmm.run_em(jax.numpy.asarray(X), start, max_iter=args.iters, tol=0.0)
        return float(model.lower_bound), model

    began = time.perf_counter()
    ours()
    compile_and_first = time.perf_counter() - began
    times = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        bound, model = ours()
        times.append(time.perf_counter() - began)
    sk = GaussianMixture(args.k, covariance_type=args.covariance_type, max_iter=args.iters, tol=0.0,
                         weights_init=weights,
                         means_init=np.asarray(start.means_KxD, np.float64),
                         precisions_init=precisions, reg_covar=1e-6)
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(X)
    sk_time = time.perf_counter() - began
    ours_time = float(np.median(times))
    result = {"n": args.n, "d": args.d, "k": args.k, "covariance_type": args.covariance_type,
              "iterations": args.iters, "ours_s": round(ours_time, 3),
              "ours_first_call_s": round(compile_and_first, 3), "sklearn_s": round(sk_time, 3),
              "speedup": round(sk_time / ours_time, 2), "ours_lower_bound": bound,
              "sklearn_lower_bound": float(sk.lower_bound_),
              "devices": f"{jax.device_count()} {jax.devices()[0].platform}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
