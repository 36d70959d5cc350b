"""Loss pieces shared by tasks, in jax: token cross-entropy with label smoothing, argmax tests.

Pure functions of logits; float32 inside whatever the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def smoothed_cross_entropy(logits_XxV: jax.Array, targets_X: jax.Array, label_smoothing: float
                           ) -> tuple[jax.Array, jax.Array]:
    """(label-smoothed cross-entropy, plain nll), both shaped like `targets`, from one log-softmax.

    Smoothing puts `label_smoothing` of the target mass uniformly over the V classes.
    """
    logp_XxV = jax.nn.log_softmax(logits_XxV.astype(jnp.float32))
    nll_X = -jnp.take_along_axis(logp_XxV, targets_X[..., None], axis=-1)[..., 0]
    if label_smoothing <= 0:
        return nll_X, nll_X
    uniform_X = -logp_XxV.mean(-1)
    return (1.0 - label_smoothing) * nll_X + label_smoothing * uniform_X, nll_X


def argmax_equals(x_BxPxV: jax.Array, targets_BxP: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1) == targets` (argmax: first maximum, or first NaN) without the argmax.

    XLA:CPU lowers argmax to a variadic (value, index) reduce that it does not
    vectorise (~140 ms of a ~1.9 s `small` train step on (32, 21, 32000)
    logits). Here: the target holds the maximum and no earlier index does;
    that is the same boolean, from a max, a gather and one fused reduction.
    """
    vocab = x_BxPxV.shape[-1]
    max_BxPx1 = x_BxPxV.max(-1, keepdims=True)  # NaN if the row has one, as argmax picks it
    is_max_BxPxV = (x_BxPxV == max_BxPx1) | jnp.isnan(x_BxPxV)
    index_V = jnp.arange(vocab, dtype=targets_BxP.dtype)
    earlier_BxP = jnp.any(is_max_BxPxV & (index_V[None, None, :] < targets_BxP[..., None]), axis=-1)
    in_range_BxP = (targets_BxP >= 0) & (targets_BxP < vocab)
    safe_BxP = jnp.clip(targets_BxP, 0, vocab - 1)
    target_BxP = jnp.take_along_axis(x_BxPxV, safe_BxP[..., None], axis=-1)[..., 0]
    target_is_max_BxP = (target_BxP == max_BxPx1[..., 0]) | jnp.isnan(target_BxP)
    return in_range_BxP & target_is_max_BxP & ~earlier_BxP


def _chunk_length(length: int, rows: int, target_rows: int) -> int:
    """The largest divisor of `length` whose chunk (rows x chunk) stays within `target_rows`."""
    best = 1
    for size in range(1, length + 1):
        if length % size == 0 and rows * size <= max(target_rows, rows):
            best = size
    return best


def _chunk_sums(h_BxCxD, table_VxD, bias_V, targets_BxC, weights_BxC, label_smoothing: float,
                with_grads: bool, grad_scale=1.0):
    """One chunk of positions: the smoothed loss sum, per-row (loss, nll, correct) sums and,
    `with_grads`, grad_scale x d(loss sum)/d(h, table, bias) of this chunk."""
    logits_BxCxV = (jax.lax.dot_general(h_BxCxD, table_VxD, (((2,), (1,)), ((), ())))
                    .astype(jnp.float32) + bias_V.astype(jnp.float32)[None, None, :])
    vocab = logits_BxCxV.shape[-1]
    max_BxCx1 = logits_BxCxV.max(-1, keepdims=True)
    exp_BxCxV = jnp.exp(logits_BxCxV - max_BxCx1)
    sum_BxCx1 = exp_BxCxV.sum(-1, keepdims=True)
    lse_BxC = (jnp.log(sum_BxCx1) + max_BxCx1)[..., 0]
    safe_BxC = jnp.clip(targets_BxC, 0, vocab - 1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, safe_BxC[..., None], axis=-1)[..., 0]
    nll_BxC = lse_BxC - target_logit_BxC
    xent_BxC = nll_BxC
    if label_smoothing > 0:
        xent_BxC = (1.0 - label_smoothing) * nll_BxC + label_smoothing * (
            lse_BxC - logits_BxCxV.mean(-1))
    correct_BxC = argmax_equals(logits_BxCxV, targets_BxC).astype(jnp.float32)
    rows = {"loss": (xent_BxC * weights_BxC).sum(-1), "nll": (nll_BxC * weights_BxC).sum(-1),
            "accuracy": (correct_BxC * weights_BxC).sum(-1)}
    if not with_grads:
        return rows, None
    # d(sum of w * xent)/d logits = w * (softmax - (1 - s) * onehot(target) - s / V)
    is_target_BxCxV = jnp.arange(vocab)[None, None, :] == safe_BxC[..., None]
    dlogits_BxCxV = (grad_scale * weights_BxC)[..., None] * (
        exp_BxCxV / sum_BxCx1 - label_smoothing / vocab
        - jnp.where(is_target_BxCxV, 1.0 - label_smoothing, 0.0))
    dlogits_BxCxV = dlogits_BxCxV.astype(table_VxD.dtype)
    grads = (jax.lax.dot_general(dlogits_BxCxV, table_VxD, (((2,), (0,)), ((), ()))),
             jax.lax.dot_general(dlogits_BxCxV, h_BxCxD, (((0, 1), (0, 1)), ((), ()))),
             dlogits_BxCxV.sum((0, 1)))
    return rows, grads


def _chunked(h_BxTxD, table_VxD, bias_V, targets_BxT, weights_BxT, label_smoothing: float,
             chunk_rows: int, with_grads: bool, grad_scale=1.0):
    """Runs `_chunk_sums` over chunks of target positions (lax.scan; the batch axis stays
    whole, so a batch-sharded input stays sharded). Returns (row sums, grads or None)."""
    batch, length, dim = h_BxTxD.shape
    size = _chunk_length(length, batch, chunk_rows)
    count = length // size
    split = lambda x: jnp.moveaxis(x.reshape(batch, count, size, *x.shape[2:]), 1, 0)
    xs = (split(h_BxTxD), split(targets_BxT), split(weights_BxT))
    zero_rows = {k: jnp.zeros((batch,), jnp.float32) for k in ("loss", "nll", "accuracy")}

    def body(carry, chunk):
        rows, grads = carry
        new_rows, new_grads = _chunk_sums(chunk[0], table_VxD, bias_V, chunk[1], chunk[2],
                                          label_smoothing, with_grads, grad_scale)
        rows = jax.tree_util.tree_map(jnp.add, rows, new_rows)
        if not with_grads:
            return (rows, grads), None
        dh_BxCxD, dtable, dbias = new_grads
        return (rows, (grads[0] + dtable, grads[1] + dbias)), dh_BxCxD

    zero_grads = ((jnp.zeros_like(table_VxD), jnp.zeros_like(bias_V)) if with_grads else None)
    (rows, grads), dh_chunks = jax.lax.scan(body, (zero_rows, zero_grads), xs)
    if not with_grads:
        return rows, None
    dh_BxTxD = jnp.moveaxis(dh_chunks, 0, 1).reshape(batch, length, dim).astype(h_BxTxD.dtype)
    return rows, (dh_BxTxD, grads[0], grads[1].astype(bias_V.dtype))


def _loss_scale(weights_BxT: jax.Array, mean: bool) -> jax.Array:
    return 1.0 / jnp.maximum(weights_BxT.sum(), 1.0) if mean else jnp.float32(1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _output_cross_entropy(h_BxTxD, table_VxD, bias_V, targets_BxT, weights_BxT,
                          label_smoothing, chunk_rows, mean):
    rows, _ = _chunked(h_BxTxD, table_VxD, bias_V, targets_BxT, weights_BxT, label_smoothing,
                       chunk_rows, with_grads=False)
    return rows["loss"].sum() * _loss_scale(weights_BxT, mean), rows


def _output_cross_entropy_fwd(h_BxTxD, table_VxD, bias_V, targets_BxT, weights_BxT,
                              label_smoothing, chunk_rows, mean):
    scale = _loss_scale(weights_BxT, mean)
    rows, grads = _chunked(h_BxTxD, table_VxD, bias_V, targets_BxT, weights_BxT,
                           label_smoothing, chunk_rows, with_grads=True, grad_scale=scale)
    return (rows["loss"].sum() * scale, rows), (grads, weights_BxT)


def _output_cross_entropy_bwd(label_smoothing, chunk_rows, mean, residuals, cotangents):
    del label_smoothing, chunk_rows, mean
    (dh_BxTxD, dtable_VxD, dbias_V), weights_BxT = residuals
    g = cotangents[0]  # the row sums are metrics: `output_cross_entropy` stops their gradient
    scale = lambda x: (g * x).astype(x.dtype)
    return (scale(dh_BxTxD), scale(dtable_VxD), scale(dbias_V), None,
            jnp.zeros_like(weights_BxT))


_output_cross_entropy.defvjp(_output_cross_entropy_fwd, _output_cross_entropy_bwd)


def output_cross_entropy(h_BxTxD: jax.Array, table_VxD: jax.Array, bias_V: jax.Array,
                         targets_BxT: jax.Array, weights_BxT: jax.Array, label_smoothing: float,
                         chunk_rows: int = 2048, mean: bool = False
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Output layer + label-smoothed cross-entropy, fused: the (B, T, V) logits never exist.

    `logits = h @ table.T + bias` is computed for chunks of about `chunk_rows` positions
    (B x a divisor of T) at a time. Under differentiation the gradients of the loss sum
    with respect to `h`, `table` and `bias` are formed in the same pass (the softmax minus
    the smoothed target, times the weights), so neither the logits nor their softmax are
    kept for the backward pass: the memory of a V-way output falls from several
    (B, T, V) float32 buffers to one chunk's.

    Returns (loss sum (): sum of weights x smoothed cross-entropy, the value to
    differentiate, or with `mean` that sum / max(sum of weights, 1); row sums {"loss",
    "nll", "accuracy"} (B,) float32, metrics whose gradient is stopped).
    `smoothed_cross_entropy` and `argmax_equals` on the full logits give the same
    numbers. Differentiate the returned value itself (`mean` divides inside):
    its cotangent is then the constant 1, and XLA drops the rescaling of the (V, D)
    table gradient that an outside division would cost (a second (V, D) buffer).
    """
    loss, rows = _output_cross_entropy(h_BxTxD, table_VxD, bias_V, targets_BxT,
                                       weights_BxT.astype(jnp.float32), float(label_smoothing),
                                       int(chunk_rows), bool(mean))
    return loss, jax.lax.stop_gradient(rows)
