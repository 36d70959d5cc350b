"""ELECTRA replaced-token detection: sampling, shared embeddings, learning, and the encoder it leaves."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax import checkpoint, configs, electra, pretrained, train
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertForClassification
from encoder_jax.tasks import mlm

from conftest import tiny_config


def test_replaced_tokens_are_sampled_only_at_real_prediction_slots():
    ids_BxL = jnp.array([[2, 10, 11, 12, 3, 0], [2, 13, 14, 3, 0, 0]])
    positions_BxP = jnp.array([[1, 3], [2, 0]])
    weights_BxP = jnp.array([[1.0, 1.0], [1.0, 0.0]])  # row 1's second slot is padding
    logits_BxPxV = jnp.full((2, 2, 20), -1e9).at[0, 0, 10].set(0.0).at[0, 1, 7].set(0.0) \
        .at[1, 0, 5].set(0.0).at[1, 1, 9].set(0.0)
    corrupted, replaced = electra.replace_masked(jax.random.key(0), ids_BxL, positions_BxP,
                                                 weights_BxP, logits_BxPxV)
    # Row 0: slot 0 samples the original token 10 (not a replacement), slot 1 writes 7.
    np.testing.assert_array_equal(corrupted, [[2, 10, 11, 7, 3, 0], [2, 13, 5, 3, 0, 0]])
    np.testing.assert_array_equal(replaced, [[0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]])
    loss, sums = electra.detection_loss(jnp.where(replaced > 0, 5.0, -5.0), replaced,
                                        (ids_BxL > 0).astype(jnp.float32))
    assert float(sums["accuracy"]) == float(sums["tokens"]) == 9.0 and float(loss) < 0.01


def _electra(rtd_weight):
    cfg = EncoderConfig(vocab_size=50, hidden_dim=16, num_layers=2, num_heads=2, mlp_dim=32,
                        max_len=16, dropout_rate=0.0, attention_dropout_rate=0.0)
    masking = mlm.MaskingConfig(mask_id=4, vocab_size=50, special_ids=(0, 1, 2, 3, 4), rate=0.3,
                                max_predictions=6)
    return mlm.electra_model_and_loss(cfg, masking, 16, configs.MaskedLmConfig(
        objective="electra", rtd_weight=rtd_weight))


def test_generator_and_discriminator_share_the_embeddings_and_both_train_them():
    ids = jax.random.randint(jax.random.key(1), (4, 16), 5, 50)
    batch = {"ids": ids, "segment_ids": jnp.ones((4, 16), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)),
             "word_starts": jnp.ones((4, 16), bool)}
    init_params, loss = _electra(0.0)
    params = init_params(jax.random.key(0))
    assert set(params) == {"encoder", "rtd_transform", "rtd_output", "generator"}
    assert not set(electra.SHARED_EMBEDDINGS) & set(params["generator"]["encoder"])
    grads = jax.jit(jax.grad(lambda p: loss(p, batch, jax.random.key(2), True)[0]))(params)
    norm = lambda tree: float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(tree)))
    # Generator loss alone: it reaches the shared token table, not the discriminator's blocks.
    assert norm(grads["encoder"]["token_embed"]) > 0 and norm(grads["generator"]) > 0
    assert norm(grads["encoder"]["block_0"]) == 0 and norm(grads["rtd_output"]) == 0
    grads = jax.jit(jax.grad(lambda p: _electra(50.0)[1](p, batch, jax.random.key(2), True)[0]))(params)
    assert norm(grads["encoder"]["block_0"]) > 0 and norm(grads["rtd_output"]) > 0


# End to end (about a minute on 2 cores): -m slow. The shared embeddings, both losses and their
# gradients are checked in process above.
@pytest.mark.slow
def test_electra_trains_through_the_trainer_and_leaves_its_discriminator_as_the_encoder(
        corpus_files, data_cache, tmp_path):
    """The generator learns and replaces what it gets wrong; whether the discriminator beats the
    base rate is a matter of compute (measured on real text in docs/recipes.md), not of 60 steps."""
    config = tiny_config(corpus_files, data_cache, **{
        "mlm.objective": "electra", "mlm.rtd_weight": 1.0, "train.num_steps": 60,
        "opt.learning_rate": 5e-3, "opt.warmup_steps": 10, "data.batch_size": 16,
        "eval.every_steps": 60, "ckpt.every_steps": 60, "model.num_layers": 2,
        "model.dropout_rate": 0.0, "train.peak_flops_per_device": 1e12})
    workdir = str(tmp_path / "electra")
    result = train.run(config, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    first = next(r for r in records if r["split"] == "train")
    assert result["loss"] < first["loss"] - 0.5, (first, result)  # the generator learns
    # A masked token is replaced unless the generator samples the original (rate 0.15 of real
    # tokens are masked): replaced <= 0.15, and more than the generator's misses allow for.
    assert 0.15 * (1 - result["accuracy"]) - 0.05 < result["replaced"] <= 0.16, result
    assert 0.0 < result["rtd_loss"] < 0.7 and 0.0 < result["rtd_accuracy"] <= 1.0, result
    source = pretrained.from_run(workdir, "whitespace")
    encoder = checkpoint.load_params(workdir)["encoder"]
    model = BertForClassification(source.config, 3)
    fresh = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    grafted = pretrained.graft_encoder(fresh, source)
    for a, b in zip(jax.tree_util.tree_leaves(grafted["encoder"]), jax.tree_util.tree_leaves(encoder)):
        np.testing.assert_array_equal(a, b)
