"""The encoder-decoder model: causality, masks that do not leak, the decode cache, weight tying."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax.layers import EncoderConfig
from encoder_jax.models import EncoderDecoder, Seq2SeqConfig


def make(share=False, tie=True, pre_norm=True, vocab=(50, 40)):
    encoder = EncoderConfig(vocab_size=vocab[0], hidden_dim=32, num_layers=2, num_heads=4,
                            mlp_dim=64, max_len=32, type_vocab_size=0, pre_norm=pre_norm,
                            use_pooler=False, dropout_rate=0.1, attention_dropout_rate=0.1)
    cfg = Seq2SeqConfig(encoder, vocab[1], decoder_layers=2, max_target_len=16,
                        share_embeddings=share, tie_output=tie)
    model = EncoderDecoder(cfg)
    rng = np.random.default_rng(0)
    source = jnp.asarray(rng.integers(5, min(vocab) - 1, (3, 7)), jnp.int32).at[1, 5:].set(0)
    target = jnp.asarray(rng.integers(5, min(vocab) - 1, (3, 6)), jnp.int32)
    params = model.init(jax.random.key(0), source, target)["params"]
    return model, params, source, target


@pytest.fixture(scope="module")
def seq2seq():
    return make()


def test_changing_a_later_target_token_leaves_earlier_logits_unchanged(seq2seq):
    model, params, source, target = seq2seq
    logits = model.apply({"params": params}, source, target)
    changed = model.apply({"params": params}, source, target.at[:, 4].set(7))
    assert not np.allclose(logits[:, 4:], changed[:, 4:]), "the change must matter from there on"
    np.testing.assert_array_equal(logits[:, :4], changed[:, :4])


def test_source_padding_does_not_leak(seq2seq):
    model, params, source, target = seq2seq
    logits = model.apply({"params": params}, source, target)
    garbage = source.at[1, 5:].set(9)  # padding positions now hold tokens, still marked padding
    seg = (source != 0).astype(jnp.int32)
    again = model.apply({"params": params}, garbage, target, seg)
    np.testing.assert_allclose(logits, again, atol=1e-6)
    longer = jnp.pad(source, ((0, 0), (0, 3)))  # more padding: same translation scores
    np.testing.assert_allclose(logits, model.apply({"params": params}, longer, target), atol=1e-5)


def test_target_padding_does_not_change_real_positions(seq2seq):
    model, params, source, target = seq2seq
    seg = jnp.ones_like(target).at[0, 4:].set(0)
    logits = model.apply({"params": params}, source, target, None, seg)
    other = model.apply({"params": params}, source, target.at[0, 4:].set(3), None, seg)
    np.testing.assert_allclose(logits[0, :4], other[0, :4], atol=1e-6)


@pytest.mark.parametrize("share,tie,pre_norm", [(False, True, True), (True, True, False),
                                                (False, False, True)])
def test_cached_incremental_decoding_equals_the_full_forward_pass(share, tie, pre_norm):
    model, params, source, target = make(share, tie, pre_norm, (50, 50) if share else (50, 40))
    variables = {"params": params}
    full = model.apply(variables, source, target)
    encoded = model.apply(variables, source, method=EncoderDecoder.encode)
    cache = model.apply(variables, source.shape[0], 8, method=EncoderDecoder.init_cache)
    source_cache = model.apply(variables, encoded, method=EncoderDecoder.source_cache)
    seg = (source != 0).astype(jnp.int32)
    step = jax.jit(lambda ids, cache, i: model.apply(variables, ids, cache, i, source_cache, seg,
                                                     method=EncoderDecoder.decode_step))
    steps = []
    for i in range(target.shape[1]):
        logits, cache = step(target[:, i], cache, jnp.asarray(i))
        steps.append(logits)
    assert float(jnp.abs(jnp.stack(steps, 1) - full).max()) <= 1e-5



def test_beams_sharing_one_source_cache_equal_beams_with_a_tiled_source():
    model, params, source, target = make(False, True, True, (50, 40))
    variables, beams = {"params": params}, 3
    rows = source.shape[0] * beams
    seg = (source != 0).astype(jnp.int32)
    encoded = model.apply(variables, source, method=EncoderDecoder.encode)
    shared = model.apply(variables, encoded, method=EncoderDecoder.source_cache)
    tiled = model.apply(variables, jnp.repeat(encoded, beams, axis=0),
                        method=EncoderDecoder.source_cache)
    ids = jnp.arange(rows, dtype=jnp.int32) % 37 + 4  # a different token for every beam
    outputs = []
    for source_cache, source_seg in ((shared, seg), (tiled, jnp.repeat(seg, beams, axis=0))):
        cache = model.apply(variables, rows, 8, method=EncoderDecoder.init_cache)
        for i in range(3):
            logits, cache = model.apply(variables, ids + i, cache, jnp.asarray(i), source_cache,
                                        source_seg, method=EncoderDecoder.decode_step)
        outputs.append(logits)
    assert outputs[0].shape == (rows, 40)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    assert float(jnp.abs(outputs[0][0] - outputs[0][1]).max()) > 1e-3  # beams did differ

def test_weight_tying_and_sharing_decide_the_parameter_tree():
    _, separate, _, _ = make(False, True)
    _, shared, _, _ = make(True, True, vocab=(50, 50))
    _, untied, _, _ = make(False, False)
    assert "token_embed" in separate["decoder"] and "output" not in separate["decoder"]
    assert "token_embed" not in shared["decoder"], "the decoder uses the encoder's table"
    assert "output" in untied["decoder"]
    with pytest.raises(ValueError, match="share_embeddings needs one vocabulary"):
        make(True, True, vocab=(50, 40))


def test_from_config_reads_the_model_section_and_names_unknown_keys():
    cfg = Seq2SeqConfig.from_config({"hidden_dim": 32, "num_heads": 4, "num_layers": 1,
                                     "mlp_dim": 64, "decoder_layers": 3, "pre_norm": True}, 100, 90)
    assert cfg.decoder.num_layers == 3 and cfg.encoder.num_layers == 1
    assert cfg.decoder.vocab_size == 90 and not cfg.encoder.use_pooler
    assert Seq2SeqConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(KeyError, match="unknown config key model.decoder_depth"):
        Seq2SeqConfig.from_config({"decoder_depth": 3}, 100, 90)


def test_dropout_is_active_only_in_training(seq2seq):
    model, params, source, target = seq2seq
    a = model.apply({"params": params}, source, target, deterministic=False,
                    rngs={"dropout": jax.random.key(1)})
    b = model.apply({"params": params}, source, target, deterministic=False,
                    rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply({"params": params}, source, target),
                                  model.apply({"params": params}, source, target))
