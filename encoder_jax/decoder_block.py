"""The decoder block: teacher forcing over whole targets, and the cached one-token step.

The step works in column layout: activations (D, R), one column per hypothesis, and
every projection multiplies `kernel_OxI @ h_IxR` with its kernel stored (out, in)
(`step_kernels`, laid out once per decode, outside the search loop). XLA:CPU streams
a weight matrix about 20% faster as that row-major left operand than as the right
operand of `x_RxI @ kernel_IxO` at 16-64 rows (measured in `benchmarks/README.md`), and a
decode step is bound by streaming its weights. The parameters are the teacher-forcing
path's own (the same names and shapes); only the step reads their transposes.

Shape letters: R hypotheses (rows of the step), C cached rows (R = G*C, G hypotheses
per row), D hidden, N heads, H head dim, F feed-forward dim, S / T cached positions.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from encoder_jax.layers import (ACTIVATIONS, Dropout, EncoderConfig, SelfAttention, _heads_major,
                                feed_forward, layer_norm, residual)

# Each step kernel's input dimensions, which `step_kernels` moves last: (in..., out...) ->
# (out..., in...). The attention output's kernel (N, H, D) contracts both heads axes.
_INPUT_DIMS = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wo": 1}


def _write_slots(blocks: Sequence[jax.Array], new_RxNxH: jax.Array, index: jax.Array,
                 keys: bool) -> tuple[jax.Array, ...]:
    """Writes the keys (or values) of the G*C hypotheses at position `index` into the last
    of the cache's blocks (the earlier ones hold the positions before it). The position
    axis is position-major, hypothesis g's position t at t*G + g (keys (C, N, H, T*G),
    values (C, N, T*G, H)), so the G hypotheses of a step fill G adjacent entries,
    written in place by one update."""
    axis = 3 if keys else 2
    rows, heads = blocks[-1].shape[:2]
    group = new_RxNxH.shape[0] // rows
    new_CxGxNxH = new_RxNxH.reshape(rows, group, heads, -1).astype(blocks[-1].dtype)
    start = index * group - sum(block.shape[axis] for block in blocks[:-1])
    starts = (0, 0, 0, start) if keys else (0, 0, start, 0)
    written = jax.lax.dynamic_update_slice(blocks[-1], _heads_major(new_CxGxNxH, keys), starts)
    return (*blocks[:-1], written)


def _blocks(cached: jax.Array | Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    return tuple(cached) if isinstance(cached, (tuple, list)) else (cached,)


def _attend_cache(q_NxHxR: jax.Array, keys: Sequence[jax.Array], values: Sequence[jax.Array],
                  mask: jax.Array | None) -> jax.Array:
    """Softmax attention of R = G*C query columns over C cached rows (heads-major); (N, H, R).

    The cache comes in blocks along its entries: keys[j] (C, N, H, S_j), values[j]
    (C, N, S_j, H), entries in block order (a decode cache only passes the blocks it has
    filled, so no step reads or copies the rest). Query column c*G + g attends over cached
    row c (G = 1: row over row). `mask` is per cached row, (C, 1, 1 or G, sum S_j),
    broadcast over the heads (and the queries).
    """
    heads, head_dim, rows = q_NxHxR.shape
    cached = keys[0].shape[0]
    group = rows // cached
    q_CxNxGxH = jnp.transpose(q_NxHxR.reshape(heads, head_dim, cached, group),
                              (2, 0, 3, 1)) * jnp.asarray(head_dim ** -0.5, q_NxHxR.dtype)
    logits_CxNxGxS = jnp.concatenate(
        [jnp.einsum("cnqh,cnhs->cnqs", q_CxNxGxH, k_CxNxHxS, preferred_element_type=jnp.float32)
         for k_CxNxHxS in keys], axis=-1)
    if mask is not None:  # an additive bias: XLA:CPU fuses a select into the product, 1.6x slower
        logits_CxNxGxS = logits_CxNxGxS + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    probs_CxNxGxS = jax.nn.softmax(logits_CxNxGxS, axis=-1).astype(values[0].dtype)
    ends = list(itertools.accumulate(v.shape[2] for v in values))
    out_CxNxGxH = sum(jnp.einsum("cnqs,cnsh->cnqh", probs_CxNxGxS[..., end - v.shape[2]:end], v)
                      for end, v in zip(ends, values))
    return jnp.transpose(out_CxNxGxH, (1, 3, 0, 2)).reshape(heads, head_dim, rows)


def step_kernels(block_params: dict[str, Any]) -> dict[str, Any]:
    """A `DecoderBlock`'s kernels as its cached step reads them: each (in..., out...)
    kernel transposed to (out..., in...), {sublayer: {projection: kernel}}."""
    def lay_out(name: str, kernel: jax.Array) -> jax.Array:
        inputs = _INPUT_DIMS[name]
        return jnp.transpose(kernel, (*range(inputs, kernel.ndim), *range(inputs)))

    return {sublayer: {name: lay_out(name, block_params[sublayer][name]["kernel"])
                       for name in names}
            for sublayer, names in (("self_attention", ("query", "key", "value", "out")),
                                    ("cross_attention", ("query", "out")),
                                    ("mlp", ("wi", "wo")))}


class ColumnDense(nn.Module):
    """A Dense / DenseGeneral layer's bias (its parameter, same name and shape) with the
    transposed kernel passed in: kernel (out..., in...) @ h (in..., R) + bias -> (out..., R)."""

    features: tuple[int, ...]
    config: EncoderConfig

    @nn.compact
    def __call__(self, h_IxR: jax.Array, kernel_OxI: jax.Array) -> jax.Array:
        cfg = self.config
        bias = self.param("bias", nn.initializers.zeros_init(), self.features, cfg.param_dtype)
        outputs, inputs = len(self.features), kernel_OxI.ndim - len(self.features)
        out = jax.lax.dot_general(
            kernel_OxI.astype(cfg.dtype), h_IxR.astype(cfg.dtype),
            ((tuple(range(outputs, kernel_OxI.ndim)), tuple(range(inputs))), ((), ())))
        return out + bias.astype(cfg.dtype).reshape(*self.features, 1)


class ColumnAttention(nn.Module):
    """Cached attention of one new position per hypothesis, columns h (D, R) -> (D, R).

    With `decode_index` (self-attention): the new keys/values are written into `cache`
    {"key" (C, N, H, T*G), "value" (C, N, T*G, H)}, whole or in blocks of consecutive
    positions (the position is written into the last block), and each hypothesis attends
    over the entries `mask` (C, 1, G, T*G) picks (its own history); returns (out, new
    cache). Without it (cross-attention): attends over the source's precomputed keys and
    values; returns (out, cache). Hypotheses never move between slots (beam search
    reorders a table of ancestors that the mask is built from), so no step copies the cache.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, h_DxR: jax.Array, kernels: dict[str, jax.Array], cache: dict,
                 mask: jax.Array | None, decode_index: jax.Array | None = None):
        cfg = self.config
        heads = (cfg.num_heads, cfg.head_dim)
        project = lambda name: ColumnDense(heads, cfg, name=name)(h_DxR, kernels[name])
        cache = {name: _blocks(cache[name]) for name in ("key", "value")}
        if decode_index is not None:
            cache = {name: _write_slots(cache[name], jnp.transpose(project(name), (2, 0, 1)),
                                        decode_index, keys=name == "key")
                     for name in ("key", "value")}
        out_NxHxR = _attend_cache(project("query"), cache["key"], cache["value"], mask)
        return ColumnDense((cfg.hidden_dim,), cfg, name="out")(out_NxHxR, kernels["out"]), cache


class ColumnFeedForward(nn.Module):
    """`FeedForward` on columns (D, R), with its kernels transposed (`step_kernels`)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, h_DxR: jax.Array, kernels: dict[str, jax.Array]) -> jax.Array:
        cfg = self.config
        h_FxR = ColumnDense((cfg.mlp_dim,), cfg, name="wi")(h_DxR, kernels["wi"])
        h_FxR = ACTIVATIONS[cfg.activation](h_FxR)
        return ColumnDense((cfg.hidden_dim,), cfg, name="wo")(h_FxR, kernels["wo"])


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the source, feed-forward (pre- or post-LN).

    Without `cache`: teacher forcing over all T target positions; returns y (B, T, D).
    With `cache` (this block's self-attention {"key", "value"}, `ColumnAttention`'s
    layout), `decode_index` and `source_cache` (the cross-attention keys/values of the C
    source rows and the block's `step_kernels`): one position of R = G*C hypotheses in
    columns, y (D, R); returns (y, new cache). With `cross_cache_only`: the
    cross-attention {"key", "value"} of `encoded_BxSxD`.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, y_BxTxD: jax.Array | None, self_mask_Bx1xTxT: jax.Array | None,
                 encoded_BxSxD: jax.Array | None, cross_mask_Bx1xTxS: jax.Array | None,
                 deterministic: bool = True, cache: dict | None = None,
                 decode_index: jax.Array | None = None, source_cache: dict | None = None,
                 cross_cache_only: bool = False):
        cfg = self.config
        dropout = Dropout(cfg.dropout_rate, cfg.dropout_rng)
        if cross_cache_only:  # the source's keys/values, computed once per decode
            return SelfAttention(cfg, name="cross_attention")(None, kv_BxSxD=encoded_BxSxD,
                                                              kv_only=True)
        if cache is not None:
            return self._step(y_BxTxD, self_mask_Bx1xTxT, cross_mask_Bx1xTxS, cache,
                              decode_index, source_cache, dropout)
        self_attention = SelfAttention(cfg, name="self_attention")
        cross_attention = SelfAttention(cfg, name="cross_attention")
        y_BxTxD = residual(
            y_BxTxD, lambda h: self_attention(h, self_mask_Bx1xTxT, deterministic=deterministic),
            layer_norm(cfg, "self_attention_norm"), dropout, cfg.pre_norm, deterministic)
        y_BxTxD = residual(
            y_BxTxD, lambda h: cross_attention(h, cross_mask_Bx1xTxS, kv_BxSxD=encoded_BxSxD,
                                               deterministic=deterministic),
            layer_norm(cfg, "cross_attention_norm"), dropout, cfg.pre_norm, deterministic)
        return residual(y_BxTxD, feed_forward(cfg, "mlp"), layer_norm(cfg, "mlp_norm"),
                        dropout, cfg.pre_norm, deterministic)

    def _step(self, y_DxR: jax.Array, self_mask: jax.Array, cross_mask: jax.Array, cache: dict,
              decode_index: jax.Array, source_cache: dict, dropout: Dropout
              ) -> tuple[jax.Array, dict]:
        """The cached step on columns (D, R) (called from the compact `__call__`, whose
        parameter names it shares: the norms reduce over axis 0 with the same (D,) scales)."""
        cfg = self.config
        kernels = source_cache["kernels"]
        norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                         param_dtype=cfg.param_dtype, reduction_axes=0,
                                         feature_axes=0, name=name)
        new_cache = {}

        def attend_self(h_DxR):
            out, new_cache["self"] = ColumnAttention(cfg, name="self_attention")(
                h_DxR, kernels["self_attention"], cache, self_mask, decode_index)
            return out

        def attend_source(h_DxR):
            return ColumnAttention(cfg, name="cross_attention")(
                h_DxR, kernels["cross_attention"], source_cache, cross_mask)[0]

        mlp = lambda h_DxR: ColumnFeedForward(cfg, name="mlp")(h_DxR, kernels["mlp"])
        y_DxR = residual(y_DxR, attend_self, norm("self_attention_norm"), dropout, cfg.pre_norm, True)
        y_DxR = residual(y_DxR, attend_source, norm("cross_attention_norm"), dropout, cfg.pre_norm,
                         True)
        y_DxR = residual(y_DxR, mlp, norm("mlp_norm"), dropout, cfg.pre_norm, True)
        return y_DxR, new_cache["self"]
