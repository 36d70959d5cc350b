"""Encoder-decoder Transformer for seq2seq (translation): `BertEncoder` + a causal decoder with
cross-attention, teacher forcing, and a decode cache for incremental decoding.

    cfg = Seq2SeqConfig(encoder=EncoderConfig(vocab_size=1000, hidden_dim=64, num_layers=2,
                                              num_heads=4, mlp_dim=128), target_vocab_size=1000)
    model = EncoderDecoder(cfg)
    params = model.init(jax.random.key(0), source_ids, target_in)["params"]
    logits_BxTxV = model.apply({"params": params}, source_ids, target_in)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from encoder_jax import errors
from encoder_jax.decoder_block import DecoderBlock, step_kernels
from encoder_jax.layers import Dropout, EncoderConfig, _kernel_init, attention_mask, layer_norm
from encoder_jax.models import BertEncoder

__all__ = ["Seq2SeqConfig", "EncoderDecoder", "block_ends", "reorder_beam_cache"]



SEQ2SEQ_FIELDS = ("decoder_layers", "max_target_len", "share_embeddings", "tie_output")


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """An encoder-decoder Transformer: the encoder's config, and what the decoder adds.

    The decoder has the encoder's width, heads, feed-forward, activation, norms and
    dropout; `decoder_layers` blocks, its own (or the shared) token table.
    """

    encoder: EncoderConfig  # source vocabulary and the shared shape / numerics
    target_vocab_size: int
    decoder_layers: int = 6
    max_target_len: int = 256  # size of the decoder's position table
    share_embeddings: bool = False  # one token table for source, target (and output if tied)
    tie_output: bool = True  # output projection = the target token table

    def __post_init__(self):
        if self.share_embeddings and self.encoder.vocab_size != self.target_vocab_size:
            raise errors.ConfigError(f"model.share_embeddings needs one vocabulary; source "
                                     f"{self.encoder.vocab_size} != target {self.target_vocab_size} tokens")

    @classmethod
    def from_config(cls, model_cfg: Any, source_vocab: int, target_vocab: int,
                    **encoder_overrides: Any) -> "Seq2SeqConfig":
        """From `config.model`: the encoder's fields plus SEQ2SEQ_FIELDS (no pooler, no type ids)."""
        given = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg or {})
        own = {k: given[k] for k in SEQ2SEQ_FIELDS if given.get(k) is not None}
        encoder = EncoderConfig.from_config(
            {k: v for k, v in given.items() if k not in SEQ2SEQ_FIELDS}, source_vocab,
            **{"use_pooler": False, **encoder_overrides})
        return cls(encoder=encoder, target_vocab_size=target_vocab, **own)

    @property
    def decoder(self) -> EncoderConfig:
        # remat "block" is the encoder's alone; "mlp" applies to the decoder's blocks too.
        return dataclasses.replace(self.encoder, vocab_size=self.target_vocab_size,
                                   num_layers=self.decoder_layers, max_len=self.max_target_len,
                                   type_vocab_size=0, use_pooler=False,
                                   remat="mlp" if self.encoder.remat == "mlp" else "none")

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "encoder": self.encoder.to_json()}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "Seq2SeqConfig":
        return cls(**{**values, "encoder": EncoderConfig.from_json(values["encoder"])})


def causal_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """(B, 1, T, T): same-segment real tokens at or before the query position."""
    length = segment_ids_BxT.shape[1]
    causal_TxT = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    return attention_mask(segment_ids_BxT) & causal_TxT[None, None]


def cross_mask(target_segment_ids_BxT: jax.Array, source_segment_ids_BxS: jax.Array) -> jax.Array:
    """(B, 1, T, S): real target positions may attend to real source tokens."""
    return ((target_segment_ids_BxT > 0)[:, None, :, None]
            & (source_segment_ids_BxS > 0)[:, None, None, :])


def claim_own_slots(ancestors_BxGxT: jax.Array, index: jax.Array) -> jax.Array:
    """At position `index` every hypothesis g writes (and reads) its own slot g."""
    batch, group, _ = ancestors_BxGxT.shape
    own_BxGx1 = jnp.broadcast_to(jnp.arange(group, dtype=jnp.int32)[None, :, None], (batch, group, 1))
    return jax.lax.dynamic_update_slice(ancestors_BxGxT, own_BxGx1, (0, 0, index))


def history_mask(ancestors_BxGxT: jax.Array, index: jax.Array, length: int | None = None
                 ) -> jax.Array:
    """bool (B, 1, G, length*G): [b, 0, g, t*G + h] is true iff slot h holds position t <= index
    of hypothesis g's history (ancestors_BxGxT[b, g, t] == h); the cache's position axis
    is position-major (`decoder_block._write_slots`). Only the first `length` positions (default
    all T): the cache blocks a step reads."""
    batch, group, _ = ancestors_BxGxT.shape
    ancestors_BxGxT = ancestors_BxGxT[:, :, :length]
    length = ancestors_BxGxT.shape[2]
    own_BxGxTxH = ancestors_BxGxT[:, :, :, None] == jnp.arange(group)[None, None, None, :]
    seen_BxGxTxH = own_BxGxTxH & (jnp.arange(length) <= index)[None, None, :, None]
    return seen_BxGxTxH.reshape(batch, 1, group, length * group)


def block_ends(max_len: int, blocks: int) -> tuple[int, ...]:
    """Where each of `blocks` near-equal blocks of max_len decode positions ends (at most
    max_len blocks): the decode cache's blocks and the searches' stages."""
    blocks = max(1, min(blocks, max_len))
    return tuple((i + 1) * max_len // blocks for i in range(blocks))


def reorder_beam_cache(cache: dict[str, Any], parents_BxK: jax.Array) -> dict[str, Any]:
    """Beam k of each row continues parents_BxK[:, k]: only the ancestor table moves."""
    rows_Bx1 = jnp.arange(parents_BxK.shape[0])[:, None]
    return {**cache, "ancestors": cache["ancestors"][rows_Bx1, parents_BxK]}


def decode_kernels(params: dict[str, Any]) -> dict[str, Any]:
    """The decoder blocks' kernels as the cached step reads them, {block_i: `step_kernels`}.

    A pure function of the params (one transposed copy of the decoder's kernels, ~14 MiB
    per block at d_model 512). Decoding many batches with the same params (`--mode
    predict`) lays them out once and passes them to every `translate_batch` call;
    without them each call transposes its own (tens of ms per call on a CPU).
    """
    return {name: step_kernels(block) for name, block in params["decoder"].items()
            if name.startswith("block_")}


class Decoder(nn.Module):
    """Target embeddings -> causal blocks with cross-attention -> logits over the target vocabulary."""

    config: Seq2SeqConfig

    def setup(self):
        cfg, dec = self.config, self.config.decoder
        embed = lambda n, name: nn.Embed(n, dec.hidden_dim, dtype=dec.dtype,
                                         param_dtype=dec.param_dtype,
                                         embedding_init=_kernel_init(dec), name=name)
        self.token_embed = None if cfg.share_embeddings else embed(dec.vocab_size, "token_embed")
        self.position_embed = embed(dec.max_len, "position_embed")
        self.embed_norm = layer_norm(dec, "embed_norm")
        self.embed_dropout = Dropout(dec.dropout_rate, dec.dropout_rng)
        self.blocks = [DecoderBlock(dec, name=f"block_{i}") for i in range(dec.num_layers)]
        self.final_norm = layer_norm(dec, "final_norm") if dec.pre_norm else None
        self.output = None if cfg.tie_output else nn.Dense(
            dec.vocab_size, dtype=dec.dtype, param_dtype=dec.param_dtype,
            kernel_init=_kernel_init(dec), name="output")
        self.output_bias = self.param("output_bias", nn.initializers.zeros, (dec.vocab_size,),
                                      dec.param_dtype)

    def embed(self, ids_BxT: jax.Array, positions_BxT: jax.Array, shared, deterministic: bool):
        table = shared.token_embed if self.token_embed is None else self.token_embed
        x_BxTxD = table(ids_BxT) + self.position_embed(positions_BxT)
        return self.embed_dropout(self.embed_norm(x_BxTxD), deterministic=deterministic)

    def logits(self, y_BxTxD: jax.Array, shared) -> jax.Array:
        """(B, T, V) float32: tied to the target token table, or the own output layer."""
        if self.final_norm is not None:
            y_BxTxD = self.final_norm(y_BxTxD)
        if self.output is not None:
            logits_BxTxV = self.output(y_BxTxD).astype(jnp.float32)
        else:
            table = shared.token_embed if self.token_embed is None else self.token_embed
            logits_BxTxV = table.attend(y_BxTxD.astype(self.config.decoder.param_dtype)).astype(
                jnp.float32)
        return logits_BxTxV + self.output_bias.astype(jnp.float32)[None, None, :]

    def features(self, y_BxTxD: jax.Array, shared) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`logits` in parts: (final_norm(y) (B, T, D), table (V, D), bias (V,)), in the
        compute dtype, with logits = y @ table.T + bias."""
        dtype = self.config.decoder.dtype
        if self.final_norm is not None:
            y_BxTxD = self.final_norm(y_BxTxD)
        bias_V = self.output_bias
        if self.output is not None:  # the untied output layer's own bias adds to output_bias
            layer = self.output.variables["params"]
            table_VxD, bias_V = layer["kernel"].T, bias_V + layer["bias"]
        else:
            table = shared.token_embed if self.token_embed is None else self.token_embed
            table_VxD = table.embedding
        return y_BxTxD.astype(dtype), table_VxD.astype(dtype), bias_V

    def __call__(self, target_in_BxT, encoded_BxSxD, source_segment_ids_BxS, target_segment_ids_BxT,
                 shared, deterministic: bool = True) -> jax.Array:
        """Teacher forcing: logits (B, T, V) for every target position at once."""
        return self.logits(self.hidden(target_in_BxT, encoded_BxSxD, source_segment_ids_BxS,
                                       target_segment_ids_BxT, shared, deterministic), shared)

    def hidden(self, target_in_BxT, encoded_BxSxD, source_segment_ids_BxS, target_segment_ids_BxT,
               shared, deterministic: bool = True) -> jax.Array:
        """Teacher forcing up to the last block: (B, T, D), before `final_norm`."""
        batch, length = target_in_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(length), (batch, length))
        y_BxTxD = self.embed(target_in_BxT, positions_BxT, shared, deterministic)
        self_mask = causal_mask(target_segment_ids_BxT)
        source_mask = cross_mask(target_segment_ids_BxT, source_segment_ids_BxS)
        for block in self.blocks:
            y_BxTxD = block(y_BxTxD, self_mask, encoded_BxSxD, source_mask, deterministic)
        return y_BxTxD

    def init_cache(self, rows: int, max_len: int, beams: int = 1, blocks: int = 1
                   ) -> dict[str, Any]:
        """Zero self-attention keys (rows, N, H, T * beams) and values (rows, N, T * beams, H)
        per block (position t of slot g at t * beams + g), cut along the positions into
        `blocks` tuples of consecutive ones (`block_ends`), and the ancestor table int32
        (rows, beams, max_len): the slot holding each position of each hypothesis' history
        (`reorder_beam_cache`)."""
        dec = self.config.decoder
        starts = (0, *block_ends(max_len, blocks))

        def zeros(length: int, keys: bool) -> jax.Array:
            values = jnp.zeros((rows, dec.num_heads, beams * length, dec.head_dim), dec.dtype)
            return jnp.swapaxes(values, 2, 3) if keys else values

        def cut(keys: bool) -> tuple[jax.Array, ...]:
            return tuple(zeros(end - start, keys) for start, end in zip(starts[:-1], starts[1:]))

        return {"ancestors": jnp.zeros((rows, beams, max_len), jnp.int32),
                **{f"block_{i}": {"key": cut(True), "value": cut(False)}
                   for i in range(dec.num_layers)}}

    def source_cache(self, encoded_BxSxD: jax.Array, kernels: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        """What every decode step reads and no step changes, computed once per decode: per
        block, the source's cross-attention keys (B, N, H, S) and values (B, N, S, H), and
        the block's kernels laid out for the column step ("kernels": `decode_kernels`'
        entry if given, else transposed here)."""
        return {f"block_{i}": {**block(None, None, encoded_BxSxD, None, cross_cache_only=True),
                               "kernels": (kernels[f"block_{i}"] if kernels is not None
                                           else step_kernels(block.variables["params"]))}
                for i, block in enumerate(self.blocks)}

    def step(self, ids_N: jax.Array, cache: dict[str, Any], index: jax.Array,
             source_cache: dict[str, Any], source_segment_ids_BxS: jax.Array, shared,
             vocab_major: bool = False, stage: int = 0) -> tuple[jax.Array, dict[str, Any]]:
        """One token per hypothesis at position `index`: (logits (N, V), or (V, N) if
        vocab_major, new cache).

        N = B*G: the cache's G hypotheses of each of its B rows, hypothesis g of row b at b*G + g.
        `index` lies in the cache's block `stage` (static): the step reads blocks 0..stage
        only, so a search that runs one loop per block (`decode`'s `stage_ends`) reads
        about half the cache on average instead of all of it.
        """
        blocks = len(cache["block_0"]["key"])
        if not 0 <= stage < blocks:
            raise ValueError(f"stage={stage}; valid: 0..{blocks - 1} (the cache's blocks)")
        rows = ids_N.shape[0]
        ancestors_BxGxT = claim_own_slots(cache["ancestors"], index)
        y_Nx1xD = self.embed(ids_N[:, None], jnp.full((rows, 1), index), shared, True)
        read = stage + 1
        read_entries = sum(keys.shape[3] for keys in cache["block_0"]["key"][:read])
        self_mask = history_mask(ancestors_BxGxT, index, read_entries // ancestors_BxGxT.shape[1])
        source_mask = (source_segment_ids_BxS > 0)[:, None, None, :]
        new_cache = {"ancestors": ancestors_BxGxT}
        y_DxN = y_Nx1xD[:, 0].T  # the blocks' step works on columns (`decoder_block`)
        for i, block in enumerate(self.blocks):
            name = f"block_{i}"
            read_cache = {part: cache[name][part][:read] for part in ("key", "value")}
            y_DxN, written = block(y_DxN, self_mask, None, source_mask, True,
                                   cache=read_cache, decode_index=index,
                                   source_cache=source_cache[name])
            new_cache[name] = {part: (*written[part], *cache[name][part][read:])
                               for part in ("key", "value")}
        if not vocab_major:
            return self.logits(y_DxN.T[:, None], shared)[:, 0], new_cache
        return self.vocab_major_logits(y_DxN.T, shared), new_cache

    def vocab_major_logits(self, y_NxD: jax.Array, shared) -> jax.Array:
        """`logits` transposed, (V, N) float32, as table @ final_norm(y).T: XLA:CPU runs this
        product at 16-64 rows faster than y @ table.T (`decode` module docstring). For an
        untied kernel (D, V) the table is its transpose, which XLA:CPU runs 2-4x slower
        than y @ kernel: `translate_batch` asks for this layout only with a tied output."""
        y_NxD, table_VxD, bias_V = self.features(y_NxD, shared)
        logits_VxN = jax.lax.dot_general(table_VxD, y_NxD, (((1,), (1,)), ((), ())))
        return logits_VxN.astype(jnp.float32) + bias_V.astype(jnp.float32)[:, None]


class EncoderDecoder(nn.Module):
    """Seq2seq Transformer: `encode` once, then `decode` (teacher forcing) or `decode_step` (cached).

    The encoder is `BertEncoder` (its params land under `encoder`, so an MLM run or
    a Hugging Face BERT can initialise it); without a pooler.
    """

    config: Seq2SeqConfig

    def setup(self):
        self.encoder = BertEncoder(dataclasses.replace(self.config.encoder, use_pooler=False),
                                   name="encoder")
        self.decoder = Decoder(self.config, name="decoder")

    def encode(self, source_ids_BxS: jax.Array, source_segment_ids_BxS: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
        """Source ids (B, S) -> hidden states (B, S, D); padding is segment 0."""
        if source_segment_ids_BxS is None:
            source_segment_ids_BxS = (source_ids_BxS != 0).astype(jnp.int32)
        hidden_BxSxD, _ = self.encoder(source_ids_BxS, segment_ids=source_segment_ids_BxS,
                                       deterministic=deterministic)
        return hidden_BxSxD

    def decode(self, target_in_BxT, encoded_BxSxD, source_segment_ids_BxS, target_segment_ids_BxT,
               deterministic: bool = True) -> jax.Array:
        """Teacher-forced logits (B, T, V) float32 given the encoded source."""
        return self.decoder(target_in_BxT, encoded_BxSxD, source_segment_ids_BxS,
                            target_segment_ids_BxT, self.encoder, deterministic)

    def __call__(self, source_ids_BxS, target_in_BxT, source_segment_ids_BxS=None,
                 target_segment_ids_BxT=None, deterministic: bool = True) -> jax.Array:
        """Logits (B, T, V) for teacher forcing; segment ids default to non-pad (id 0) tokens."""
        return self.decoder.logits(self._hidden(source_ids_BxS, target_in_BxT, source_segment_ids_BxS,
                                                target_segment_ids_BxT, deterministic), self.encoder)

    def features(self, source_ids_BxS, target_in_BxT, source_segment_ids_BxS=None,
                 target_segment_ids_BxT=None, deterministic: bool = True
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`__call__` without its output layer: (y (B, T, D), table (V, D), bias (V,)) with
        logits = y @ table.T + bias, for a loss that never forms the (B, T, V) logits
        (`losses.output_cross_entropy`)."""
        return self.decoder.features(self._hidden(source_ids_BxS, target_in_BxT,
                                                  source_segment_ids_BxS, target_segment_ids_BxT,
                                                  deterministic), self.encoder)

    def _hidden(self, source_ids_BxS, target_in_BxT, source_segment_ids_BxS,
                target_segment_ids_BxT, deterministic: bool) -> jax.Array:
        if source_segment_ids_BxS is None:
            source_segment_ids_BxS = (source_ids_BxS != 0).astype(jnp.int32)
        if target_segment_ids_BxT is None:
            target_segment_ids_BxT = jnp.ones_like(target_in_BxT)
        encoded_BxSxD = self.encode(source_ids_BxS, source_segment_ids_BxS, deterministic)
        return self.decoder.hidden(target_in_BxT, encoded_BxSxD, source_segment_ids_BxS,
                                   target_segment_ids_BxT, self.encoder, deterministic)

    def init_cache(self, rows: int, max_len: int, beams: int = 1, blocks: int = 1
                   ) -> dict[str, Any]:
        """The decode cache for `max_len` target positions of `beams` hypotheses per row,
        in `blocks` blocks of positions (`Decoder.init_cache`)."""
        return self.decoder.init_cache(rows, max_len, beams, blocks)

    def source_cache(self, encoded_BxSxD: jax.Array, kernels: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
        """The decoder's cross-attention keys/values of an encoded source and its step
        kernels (`decode_kernels`, or laid out here), computed once per decode."""
        return self.decoder.source_cache(encoded_BxSxD, kernels)

    def decode_step(self, ids_N: jax.Array, cache: dict[str, Any], index: jax.Array,
                    source_cache: dict[str, Any], source_segment_ids_BxS: jax.Array,
                    vocab_major: bool = False, stage: int = 0
                    ) -> tuple[jax.Array, dict[str, Any]]:
        """The cached decoder on one token per row: (logits (N, V) float32, or (V, N) if
        vocab_major, new cache).

        N = B*G: the cache's G hypotheses (beams) per source row, hypothesis g of source b
        at b*G + g; they share the source's cross-attention keys/values (`source_cache`, B
        rows). Beam search reorders hypotheses with `reorder_beam_cache`. `index` must lie
        in the cache's block `stage` (`Decoder.step`).
        """
        return self.decoder.step(ids_N, cache, index, source_cache, source_segment_ids_BxS,
                                 self.encoder, vocab_major, stage)
