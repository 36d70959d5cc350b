"""The fused output layer + loss (`losses.output_cross_entropy`) against the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax import losses
from encoder_jax.layers import EncoderConfig
from encoder_jax.seq2seq import EncoderDecoder, Seq2SeqConfig


def _inputs(batch=3, length=6, dim=8, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(vocab, dim)) * 0.5, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(vocab,)) * 0.1, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    weights = jnp.asarray(rng.random((batch, length)) > 0.3, jnp.float32)
    return h, table, bias, targets, weights


def _plain(h, table, bias, targets, weights, smoothing):
    logits = jnp.einsum("btd,vd->btv", h, table) + bias[None, None, :]
    xent, nll = losses.smoothed_cross_entropy(logits, targets, smoothing)
    correct = losses.argmax_equals(logits, targets).astype(jnp.float32)
    return (xent * weights).sum(), {"loss": (xent * weights).sum(-1),
                                    "nll": (nll * weights).sum(-1),
                                    "accuracy": (correct * weights).sum(-1)}


@pytest.mark.parametrize("smoothing,chunk_rows", [(0.0, 6), (0.1, 6), (0.1, 1000)])
def test_fused_loss_and_gradients_equal_the_plain_formulas(smoothing, chunk_rows):
    h, table, bias, targets, weights = _inputs()
    # The argmax is the target in some rows, so the accuracy sums are not all zero.
    targets = targets.at[0].set(jnp.argmax(jnp.einsum("td,vd->tv", h[0], table) + bias[None, :], -1))
    plain = jax.value_and_grad(_plain, argnums=(0, 1, 2), has_aux=True)
    fused = jax.value_and_grad(
        lambda h_, t_, b_, *rest: losses.output_cross_entropy(h_, t_, b_, *rest, chunk_rows),
        argnums=(0, 1, 2), has_aux=True)
    (want, want_rows), want_grads = jax.jit(plain, static_argnums=5)(
        h, table, bias, targets, weights, smoothing)
    (got, got_rows), got_grads = jax.jit(fused, static_argnums=5)(
        h, table, bias, targets, weights, smoothing)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name in ("loss", "nll", "accuracy"):
        np.testing.assert_allclose(got_rows[name], want_rows[name], rtol=1e-5, atol=1e-5)
    assert float(got_rows["accuracy"][0]) == float(weights[0].sum()) > 0
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # Masked positions get no gradient.
    assert float(jnp.abs(got_grads[0] * (1 - weights)[..., None]).max()) == 0.0


def test_the_mean_option_divides_loss_and_gradients_by_the_weight_sum():
    h, table, bias, targets, weights = _inputs()
    plain = jax.grad(lambda *a: _plain(*a, 0.1)[0] / weights.sum(), argnums=(0, 1, 2))
    fused = jax.value_and_grad(lambda *a: losses.output_cross_entropy(*a, 0.1, 6, mean=True)[0],
                               argnums=(0, 1, 2))
    got, got_grads = jax.jit(fused)(h, table, bias, targets, weights)
    np.testing.assert_allclose(got, _plain(h, table, bias, targets, weights, 0.1)[0] / weights.sum(),
                               rtol=1e-5)
    for g, w in zip(got_grads, jax.jit(plain)(h, table, bias, targets, weights)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
    # An upstream factor still scales every gradient (the cotangent is not assumed to be 1).
    doubled = jax.grad(lambda *a: 2.0 * losses.output_cross_entropy(*a, 0.1, 6, mean=True)[0],
                       argnums=1)(h, table, bias, targets, weights)
    np.testing.assert_allclose(doubled, 2.0 * got_grads[1], rtol=1e-6)


def test_chunks_divide_the_length_within_the_row_budget():
    assert losses._chunk_length(64, 16, 256) == 16
    assert losses._chunk_length(64, 16, 2048) == 64
    assert losses._chunk_length(7, 4, 12) == 1  # a prime length: single positions
    assert losses._chunk_length(6, 8, 4) == 1  # a budget below one position's rows


def test_fused_loss_never_holds_the_full_logits():
    batch, length, dim, vocab = 4, 64, 16, 4096
    args = _inputs(batch, length, dim, vocab)
    logits_bytes = batch * length * vocab * 4

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda h, t, b: fn(h, t, b, *args[3:], 0.1)[0], argnums=(0, 1, 2)))
        return grad.lower(*args[:3]).compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(lambda *a: losses.output_cross_entropy(*a, chunk_rows=16))
    assert temp_bytes(_plain) >= logits_bytes
    assert fused < logits_bytes / 3, (fused, logits_bytes)  # one chunk: 16 x 4096 floats


@pytest.mark.parametrize("tie_output", [True, False])
def test_features_rebuild_the_model_logits(tie_output):
    cfg = Seq2SeqConfig(encoder=EncoderConfig(vocab_size=30, hidden_dim=16, num_layers=1,
                                              num_heads=2, mlp_dim=32, max_len=16, pre_norm=True),
                        target_vocab_size=24, decoder_layers=1, max_target_len=16,
                        tie_output=tie_output)
    model = EncoderDecoder(cfg)
    source = jnp.asarray([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)
    target = jnp.asarray([[2, 4, 5], [2, 7, 0]], jnp.int32)
    params = model.init(jax.random.key(0), source, target)["params"]
    # Every parameter moved off its init, so zero-initialised biases count too.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                                 for x, k in zip(leaves, keys)])
    logits = model.apply({"params": params}, source, target)
    y, table, bias = model.apply({"params": params}, source, target,
                                 method=EncoderDecoder.features)
    assert y.shape == (2, 3, 16) and table.shape == (24, 16) and bias.shape == (24,)
    np.testing.assert_allclose(jnp.einsum("btd,vd->btv", y, table) + bias[None, None, :], logits,
                               rtol=1e-5, atol=1e-5)
