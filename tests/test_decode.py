"""Greedy and beam search (encoder_jax.decode) on tiny hand-built scoring models.

The scoring model is a second-order Markov table, logits[position, token before the previous,
previous token, next token], built with a fixed numpy seed. The callback reads the token before
the previous one from its cache, so a cache that is tiled or reordered wrongly changes the
scores. With V = 4 (pad, two words, EOS) and T = 3 every output sequence can be enumerated, so
beam search wide enough to be exhaustive must return the brute-force ranking.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax import decode, topk

PAD = BOS = 0
SUPPRESSED = -1e9  # logit of token 0: BOS / pad is never generated, so 0 in an output is pad


# ------------------------------------------------------------------------------ models

def markov_table(seed: int, max_len: int, vocab_size: int, eos_id: int,
                 eos_bias: float = 0.0) -> np.ndarray:
    """float32 (T, V, V, V) logits[position, before previous, previous, next]; pad suppressed."""
    rng = np.random.RandomState(seed)
    table = rng.normal(scale=2.0, size=(max_len,) + (vocab_size,) * 3).astype(np.float32)
    table[..., PAD] = SUPPRESSED
    table[..., eos_id] += eos_bias
    return table


def markov_model(table: np.ndarray):
    """tokens_to_logits over the table; the cache carries the previous input token per row."""
    table = jnp.asarray(table)

    def tokens_to_logits(ids_N, cache, index):
        logits_NxV = table[index][cache["prev"], ids_N]
        return logits_NxV, {"prev": ids_N}

    return tokens_to_logits


def markov_cache(contexts_B) -> dict:
    """Initial cache: the fake 'token before BOS' of each row (makes the rows differ)."""
    return {"prev": jnp.asarray(contexts_B, jnp.int32)}


def sequence_log_prob(table: np.ndarray, context: int, tokens) -> float:
    """Sum of the tokens' log-probs under the table, in float64."""
    before, previous, total = context, BOS, 0.0
    for position, token in enumerate(tokens):
        logits_V = table[position, before, previous].astype(np.float64)
        log_probs_V = logits_V - np.logaddexp.reduce(logits_V)
        total += log_probs_V[token]
        before, previous = previous, token
    return total


def penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def all_outputs(max_len: int, words, eos_id: int):
    """Every output: n < T words then EOS, or T words cut at T."""
    for n in range(max_len):
        for prefix in itertools.product(words, repeat=n):
            yield prefix + (eos_id,)
    yield from itertools.product(words, repeat=max_len)


def brute_force_ranking(table, context, alpha, eos_id):
    """[(score, tokens)] best first under sum log-prob / penalty(length incl. EOS)."""
    max_len, vocab_size = table.shape[0], table.shape[-1]
    words = [t for t in range(vocab_size) if t not in (PAD, eos_id)]
    scored = [(sequence_log_prob(table, context, s) / penalty(len(s), alpha), s)
              for s in all_outputs(max_len, words, eos_id)]
    return sorted(scored, key=lambda pair: -pair[0])


def padded(tokens, max_len: int) -> list[int]:
    return list(tokens) + [PAD] * (max_len - len(tokens))


# Small model (brute force) and a random bigger one.
SMALL = dict(vocab_size=4, eos_id=3, max_len=3)
SMALL_TABLE = markov_table(0, SMALL["max_len"], SMALL["vocab_size"], SMALL["eos_id"])
SMALL_CONTEXTS = (0, 2, 1)  # B = 3 does not divide K = 15: a mis-tiled cache shows
RANDOM = dict(vocab_size=11, eos_id=10, max_len=6)
RANDOM_TABLE = markov_table(1, RANDOM["max_len"], RANDOM["vocab_size"], RANDOM["eos_id"],
                            eos_bias=1.0)
RANDOM_CONTEXTS = (0, 3, 7)


def run_greedy(table, contexts, **kwargs) -> decode.DecodeOutput:
    return decode.greedy_search(markov_model(table), markov_cache(contexts),
                                batch_size=len(contexts), bos_id=BOS, **kwargs)


def run_beam(table, contexts, **kwargs) -> decode.DecodeOutput:
    return decode.beam_search(markov_model(table), markov_cache(contexts),
                              batch_size=len(contexts), bos_id=BOS, **kwargs)


def check_well_formed(out: decode.DecodeOutput, eos_id: int, max_len: int) -> None:
    """Shapes, dtypes; each hypothesis: words, then EOS (counted in length) or a cut, then pad."""
    tokens = np.asarray(out.tokens)
    assert tokens.dtype == np.int32 and out.lengths.dtype == jnp.int32
    assert out.scores.dtype == jnp.float32
    assert tokens.shape[2] == max_len and out.scores.shape == out.lengths.shape == tokens.shape[:2]
    assert np.all(np.diff(np.asarray(out.scores), axis=1) <= 0), "scores not sorted best first"
    for row, length in zip(tokens.reshape(-1, max_len), np.asarray(out.lengths).reshape(-1)):
        assert 1 <= length <= max_len
        assert np.all(row[length:] == PAD) and np.all(row[:length] != PAD)
        assert not np.any(row[:length - 1] == eos_id)
        assert row[length - 1] == eos_id or length == max_len


def check_scores(out, table, contexts, alpha) -> None:
    """Scores recomputed from the returned tokens (alpha None: greedy's plain sum)."""
    for b, context in enumerate(contexts):
        for k in range(out.tokens.shape[1]):
            length = int(out.lengths[b, k])
            tokens = np.asarray(out.tokens[b, k, :length])
            expected = sequence_log_prob(table, context, tokens)
            if alpha is not None:
                expected /= penalty(length, alpha)
            np.testing.assert_allclose(float(out.scores[b, k]), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("length,alpha", [(1, 0.6), (3, 0.6), (7, 1.0), (10, 0.2), (4, 2.5)])
def test_length_penalty_matches_the_gnmt_formula(length, alpha):
    expected = ((5.0 + length) / 6.0) ** alpha
    np.testing.assert_allclose(float(decode.length_penalty(length, alpha)), expected, rtol=1e-6)


def test_length_penalty_works_on_arrays_and_is_one_without_alpha():
    lengths = jnp.array([1, 2, 5, 40], jnp.int32)
    np.testing.assert_allclose(decode.length_penalty(lengths, 0.6),
                               ((5.0 + np.array([1, 2, 5, 40])) / 6.0) ** 0.6, rtol=1e-6)
    np.testing.assert_array_equal(decode.length_penalty(lengths, 0.0), np.ones(4))


def test_max_lengths_is_a_plus_b_times_source_length_capped():
    limits = decode.max_lengths(jnp.array([0, 3, 10]), a=2, b=1.5, cap=12)
    assert limits.dtype == jnp.int32
    np.testing.assert_array_equal(limits, [2, 6, 12])


def test_beam_helpers_fold_tile_and_gather():
    x_BxS = jnp.arange(6).reshape(2, 3)
    tiled_BxKxS = decode.add_beam_dim(x_BxS, 2)
    assert tiled_BxKxS.shape == (2, 2, 3)
    np.testing.assert_array_equal(tiled_BxKxS[:, 1], x_BxS)
    folded_NxS = decode.flatten_beam_dim(tiled_BxKxS)
    np.testing.assert_array_equal(folded_NxS, [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
    np.testing.assert_array_equal(decode.unflatten_beam_dim(folded_NxS, 2, 2), tiled_BxKxS)
    beams_BxKxS = jnp.arange(12).reshape(2, 2, 3)
    picked = decode.gather_beams({"a": beams_BxKxS}, jnp.array([[1, 1, 0], [0, 1, 1]]))
    np.testing.assert_array_equal(picked["a"][0], beams_BxKxS[0, jnp.array([1, 1, 0])])
    np.testing.assert_array_equal(picked["a"][1], beams_BxKxS[1, jnp.array([0, 1, 1])])


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_exhaustive_beam_search_returns_the_brute_force_ranking(alpha):
    rankings = [brute_force_ranking(SMALL_TABLE, c, alpha, SMALL["eos_id"])
                for c in SMALL_CONTEXTS]
    orders = {tuple(s for _, s in ranking) for ranking in rankings}
    assert len(orders) == len(rankings), "the rows' rankings should differ"
    beam_size = len(rankings[0])  # 15 sequences: wide enough to keep every one of them
    out = run_beam(SMALL_TABLE, SMALL_CONTEXTS, beam_size=beam_size, alpha=alpha, **{
        k: SMALL[k] for k in ("eos_id", "max_len")})
    check_well_formed(out, SMALL["eos_id"], SMALL["max_len"])
    for b, ranking in enumerate(rankings):
        expected_tokens = [padded(s, SMALL["max_len"]) for _, s in ranking]
        np.testing.assert_array_equal(out.tokens[b], expected_tokens)
        np.testing.assert_array_equal(out.lengths[b], [len(s) for _, s in ranking])
        np.testing.assert_allclose(out.scores[b], [score for score, _ in ranking],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table,contexts,config", [(SMALL_TABLE, SMALL_CONTEXTS, SMALL),
                                                   (RANDOM_TABLE, RANDOM_CONTEXTS, RANDOM)],
                         ids=["markov", "random"])
def test_beam_size_one_is_greedy(table, contexts, config):
    kwargs = dict(eos_id=config["eos_id"], max_len=config["max_len"])
    greedy = run_greedy(table, contexts, **kwargs)
    beam = run_beam(table, contexts, beam_size=1, alpha=0.0, **kwargs)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_array_equal(beam.lengths, greedy.lengths)
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-6)
    check_well_formed(greedy, config["eos_id"], config["max_len"])
    check_scores(greedy, table, contexts, alpha=None)


def test_random_model_outputs_are_well_formed_and_scored():
    out = run_beam(RANDOM_TABLE, RANDOM_CONTEXTS, beam_size=3, alpha=0.6,
                   eos_id=RANDOM["eos_id"], max_len=RANDOM["max_len"])
    assert out.tokens.shape == (3, 3, RANDOM["max_len"])
    lengths = np.asarray(out.lengths)
    assert lengths.min() < RANDOM["max_len"] and lengths.max() == RANDOM["max_len"], (
        "the model should give both early EOS and cut hypotheses")
    check_well_formed(out, RANDOM["eos_id"], RANDOM["max_len"])
    check_scores(out, RANDOM_TABLE, RANDOM_CONTEXTS, alpha=0.6)


NO_EOS_TABLE = markov_table(2, RANDOM["max_len"], RANDOM["vocab_size"], RANDOM["eos_id"],
                            eos_bias=-20.0)  # EOS only when forced


def test_max_len_per_row_forces_eos_in_greedy_search():
    kwargs = dict(eos_id=RANDOM["eos_id"], max_len=RANDOM["max_len"])
    free = run_greedy(NO_EOS_TABLE, RANDOM_CONTEXTS, **kwargs)
    np.testing.assert_array_equal(free.lengths[:, 0], [6, 6, 6])
    limits = jnp.array([1, 3, 8], jnp.int32)  # 8 > T: row 2 is cut at T
    out = run_greedy(NO_EOS_TABLE, RANDOM_CONTEXTS, max_len_per_row=limits, **kwargs)
    check_well_formed(out, **kwargs)
    check_scores(out, NO_EOS_TABLE, RANDOM_CONTEXTS, alpha=None)
    np.testing.assert_array_equal(out.lengths[:, 0], [1, 3, 6])
    assert out.tokens[0, 0, 0] == RANDOM["eos_id"] and out.tokens[1, 0, 2] == RANDOM["eos_id"]
    np.testing.assert_array_equal(out.tokens[1, 0, :2], free.tokens[1, 0, :2])
    np.testing.assert_array_equal(out.tokens[2], free.tokens[2])


def test_max_len_per_row_forces_eos_on_every_beam():
    kwargs = dict(eos_id=RANDOM["eos_id"], max_len=RANDOM["max_len"])
    limits = jnp.array([2, 4, 8], jnp.int32)
    out = run_beam(NO_EOS_TABLE, RANDOM_CONTEXTS, beam_size=3, alpha=0.6,
                   max_len_per_row=limits, **kwargs)
    check_well_formed(out, **kwargs)
    check_scores(out, NO_EOS_TABLE, RANDOM_CONTEXTS, alpha=0.6)
    np.testing.assert_array_equal(out.lengths, [[2] * 3, [4] * 3, [6] * 3])
    np.testing.assert_array_equal(out.tokens[0, :, 1], [RANDOM["eos_id"]] * 3)
    np.testing.assert_array_equal(out.tokens[1, :, 3], [RANDOM["eos_id"]] * 3)
    assert not np.any(np.asarray(out.tokens[2]) == RANDOM["eos_id"])


def test_rows_with_fewer_than_k_hypotheses_get_empty_slots():
    limits = jnp.array([1, 6], jnp.int32)  # row 0 can only say EOS
    out = run_beam(NO_EOS_TABLE, (0, 3), beam_size=3, eos_id=RANDOM["eos_id"],
                   max_len=RANDOM["max_len"], max_len_per_row=limits)
    np.testing.assert_array_equal(out.lengths[0], [1, 0, 0])
    assert np.isfinite(out.scores[0, 0]) and np.all(np.isneginf(out.scores[0, 1:]))
    np.testing.assert_array_equal(out.tokens[0], [[RANDOM["eos_id"]] + [PAD] * 5] + [[PAD] * 6] * 2)
    assert np.all(np.isfinite(out.scores[1]))


SEARCHES = {
    "greedy": decode.greedy_search,
    "beam": functools.partial(decode.beam_search, beam_size=3, alpha=0.6),
}


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_search_runs_under_jit_and_traces_the_callback_once(name):
    search, model, calls = SEARCHES[name], markov_model(RANDOM_TABLE), []

    def counting_model(ids_N, cache, index):
        calls.append(index)
        return model(ids_N, cache, index)

    limits = jnp.array([3, 6, 5], jnp.int32)
    kwargs = dict(batch_size=3, bos_id=BOS, eos_id=RANDOM["eos_id"], max_len=RANDOM["max_len"],
                  max_len_per_row=limits)
    cache = markov_cache(RANDOM_CONTEXTS)
    eager = search(counting_model, cache, **kwargs)
    calls.clear()
    jitted = jax.jit(lambda cache: search(counting_model, cache, **kwargs))
    first, second = jitted(cache), jitted(cache)
    assert len(calls) == 1, "the callback must be traced once: no Python loop per token"
    for out in (first, second):
        np.testing.assert_array_equal(out.tokens, eager.tokens)
        np.testing.assert_array_equal(out.lengths, eager.lengths)
        np.testing.assert_allclose(out.scores, eager.scores, rtol=1e-6)


def test_searches_stop_early_once_no_row_can_improve():
    vocab_size, eos_id, steps = 5, 4, []
    logits_V = jnp.array([SUPPRESSED, 0.0, 0.0, 0.0, 10.0], jnp.float32)  # EOS nearly certain

    def tokens_to_logits(ids_N, cache, index):
        jax.debug.callback(lambda i: steps.append(int(i)), index)
        return jnp.broadcast_to(logits_V, (ids_N.shape[0], vocab_size)), cache

    cache = {"dummy": jnp.zeros((2, 3), jnp.float32)}  # a leaf with a trailing dimension
    kwargs = dict(batch_size=2, bos_id=BOS, eos_id=eos_id, max_len=8)
    greedy = decode.greedy_search(tokens_to_logits, cache, **kwargs)
    jax.effects_barrier()
    assert steps == [0], "greedy stops once every row has emitted EOS"
    np.testing.assert_array_equal(greedy.lengths, [[1], [1]])
    steps.clear()
    beam = decode.beam_search(tokens_to_logits, cache, beam_size=2, alpha=0.6, **kwargs)
    jax.effects_barrier()
    # After step 1 the finished set holds [EOS] and [word, EOS] (~ -10 / 1.10), while the best
    # live beam (two words, ~ -20) can reach at most -20 / penalty(8) ~ -12.6.
    assert steps == [0, 1], "beam search exits once no live beam can beat the finished ones"
    np.testing.assert_array_equal(beam.lengths, [[1, 2], [1, 2]])


def scripted_model(log_probs_TxV: np.ndarray):
    """tokens_to_logits whose log-probs depend only on the position (same for every row)."""
    table_TxV = jnp.asarray(log_probs_TxV, jnp.float32)

    def tokens_to_logits(ids_N, cache, index):
        return jnp.broadcast_to(table_TxV[index], (ids_N.shape[0], table_TxV.shape[1])), cache

    return tokens_to_logits


def test_beam_size_one_keeps_to_greedy_when_a_runner_up_eos_would_score_better():
    # Step 0: word 0.55, EOS 0.45; then EOS 0.4 (each word 0.3). Greedy ends [word, EOS]
    # (log 0.22 ~ -1.5), worse than [EOS] (log 0.45 ~ -0.8): an EOS ranked below the beam
    # must not finish, or beam_size=1 would return [EOS].
    eos_id, words = 3, np.log([1e-30, 0.55, 1e-30, 0.45])
    later = np.log([1e-30, 0.3, 0.3, 0.4])
    model = scripted_model(np.stack([words, later, later]))
    cache = {"dummy": jnp.zeros((1,), jnp.float32)}
    kwargs = dict(batch_size=1, bos_id=BOS, eos_id=eos_id, max_len=3)
    greedy = decode.greedy_search(model, cache, **kwargs)
    assert float(greedy.scores[0, 0]) < np.log(0.45), "the runner-up EOS would win"
    beam = decode.beam_search(model, cache, beam_size=1, alpha=0.0, **kwargs)
    np.testing.assert_array_equal(greedy.tokens[0, 0], [1, eos_id, PAD])
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-6)


def test_early_exit_bound_allows_for_the_length_penalty():
    # [EOS] scores log 0.6 ~ -0.51; the word path has log 0.4 ~ -0.92 and then costs nothing, so
    # cut at T = 8 it scores -0.92 / penalty(8) ~ -0.42 and wins; an exit after step 0 misses it.
    eos_id, max_len, alpha = 3, 8, 1.0
    first = np.log([1e-30, 0.4, 1e-30, 0.6])
    later = np.log([1e-30, 1.0 - 2e-9, 1e-9, 1e-9])
    model = scripted_model(np.stack([first] + [later] * (max_len - 1)))
    cache = {"dummy": jnp.zeros((1, 2), jnp.float32)}
    out = decode.beam_search(model, cache, batch_size=1, beam_size=1, alpha=alpha, bos_id=BOS,
                             eos_id=eos_id, max_len=max_len)
    np.testing.assert_array_equal(out.tokens[0, 0], [1] * max_len)
    np.testing.assert_allclose(out.scores[0, 0], np.log(0.4) / penalty(max_len, alpha), rtol=1e-5)


# ------------------------------------------------------------------------------- top_k

@pytest.mark.parametrize("case", ["normal", "ties", "mostly_neg_inf"])
def test_blocked_top_k_equals_lax_top_k(case):
    rng = np.random.RandomState(3)
    x = rng.normal(size=(3, 2, 8192)).astype(np.float32)
    if case == "ties":  # few distinct values: the order among equals must be lax.top_k's
        x = np.round(x * 2) / 2
    if case == "mostly_neg_inf":  # fewer than k finite values in some rows
        x[rng.rand(*x.shape) < 0.9995] = -np.inf
        x[0, 0] = -np.inf
    assert topk.block_size(8192, 8) == 128, "this test must take the blocked path"
    values, indices = jax.jit(topk.top_k, static_argnums=1)(jnp.asarray(x), 8)
    expected_values, expected_indices = jax.lax.top_k(jnp.asarray(x), 8)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)


def test_blocked_top_k_block_sizes_and_fallbacks():
    assert topk.block_size(4 * 32000, 8) == 128  # beam 4 x a 32k vocabulary
    assert topk.block_size(1000, 8) is None  # short: lax.top_k as is
    assert topk.block_size(8191, 8) is None  # prime: no block size divides it
    assert topk.block_size(4096, 64) is None  # too few blocks for k
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 8191)).astype(np.float32))
    for got, expected in zip(topk.top_k(x, 5), jax.lax.top_k(x, 5)):
        np.testing.assert_array_equal(got, expected)


def factorized_model(vocab: int, max_len: int, seed: int, vocab_major: bool = False):
    """tokens_to_logits of a low-rank bigram model plus a per-position shift, for vocabularies
    too large for `markov_table`; logits (N, V), or (V, N) if vocab_major."""
    rng = np.random.RandomState(seed)
    embed_VxE = jnp.asarray(rng.normal(size=(vocab, 8)).astype(np.float32))
    out_ExV = jnp.asarray(rng.normal(scale=2.0, size=(8, vocab)).astype(np.float32))
    shift_TxV = jnp.asarray(rng.normal(size=(max_len, vocab)).astype(np.float32))

    def tokens_to_logits(ids_N, cache, index):
        logits_NxV = (embed_VxE[(ids_N + cache["prev"]) % vocab] @ out_ExV
                      + shift_TxV[index][None, :])
        return (logits_NxV.T if vocab_major else logits_NxV), {"prev": ids_N}

    return tokens_to_logits


def test_searches_over_a_large_vocabulary_are_unchanged_by_the_blocked_top_k(monkeypatch):
    vocab, eos_id, max_len = 2048, 5, 5  # greedy: V = 2048, beam: K * V = 8192: the blocked path
    tokens_to_logits = factorized_model(vocab, max_len, seed=4)

    def run():
        kwargs = dict(batch_size=3, bos_id=BOS, eos_id=eos_id, max_len=max_len)
        return (decode.greedy_search(tokens_to_logits, markov_cache((0, 7, 9)), **kwargs),
                decode.beam_search(tokens_to_logits, markov_cache((0, 7, 9)), beam_size=4,
                                   alpha=0.6, **kwargs))

    assert topk.block_size(vocab, 1) is not None and topk.block_size(4 * vocab, 8) is not None
    blocked = run()
    monkeypatch.setattr(decode, "top_k", jax.lax.top_k)
    plain = run()
    for got, expected in zip(blocked, plain):
        for field in ("tokens", "scores", "lengths"):
            np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    first_logits_NxV, _ = tokens_to_logits(jnp.full((3,), BOS), markov_cache((0, 7, 9)), 0)
    np.testing.assert_array_equal(  # lax.top_k's k = 1 is the argmax
        plain[0].tokens[:, 0, 0], jnp.argmax(first_logits_NxV, axis=-1))


@pytest.mark.parametrize("group,k,case", [(1, 1, "normal"), (4, 8, "normal"), (4, 8, "ties"),
                                          (3, 6, "mostly_neg_inf"), (4, 8, "short")])
def test_top_k_columns_equals_lax_top_k_of_the_transpose(group, k, case):
    rng = np.random.RandomState(5)
    x = rng.normal(size=(500 if case == "short" else 2048, 4 * group)).astype(np.float32)
    if case == "ties":
        x = np.round(x * 2) / 2
    if case == "mostly_neg_inf":
        x[rng.rand(*x.shape) < 0.999] = -np.inf
    blocked = topk.block_size(x.shape[0], k, copies=group) is not None
    assert blocked == (case != "short"), "the cases must cover both paths"
    values, indices = jax.jit(topk.top_k_columns, static_argnums=(1, 2))(jnp.asarray(x), k, group)
    rows = x.shape[1] // group
    expected_values, expected_indices = jax.lax.top_k(jnp.asarray(x.T.reshape(rows, -1)), k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)


@pytest.mark.parametrize("vocab", [11, 2048])  # lax.top_k / the blocked path
def test_searches_read_vocab_major_logits_as_the_transposed_ones(vocab):
    eos_id, max_len = 5, 5
    model = functools.partial(factorized_model, vocab, max_len, 6)

    kwargs = dict(batch_size=3, bos_id=BOS, eos_id=eos_id, max_len=max_len,
                  max_len_per_row=jnp.array([2, 5, 9], jnp.int32))  # forced EOS too
    for search in (decode.greedy_search,
                   functools.partial(decode.beam_search, beam_size=4, alpha=0.6)):
        plain = search(model(False), markov_cache((0, 7, 9)), **kwargs)
        vocab_major = search(model(True), markov_cache((0, 7, 9)), vocab_major=True, **kwargs)
        np.testing.assert_array_equal(vocab_major.tokens, plain.tokens)
        np.testing.assert_array_equal(vocab_major.lengths, plain.lengths)
        np.testing.assert_allclose(vocab_major.scores, plain.scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_staged_searches_equal_one_loop_and_tell_each_step_its_stage(name):
    search, model, seen = SEARCHES[name], markov_model(RANDOM_TABLE), []

    def staged_model(ids_N, cache, index, stage):
        jax.debug.callback(lambda i, s=stage: seen.append((int(i), s)), index)
        return model(ids_N, cache, index)

    kwargs = dict(batch_size=3, bos_id=BOS, eos_id=RANDOM["eos_id"], max_len=RANDOM["max_len"],
                  max_len_per_row=jnp.array([3, 6, 5], jnp.int32))
    cache = markov_cache(RANDOM_CONTEXTS)
    one_loop = search(model, cache, **kwargs)
    staged = jax.jit(lambda cache: search(staged_model, cache, stage_ends=(1, 4, 6), **kwargs))(cache)
    jax.effects_barrier()
    for field in ("tokens", "lengths", "scores"):
        np.testing.assert_array_equal(getattr(staged, field), getattr(one_loop, field))
    stage_of = {0: 0, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2}  # positions before 1, 4 and 6
    assert seen and all(stage == stage_of[index] for index, stage in seen), seen
    assert sorted(index for index, _ in seen) == list(range(len(seen)))  # each position once
    for bad in ((2, 5), (3, 3, 6), (4, 2, 6)):
        with pytest.raises(ValueError, match=r"stage_ends=.*ending at max_len=6"):
            search(staged_model, cache, stage_ends=bad, **kwargs)
