"""The encoder-decoder model: causality, masks that do not leak, the decode cache, weight tying."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from encoder_jax import decode
from encoder_jax.decoder_block import ColumnDense, step_kernels
from encoder_jax.layers import EncoderConfig
from encoder_jax.seq2seq import EncoderDecoder, Seq2SeqConfig, block_ends, reorder_beam_cache


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
    # output biases are zero at init: random ones, so that a bias lost or added twice shows
    rng = np.random.default_rng(1)
    decoder = {**params["decoder"]}
    decoder["output_bias"] = jnp.asarray(rng.normal(size=decoder["output_bias"].shape), jnp.float32)
    if not tie:
        layer = decoder["output"]
        decoder["output"] = {**layer, "bias": jnp.asarray(rng.normal(size=layer["bias"].shape),
                                                          jnp.float32)}
    params = {**params, "decoder": decoder}
    variables = {"params": params}
    full = model.apply(variables, source, target)
    encoded = model.apply(variables, source, method=EncoderDecoder.encode)
    cache = model.apply(variables, source.shape[0], 8, method=EncoderDecoder.init_cache)
    source_cache = model.apply(variables, encoded, method=EncoderDecoder.source_cache)
    seg = (source != 0).astype(jnp.int32)
    step = jax.jit(lambda ids, cache, i, vocab_major: model.apply(
        variables, ids, cache, i, source_cache, seg, vocab_major,
        method=EncoderDecoder.decode_step), static_argnums=3)
    steps = []
    for i in range(target.shape[1]):
        vocab_major_VxN, _ = step(target[:, i], cache, jnp.asarray(i), True)
        logits, cache = step(target[:, i], cache, jnp.asarray(i), False)
        steps.append(logits)
        np.testing.assert_allclose(vocab_major_VxN.T, logits, atol=1e-5)  # (V, N) layout
    assert float(jnp.abs(jnp.stack(steps, 1) - full).max()) <= 1e-5



def test_column_dense_on_step_kernels_is_dense_general_on_rows_transposed(seq2seq):
    """The step's product kernel (out..., in...) @ columns equals DenseGeneral's rows @ kernel,
    for a query-like (D -> N, H) and an out-like (N, H -> D) layer, biases included."""
    cfg = EncoderConfig(vocab_size=10, hidden_dim=8, num_layers=1, num_heads=2, mlp_dim=16)
    x_RxD = jax.random.normal(jax.random.key(0), (5, 8))
    for features, axis, x in (((2, 4), -1, x_RxD), ((8,), (-2, -1), x_RxD.reshape(5, 2, 4))):
        dense = nn.DenseGeneral(features, axis=axis)
        params = dense.init(jax.random.key(1), x)["params"]
        params = {**params, "bias": jax.random.normal(jax.random.key(2), params["bias"].shape)}
        inputs = x.ndim - 1
        kernel = params["kernel"]
        kernel_OxI = jnp.transpose(kernel, (*range(inputs, kernel.ndim), *range(inputs)))
        columns = ColumnDense(features, cfg).apply({"params": {"bias": params["bias"]}},
                                                   jnp.moveaxis(x, 0, -1), kernel_OxI)
        np.testing.assert_allclose(jnp.moveaxis(columns, -1, 0),
                                   dense.apply({"params": params}, x), atol=1e-5)
    # step_kernels lays out every projection of a block that way: (out..., in...)
    _, params, _, _ = seq2seq
    block = params["decoder"]["block_0"]
    laid_out = step_kernels(block)
    assert laid_out["self_attention"]["out"].shape == (32, 4, 8)     # (D, N, H)
    assert laid_out["self_attention"]["query"].shape == (4, 8, 32)   # (N, H, D)
    np.testing.assert_array_equal(laid_out["mlp"]["wi"], block["mlp"]["wi"]["kernel"].T)
    np.testing.assert_array_equal(laid_out["cross_attention"]["out"],
                                  jnp.transpose(block["cross_attention"]["out"]["kernel"], (2, 0, 1)))


def _decode_steps(model, variables, cache, source_cache, seg, tokens_NxT, start=0):
    """Feeds tokens_NxT[:, i] at positions start + i; returns (last logits, cache).

    The step is jitted (the index is traced), so each cache shape compiles once instead of
    every layer's ops dispatching one by one."""
    step = jax.jit(lambda v, ids, c, index, sc, sg: model.apply(
        v, ids, c, index, sc, sg, method=EncoderDecoder.decode_step))
    for i in range(tokens_NxT.shape[1]):
        logits, cache = step(variables, tokens_NxT[:, i], cache, jnp.asarray(start + i),
                             source_cache, seg)
    return logits, cache


def test_beams_in_one_cache_equal_independent_rows_and_follow_their_reordered_parents():
    model, params, source, _ = make(False, True, True, (50, 40))
    variables, beams, batch = {"params": params}, 3, source.shape[0]
    seg = (source != 0).astype(jnp.int32)
    encoded = model.apply(variables, source, method=EncoderDecoder.encode)
    shared = model.apply(variables, encoded, method=EncoderDecoder.source_cache)
    tiled = model.apply(variables, jnp.repeat(encoded, beams, axis=0),
                        method=EncoderDecoder.source_cache)
    tiled_seg = jnp.repeat(seg, beams, axis=0)
    rows = batch * beams
    tokens = (jnp.arange(rows * 4, dtype=jnp.int32).reshape(rows, 4) * 7) % 35 + 4  # beams differ

    def as_rows(tokens_NxT):  # every hypothesis its own row: the reference
        cache = model.apply(variables, rows, 8, method=EncoderDecoder.init_cache)
        return _decode_steps(model, variables, cache, tiled, tiled_seg, tokens_NxT)[0]

    cache = model.apply(variables, batch, 8, beams, method=EncoderDecoder.init_cache)
    logits, cache = _decode_steps(model, variables, cache, shared, seg, tokens[:, :3])
    assert logits.shape == (rows, 40)
    np.testing.assert_allclose(logits, as_rows(tokens[:, :3]), atol=1e-5)
    assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-3  # beams did differ
    # Beam k of row b now continues beam parents[b, k]: its history is the parent's tokens.
    parents = jnp.array([[2, 2, 0], [1, 0, 1], [0, 2, 1]], jnp.int32)
    cache = reorder_beam_cache(cache, parents)
    logits, _ = _decode_steps(model, variables, cache, shared, seg, tokens[:, 3:], start=3)
    flat_parents = (jnp.arange(batch)[:, None] * beams + parents).reshape(-1)
    history = jnp.concatenate([tokens[flat_parents, :3], tokens[:, 3:]], axis=1)
    np.testing.assert_allclose(logits, as_rows(history), atol=1e-5)


def test_beam_search_on_the_ancestor_cache_equals_gathering_every_key_and_value():
    model, params, source, _ = make(False, True, True, (50, 40))
    variables, beams, batch = {"params": params}, 3, source.shape[0]
    params = {**params, "decoder": {**params["decoder"],  # make EOS (3) likely: beams end early
                                    "output_bias": params["decoder"]["output_bias"].at[3].add(2.0)}}
    variables = {"params": params}
    seg = (source != 0).astype(jnp.int32)
    encoded = model.apply(variables, source, method=EncoderDecoder.encode)
    search = dict(batch_size=batch, beam_size=beams, bos_id=2, eos_id=3, max_len=7, alpha=0.6)

    def step_fn(source_cache, source_seg):
        return lambda ids, cache, i: model.apply(variables, ids, cache, i, source_cache, source_seg,
                                                 method=EncoderDecoder.decode_step)

    shared = model.apply(variables, encoded, method=EncoderDecoder.source_cache)
    ancestors = decode.beam_search(
        step_fn(shared, seg), model.apply(variables, batch, 7, beams, method=EncoderDecoder.init_cache),
        reorder_cache=reorder_beam_cache, **search)
    # The generic path: one-hypothesis caches of B rows, tiled to B*K and gathered at every step.
    tiled = model.apply(variables, jnp.repeat(encoded, beams, axis=0),
                        method=EncoderDecoder.source_cache)
    gathered = decode.beam_search(
        step_fn(tiled, jnp.repeat(seg, beams, axis=0)),
        model.apply(variables, batch, 7, method=EncoderDecoder.init_cache), **search)
    # The cache in 3 blocks of positions, one search loop per block (as translate_batch).
    staged = decode.beam_search(
        lambda ids, cache, i, stage: model.apply(variables, ids, cache, i, shared, seg, False,
                                                 stage, method=EncoderDecoder.decode_step),
        model.apply(variables, batch, 7, beams, 3, method=EncoderDecoder.init_cache),
        reorder_cache=reorder_beam_cache, stage_ends=block_ends(7, 3), **search)
    for other in (gathered, staged):
        np.testing.assert_array_equal(ancestors.tokens, other.tokens)
        np.testing.assert_array_equal(ancestors.lengths, other.lengths)
        np.testing.assert_allclose(ancestors.scores, other.scores, atol=1e-5)
    assert len({tuple(np.asarray(t)) for t in ancestors.tokens[0]}) == beams  # distinct beams


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


@pytest.mark.parametrize("beam_size,tie,cache_blocks", [(1, True, 1), (4, True, 3), (4, False, 1)])
def test_translate_batch_exports_with_a_symbolic_batch_on_the_blocked_top_k_path(beam_size, tie,
                                                                                 cache_blocks):
    """A 4,096-token vocabulary takes topk's blocked path (vocabulary-major logits when the
    output is tied, (N, V) when not); jax.export must accept it with a symbolic batch (the
    deployment artifact) and agree with the jitted call, also with the decode cache in
    blocks (one search loop each), and with step kernels laid out once outside the call."""
    from jax import export

    from encoder_jax import topk
    from encoder_jax.seq2seq import decode_kernels
    from encoder_jax.tasks import translate

    model, params, source, _ = make(share=True, tie=tie, vocab=(4096, 4096))
    assert topk.block_size(4096, 2 * beam_size, copies=beam_size) is not None

    def run(params, ids, seg, kernels=None):
        out = translate.translate_batch(
            model, params, {"source_ids": ids, "source_segment_ids": seg}, beam_size=beam_size,
            alpha=0.6, max_len=6, max_len_a=5, max_len_b=1.2, bos_id=2, eos_id=3,
            cache_blocks=cache_blocks, kernels=kernels)
        return out.tokens, out.scores

    batch, length = export.symbolic_shape("b, l", constraints=["l <= 16"])
    rows = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    exported = export.export(jax.jit(run))(params, rows, rows)
    seg = (source != 0).astype(jnp.int32)
    expected = jax.jit(run)(params, source, seg)
    for got, want in zip(exported.call(params, source, seg), expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    if beam_size == 1:  # one case: the kernels' layout does not depend on the search
        kernels = decode_kernels(params)
        assert set(kernels) == {f"block_{i}" for i in range(model.config.decoder.num_layers)}
        for got, want in zip(jax.jit(run)(params, source, seg, kernels), expected):
            np.testing.assert_array_equal(got, want)


def test_a_cache_in_blocks_read_stage_by_stage_equals_the_full_forward_pass():
    model, params, source, target = make(False, True, True, (50, 40))
    variables = {"params": params}
    full = model.apply(variables, source, target)
    encoded = model.apply(variables, source, method=EncoderDecoder.encode)
    source_cache = model.apply(variables, encoded, method=EncoderDecoder.source_cache)
    seg = (source != 0).astype(jnp.int32)
    ends = block_ends(target.shape[1], 3)
    assert ends == (2, 4, 6) and block_ends(5, 9) == (1, 2, 3, 4, 5)
    cache = model.apply(variables, source.shape[0], target.shape[1], 1, 3,
                        method=EncoderDecoder.init_cache)
    assert [k.shape[-1] for k in cache["block_0"]["key"]] == [2, 2, 2]
    assert [v.shape[-2] for v in cache["block_0"]["value"]] == [2, 2, 2]
    step = jax.jit(lambda ids, cache, i, stage: model.apply(
        variables, ids, cache, i, source_cache, seg, True, stage,
        method=EncoderDecoder.decode_step), static_argnums=3)
    steps = []
    for i in range(target.shape[1]):
        stage = next(s for s, end in enumerate(ends) if i < end)
        before = cache
        logits_VxN, cache = step(target[:, i], cache, jnp.asarray(i), stage)
        steps.append(logits_VxN.T)
        for name in ("key", "value"):  # a step writes its own block only
            for j, (old, new) in enumerate(zip(before["block_1"][name], cache["block_1"][name])):
                assert bool(jnp.any(old != new)) == (j == stage), (i, name, j)
    assert float(jnp.abs(jnp.stack(steps, 1) - full).max()) <= 1e-5


def test_remat_mlp_keeps_params_loss_and_gradients_and_recomputes_the_activation():
    """remat="mlp" (encoder and decoder feed-forwards): the same parameter tree, loss and
    gradients as no remat, and the backward pass holds fewer (B, L, F) activations."""
    model, params, source, target = make()
    cfg = model.config
    remat = EncoderDecoder(dataclasses.replace(
        cfg, encoder=dataclasses.replace(cfg.encoder, remat="mlp")))
    assert remat.config.decoder.remat == "mlp"
    assert jax.tree_util.tree_structure(remat.init(jax.random.key(0), source, target)["params"]) \
        == jax.tree_util.tree_structure(params)

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, source, target, deterministic=False,
                                          rngs={"dropout": jax.random.key(3)}) ** 2)

    (base_loss, base_grads), (remat_loss, remat_grads) = (
        jax.jit(jax.value_and_grad(loss(m)))(params) for m in (model, remat))
    np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           remat_grads, base_grads)

    def saved_hidden_activations(m):  # residuals of the forward pass with the feed-forward width
        _, vjp = jax.jit(lambda p: jax.vjp(loss(m), p))(params)
        return sum(x.ndim == 3 and x.shape[-1] == cfg.encoder.mlp_dim
                   for x in jax.tree_util.tree_leaves(vjp))

    assert saved_hidden_activations(remat) < saved_hidden_activations(model)
