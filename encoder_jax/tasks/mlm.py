"""Masked-language-model objective: dynamic (whole-word) masking, sparse head, loss and metrics.

`mlm.objective="electra"` trains ELECTRA's replaced-token detection on the same data,
masks and trainer instead (`encoder_jax.electra`); the discriminator is the `encoder`.

Masking runs inside the jitted step from the step's PRNG key, so a resumed run
replays exactly the masks of the run it continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from encoder_jax import configs, electra, errors, metrics, pretrained as pretrained_lib
from encoder_jax import static_embeddings
from encoder_jax import workdir as workdir_lib
from encoder_jax.data import mlm_packing, sources, tokenizer as tokenizer_lib
from encoder_jax.data.text import special_ids
from encoder_jax.losses import argmax_equals  # noqa: F401  (re-exported: the MLM accuracy)
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertForMaskedLM
from encoder_jax.tasks.base import Task, stateless

log = logging.getLogger("encoder_jax")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """BERT masking: choose `rate` of the tokens; of those 80% [MASK], 10% random, 10% kept."""

    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    rate: float = 0.15
    max_predictions: int = 20  # P: prediction slots per row (static shape of the sparse head)
    whole_word: bool = False
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.rate < 1.0:
            raise errors.ConfigError(f"mlm.rate={self.rate} must be in (0, 1)")
        if self.mask_fraction + self.random_fraction > 1.0:
            raise errors.ConfigError("mlm.mask_fraction + mlm.random_fraction must be <= 1")


def choose_positions(key: jax.Array, ids_BxL: jax.Array, segment_ids_BxL: jax.Array,
                     word_starts_BxL: jax.Array, cfg: MaskingConfig
                     ) -> tuple[jax.Array, jax.Array]:
    """Picks round(rate * eligible) tokens per row (at most P), as whole words if asked.

    Words are taken in random order while they fit the row's budget, so all
    sub-tokens of a chosen word are masked together.

    Returns:
      positions (B, P) int32, sorted within the row, and weights (B, P) float32
      (1 for a real prediction, 0 for an unused slot).
    """
    batch, length = ids_BxL.shape
    eligible_BxL = (segment_ids_BxL > 0) & ~jnp.isin(ids_BxL, jnp.asarray(cfg.special_ids))
    count_B = eligible_BxL.sum(-1)
    budget_B = jnp.minimum(cfg.max_predictions,
                           jnp.where(count_B > 0, jnp.maximum(1, jnp.round(cfg.rate * count_B)), 0))
    if cfg.whole_word:
        new_segment = jnp.concatenate(
            [jnp.ones((batch, 1), bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
        starts_BxL = word_starts_BxL | new_segment | ~eligible_BxL
    else:
        starts_BxL = jnp.ones_like(eligible_BxL)
    word_BxL = jnp.cumsum(starts_BxL, axis=1) - 1  # word index of every token
    word_score_BxL = jax.random.uniform(key, (batch, length))
    score_BxL = jnp.where(eligible_BxL, jnp.take_along_axis(word_score_BxL, word_BxL, axis=1), 2.0)
    order_BxL = jnp.argsort(score_BxL, axis=1, stable=True)  # a word's tokens stay adjacent
    rank_BxL = jnp.argsort(order_BxL, axis=1)

    def per_row(word_L, rank_L, eligible_L):
        first_rank = jnp.full((length,), length, rank_L.dtype).at[word_L].min(rank_L)
        size = jnp.zeros((length,), jnp.int32).at[word_L].add(eligible_L.astype(jnp.int32))
        return first_rank[word_L] + size[word_L] - 1  # rank of the word's last token

    word_end_rank_BxL = jax.vmap(per_row)(word_BxL, rank_BxL, eligible_BxL)
    chosen_BxL = eligible_BxL & (word_end_rank_BxL < budget_B[:, None])
    # The P chosen positions of lowest index (unused slots point at unchosen tokens).
    key_BxL = jnp.where(chosen_BxL, length - jnp.arange(length), 0)
    top_BxP, positions_BxP = jax.lax.top_k(key_BxL, cfg.max_predictions)
    weights_BxP = (top_BxP > 0).astype(jnp.float32)
    return positions_BxP.astype(jnp.int32), weights_BxP


def corrupt(key: jax.Array, ids_BxL: jax.Array, positions_BxP: jax.Array,
            weights_BxP: jax.Array, cfg: MaskingConfig) -> tuple[jax.Array, jax.Array]:
    """Applies 80/10/10 to the chosen positions; returns (corrupted ids, targets (B, P))."""
    targets_BxP = jnp.take_along_axis(ids_BxL, positions_BxP, axis=1)
    kind_key, token_key = jax.random.split(key)
    u_BxP = jax.random.uniform(kind_key, positions_BxP.shape)
    regular = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(cfg.special_ids)).astype(np.int32)
    random_BxP = jnp.asarray(regular)[jax.random.randint(token_key, positions_BxP.shape, 0, len(regular))]
    new_BxP = jnp.where(u_BxP < cfg.mask_fraction, cfg.mask_id,
                        jnp.where(u_BxP < cfg.mask_fraction + cfg.random_fraction, random_BxP, targets_BxP))
    new_BxP = jnp.where(weights_BxP > 0, new_BxP, targets_BxP)
    rows_Bx1 = jnp.arange(ids_BxL.shape[0])[:, None]
    # Unused slots write back the original token, so duplicates there are harmless.
    corrupted_BxL = ids_BxL.at[rows_Bx1, positions_BxP].set(new_BxP.astype(ids_BxL.dtype))
    return corrupted_BxL, targets_BxP


def mask_batch(key: jax.Array, batch: dict[str, jax.Array], cfg: MaskingConfig) -> dict[str, jax.Array]:
    """Adds `masked_ids`, `masked_positions`, `targets`, `target_weights` to a packed batch."""
    choose_key, corrupt_key = jax.random.split(key)
    positions, weights = choose_positions(choose_key, batch["ids"], batch["segment_ids"],
                                          batch["word_starts"], cfg)
    masked_ids, targets = corrupt(corrupt_key, batch["ids"], positions, weights, cfg)
    return {**batch, "masked_ids": masked_ids, "masked_positions": positions,
            "targets": targets, "target_weights": weights}


def mlm_loss_and_metrics(logits_BxPxV: jax.Array, targets_BxP: jax.Array, weights_BxP: jax.Array
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over real predictions, and metric sums with their denominator."""
    logits_BxPxV = logits_BxPxV.astype(jnp.float32)
    xent_BxP = optax.softmax_cross_entropy_with_integer_labels(logits_BxPxV, targets_BxP)
    denominator = weights_BxP.sum()
    loss_sum = (xent_BxP * weights_BxP).sum()
    correct = (argmax_equals(logits_BxPxV, targets_BxP) * weights_BxP).sum()
    loss = loss_sum / jnp.maximum(denominator, 1.0)
    return loss, {"loss": loss_sum, "accuracy": correct, "denominator": denominator}


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Sums -> means; adds perplexity."""
    return metrics.means(sums, perplexity_of="loss")


# ----------------------------------------------------------------------------- task


def masking_config(mlm_cfg: configs.MaskedLmConfig, tokenizer, seq_len: int) -> MaskingConfig:
    """`config.mlm` with the tokenizer's special ids; P = ceil(rate * seq_len) + 1 unless given."""
    max_predictions = mlm_cfg.max_predictions or int(np.ceil(mlm_cfg.rate * seq_len)) + 1
    return MaskingConfig(
        mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
        special_ids=tuple(int(i) for i in special_ids(tokenizer)),
        rate=mlm_cfg.rate, max_predictions=max_predictions, whole_word=mlm_cfg.whole_word,
        mask_fraction=mlm_cfg.mask_fraction, random_fraction=mlm_cfg.random_fraction)


def model_and_loss(model_cfg: EncoderConfig, masking: MaskingConfig, seq_len: int):
    """(init_params(rng), loss(params, batch, rng, train) -> (loss, sums)) of BertForMaskedLM.

    Masks are drawn inside the loss from its rng. In evaluation the sums add
    `target_counts`, the histogram of the targets (the unigram baseline).
    """
    model = BertForMaskedLM(model_cfg)

    def init_params(rng):
        ids = jnp.zeros((1, seq_len), jnp.int32)
        return model.init(rng, ids, jnp.zeros((1, masking.max_predictions), jnp.int32))["params"]

    def loss(params, batch, rng, train):
        mask_rng, dropout_rng = jax.random.split(rng)
        batch = mask_batch(mask_rng, batch, masking)
        logits = model.apply({"params": params}, batch["masked_ids"], batch["masked_positions"],
                             segment_ids=batch["segment_ids"], positions=batch["positions"],
                             deterministic=not train, rngs={"dropout": dropout_rng})
        value, sums = mlm_loss_and_metrics(logits, batch["targets"], batch["target_weights"])
        if not train:
            sums["target_counts"] = jnp.zeros(masking.vocab_size, jnp.float32).at[
                batch["targets"].reshape(-1)].add(batch["target_weights"].reshape(-1))
        return value, sums

    return init_params, loss


def electra_model_and_loss(model_cfg: EncoderConfig, masking: MaskingConfig, seq_len: int,
                           mlm_cfg: configs.MaskedLmConfig):
    """`model_and_loss` for ELECTRA (`encoder_jax.electra`): generator MLM loss + weighted detection.

    Sums: `loss`/`accuracy` are the generator's (per masked token, as for MLM);
    `rtd_loss`/`rtd_accuracy` the discriminator's per real token; `replaced` the
    share of real tokens the generator changed.
    """
    generator = BertForMaskedLM(electra.generator_config(model_cfg, mlm_cfg.generator_layers))
    discriminator = electra.ElectraDiscriminator(model_cfg)

    def init_params(rng):
        gen_rng, disc_rng = jax.random.split(rng)
        ids = jnp.zeros((1, seq_len), jnp.int32)
        gen = generator.init(gen_rng, ids, jnp.zeros((1, masking.max_predictions), jnp.int32))
        return {**discriminator.init(disc_rng, ids)["params"],
                "generator": electra.without_embeddings(gen["params"])}

    def loss(params, batch, rng, train):
        mask_rng, sample_rng, gen_rng, disc_rng = jax.random.split(rng, 4)
        batch = mask_batch(mask_rng, batch, masking)
        where = dict(segment_ids=batch["segment_ids"], positions=batch["positions"],
                     deterministic=not train)
        gen_logits = generator.apply(
            {"params": electra.with_shared_embeddings(params["generator"], params["encoder"])},
            batch["masked_ids"], batch["masked_positions"], rngs={"dropout": gen_rng}, **where)
        gen_loss, sums = mlm_loss_and_metrics(gen_logits, batch["targets"], batch["target_weights"])
        corrupted, replaced = electra.replace_masked(sample_rng, batch["ids"], batch["masked_positions"],
                                                     batch["target_weights"], gen_logits)
        disc_logits = discriminator.apply({"params": {k: v for k, v in params.items() if k != "generator"}},
                                          corrupted, rngs={"dropout": disc_rng}, **where)
        rtd_loss, rtd = electra.detection_loss(disc_logits, replaced,
                                               (batch["segment_ids"] > 0).astype(jnp.float32))
        per_masked = sums["denominator"] / jnp.maximum(rtd["tokens"], 1.0)  # means() divides by it
        sums.update(rtd_loss=rtd["loss"] * per_masked, rtd_accuracy=rtd["accuracy"] * per_masked,
                    replaced=replaced.sum() * per_masked)
        if not train:
            sums["target_counts"] = jnp.zeros(masking.vocab_size, jnp.float32).at[
                batch["targets"].reshape(-1)].add(batch["target_weights"].reshape(-1))
        return gen_loss + mlm_cfg.rtd_weight * rtd_loss, sums

    return init_params, loss


def summarize_with_baseline(sums: dict[str, Any]) -> dict[str, float]:
    """`summarize`, plus the held-out unigram baseline (best constant predictor) in evaluation."""
    counts = sums.pop("target_counts", None)
    out = summarize(sums)
    if counts is not None and counts.sum() > 0:
        p = counts / counts.sum()
        nz = p[p > 0]
        out["unigram_loss"] = float(-(nz * np.log(nz)).sum())
        out["unigram_accuracy"] = float(p.max())
    return out


@contextlib.contextmanager
def _no_tokenizer_left_on_error(workdir: str | None):
    """A tokenizer this build trained into the workdir is removed if the build then fails:
    a rerun with fixed data must train a new one, not reuse one from the bad data."""
    path = os.path.join(workdir, tokenizer_lib.SentencePieceTokenizer.FILENAME) if workdir else None
    existed = path is not None and os.path.exists(path)
    try:
        yield
    except errors.Error:
        if path is not None and not existed and os.path.exists(path) and jax.process_index() == 0:
            os.remove(path)
        raise


def _check_enough_tokens(source, tokenizer, needed: int, text_field: str) -> None:
    """A corpus must fill at least one batch (counting [CLS]/[SEP] per document)."""
    total = 0
    for index in range(len(source)):
        total += len(tokenizer.encode(source[index][text_field])) + 2
        if total >= needed:
            return
    raise errors.ConfigError(f"the training corpus ({source.name}) has {total} tokens, fewer than one "
                             f"batch of data.batch_size x data.seq_len = {needed}; add text or lower those")


def tokenizer_and_model(config, pretrained, data_cfg: configs.TextDataConfig, train_source,
                        workdir: str | None, cache_dir: str):
    """(tokenizer, EncoderConfig): a pretrained encoder's (continued pretraining), else trained here."""
    if pretrained is not None:  # shape and tokenizer from the checkpoint; weights via init_from
        return pretrained.tokenizer, pretrained_lib.continued_config(pretrained, config.model)

    def texts():
        for i in range(len(train_source)):
            yield train_source[i][data_cfg.text_field]

    tokenizer = tokenizer_lib.get_tokenizer(
        configs.section(configs.TokenizerConfig, config.tokenizer, "tokenizer"), workdir=workdir,
        cache_dir=cache_dir, corpus_id=repr(train_source), texts=texts)
    return tokenizer, EncoderConfig.from_config(config.model, tokenizer.vocab_size)


def ppmi_token_table(mlm_cfg: configs.MaskedLmConfig, model_cfg: EncoderConfig, tokenizer,
                     source, text_field: str, seed: int):
    """params -> params with the encoder's token table from the corpus' PPMI-SVD vectors.

    Counts `mlm.ppmi_docs` training documents spaced evenly over the source (so every
    file of a mixed corpus is sampled). Tokens the sample never shows keep their fresh rows.
    """
    def init(params):
        count = min(len(source), mlm_cfg.ppmi_docs)
        picked = np.unique(np.linspace(0, len(source) - 1, count).astype(int))
        docs = (tokenizer.encode(source[int(i)][text_field]) for i in picked)
        table, seen = static_embeddings.corpus_embeddings(
            docs, model_cfg.vocab_size, model_cfg.hidden_dim, window=mlm_cfg.ppmi_window,
            std=mlm_cfg.ppmi_std, seed=seed)
        encoder = params["encoder"]
        fresh = np.asarray(encoder["token_embed"]["embedding"])
        merged = np.where(seen[:, None], table, fresh).astype(fresh.dtype)
        params = {**params, "encoder": {**encoder, "token_embed": {**encoder["token_embed"],
                                                                   "embedding": merged}}}
        return _tied_logits_at_fresh_scale(params, model_cfg.init_std / mlm_cfg.ppmi_std)
    return init


def _tied_logits_at_fresh_scale(params, factor: float):
    """Scales the MLM heads' last LayerNorm by `factor` so that logits against the rescaled
    tied token table start at the size they have against a fresh N(0, init_std) table."""
    def scaled(head):
        norm = head["transform_norm"]
        return {**head, "transform_norm": {
            k: (np.asarray(v) * factor).astype(np.asarray(v).dtype) for k, v in norm.items()}}

    if "transform_norm" in params:
        params = scaled(params)
    if "generator" in params and "transform_norm" in params["generator"]:  # electra
        params = {**params, "generator": scaled(params["generator"])}
    return params


def host_rows(global_rows: int, shard_count: int, field: str) -> int:
    """This process's share of a global batch; it must divide evenly."""
    if global_rows % shard_count:
        raise errors.ConfigError(f"{field}={global_rows} must divide by the process count {shard_count}")
    return global_rows // shard_count


def build(config, workdir: str | None, shard_index: int = 0, shard_count: int = 1) -> Task:
    """The MLM task: data, tokenizer, model and loss from `config`."""
    data_cfg = configs.section(configs.TextDataConfig, config.data, "data")
    eval_cfg = configs.section(configs.EvalConfig, config.eval, "eval")
    cache_dir = data_cfg.data_dir or sources.default_data_dir()
    splits = sources.open_text_sources(data_cfg, cache_dir)
    pretrained = pretrained_lib.resolve(config)
    seq_len = data_cfg.seq_len
    with _no_tokenizer_left_on_error(workdir):
        tokenizer, model_cfg = tokenizer_and_model(config, pretrained, data_cfg, splits["train"],
                                                   workdir, cache_dir)
        if seq_len > model_cfg.max_len:
            raise errors.ConfigError(f"data.seq_len={seq_len} exceeds model.max_len={model_cfg.max_len}")
        _check_enough_tokens(splits["train"], tokenizer, data_cfg.batch_size * seq_len,
                             data_cfg.text_field)
    if workdir and shard_index == 0:
        if pretrained is not None:
            tokenizer.save(workdir)
        workdir_lib.write_model_record(workdir, workdir_lib.ModelRecord("mlm", model_cfg))
    mlm_cfg = configs.section(configs.MaskedLmConfig, config.mlm, "mlm")
    masking = masking_config(mlm_cfg, tokenizer, seq_len)
    rows = host_rows(data_cfg.batch_size, shard_count, "data.batch_size")
    train_data = mlm_packing.mlm_train_dataset(
        splits["train"], tokenizer, seq_len=seq_len, batch_size=rows, seed=config.seed,
        text_field=data_cfg.text_field, shard_index=shard_index, shard_count=shard_count,
        workers=data_cfg.workers, prefetch=data_cfg.prefetch)
    eval_rows = host_rows(eval_cfg.batch_size or data_cfg.batch_size, shard_count, "eval.batch_size")

    def eval_batches():
        return mlm_packing.mlm_eval_batches(
            splits["validation"], tokenizer, seq_len=seq_len, batch_size=eval_rows,
            text_field=data_cfg.text_field, shard_index=shard_index, shard_count=shard_count,
            max_batches=eval_cfg.max_batches)

    init_params, loss = (model_and_loss(model_cfg, masking, seq_len) if mlm_cfg.objective == "mlm"
                         else electra_model_and_loss(model_cfg, masking, seq_len, mlm_cfg))
    init_from = None
    if pretrained is not None:
        init_from = lambda params: pretrained_lib.merge_params(params, pretrained.load_params(),
                                                               pretrained.source)
        if mlm_cfg.embedding_init != "random":
            log.warning("mlm.embedding_init=%s ignored: the weights come from %s",
                        mlm_cfg.embedding_init, pretrained.source)
    elif mlm_cfg.embedding_init == "ppmi":
        if model_cfg.hidden_dim >= model_cfg.vocab_size:
            raise errors.ConfigError(
                f"mlm.embedding_init=ppmi needs model.hidden_dim={model_cfg.hidden_dim} below the "
                f"vocabulary size {model_cfg.vocab_size} (tokenizer.vocab_size)")
        init_from = ppmi_token_table(mlm_cfg, model_cfg, tokenizer, splits["train"],
                                     data_cfg.text_field, config.seed)
    return Task(
        name="mlm", init_params=init_params, loss_fn=stateless(loss), train_data=train_data,
        example_batch=mlm_packing.example_batch(rows, seq_len), summarize=summarize_with_baseline,
        eval_batches=eval_batches, tokens_in_batch=lambda b: int((b["segment_ids"] > 0).sum()),
        init_from=init_from,
        batch_rows={"data.batch_size": rows, "eval.batch_size": eval_rows})
