"""BERT encoder and its task heads (masked-LM with tied embeddings, classifier).

Usable on its own in a notebook::

    cfg = EncoderConfig(vocab_size=1000, hidden_dim=64, num_layers=2, num_heads=4, mlp_dim=128)
    model = BertEncoder(cfg)
    params = model.init(jax.random.key(0), ids)["params"]
    hidden_BxLxD, pooled_BxD = model.apply({"params": params}, ids, segment_ids=seg)

Naming: `type_ids` index BERT's sentence A/B ("token type") embeddings;
`segment_ids` number the documents packed into one row (0 = padding) and
decide who may attend to whom.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from encoder_jax import errors, wide
from encoder_jax.layers import (ACTIVATIONS, Dropout, EncoderBlock, EncoderConfig,
                                _kernel_init, attention_mask, layer_norm)

__all__ = ["EncoderConfig", "BertEncoder", "BertForMaskedLM", "BertForClassification"]


def default_segment_ids(ids_BxL: jax.Array, mask_BxL: jax.Array | None,
                        segment_ids_BxL: jax.Array | None) -> jax.Array:
    """Resolves the packing segments: explicit ids, else one segment per row from `mask`."""
    if segment_ids_BxL is not None:
        return segment_ids_BxL
    if mask_BxL is None:
        return jnp.ones(ids_BxL.shape, jnp.int32)
    return mask_BxL.astype(jnp.int32)


def bigram_buckets(ids_BxL: jax.Array, segment_ids_BxL: jax.Array, num_buckets: int) -> jax.Array:
    """(B, L) int32 in [0, num_buckets): a hash of each (previous token, token) pair.

    A document's first token pairs with a start marker, so packed neighbours do not leak.
    The hash mixes both ids (murmur3's finaliser) so colliding pairs are spread, not banded.
    """
    same_doc_BxL = jnp.pad(segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1], ((0, 0), (1, 0)))
    previous_BxL = jnp.where(same_doc_BxL, jnp.pad(ids_BxL[:, :-1], ((0, 0), (1, 0))) + 1, 0)
    return wide.hash_pair(previous_BxL, ids_BxL, num_buckets)


class BertEncoder(nn.Module):
    """Embeddings -> N Transformer blocks -> (hidden states, tanh-pooled first token)."""

    config: EncoderConfig

    def setup(self):
        cfg = self.config
        embed = lambda n, name: nn.Embed(n, cfg.hidden_dim, dtype=cfg.dtype,
                                         param_dtype=cfg.param_dtype,
                                         embedding_init=_kernel_init(cfg), name=name)
        # setup (not compact): the token table is shared with `attend` (tied MLM output).
        self.token_embed = embed(cfg.vocab_size, "token_embed")
        self.position_embed = embed(cfg.max_len, "position_embed")
        self.type_embed = embed(cfg.type_vocab_size, "type_embed") if cfg.type_vocab_size else None
        # fastText-style hashed bigrams: extra lexical capacity without a larger vocabulary.
        self.bigram_embed = embed(cfg.bigram_buckets, "bigram_embed") if cfg.bigram_buckets else None
        self.embed_norm = layer_norm(cfg, "embed_norm")
        self.embed_dropout = Dropout(cfg.dropout_rate, cfg.dropout_rng)
        block = nn.remat(EncoderBlock, static_argnums=(3,)) if cfg.remat == "block" else EncoderBlock
        self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
        self.final_norm = layer_norm(cfg, "final_norm") if cfg.pre_norm else None
        self.pooler = (nn.Dense(cfg.hidden_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                kernel_init=_kernel_init(cfg), name="pooler")
                       if cfg.use_pooler else None)

    def __call__(self, ids_BxL: jax.Array, *, segment_ids: jax.Array | None = None,
                 mask: jax.Array | None = None, type_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True
                 ) -> tuple[jax.Array, jax.Array | None]:
        """Encodes token ids.

        Args:
          ids_BxL: int token ids (B, L).
          segment_ids: int (B, L) packed-document ids, 0 = padding. Tokens attend
            only within their own segment. Default: from `mask`, else all ones.
          mask: bool (B, L), True for real tokens. Ignored if `segment_ids` given.
          type_ids: int (B, L) sentence A/B ids; default zeros.
          positions: int (B, L) position of each token inside its document;
            default 0..L-1 (packed rows should restart at each document).
          deterministic: disables dropout.

        Returns:
          hidden (B, L, D) in `dtype`, and pooled (B, D) (None without pooler).
        """
        cfg = self.config
        batch, length = ids_BxL.shape
        if length > cfg.max_len:
            raise errors.ConfigError(f"sequence length {length} exceeds model.max_len={cfg.max_len}")
        segment_ids_BxL = default_segment_ids(ids_BxL, mask, segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        x_BxLxD = self.token_embed(ids_BxL) + self.position_embed(positions)
        if self.type_embed is not None:
            type_ids = jnp.zeros_like(ids_BxL) if type_ids is None else type_ids
            x_BxLxD = x_BxLxD + self.type_embed(type_ids)
        if self.bigram_embed is not None:
            x_BxLxD = x_BxLxD + self.bigram_embed(
                bigram_buckets(ids_BxL, segment_ids_BxL, cfg.bigram_buckets))
        x_BxLxD = self.embed_dropout(self.embed_norm(x_BxLxD), deterministic=deterministic)
        mask_Bx1xLxL = attention_mask(segment_ids_BxL)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, mask_Bx1xLxL, deterministic)
        if self.final_norm is not None:
            x_BxLxD = self.final_norm(x_BxLxD)
        pooled_BxD = jnp.tanh(self.pooler(x_BxLxD[:, 0])) if self.pooler is not None else None
        return x_BxLxD, pooled_BxD

    def attend(self, h_BxPxD: jax.Array) -> jax.Array:
        """Scores hidden states against the token embedding table: (B, P, V) float32."""
        return self.token_embed.attend(h_BxPxD.astype(self.config.param_dtype)).astype(jnp.float32)


class BertForMaskedLM(nn.Module):
    """Encoder + sparse MLM head: logits only at `masked_positions`, output tied to input embeddings."""

    config: EncoderConfig

    def setup(self):
        cfg = self.config
        self.encoder = BertEncoder(cfg, name="encoder")
        self.transform = nn.Dense(cfg.hidden_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  kernel_init=_kernel_init(cfg), name="transform")
        self.transform_norm = layer_norm(cfg, "transform_norm")
        self.output_bias = self.param("output_bias", nn.initializers.zeros,
                                      (cfg.vocab_size,), cfg.param_dtype)

    def __call__(self, ids_BxL: jax.Array, masked_positions_BxP: jax.Array, *,
                 segment_ids=None, mask=None, type_ids=None, positions=None,
                 deterministic: bool = True) -> jax.Array:
        """Returns float32 logits (B, P, V) at the P gathered positions of each row."""
        hidden_BxLxD, _ = self.encoder(ids_BxL, segment_ids=segment_ids, mask=mask,
                                       type_ids=type_ids, positions=positions,
                                       deterministic=deterministic)
        picked_BxPxD = jnp.take_along_axis(hidden_BxLxD, masked_positions_BxP[..., None], axis=1)
        return self.predict(picked_BxPxD)

    def predict(self, h_BxPxD: jax.Array) -> jax.Array:
        """Head on given hidden states: dense -> activation -> LayerNorm -> tied logits."""
        h_BxPxD = ACTIVATIONS[self.config.activation](self.transform(h_BxPxD))
        h_BxPxD = self.transform_norm(h_BxPxD)
        return self.encoder.attend(h_BxPxD) + self.output_bias.astype(jnp.float32)[None, None, :]


class BertForClassification(nn.Module):
    """Encoder + dropout + linear classifier over the pooled first token or the token mean.

    With `wide_buckets` > 0 the logits also get a linear model over the row's tokens and
    hashed token bigrams (Wide & Deep, Cheng et al. 2016): the sparse n-gram evidence that
    a TF-IDF linear classifier uses, trained jointly with the encoder.
    """

    config: EncoderConfig
    num_classes: int
    pooling: str = "first"  # "first": BERT's tanh pooler on [CLS]; "mean": mean of real tokens
    wide_buckets: int = 0  # hashed bigram rows of the wide part; 0: no wide part
    wide_chars: bool = False  # the wide part also sees character uni/bigrams (see wide.py)

    @nn.compact
    def __call__(self, ids_BxL: jax.Array, *, segment_ids=None, mask=None, type_ids=None,
                 positions=None, deterministic: bool = True, return_parts: bool = False):
        """Returns float32 class logits (B, C): the deep part's plus the wide part's.

        With `return_parts`, the two (B, C) parts (deep, wide) instead of their sum
        (wide is zeros without a wide part); `finetune.wide_loss=separate` trains each alone.
        """
        cfg = self.config
        if self.pooling not in ("first", "mean"):
            raise errors.ConfigError(f"pooling={self.pooling!r}; valid: ['first', 'mean']")
        hidden_BxLxD, pooled_BxD = BertEncoder(cfg, name="encoder")(
            ids_BxL, segment_ids=segment_ids, mask=mask, type_ids=type_ids,
            positions=positions, deterministic=deterministic)
        if self.pooling == "mean" or pooled_BxD is None:
            real_BxL = default_segment_ids(ids_BxL, mask, segment_ids) > 0
            weights_BxLx1 = real_BxL[..., None].astype(jnp.float32)
            pooled_BxD = ((hidden_BxLxD.astype(jnp.float32) * weights_BxLx1).sum(1)
                          / jnp.maximum(weights_BxLx1.sum(1), 1.0))
        pooled_BxD = Dropout(cfg.dropout_rate, cfg.dropout_rng)(pooled_BxD, deterministic=deterministic)
        logits_BxC = nn.Dense(self.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=_kernel_init(cfg), name="classifier")(pooled_BxD)
        deep_BxC = logits_BxC.astype(jnp.float32)
        wide_BxC = (self.wide_logits(ids_BxL, default_segment_ids(ids_BxL, mask, segment_ids))
                    if self.wide_buckets else jnp.zeros_like(deep_BxC))
        return (deep_BxC, wide_BxC) if return_parts else deep_BxC + wide_BxC

    def wide_logits(self, ids_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
        """(B, C) float32: summed unigram and hashed-bigram weights of real tokens / sqrt(count),
        plus (`wide_chars`) the same over the character uni/bigrams of the row's pieces.

        Zero-initialised, so a fresh wide part leaves the encoder's logits unchanged.
        """
        table = lambda rows, name: nn.Embed(rows, self.num_classes, param_dtype=jnp.float32,
                                            embedding_init=nn.initializers.zeros, name=name)
        unigram_BxLxC = table(self.config.vocab_size, "wide_unigram")(ids_BxL)
        bigram_BxLxC = table(self.wide_buckets, "wide_bigram")(
            bigram_buckets(ids_BxL, segment_ids_BxL, self.wide_buckets))
        real_BxLx1 = (segment_ids_BxL > 0)[..., None].astype(jnp.float32)
        count_Bx1 = jnp.maximum(real_BxLx1.sum(1), 1.0)
        tokens_BxC = ((unigram_BxLxC + bigram_BxLxC) * real_BxLx1).sum(1) / jnp.sqrt(count_Bx1)
        if not self.wide_chars:
            return tokens_BxC
        # Filled from the tokenizer by the classification task; -1 (no n-grams) until then.
        index_VxW = self.param("wide_char_index", nn.initializers.constant(-1.0),
                               (self.config.vocab_size, wide.INDEX_WIDTH), jnp.float32)
        buckets_BxLxS, valid_BxLxS = wide.char_buckets(jax.lax.stop_gradient(index_VxW)[ids_BxL],
                                                       segment_ids_BxL, self.wide_buckets)
        valid_BxLxSx1 = valid_BxLxS[..., None].astype(jnp.float32)
        chars_BxC = (table(self.wide_buckets, "wide_char")(buckets_BxLxS) * valid_BxLxSx1).sum((1, 2))
        char_count_Bx1 = jnp.maximum(valid_BxLxSx1.sum((1, 2)), 1.0)
        return tokens_BxC + chars_BxC / jnp.sqrt(char_count_Bx1)
