"""ELECTRA's replaced-token detection (Clark et al. 2020): a generator and a discriminator.

A small masked-LM generator fills the masked positions with sampled tokens; the
discriminator (the encoder that fine-tuning keeps, under `encoder`) predicts for
every real token whether it was replaced. Its loss covers all tokens, not only the
~15% masked ones, which is why Clark et al. find it learns more per FLOP than
MLM at small compute (not yet reproduced here: docs/recipes.md). The two share their embeddings (token, position, type and their
LayerNorm): the generator's parameters hold no embedding tables of their own, and
the discriminator's are put in place before each generator call, so both losses
train them. The generator is the discriminator's shape with fewer blocks.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from encoder_jax.layers import ACTIVATIONS, EncoderConfig, _kernel_init
from encoder_jax.models import BertEncoder

SHARED_EMBEDDINGS = ("token_embed", "position_embed", "type_embed", "bigram_embed", "embed_norm")


class ElectraDiscriminator(nn.Module):
    """Encoder + per-token head: dense -> activation -> one logit "this token was replaced"."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, ids_BxL: jax.Array, *, segment_ids=None, positions=None,
                 deterministic: bool = True) -> jax.Array:
        """float32 logits (B, L)."""
        cfg = self.config
        hidden_BxLxD, _ = BertEncoder(cfg, name="encoder")(
            ids_BxL, segment_ids=segment_ids, positions=positions, deterministic=deterministic)
        h_BxLxD = ACTIVATIONS[cfg.activation](nn.Dense(
            cfg.hidden_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_kernel_init(cfg), name="rtd_transform")(hidden_BxLxD))
        logit_BxLx1 = nn.Dense(1, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               kernel_init=_kernel_init(cfg), name="rtd_output")(h_BxLxD)
        return logit_BxLx1[..., 0].astype(jnp.float32)


def generator_config(cfg: EncoderConfig, num_layers: int) -> EncoderConfig:
    """The generator: the discriminator's width (so embeddings can be shared), fewer blocks, no pooler."""
    return dataclasses.replace(cfg, num_layers=num_layers, use_pooler=False)


def without_embeddings(generator_params: dict) -> dict:
    """Generator params minus the embedding subtrees it borrows from the discriminator."""
    encoder = {k: v for k, v in generator_params["encoder"].items() if k not in SHARED_EMBEDDINGS}
    return {**generator_params, "encoder": encoder}


def with_shared_embeddings(generator_params: dict, encoder_params: dict) -> dict:
    """Generator params with the discriminator encoder's embedding subtrees put in place."""
    shared = {k: encoder_params[k] for k in SHARED_EMBEDDINGS if k in encoder_params}
    return {**generator_params, "encoder": {**generator_params["encoder"], **shared}}


def replace_masked(key: jax.Array, ids_BxL: jax.Array, positions_BxP: jax.Array,
                   weights_BxP: jax.Array, logits_BxPxV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(corrupted ids (B, L), replaced (B, L) float): samples from the generator at the positions.

    A sample equal to the original token counts as not replaced (as in ELECTRA).
    Padded prediction slots (weight 0) leave their position untouched.
    """
    sampled_BxP = jax.random.categorical(key, jax.lax.stop_gradient(logits_BxPxV))
    rows_Bx1 = jnp.arange(ids_BxL.shape[0])[:, None]
    original_BxP = jnp.take_along_axis(ids_BxL, positions_BxP, axis=1)
    new_BxP = jnp.where(weights_BxP > 0, sampled_BxP, original_BxP).astype(ids_BxL.dtype)
    corrupted_BxL = ids_BxL.at[rows_Bx1, positions_BxP].set(new_BxP)
    return corrupted_BxL, (corrupted_BxL != ids_BxL).astype(jnp.float32)


def detection_loss(logits_BxL: jax.Array, replaced_BxL: jax.Array, real_BxL: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean sigmoid cross-entropy over real tokens; sums of loss, accuracy and tokens."""
    xent_BxL = optax.sigmoid_binary_cross_entropy(logits_BxL, replaced_BxL)
    tokens = real_BxL.sum()
    correct = (((logits_BxL > 0).astype(jnp.float32) == replaced_BxL) * real_BxL).sum()
    loss_sum = (xent_BxL * real_BxL).sum()
    return loss_sum / jnp.maximum(tokens, 1.0), {"loss": loss_sum, "accuracy": correct,
                                                 "tokens": tokens}
