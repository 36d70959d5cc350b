"""MLM accuracy without argmax: `argmax_equals` must match `jnp.argmax(x, -1) == t` exactly."""

import jax
import jax.numpy as jnp
import numpy as np

from encoder_jax.tasks.mlm import argmax_equals, mlm_loss_and_metrics


def _hard_logits(rng: np.random.Generator, trial: int) -> np.ndarray:
    """Random logits with the cases that decide argmax's tie and NaN rules."""
    vocab = int(rng.choice([1, 2, 5, 17, 39]))  # a few shapes: each one compiles
    x = rng.standard_normal((3, 4, vocab)).astype(np.float32)
    if trial % 3 == 0:
        x = np.round(x)  # many ties for the maximum
    if trial % 7 == 0:
        x[0, 1, rng.integers(vocab)] = np.nan
        x[1, 2, :] = np.nan
    if trial % 11 == 0:
        x[2, 0, :] = -np.inf
    if trial % 13 == 0:
        x[2, 1, rng.integers(vocab)] = np.inf
        x[2, 1, rng.integers(vocab)] = np.inf
    return x


def test_argmax_equals_matches_argmax_with_ties_nans_and_infs():
    rng = np.random.default_rng(0)
    fn = jax.jit(argmax_equals)
    hits = 0
    for trial in range(300):
        x = _hard_logits(rng, trial)
        vocab = x.shape[-1]
        if trial % 2:
            targets = rng.integers(-2, vocab + 2, x.shape[:2]).astype(np.int32)  # incl. out of range
        else:
            targets = np.asarray(jnp.argmax(x, -1)).astype(np.int32)  # mostly hits
            targets[:, ::2] = rng.integers(0, vocab, targets[:, ::2].shape)
        expected = np.asarray(jnp.argmax(x, -1) == targets)
        hits += int(expected.sum())
        np.testing.assert_array_equal(np.asarray(fn(x, targets)), expected, err_msg=f"trial {trial}")
    assert 0 < hits < 300 * 12  # the comparison covers both outcomes


def test_accuracy_counts_first_maximum_only():
    logits = jnp.zeros((1, 2, 4)).at[0, 1, 3].set(1.0)
    targets = jnp.array([[2, 3]])  # row 0 is all ties: argmax is 0, so target 2 is wrong
    _, sums = mlm_loss_and_metrics(logits, targets, jnp.ones((1, 2)))
    assert float(sums["accuracy"]) == 1
