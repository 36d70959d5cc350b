"""Task-independent batching: padded lengths, padded rows, length-grouped train and ordered eval batches.

An example is a dict of 1-D int sequences (`sequence_keys`, e.g. ids and
type_ids), int scalars (`scalar_keys`, e.g. label) and its position `index`.
`pad_examples` stacks examples into B rows padded to the smallest allowed
length that fits, adding `segment_ids` (1 for real tokens) and `weight` (1 for a
real row, 0 for a padding row); a padding row's index is -1.

Training batches are length-grouped: a window of `group` global batches is
sorted by length and cut into batches whose order is then shuffled, so rows in a
batch have similar lengths and little padding. The window is a grain FlatMap,
so the iterator state (and a resumed run) stays exact. Every host reads the
same global batch and keeps its rows, padded to the global batch's length.
`TokenBudgetBatches` instead fills each batch up to a token budget (rows x
padded length), with more rows for shorter lengths (translation).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from encoder_jax.data.sources import DataError

SEQUENCE_KEYS = ("ids", "type_ids")  # int32 (B, L), 0 = padding
SCALAR_KEYS = ("label",)  # int32 (B,), clipped at 0 (a missing label, -1, reads as 0)

# grain's default (16 threads, 500 elements ahead) suits remote disks. Its iterator polls the
# ready part of that buffer at every element, CPU that the step needs: for THUCNews titles,
# that and tokenizing every epoch cost 10x what encoded records streamed without threads do
# (benchmarks/input_pipeline.py). Two threads keep tokenizing off the step's path.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
IN_MEMORY_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def make_pad_lengths(requested: Sequence[int] | None, max_len: int) -> tuple[int, ...]:
    """Sorted allowed lengths <= max_len, always ending at max_len."""
    lengths = sorted({int(n) for n in (requested or ()) if 0 < int(n) < max_len} | {max_len})
    return tuple(lengths)


def example_length(example: dict[str, Any], sequence_keys: Sequence[str] = SEQUENCE_KEYS) -> int:
    """The longest of an example's sequences."""
    return max(len(example[key]) for key in sequence_keys)


def pad_examples(examples: Sequence[dict[str, Any]], rows: int, pad_lengths: Sequence[int], *,
                 sequence_keys: Sequence[str] = SEQUENCE_KEYS,
                 scalar_keys: Sequence[str] = SCALAR_KEYS,
                 segment_keys: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Stacks examples into a batch of `rows` rows padded to the smallest fitting length.

    Keys, in order: sequence_keys, the segment keys (`segment_keys` maps each to the
    sequence it marks; default {"segment_ids": the first sequence key}), scalar_keys,
    weight, index.
    """
    longest = max((example_length(e, sequence_keys) for e in examples), default=0)
    length = next((n for n in pad_lengths if n >= longest), None)
    if length is None:
        raise DataError(f"an encoded row has {longest} tokens, more than data.max_len={pad_lengths[-1]}")
    segments = dict(segment_keys or {"segment_ids": sequence_keys[0]})
    batch = {key: np.zeros((rows, length), np.int32) for key in (*sequence_keys, *segments)}
    batch.update({key: np.zeros(rows, np.int32) for key in scalar_keys})
    batch.update(weight=np.zeros(rows, np.float32), index=np.full(rows, -1, np.int32))
    for row, e in enumerate(examples):
        for key in sequence_keys:
            batch[key][row, :len(e[key])] = e[key]
        for key, marked in segments.items():
            batch[key][row, :len(e[marked])] = 1
        for key in scalar_keys:
            batch[key][row] = max(int(e[key]), 0)
        batch["weight"][row] = 1.0
        batch["index"][row] = e["index"]
    return batch


def pad_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads the leading axis with zero rows (segment 0 = padding, so they are ignored)."""
    missing = batch_size - len(next(iter(batch.values())))
    if missing <= 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _lengths_fitting(global_len: int, pad_lengths: Sequence[int]) -> list[int]:
    """The allowed lengths that hold a global batch whose longest row has `global_len` tokens."""
    return [n for n in pad_lengths if n >= global_len] or [pad_lengths[-1]]


class LengthGroupedBatches(grain.experimental.FlatMapTransform):
    """A window of `group` global batches -> this host's rows of each, length-sorted, shuffled.

    Deterministic in the window's content, so grain's FlatMap iterator resumes exactly.
    """

    def __init__(self, global_batch: int, group: int, pad_lengths: Sequence[int], seed: int,
                 shard_index: int = 0, shard_count: int = 1, *,
                 sequence_keys: Sequence[str] = SEQUENCE_KEYS,
                 scalar_keys: Sequence[str] = SCALAR_KEYS):
        self.max_fan_out = group
        self.global_batch, self.group = global_batch, group
        self.pad_lengths, self.seed = tuple(pad_lengths), seed
        self.rows = global_batch // shard_count
        self.shard_index = shard_index
        self.sequence_keys, self.scalar_keys = tuple(sequence_keys), tuple(scalar_keys)

    def flat_map(self, window: Sequence[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        lengths = [example_length(e, self.sequence_keys) for e in window]
        order = sorted(range(len(window)), key=lambda i: (lengths[i], window[i]["index"]))
        chunks = [order[k:k + self.global_batch] for k in range(0, len(order), self.global_batch)]
        chunks = [c for c in chunks if len(c) == self.global_batch]
        first = min(int(e["index"]) for e in window)
        np.random.default_rng([self.seed, first]).shuffle(chunks)
        lo = self.shard_index * self.rows
        return [self._host_rows(window, lengths, chunk, lo) for chunk in chunks]

    def _host_rows(self, window, lengths, chunk, lo):
        # Every host pads to the global batch's length, so the global array has one shape.
        fitting = _lengths_fitting(max(lengths[i] for i in chunk), self.pad_lengths)
        return pad_examples([window[i] for i in chunk[lo:lo + self.rows]], self.rows, fitting,
                            sequence_keys=self.sequence_keys, scalar_keys=self.scalar_keys)


def eval_batches(examples: Sequence[dict[str, Any]], *, global_batch: int,
                 pad_lengths: Sequence[int], shard_index: int = 0, shard_count: int = 1,
                 sequence_keys: Sequence[str] = SEQUENCE_KEYS,
                 scalar_keys: Sequence[str] = SCALAR_KEYS,
                 segment_keys: Mapping[str, str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One pass, length-sorted; the last batch is padded with weight-0 rows, never dropped."""
    if global_batch % shard_count:
        raise DataError(f"eval.batch_size={global_batch} must divide by the process count {shard_count}")
    rows = global_batch // shard_count
    lengths = [example_length(e, sequence_keys) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), global_batch):
        chunk = order[start:start + global_batch]
        fitting = _lengths_fitting(max(lengths[i] for i in chunk), pad_lengths)
        # A host whose share of the last batch is empty yields padding rows only.
        host = [examples[i] for i in chunk[shard_index * rows:(shard_index + 1) * rows]]
        yield pad_examples(host, rows, fitting, sequence_keys=sequence_keys, scalar_keys=scalar_keys,
                           segment_keys=segment_keys)


def budget_rows(length: int, max_tokens: int, multiple: int) -> int:
    """Rows of a token-budget batch padded to `length`: rows x length <= max_tokens, in
    multiples of `multiple` (at least one multiple, even past the budget)."""
    return max(multiple, (max_tokens // length) // multiple * multiple)


class TokenBudgetBatches(grain.experimental.FlatMapTransform):
    """A window of examples -> this host's rows of token-budget batches, length-bucketed, shuffled.

    Like fairseq's max_tokens: the window is sorted by length, each example goes to
    the smallest pad length L holding its longest sequence, and each bucket is cut
    into global batches of `budget_rows(L)` rows; a bucket's last batch is filled
    up with weight-0 rows so that shapes stay static. The window's batches are
    shuffled from (seed, its first example's index, its size), so grain's FlatMap
    iterator resumes exactly. Every host cuts the same global batches and keeps
    its `rows // shard_count` rows.
    """

    def __init__(self, max_tokens: int, batch_multiple: int, pad_lengths: Sequence[int],
                 window: int, seed: int, shard_index: int = 0, shard_count: int = 1, *,
                 sequence_keys: Sequence[str] = SEQUENCE_KEYS,
                 scalar_keys: Sequence[str] = SCALAR_KEYS,
                 segment_keys: Mapping[str, str] | None = None):
        if batch_multiple <= 0 or batch_multiple % shard_count:
            raise DataError(f"data.batch_multiple={batch_multiple} must be a positive multiple of "
                            f"the process count {shard_count}")
        self.pad_lengths, self.seed = tuple(pad_lengths), seed
        self.rows = {n: budget_rows(n, max_tokens, batch_multiple) for n in self.pad_lengths}
        # The most batches a window can make: all of it in the longest bucket, plus one
        # partly filled batch per bucket.
        self.max_fan_out = -(-window // self.rows[self.pad_lengths[-1]]) + len(self.pad_lengths)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.keys = dict(sequence_keys=tuple(sequence_keys), scalar_keys=tuple(scalar_keys),
                         segment_keys=segment_keys)

    def flat_map(self, window: Sequence[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        lengths = [example_length(e, self.keys["sequence_keys"]) for e in window]
        buckets: dict[int, list[int]] = {}
        for i in sorted(range(len(window)), key=lambda i: (lengths[i], int(window[i]["index"]), i)):
            buckets.setdefault(_lengths_fitting(lengths[i], self.pad_lengths)[0], []).append(i)
        chunks = [(n, order[k:k + self.rows[n]]) for n, order in sorted(buckets.items())
                  for k in range(0, len(order), self.rows[n])]
        if window:
            np.random.default_rng([self.seed, int(window[0]["index"]), len(window)]).shuffle(chunks)
        return [self._host_rows(window, length, chunk) for length, chunk in chunks]

    def _host_rows(self, window, length, chunk):
        rows = self.rows[length] // self.shard_count
        host = chunk[self.shard_index * rows:(self.shard_index + 1) * rows]
        return pad_examples([window[i] for i in host], rows, (length,), **self.keys)
