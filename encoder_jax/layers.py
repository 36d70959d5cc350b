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
    """Multi-head attention of x over itself (or over `kv` for cross-attention)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_Bx1xLxS: jax.Array, *,
                 kv_BxSxD: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        kv_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD
        dense = lambda name: nn.DenseGeneral(
            (cfg.num_heads, cfg.head_dim), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_kernel_init(cfg), name=name)
        q_BxLxNxH = dense("query")(x_BxLxD)
        k_BxSxNxH = dense("key")(kv_BxSxD)
        v_BxSxNxH = dense("value")(kv_BxSxD)
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
        return nn.DenseGeneral(cfg.hidden_dim, axis=(-2, -1), dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, kernel_init=_kernel_init(cfg),
                               name="out")(out_BxLxNxH)


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
        if cfg.pre_norm:
            h = attention(attention_norm(x_BxLxD), mask_Bx1xLxL, deterministic=deterministic)
            x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
            h = mlp(mlp_norm(x_BxLxD))
            return x_BxLxD + dropout(h, deterministic=deterministic)
        h = attention(x_BxLxD, mask_Bx1xLxL, deterministic=deterministic)
        x_BxLxD = attention_norm(x_BxLxD + dropout(h, deterministic=deterministic))
        h = mlp(x_BxLxD)
        return mlp_norm(x_BxLxD + dropout(h, deterministic=deterministic))
