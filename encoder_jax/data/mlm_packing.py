"""MLM input pipelines: shuffle -> tokenize -> concat-then-split packing -> batch -> prefetch.

Packed MLM batches hold, per row of length L:
  ids          int32 (B, L)  token ids, [CLS] doc [SEP] [CLS] doc [SEP] ..., 0 = padding
  segment_ids  int32 (B, L)  1, 2, ... per packed document, 0 = padding
  positions    int32 (B, L)  position inside the document piece, restarting at 0
  word_starts  bool  (B, L)  True where a token begins a word (whole-word masking)
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np

from encoder_jax.data.batching import READ_OPTIONS, pad_rows
from encoder_jax.data.text import Tokenizer

PACKED_FEATURES = ("ids", "word_starts")


class TokenizeDocument(grain.transforms.Map):
    """{"text": str} -> {"ids": [CLS] ids [SEP], "word_starts": bool} (numpy, 1-D)."""

    def __init__(self, tokenizer: Tokenizer, text_field: str = "text", max_tokens: int = 1 << 20):
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.max_tokens = max_tokens

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        ids, starts = self.tokenizer.encode_words(record[self.text_field])
        ids, starts = ids[: self.max_tokens], starts[: self.max_tokens]
        tok = self.tokenizer
        return {"ids": np.asarray([tok.cls_id, *ids, tok.sep_id], np.int32),
                "word_starts": np.asarray([True, *starts, True], bool)}


def _rename_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"ids": packed["ids"].astype(np.int32),
            "segment_ids": packed["ids_segment_ids"].astype(np.int32),
            "positions": packed["ids_positions"].astype(np.int32),
            "word_starts": packed["word_starts"].astype(bool)}


def _pack(dataset: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    packed = grain.experimental.ConcatThenSplitIterDataset(
        dataset, length_struct={name: seq_len for name in PACKED_FEATURES})
    return packed.map(_rename_packed)


def mlm_train_dataset(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                      seed: int, text_field: str = "text", shard_index: int = 0,
                      shard_count: int = 1, workers: int = 0, prefetch: int = 2
                      ) -> grain.IterDataset:
    """Infinite, per-epoch reshuffled stream of this host's `batch_size` rows of each global batch.

    Every host packs the same global stream (all documents, one shuffle) and keeps its own
    rows, so the global batches, and a checkpoint's iterator position, are the same for
    any number of hosts (a run may resume on a different host count). The price: each
    host tokenizes the whole stream. `get_state` / `set_state` resume the exact position.
    """
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    dataset = dataset.map(TokenizeDocument(tokenizer, text_field))
    dataset = _pack(dataset.to_iter_dataset(READ_OPTIONS), seq_len).batch(batch_size * shard_count,
                                                                          drop_remainder=True)
    if shard_count > 1:
        dataset = dataset.map(HostRows(shard_index * batch_size, (shard_index + 1) * batch_size))
    if workers > 0:
        _ensure_absl_flags_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=prefetch))
    return dataset


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside launch.py (notebooks, tests) use defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def mlm_eval_batches(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                     text_field: str = "text", shard_index: int = 0, shard_count: int = 1,
                     max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over the split; the last batch is zero-padded, never dropped.

    Like training, every host packs the whole split and keeps its rows of each global
    batch, so all hosts yield the same number of batches (no host waits on a collective
    the others never join).
    """
    dataset = grain.MapDataset.source(source)
    dataset = dataset.map(TokenizeDocument(tokenizer, text_field)).to_iter_dataset(READ_OPTIONS)
    global_rows = batch_size * shard_count
    dataset = _pack(dataset, seq_len).batch(global_rows, drop_remainder=False)
    take = HostRows(shard_index * batch_size, (shard_index + 1) * batch_size)
    for i, batch in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            return
        yield take(pad_rows(batch, global_rows))


class HostRows:
    """A global batch -> this host's rows [start, stop) (a class: grain workers pickle it)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[self.start:self.stop] for k, v in batch.items()}


def example_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """A batch with the packed train keys, shapes and dtypes (for compiling)."""
    return {"ids": np.zeros((rows, seq_len), np.int32),
            "segment_ids": np.ones((rows, seq_len), np.int32),
            "positions": np.zeros((rows, seq_len), np.int32),
            "word_starts": np.zeros((rows, seq_len), bool)}
