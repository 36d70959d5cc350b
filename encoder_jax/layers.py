"""Transformer building blocks: attention masks, self-attention, feed-forward, blocks.

Shape letters used in local names: B batch, L (query) length, S key length,
D hidden, N heads, H head dim, F feed-forward dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT / Hugging Face "gelu"
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # "gelu_new"
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


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
    init_std: float = 0.02
    remat: bool = False  # rematerialise each block in the backward pass to save memory
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # storage dtype

    def __post_init__(self):
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"model.hidden_dim={self.hidden_dim} is not divisible by model.num_heads={self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r}; valid: {sorted(ACTIVATIONS)}")

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
            raise KeyError(f"unknown config key model.{unknown[0]}; valid: {sorted(names)}")
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
                raise ValueError(f"model.{name}={values[name]!r}; valid: float32, bfloat16, "
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


class SelfAttention(nn.Module):
    """Multi-head attention of x over itself, over `kv` (cross-attention), or over a decode cache.

    Modes (keyword arguments):
      default: keys/values from x (or `kv_BxSxD`); returns out (B, L, D).
      `cache` + `decode_index`: self-attention decoding: x's keys/values (L = 1) are
        written into `cache` {"key", "value"} (B, T, N, H) at `decode_index` and x
        attends over the cache; returns (out, new cache).
      `cache` alone: attends over precomputed keys/values (cross-attention decoding);
        returns (out, cache).
      `kv_only`: returns {"key", "value"} of `kv_BxSxD` (a cross-attention cache).
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
            return {"key": dense("key")(kv_BxSxD), "value": dense("value")(kv_BxSxD)}
        q_BxLxNxH = dense("query")(x_BxLxD)
        if cache is None:
            kv_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD
            k_BxSxNxH, v_BxSxNxH = dense("key")(kv_BxSxD), dense("value")(kv_BxSxD)
        else:
            if decode_index is not None:
                start = (0, decode_index, 0, 0)
                cache = {"key": jax.lax.dynamic_update_slice(
                             cache["key"], dense("key")(x_BxLxD).astype(cache["key"].dtype), start),
                         "value": jax.lax.dynamic_update_slice(
                             cache["value"], dense("value")(x_BxLxD).astype(cache["value"].dtype), start)}
            k_BxSxNxH, v_BxSxNxH = cache["key"], cache["value"]
        if deterministic or cfg.attention_dropout_rate == 0.0:
            out_BxLxNxH = jax.nn.dot_product_attention(
                q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask=mask_Bx1xLxS)
        else:
            # jax.nn.dot_product_attention has no dropout on the probabilities.
            scale = cfg.head_dim ** -0.5
            logits_BxNxLxS = jnp.einsum("blnh,bsnh->bnls", q_BxLxNxH, k_BxSxNxH,
                                        preferred_element_type=jnp.float32) * scale
            logits_BxNxLxS = jnp.where(mask_Bx1xLxS, logits_BxNxLxS, jnp.finfo(jnp.float32).min)
            probs_BxNxLxS = jax.nn.softmax(logits_BxNxLxS, axis=-1)
            probs_BxNxLxS = nn.Dropout(cfg.attention_dropout_rate)(probs_BxNxLxS, deterministic=False)
            out_BxLxNxH = jnp.einsum("bnls,bsnh->blnh", probs_BxNxLxS.astype(cfg.dtype), v_BxSxNxH)
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


def layer_norm(config: EncoderConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype,
                        param_dtype=config.param_dtype, name=name)


def residual(x_BxLxD: jax.Array, sublayer, norm: nn.LayerNorm, dropout: nn.Dropout,
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
        dropout = nn.Dropout(cfg.dropout_rate)
        attention = SelfAttention(cfg, name="attention")
        mlp = FeedForward(cfg, name="mlp")
        attention_norm, mlp_norm = layer_norm(cfg, "attention_norm"), layer_norm(cfg, "mlp_norm")
        x_BxLxD = residual(x_BxLxD, lambda h: attention(h, mask_Bx1xLxL, deterministic=deterministic),
                           attention_norm, dropout, cfg.pre_norm, deterministic)
        return residual(x_BxLxD, mlp, mlp_norm, dropout, cfg.pre_norm, deterministic)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the source, feed-forward (pre- or post-LN).

    Without `cache`: teacher forcing over all T target positions; returns y (B, T, D).
    With `cache` {"self", "cross"} and `decode_index`: one position (T = 1);
    returns (y, new cache). With `cross_cache_only`: the cross-attention
    {"key", "value"} of `encoded_BxSxD`.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, y_BxTxD: jax.Array | None, self_mask_Bx1xTxT: jax.Array | None,
                 encoded_BxSxD: jax.Array | None, cross_mask_Bx1xTxS: jax.Array | None,
                 deterministic: bool = True, cache: dict | None = None,
                 decode_index: jax.Array | None = None, cross_cache_only: bool = False):
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        self_attention = SelfAttention(cfg, name="self_attention")
        cross_attention = SelfAttention(cfg, name="cross_attention")
        if cross_cache_only:  # the source's keys/values, computed once per decode
            return cross_attention(None, kv_BxSxD=encoded_BxSxD, kv_only=True)
        new_cache = {}

        def attend_self(h):
            if cache is None:
                return self_attention(h, self_mask_Bx1xTxT, deterministic=deterministic)
            out, new_cache["self"] = self_attention(h, self_mask_Bx1xTxT, cache=cache["self"],
                                                    decode_index=decode_index,
                                                    deterministic=deterministic)
            return out

        def attend_source(h):
            if cache is None:
                return cross_attention(h, cross_mask_Bx1xTxS, kv_BxSxD=encoded_BxSxD,
                                       deterministic=deterministic)
            out, new_cache["cross"] = cross_attention(h, cross_mask_Bx1xTxS, cache=cache["cross"],
                                                      deterministic=deterministic)
            return out

        y_BxTxD = residual(y_BxTxD, attend_self, layer_norm(cfg, "self_attention_norm"), dropout,
                           cfg.pre_norm, deterministic)
        y_BxTxD = residual(y_BxTxD, attend_source, layer_norm(cfg, "cross_attention_norm"), dropout,
                           cfg.pre_norm, deterministic)
        y_BxTxD = residual(y_BxTxD, FeedForward(cfg, name="mlp"), layer_norm(cfg, "mlp_norm"),
                           dropout, cfg.pre_norm, deterministic)
        return y_BxTxD if cache is None else (y_BxTxD, new_cache)
