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


class SelfAttention(nn.Module):
    """Multi-head attention of x over itself or over `kv` (cross-attention).

    Modes (keyword arguments):
      default: keys/values from x (or `kv_BxSxD`); returns out (B, L, D).
      `kv_only`: returns the decode step's cross-attention cache of `kv_BxSxD`,
        {"key" (B, N, H, S), "value" (B, N, S, H)} (`decoder_block.ColumnAttention`).

    Decode caches are heads-major, keys transposed: a loop-carried buffer keeps its layout,
    and in (B, T, N, H) every decode step would transpose the whole cache to multiply it
    (and on CPU q @ K with K (H, S) runs about twice as fast as with K (S, H)).
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array | None, mask_Bx1xLxS: jax.Array | None = None, *,
                 kv_BxSxD: jax.Array | None = None, deterministic: bool = True,
                 kv_only: bool = False):
        cfg = self.config
        dense = lambda name: nn.DenseGeneral(
            (cfg.num_heads, cfg.head_dim), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_kernel_init(cfg), name=name)
        if kv_only:
            return {"key": _heads_major(dense("key")(kv_BxSxD), keys=True),
                    "value": _heads_major(dense("value")(kv_BxSxD))}
        q_BxLxNxH = dense("query")(x_BxLxD)
        kv_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD
        k_BxSxNxH, v_BxSxNxH = dense("key")(kv_BxSxD), dense("value")(kv_BxSxD)
        dropout = (None if deterministic or cfg.attention_dropout_rate == 0.0
                   else Dropout(cfg.attention_dropout_rate, cfg.dropout_rng, deterministic=False))
        out_BxLxNxH = _attend(q_BxLxNxH, k_BxSxNxH, v_BxSxNxH, mask_Bx1xLxS, dropout)
        out_BxLxD = nn.DenseGeneral(cfg.hidden_dim, axis=(-2, -1), dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype, kernel_init=_kernel_init(cfg),
                                    name="out")(out_BxLxNxH)
        return out_BxLxD


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
