"""Transformer building blocks: attention masks, self-attention, feed-forward, blocks.

Shape letters used in local names: B batch, L (query) length, S key length,
D hidden, N heads, H head dim, F feed-forward dim.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from encoder_jax import errors
from encoder_jax.dropout import DROPOUT_RNGS, Dropout  # noqa: F401  (Dropout re-exported)

Dtype = Any

def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written with erf as BERT / PyTorch do.

    `jax.nn.gelu(approximate=False)` (via erfc) gives the same values within 1e-6 but
    XLA:CPU evaluates erfc through a longer polynomial: ~4x the forward time here.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))  # 1 / sqrt(2)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,  # BERT / Hugging Face "gelu"
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # "gelu_new"
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


# none: keep every activation the backward pass needs; block: keep only each encoder block's
# input and recompute the block (about 1/3 more FLOPs); mlp: keep the feed-forward's matmul
# outputs and recompute the activation between them (two (B, L, F) buffers fewer per block,
# decoder blocks included; elementwise work only).
REMAT_MODES = ("none", "block", "mlp")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of a BERT-style Transformer encoder (all sizes in units)."""

    vocab_size: int = 32000
    hidden_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 512  # size of the learned position table
    type_vocab_size: int = 2  # BERT's sentence A/B ("token type") embeddings
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    activation: str = "gelu"  # one of ACTIVATIONS
    layer_norm_eps: float = 1e-12
    pre_norm: bool = False  # False: post-LN as in BERT; True: pre-LN + final LayerNorm
    use_pooler: bool = True
    bigram_buckets: int = 0  # > 0: add a hashed (previous token, token) embedding of this many rows
    init_std: float = 0.02
    remat: str = "none"  # recompute in the backward pass (REMAT_MODES) to save memory
    dropout_rng: str = "threefry"  # how dropout draws its masks (DROPOUT_RNGS; see `Dropout`)
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # storage dtype

    def __post_init__(self):
        if self.hidden_dim % self.num_heads:
            raise errors.ConfigError(
                f"model.hidden_dim={self.hidden_dim} is not divisible by model.num_heads={self.num_heads}")
        if self.bigram_buckets < 0:
            raise errors.ConfigError(f"model.bigram_buckets={self.bigram_buckets}; valid: 0 (off) or a "
                                     f"positive number of hash buckets")
        if self.activation not in ACTIVATIONS:
            raise errors.ConfigError(f"model.activation={self.activation!r}; valid: {sorted(ACTIVATIONS)}")
        if isinstance(self.remat, bool):  # configs and saved runs from before the modes
            object.__setattr__(self, "remat", "block" if self.remat else "none")
        if self.remat not in REMAT_MODES:
            raise errors.ConfigError(f"model.remat={self.remat!r}; valid: {list(REMAT_MODES)}")
        if self.dropout_rng not in DROPOUT_RNGS:
            raise errors.ConfigError(f"model.dropout_rng={self.dropout_rng!r}; valid: {list(DROPOUT_RNGS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @classmethod
    def from_config(cls, model_cfg: Any, vocab_size: int, *, ignore: tuple[str, ...] = (),
                    **overrides: Any) -> "EncoderConfig":
        """From `config.model` (a ConfigDict or mapping; dtypes by name), vocab from the tokenizer.

        `ignore`: keys of the section that belong to the task, not the encoder
        (e.g. classification's `pooling`); any other unknown key is an error.
        `overrides` win over the section (e.g. a pretrained encoder's shape).
        """
        given = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg or {})
        names = [f.name for f in dataclasses.fields(cls) if f.name != "vocab_size"]
        unknown = sorted(set(given) - set(names) - set(ignore))
        if unknown:
            raise errors.ConfigKeyError(f"unknown config key model.{unknown[0]}; valid: {sorted(names)}")
        values = {k: v for k, v in given.items() if k in names and v is not None}
        return cls.from_json({**values, **overrides, "vocab_size": vocab_size})

    def to_json(self) -> dict[str, Any]:
        """JSON-ready field values (dtypes by name); `from_json` reads them back."""
        values = dataclasses.asdict(self)
        values["dtype"], values["param_dtype"] = jnp.dtype(self.dtype).name, jnp.dtype(self.param_dtype).name
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "EncoderConfig":
        """From `to_json` output (unknown keys ignored, so older records still load)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in names}
        for name in ("dtype", "param_dtype"):
            values.setdefault(name, "float32")
            try:
                values[name] = jnp.dtype(values[name])
            except TypeError:
                raise errors.ConfigError(f"model.{name}={values[name]!r}; valid: float32, bfloat16, "
                                         f"float16") from None
        return cls(**values)


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """Boolean mask (B, 1, L, L): query and key are real tokens of the same segment.

    `segment_ids` number the documents packed into a row (1, 2, ...); 0 marks
    padding. A plain padded batch is the special case of one segment per row.
    """
    q_BxLx1 = segment_ids_BxL[:, :, None]
    k_Bx1xL = segment_ids_BxL[:, None, :]
    mask_BxLxL = (q_BxLx1 == k_Bx1xL) & (k_Bx1xL > 0)
    return mask_BxLxL[:, None, :, :]


def _kernel_init(config: EncoderConfig):
    return nn.initializers.truncated_normal(config.init_std)


def _heads_major(x_BxSxNxH: jax.Array, keys: bool = False) -> jax.Array:
    """(B, S, N, H) -> the decode caches' layouts: values (B, N, S, H), keys (B, N, H, S)."""
    return jnp.transpose(x_BxSxNxH, (0, 2, 3, 1) if keys else (0, 2, 1, 3))


def _attend(q_BxLxNxH: jax.Array, k_BxSxNxH: jax.Array, v_BxSxNxH: jax.Array,
            mask_Bx1xLxS: jax.Array | None, dropout: Dropout | None) -> jax.Array:
    """Softmax attention (B, L, N, H); `dropout` (training) on the probabilities."""
    if dropout is None:
        return jax.nn.dot_product_attention(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask=mask_Bx1xLxS)
    # jax.nn.dot_product_attention has no dropout on the probabilities.
    logits_BxNxLxS = jnp.einsum("blnh,bsnh->bnls", q_BxLxNxH, k_BxSxNxH,
                                preferred_element_type=jnp.float32) * q_BxLxNxH.shape[-1] ** -0.5
    logits_BxNxLxS = jnp.where(mask_Bx1xLxS, logits_BxNxLxS, jnp.finfo(jnp.float32).min)
    probs_BxNxLxS = dropout(jax.nn.softmax(logits_BxNxLxS, axis=-1))
    return jnp.einsum("bnls,bsnh->blnh", probs_BxNxLxS.astype(v_BxSxNxH.dtype), v_BxSxNxH)


def _write_slots(blocks: Sequence[jax.Array], new_RxLxNxH: jax.Array, index: jax.Array,
                 keys: bool) -> tuple[jax.Array, ...]:
    """Writes the keys (or values) of the G*C hypotheses (L = 1) at position `index` into
    the last of the cache's blocks (the earlier ones hold the positions before it). The
    position axis is position-major, hypothesis g's position t at t*G + g (keys
    (C, N, H, T*G), values (C, N, T*G, H)), so the G hypotheses of a step fill G adjacent
    entries, written in place by one update."""
    axis = 3 if keys else 2
    rows, heads = blocks[-1].shape[:2]
    group = new_RxLxNxH.shape[0] // rows
    new_CxGxNxH = new_RxLxNxH.reshape(rows, group, heads, -1).astype(blocks[-1].dtype)
    start = index * group - sum(block.shape[axis] for block in blocks[:-1])
    starts = (0, 0, 0, start) if keys else (0, 0, start, 0)
    written = jax.lax.dynamic_update_slice(blocks[-1], _heads_major(new_CxGxNxH, keys), starts)
    return (*blocks[:-1], written)


def _blocks(cached: jax.Array | Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    return tuple(cached) if isinstance(cached, (tuple, list)) else (cached,)


def _attend_cache(q_RxLxNxH: jax.Array, keys: Sequence[jax.Array], values: Sequence[jax.Array],
                  mask: jax.Array | None) -> jax.Array:
    """Softmax attention of R = G*C query rows over C cached rows (heads-major); (R, L, N, H).

    The cache comes in blocks along its entries: keys[j] (C, N, H, S_j), values[j]
    (C, N, S_j, H), entries in block order (a decode cache only passes the blocks it has
    filled, so no step reads or copies the rest). Query row c*G + g attends over cached
    row c (G = 1: row over row). `mask` is per cached row, (C, 1, 1 or G*L, sum S_j),
    broadcast over the heads (and the queries).
    """
    rows, length, heads, head_dim = q_RxLxNxH.shape
    cached = keys[0].shape[0]
    group = rows // cached
    q_CxNxGLxH = jnp.transpose(q_RxLxNxH.reshape(cached, group * length, heads, head_dim),
                               (0, 2, 1, 3)) * jnp.asarray(head_dim ** -0.5, q_RxLxNxH.dtype)
    logits_CxNxGLxS = jnp.concatenate(
        [jnp.einsum("cnqh,cnhs->cnqs", q_CxNxGLxH, k_CxNxHxS, preferred_element_type=jnp.float32)
         for k_CxNxHxS in keys], axis=-1)
    if mask is not None:  # an additive bias: XLA:CPU fuses a select into the product, 1.6x slower
        logits_CxNxGLxS = logits_CxNxGLxS + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    probs_CxNxGLxS = jax.nn.softmax(logits_CxNxGLxS, axis=-1).astype(values[0].dtype)
    ends = list(itertools.accumulate(v.shape[2] for v in values))
    out_CxNxGLxH = sum(jnp.einsum("cnqs,cnsh->cnqh", probs_CxNxGLxS[..., end - v.shape[2]:end], v)
                       for end, v in zip(ends, values))
    return jnp.transpose(out_CxNxGLxH, (0, 2, 1, 3)).reshape(rows, length, heads, head_dim)


class SelfAttention(nn.Module):
    """Multi-head attention of x over itself, over `kv` (cross-attention), or over a decode cache.

    Modes (keyword arguments):
      default: keys/values from x (or `kv_BxSxD`); returns out (B, L, D).
      `cache` + `decode_index`: self-attention decoding of C rows with G hypotheses each
        (x has G*C rows, L = 1; hypothesis g of row c at c*G + g): x's keys/values are
        written into `cache` {"key" (C, N, H, T*G), "value" (C, N, T*G, H)} at position
        `decode_index` of each hypothesis' slot (slot g holds entries t*G + g), and x
        attends over all T*G entries of its row under `mask` (C, 1, G, T*G), which picks
        those of its own history; returns (out, new cache). The cache may also come as
        blocks of consecutive positions, {"key": (keys_0, ...), "value": (values_0, ...)}
        (T = their positions together): the position is written into the last block.
      `cache` alone: attends over precomputed {"key" (C, N, H, S), "value" (C, N, S, H)}
        (cross-attention decoding) with the G*C rows of x as above, so a row's hypotheses
        share one copy of the source's keys; returns (out, cache).
      `kv_only`: returns that cache {"key" (B, N, H, S), "value" (B, N, S, H)} of `kv_BxSxD`.

    Decode caches are heads-major, keys transposed: a loop-carried buffer keeps its layout,
    and in (B, T, N, H) every decode step would transpose the whole cache to multiply it
    (and on CPU q @ K with K (H, S) runs about twice as fast as with K (S, H)).
    Hypotheses never move between slots (beam search reorders a table of ancestors
    that the mask is built from), so no step copies the cache.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array | None, mask_Bx1xLxS: jax.Array | None = None, *,
                 kv_BxSxD: jax.Array | None = None, deterministic: bool = True,
                 cache: dict[str, jax.Array] | None = None, decode_index: jax.Array | None = None,
                 kv_only: bool = False):
        cfg = self.config
        dense = lambda name: nn.DenseGeneral(
            (cfg.num_heads, cfg.head_dim), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_kernel_init(cfg), name=name)
        if kv_only:
            return {"key": _heads_major(dense("key")(kv_BxSxD), keys=True),
                    "value": _heads_major(dense("value")(kv_BxSxD))}
        q_BxLxNxH = dense("query")(x_BxLxD)
        if cache is not None:
            cache = {name: _blocks(cache[name]) for name in ("key", "value")}
            if decode_index is not None:
                cache = {name: _write_slots(cache[name], dense(name)(x_BxLxD), decode_index,
                                            keys=name == "key")
                         for name in ("key", "value")}
            out_BxLxNxH = _attend_cache(q_BxLxNxH, cache["key"], cache["value"], mask_Bx1xLxS)
        else:
            kv_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD
            k_BxSxNxH, v_BxSxNxH = dense("key")(kv_BxSxD), dense("value")(kv_BxSxD)
            dropout = (None if deterministic or cfg.attention_dropout_rate == 0.0
                       else Dropout(cfg.attention_dropout_rate, cfg.dropout_rng, deterministic=False))
            out_BxLxNxH = _attend(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask_Bx1xLxS, dropout)
        out_BxLxD = nn.DenseGeneral(cfg.hidden_dim, axis=(-2, -1), dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype, kernel_init=_kernel_init(cfg),
                                    name="out")(out_BxLxNxH)
        return out_BxLxD if cache is None else (out_BxLxD, cache)


class FeedForward(nn.Module):
    """Position-wise two-layer MLP: D -> F -> D."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.config
        h_BxLxF = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           kernel_init=_kernel_init(cfg), name="wi")(x_BxLxD)
        h_BxLxF = ACTIVATIONS[cfg.activation](h_BxLxF)
        return nn.Dense(cfg.hidden_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        kernel_init=_kernel_init(cfg), name="wo")(h_BxLxF)


_REMAT_FEED_FORWARD = nn.remat(FeedForward, policy=jax.checkpoint_policies.dots_saveable)


def feed_forward(config: EncoderConfig, name: str) -> nn.Module:
    """A block's FeedForward; with `remat="mlp"` its activation is recomputed in the backward pass."""
    return (_REMAT_FEED_FORWARD if config.remat == "mlp" else FeedForward)(config, name=name)


def layer_norm(config: EncoderConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype,
                        param_dtype=config.param_dtype, name=name)


def residual(x_BxLxD: jax.Array, sublayer, norm: nn.LayerNorm, dropout: Dropout,
             pre_norm: bool, deterministic: bool) -> jax.Array:
    """x + dropout(sublayer(norm(x))) (pre-LN) or norm(x + dropout(sublayer(x))) (post-LN)."""
    if pre_norm:
        return x_BxLxD + dropout(sublayer(norm(x_BxLxD)), deterministic=deterministic)
    return norm(x_BxLxD + dropout(sublayer(x_BxLxD), deterministic=deterministic))


class EncoderBlock(nn.Module):
    """Self-attention + feed-forward, each with dropout, residual and LayerNorm."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_Bx1xLxL: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        dropout = Dropout(cfg.dropout_rate, cfg.dropout_rng)
        attention = SelfAttention(cfg, name="attention")
        mlp = feed_forward(cfg, "mlp")
        attention_norm, mlp_norm = layer_norm(cfg, "attention_norm"), layer_norm(cfg, "mlp_norm")
        x_BxLxD = residual(x_BxLxD, lambda h: attention(h, mask_Bx1xLxL, deterministic=deterministic),
                           attention_norm, dropout, cfg.pre_norm, deterministic)
        return residual(x_BxLxD, mlp, mlp_norm, dropout, cfg.pre_norm, deterministic)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the source, feed-forward (pre- or post-LN).

    Without `cache`: teacher forcing over all T target positions; returns y (B, T, D).
    With `cache` (this block's self-attention {"key", "value"}, `SelfAttention`'s layout),
    `decode_index` and `source_cache` (the cross-attention keys/values of the C source
    rows; y has G*C rows): one position (T = 1); returns (y, new cache). With
    `cross_cache_only`: the cross-attention {"key", "value"} of `encoded_BxSxD`.
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
        self_attention = SelfAttention(cfg, name="self_attention")
        cross_attention = SelfAttention(cfg, name="cross_attention")
        if cross_cache_only:  # the source's keys/values, computed once per decode
            return cross_attention(None, kv_BxSxD=encoded_BxSxD, kv_only=True)
        new_cache = {}

        def attend_self(h):
            if cache is None:
                return self_attention(h, self_mask_Bx1xTxT, deterministic=deterministic)
            out, new_cache["self"] = self_attention(h, self_mask_Bx1xTxT, cache=cache,
                                                    decode_index=decode_index)
            return out

        def attend_source(h):
            if cache is None:
                return cross_attention(h, cross_mask_Bx1xTxS, kv_BxSxD=encoded_BxSxD,
                                       deterministic=deterministic)
            return cross_attention(h, cross_mask_Bx1xTxS, cache=source_cache)[0]

        y_BxTxD = residual(y_BxTxD, attend_self, layer_norm(cfg, "self_attention_norm"), dropout,
                           cfg.pre_norm, deterministic)
        y_BxTxD = residual(y_BxTxD, attend_source, layer_norm(cfg, "cross_attention_norm"), dropout,
                           cfg.pre_norm, deterministic)
        y_BxTxD = residual(y_BxTxD, feed_forward(cfg, "mlp"), layer_norm(cfg, "mlp_norm"),
                           dropout, cfg.pre_norm, deterministic)
        return y_BxTxD if cache is None else (y_BxTxD, new_cache["self"])
