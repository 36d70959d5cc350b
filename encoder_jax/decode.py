"""Autoregressive decoding (greedy and beam search) as pure functions around a logits callback.

Callback contract, `tokens_to_logits(ids_N, cache, index) -> (logits_NxV, new_cache)`:
  ids_N      int32 (N,): the token at position `index` of every row (BOS at index 0); N is
             B for greedy and B*K for beam search (beams folded into the batch axis).
  cache      any pytree. Beam search by default tiles its leaves (row dimension B first) K
             times and reorders them (`gather_beams`) whenever beams are reordered; with
             `reorder_cache` the cache is the caller's (built for B*K hypotheses, any layout)
             and `reorder_cache(cache, parents_BxK)` is all the search does to it.
  index      int32 scalar.
  logits_NxV float32: scores of the token at position index + 1; (V, N) instead with
             `vocab_major=True` (an output layer computed as table @ hidden.T: on XLA:CPU
             that product took 7.3 instead of 11.1 ms per beam-4 step at the Marian shape,
             4.2 instead of 4.7 per greedy step; the searches read the scores column-wise,
             with no transpose).

Both searches run in one `lax.while_loop` (jittable end to end, the callback is traced once)
and return a `DecodeOutput`. With `stage_ends` (increasing positions, the last max_len) they
run one loop per stage instead, stage s over the positions before stage_ends[s], and call
`tokens_to_logits(ids_N, cache, index, s)` with the stage as a static int: a cache kept in
blocks of positions lets each stage read only the blocks filled so far (the callback is
traced once per stage). `max_len` (T) bounds the generated tokens: a hypothesis that
reaches T tokens without EOS is cut there. `max_len_per_row` (int32 (B,), optional) bounds the
generated tokens *including* EOS per row: the step producing token number limit (1-based) may
only produce EOS, so `lengths <= max_len_per_row` and the row always ends with EOS when its
limit is <= T. Limits below 1 act as 1.

Beam search follows flax `examples/wmt/decode.py` (top 2K candidates per step, EOS ones to the
finished set scored with the GNMT length penalty, the top K others stay live, early exit when no
live beam can beat the worst finished one), with two departures, each for a reason:
  * an EOS candidate enters the finished set only if it ranks within the top K of the 2K
    candidates (as HF transformers does), so beam_size=1 with alpha=0 is exactly greedy search;
  * at the end the live beams, scored as if they ended there, are merged with the finished set:
    this fills rows with fewer than K finished hypotheses and lets hypotheses cut at T compete
    on the same objective (an early exit only happens when no live beam can enter the top K).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from encoder_jax.topk import top_k, top_k_columns

TokensToLogits = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
ReorderCache = Callable[[Any, jax.Array], Any]  # (cache, parents_BxK) -> cache
NEG_INF = float("-inf")  # marks empty beam slots and forbidden tokens; never subtracted


# ------------------------------------------------------------------------- small helpers

def length_penalty(length: ArrayLike, alpha: float) -> jax.Array:
    """GNMT length penalty ((5 + length) / 6) ** alpha, elementwise (Wu et al., 2016)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def max_lengths(source_lengths_B: ArrayLike, a: float, b: float, cap: int) -> jax.Array:
    """Per-row generation limit min(cap, a + b * source_length) as int32 (B,)."""
    limits_B = a + b * jnp.asarray(source_lengths_B, jnp.float32)
    return jnp.minimum(cap, limits_B).astype(jnp.int32)


def add_beam_dim(x_NxS: jax.Array, beam_size: int) -> jax.Array:
    """Tiles (N, ...) to (N, K, ...): every beam of a row starts as a copy of the row."""
    x_Nx1xS = jnp.expand_dims(x_NxS, axis=1)
    return jnp.broadcast_to(x_Nx1xS, (x_NxS.shape[0], beam_size) + x_NxS.shape[1:])


def flatten_beam_dim(x_BxKxS: jax.Array) -> jax.Array:
    """Folds the beam axis into the batch axis: (B, K, ...) -> (B*K, ...)."""
    return x_BxKxS.reshape((x_BxKxS.shape[0] * x_BxKxS.shape[1],) + x_BxKxS.shape[2:])


def unflatten_beam_dim(x_NxS: jax.Array, batch_size: int, beam_size: int) -> jax.Array:
    """Unfolds the batch axis: (B*K, ...) -> (B, K, ...)."""
    return x_NxS.reshape((batch_size, beam_size) + x_NxS.shape[1:])


def gather_beams(tree: Any, beam_indices_BxM: jax.Array) -> Any:
    """Picks beams per row: every leaf (B, K_old, ...) -> (B, M, ...) at beam_indices_BxM."""
    rows_Bx1 = jnp.arange(beam_indices_BxM.shape[0])[:, None]
    return jax.tree.map(lambda x_BxKxS: x_BxKxS[rows_Bx1, beam_indices_BxM], tree)


def gather_cache(cache: Any, parents_BxK: jax.Array) -> Any:
    """Reorders the folded cache leaves (B*K, ...) so that beam k continues parents_BxK[:, k]."""
    batch_size, beam_size = parents_BxK.shape

    def gather(x_NxS):
        x_BxKxS = unflatten_beam_dim(x_NxS, batch_size, beam_size)
        return flatten_beam_dim(gather_beams(x_BxKxS, parents_BxK))

    return jax.tree.map(gather, cache)


def _run_stages(cond: Callable[[Any], jax.Array], body: Callable[[Any, TokensToLogits], Any],
                state: Any, tokens_to_logits: Callable, stage_ends: Sequence[int], max_len: int
                ) -> Any:
    """The search loop: without `stage_ends` one `while_loop` over max_len positions; with
    them one per stage, stage s over the positions before stage_ends[s], the callback told
    its stage."""
    if not stage_ends:
        return jax.lax.while_loop(lambda state: (state.index < max_len) & cond(state),
                                  functools.partial(body, callback=tokens_to_logits), state)
    ends = tuple(int(end) for end in stage_ends)
    if ends[-1] != max_len or any(b <= a for a, b in zip((0, *ends), ends)):
        raise ValueError(f"stage_ends={ends}; valid: increasing positions ending at "
                         f"max_len={max_len}")
    for stage, end in enumerate(ends):
        callback = functools.partial(_call_at_stage, tokens_to_logits, stage)
        state = jax.lax.while_loop(lambda state, end=end: (state.index < end) & cond(state),
                                   functools.partial(body, callback=callback), state)
    return state


def _call_at_stage(tokens_to_logits: Callable, stage: int, ids_N: jax.Array, cache: Any,
                   index: jax.Array) -> tuple[jax.Array, Any]:
    return tokens_to_logits(ids_N, cache, index, stage)


def _row_limits(max_len_per_row: ArrayLike | None, batch_size: int, max_len: int) -> jax.Array:
    """int32 (B,) limits on generated tokens incl. EOS; max_len + 1 (never forced) when None."""
    if max_len_per_row is None:
        return jnp.full((batch_size,), max_len + 1, jnp.int32)
    return jnp.maximum(jnp.asarray(max_len_per_row, jnp.int32), 1)


def _log_probs(logits: jax.Array, force_eos_N: jax.Array, eos_id: int, vocab_major: bool
               ) -> jax.Array:
    """float32 log-softmax of logits (N, V), or (V, N) if vocab_major; the hypotheses with
    force_eos_N keep only EOS (their other tokens become -inf)."""
    axis = 0 if vocab_major else 1
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=axis)
    not_eos_V = jnp.arange(logits.shape[axis]) != eos_id
    blocked = (not_eos_V[:, None] & force_eos_N[None, :] if vocab_major
               else force_eos_N[:, None] & not_eos_V[None, :])
    return jnp.where(blocked, NEG_INF, log_probs)


def _best_extensions(logits: jax.Array, force_eos_N: jax.Array, eos_id: int, k: int, group: int,
                     vocab_major: bool, prefix_N: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """The top k of prefix + log-prob over each group of `group` hypotheses' V tokens:
    values and flat indices g * V + token, (N // group, k)."""
    log_probs = _log_probs(logits, force_eos_N, eos_id, vocab_major)
    if vocab_major:
        totals_VxN = log_probs if prefix_N is None else prefix_N[None, :] + log_probs
        return top_k_columns(totals_VxN, k, group)
    totals_NxV = log_probs if prefix_N is None else prefix_N[:, None] + log_probs
    rows, vocab_size = totals_NxV.shape
    return top_k(totals_NxV.reshape(rows // group, group * vocab_size), k)


@flax.struct.dataclass
class DecodeOutput:
    """Decoded hypotheses, best first; K = 1 for greedy search."""

    tokens: jax.Array   # int32 (B, K, T): generated tokens after BOS, EOS included, 0 after it
    scores: jax.Array   # float32 (B, K): beam: sum log-prob / length_penalty; greedy: sum
    lengths: jax.Array  # int32 (B, K): generated tokens incl. EOS (0 for an empty slot)


# ------------------------------------------------------------------------- greedy search

@flax.struct.dataclass
class _GreedyState:
    index: jax.Array        # int32 scalar: position of the token fed next
    seqs_BxT1: jax.Array    # int32 (B, T+1): BOS, then generated tokens, 0 after EOS
    scores_B: jax.Array     # float32: sum of the chosen tokens' log-probs
    lengths_B: jax.Array    # int32: generated tokens incl. EOS
    finished_B: jax.Array   # bool: EOS emitted
    cache: Any


def _greedy_step(state: _GreedyState, tokens_to_logits: TokensToLogits, limits_B: jax.Array,
                 eos_id: int, vocab_major: bool) -> _GreedyState:
    """Feeds the last tokens, appends the argmax (pad once a row has finished)."""
    ids_B = state.seqs_BxT1[:, state.index]
    logits, cache = tokens_to_logits(ids_B, state.cache, state.index)
    best_log_prob_Bx1, best_Bx1 = _best_extensions(  # the argmax: first of ties
        logits, state.index + 1 >= limits_B, eos_id, 1, 1, vocab_major)
    next_B, next_log_prob_B = best_Bx1[:, 0].astype(jnp.int32), best_log_prob_Bx1[:, 0]
    active_B = ~state.finished_B
    next_B = jnp.where(active_B, next_B, 0)
    return state.replace(
        index=state.index + 1,
        seqs_BxT1=state.seqs_BxT1.at[:, state.index + 1].set(next_B),
        scores_B=state.scores_B + jnp.where(active_B, next_log_prob_B, 0.0),
        lengths_B=state.lengths_B + active_B.astype(jnp.int32),
        finished_B=state.finished_B | (next_B == eos_id),
        cache=cache)


def greedy_search(tokens_to_logits: TokensToLogits, cache: Any, *, batch_size: int, bos_id: int,
                  eos_id: int, max_len: int, max_len_per_row: ArrayLike | None = None,
                  vocab_major: bool = False, stage_ends: Sequence[int] = ()) -> DecodeOutput:
    """Argmax decoding of up to max_len tokens per row; stops once every row has emitted EOS.
    With `vocab_major` the callback returns logits (V, B) instead of (B, V); `stage_ends`
    as in the module docstring."""
    limits_B = _row_limits(max_len_per_row, batch_size, max_len)
    seqs_BxT1 = jnp.zeros((batch_size, max_len + 1), jnp.int32).at[:, 0].set(bos_id)
    state = _GreedyState(
        index=jnp.array(0, jnp.int32), seqs_BxT1=seqs_BxT1,
        scores_B=jnp.zeros((batch_size,), jnp.float32),
        lengths_B=jnp.zeros((batch_size,), jnp.int32),
        finished_B=jnp.zeros((batch_size,), bool), cache=cache)

    def cond(state: _GreedyState) -> jax.Array:
        return ~jnp.all(state.finished_B)

    def body(state: _GreedyState, callback: TokensToLogits) -> _GreedyState:
        return _greedy_step(state, callback, limits_B, eos_id, vocab_major)

    state = _run_stages(cond, body, state, tokens_to_logits, stage_ends, max_len)
    return DecodeOutput(tokens=state.seqs_BxT1[:, None, 1:], scores=state.scores_B[:, None],
                        lengths=state.lengths_B[:, None])


# --------------------------------------------------------------------------- beam search

@flax.struct.dataclass
class _BeamState:
    index: jax.Array                 # int32 scalar: tokens generated by every live beam so far
    live_log_probs_BxK: jax.Array    # float32: sum of log-probs, sorted; -inf = empty slot
    live_seqs_BxKxT1: jax.Array      # int32: BOS, then the beam's tokens (never EOS)
    finished_scores_BxK: jax.Array   # float32: length-penalised, sorted; -inf = empty slot
    finished_seqs_BxKxT1: jax.Array  # int32: BOS, tokens, EOS, then 0
    finished_lengths_BxK: jax.Array  # int32: generated tokens incl. EOS
    cache: Any                       # leaves (B*K, ...), beam k of row b at b*K + k


def _init_beam_state(cache: Any, batch_size: int, beam_size: int, bos_id: int,
                     max_len: int, tile_cache: bool) -> _BeamState:
    """One live beam per row (the others empty, so step 0 does not pick K copies of a token)."""
    first_K = jnp.where(jnp.arange(beam_size) == 0, 0.0, NEG_INF).astype(jnp.float32)
    seqs_BxKxT1 = jnp.zeros((batch_size, beam_size, max_len + 1), jnp.int32)
    return _BeamState(
        index=jnp.array(0, jnp.int32),
        live_log_probs_BxK=jnp.broadcast_to(first_K, (batch_size, beam_size)),
        live_seqs_BxKxT1=seqs_BxKxT1.at[:, :, 0].set(bos_id),
        finished_scores_BxK=jnp.full((batch_size, beam_size), NEG_INF, jnp.float32),
        finished_seqs_BxKxT1=seqs_BxKxT1,
        finished_lengths_BxK=jnp.zeros((batch_size, beam_size), jnp.int32),
        cache=(jax.tree.map(lambda x: flatten_beam_dim(add_beam_dim(x, beam_size)), cache)
               if tile_cache else cache))


def _top_candidates(state: _BeamState, tokens_to_logits: TokensToLogits, limits_B: jax.Array,
                    eos_id: int, vocab_major: bool
                    ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """Top 2K (beam, token) extensions per row: (log_probs_BxC, parents_BxC, tokens_BxC, cache)."""
    beam_size = state.live_log_probs_BxK.shape[1]
    ids_N = flatten_beam_dim(state.live_seqs_BxKxT1[:, :, state.index])
    logits, cache = tokens_to_logits(ids_N, state.cache, state.index)
    vocab_size = logits.shape[0 if vocab_major else 1]
    force_N = jnp.repeat(state.index + 1 >= limits_B, beam_size)
    count = min(2 * beam_size, beam_size * vocab_size)
    live_N = flatten_beam_dim(state.live_log_probs_BxK)
    log_probs_BxC, flat_BxC = _best_extensions(logits, force_N, eos_id, count, beam_size,
                                               vocab_major, live_N)
    return log_probs_BxC, flat_BxC // vocab_size, flat_BxC % vocab_size, cache


def _merge_finished(state: _BeamState, scores_BxC: jax.Array, seqs_BxCxT1: jax.Array,
                    lengths_BxC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top K of the finished set and new hypotheses; old ones first so ties keep them."""
    beam_size = state.finished_scores_BxK.shape[1]
    scores_BxM = jnp.concatenate([state.finished_scores_BxK, scores_BxC], axis=1)
    seqs_BxMxT1 = jnp.concatenate([state.finished_seqs_BxKxT1, seqs_BxCxT1], axis=1)
    lengths_BxM = jnp.concatenate([state.finished_lengths_BxK, lengths_BxC], axis=1)
    scores_BxK, keep_BxK = jax.lax.top_k(scores_BxM, beam_size)
    seqs_BxKxT1, lengths_BxK = gather_beams((seqs_BxMxT1, lengths_BxM), keep_BxK)
    return scores_BxK, seqs_BxKxT1, lengths_BxK


def _beam_step(state: _BeamState, tokens_to_logits: TokensToLogits, limits_B: jax.Array,
               eos_id: int, alpha: float, reorder_cache: ReorderCache, vocab_major: bool
               ) -> _BeamState:
    """One token for every live beam: EOS candidates to the finished set, the best K stay live."""
    batch_size, beam_size = state.live_log_probs_BxK.shape
    log_probs_BxC, parents_BxC, tokens_BxC, cache = _top_candidates(
        state, tokens_to_logits, limits_B, eos_id, vocab_major)
    seqs_BxCxT1 = gather_beams(state.live_seqs_BxKxT1, parents_BxC)
    seqs_BxCxT1 = seqs_BxCxT1.at[:, :, state.index + 1].set(tokens_BxC)
    is_eos_BxC = tokens_BxC == eos_id
    # Only EOS candidates ranked within the top K finish (see the module docstring).
    in_top_k_C = jnp.arange(tokens_BxC.shape[1]) < beam_size
    ends_BxC = is_eos_BxC & in_top_k_C[None, :]
    ended_BxC = log_probs_BxC / length_penalty(state.index + 1, alpha)
    finished = _merge_finished(state, jnp.where(ends_BxC, ended_BxC, NEG_INF), seqs_BxCxT1,
                               jnp.full_like(tokens_BxC, state.index + 1))
    live_log_probs_BxK, keep_BxK = jax.lax.top_k(
        jnp.where(is_eos_BxC, NEG_INF, log_probs_BxC), beam_size)
    parents_BxK = jnp.take_along_axis(parents_BxC, keep_BxK, axis=1)
    return state.replace(
        index=state.index + 1,
        live_log_probs_BxK=live_log_probs_BxK,
        live_seqs_BxKxT1=gather_beams(seqs_BxCxT1, keep_BxK),
        finished_scores_BxK=finished[0], finished_seqs_BxKxT1=finished[1],
        finished_lengths_BxK=finished[2],
        cache=reorder_cache(cache, parents_BxK))


def _rows_done(state: _BeamState, limits_B: jax.Array, max_len: int, alpha: float) -> jax.Array:
    """bool (B,): no live beam can beat the worst finished hypothesis (true if none is live)."""
    final_B = jnp.minimum(limits_B, max_len)
    # Log-probs only fall as a beam grows, so its best score is its log-prob over the largest
    # penalty it can still get: penalties are monotonic in length, the lengths it can end at
    # lie in [index, final] (index itself when the loop stops and it is scored as ended).
    best_penalty_B = jnp.maximum(length_penalty(state.index, alpha),
                                 length_penalty(final_B, alpha))
    best_live_B = jnp.max(state.live_log_probs_BxK, axis=1) / best_penalty_B
    worst_finished_B = jnp.min(state.finished_scores_BxK, axis=1)
    return worst_finished_B >= best_live_B


def _final_hypotheses(state: _BeamState, alpha: float) -> DecodeOutput:
    """Live beams scored as if ended merged into the finished set; empty slots zeroed."""
    live_scores_BxK = state.live_log_probs_BxK / length_penalty(state.index, alpha)
    live_lengths_BxK = jnp.full_like(state.finished_lengths_BxK, state.index)
    scores_BxK, seqs_BxKxT1, lengths_BxK = _merge_finished(
        state, live_scores_BxK, state.live_seqs_BxKxT1, live_lengths_BxK)
    valid_BxK = jnp.isfinite(scores_BxK)
    return DecodeOutput(tokens=jnp.where(valid_BxK[:, :, None], seqs_BxKxT1[:, :, 1:], 0),
                        scores=scores_BxK, lengths=jnp.where(valid_BxK, lengths_BxK, 0))


def beam_search(tokens_to_logits: TokensToLogits, cache: Any, *, batch_size: int, beam_size: int,
                bos_id: int, eos_id: int, max_len: int, alpha: float = 0.6,
                max_len_per_row: ArrayLike | None = None,
                reorder_cache: ReorderCache | None = None, vocab_major: bool = False,
                stage_ends: Sequence[int] = ()) -> DecodeOutput:
    """The beam_size best hypotheses per row under sum log-prob / length_penalty(length, alpha).

    Without `reorder_cache`, `cache` leaves have the batch dimension B first and the callback
    sees them tiled to B*K rows, gathered whenever beams are reordered. With it, the cache is
    built by the caller for the B*K hypotheses and reordered only by
    `reorder_cache(cache, parents_BxK)` (beam k continues parents_BxK[:, k]), e.g. by
    reordering a small table of ancestors instead of every key and value.
    A row with fewer than K possible hypotheses gets empty slots: score -inf, tokens and
    length 0. With `vocab_major` the callback returns logits (V, B*K) instead of (B*K, V);
    `stage_ends` as in the module docstring.
    """
    limits_B = _row_limits(max_len_per_row, batch_size, max_len)
    state = _init_beam_state(cache, batch_size, beam_size, bos_id, max_len,
                             tile_cache=reorder_cache is None)
    reorder_cache = reorder_cache or gather_cache

    def cond(state: _BeamState) -> jax.Array:
        return ~jnp.all(_rows_done(state, limits_B, max_len, alpha))

    def body(state: _BeamState, callback: TokensToLogits) -> _BeamState:
        return _beam_step(state, callback, limits_B, eos_id, alpha, reorder_cache, vocab_major)

    state = _run_stages(cond, body, state, tokens_to_logits, stage_ends, max_len)
    return _final_hypotheses(state, alpha)
