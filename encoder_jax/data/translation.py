"""Translation data: sentence-pair sources, encoding, token-budget train and ordered eval batches.

Every split is read as records `{"source": str, "target": str}`: local csv/tsv(.gz)
files go through the local-files TFDS builder of `sources` (columns by header
name or 0-based index; the Tatoeba layout english<TAB>chinese<TAB>attribution
reads zh->en as columns 1 -> 0), a TFDS catalog dataset (wmt19_translate/zh-en,
records {"zh", "en"}) through `catalog_sources` with its fields renamed, or the
built-in offline demo `zh_en_numbers`.

A pair encodes as source_ids = [ids..., EOS], target_in = [BOS, ids...] and
target_out = [ids..., EOS] (target_in shifted left by one), with BOS the
tokenizer's [CLS] id and EOS its [SEP] id. Training drops pairs longer than
data.max_len on either side and pairs with an empty side (`fits`); evaluation
keeps every pair, cutting long ones to max_len (EOS kept).

Train batches are cut by a token budget (`batching.TokenBudgetBatches`, like
fairseq's max_tokens): R rows padded to one of a few lengths L, R x L <= max_tokens,
R a multiple of data.batch_multiple. Source and target share L. Keys:
  source_ids          int32   (R, L)  [ids..., EOS], 0 = padding
  target_in           int32   (R, L)  [BOS, ids...], 0 = padding
  target_out          int32   (R, L)  [ids..., EOS], 0 = padding
  source_segment_ids  int32   (R, L)  1 for real source tokens, 0 for padding
  target_segment_ids  int32   (R, L)  1 for real target tokens, 0 for padding
  weight              float32 (R,)    1 for a real row, 0 for a padding row
  index               int32   (R,)    position of the pair in its split, -1 for a padding row
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from encoder_jax import configs
from encoder_jax.data import batching, sources, zh_en_numbers
from encoder_jax.data.sources import DataError
from encoder_jax.data.text import Tokenizer

log = logging.getLogger("encoder_jax")

BUILTIN_DATASETS = ("zh_en_numbers",)  # written by `data.zh_en_numbers`
SEQUENCE_KEYS = ("source_ids", "target_in", "target_out")
SEGMENT_KEYS = {"source_segment_ids": "source_ids", "target_segment_ids": "target_in"}
BATCH_KEYS = (*SEQUENCE_KEYS, *SEGMENT_KEYS, "weight", "index")
_BATCH_LAYOUT = dict(sequence_keys=SEQUENCE_KEYS, scalar_keys=(), segment_keys=SEGMENT_KEYS)

# ----------------------------------------------------------------------------- sources


class PairSource:
    """A catalog split (random access) whose records are renamed to {"source", "target"}."""

    def __init__(self, source, source_field: str, target_field: str):
        self._source, self.name = source, getattr(source, "name", repr(source))
        self.fields = {"source": source_field, "target": target_field}

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, str]:
        record = self._source[index]
        missing = [f for f in self.fields.values() if f not in record]
        if missing:
            raise DataError(f"{self.name}: records have no field {missing[0]!r} (data.source_field / "
                            f"data.target_field); fields: {sorted(record)}")
        return {key: record[field] for key, field in self.fields.items()}

    def __repr__(self) -> str:
        return f"PairSource({self.name}, {self.fields})"


def open_pair_splits(data_cfg, data_dir: str | None) -> dict[str, Any]:
    """{'train', 'validation'} random-access sources of {"source", "target"} records.

    data.files.train set -> local csv/tsv(.gz); else data.name is the built-in
    zh_en_numbers or a TFDS catalog name. `data_cfg`: a `configs.TranslationDataConfig`.
    """
    data_cfg = configs.section(configs.TranslationDataConfig, data_cfg, "data")
    data_dir = data_dir or data_cfg.data_dir or sources.default_data_dir()
    train_files = sources.expand_files(data_cfg.files.train, "data.files.train")
    valid_files = sources.expand_files(data_cfg.files.validation, "data.files.validation")
    file_format, has_header = data_cfg.format or "auto", data_cfg.has_header
    columns = {"source": data_cfg.source_column, "target": data_cfg.target_column}
    if not train_files and data_cfg.name in BUILTIN_DATASETS:
        paths = zh_en_numbers.write_files(os.path.join(data_dir, "builtin"))
        train_files, valid_files = [paths["train"]], [paths["validation"]]
        file_format, has_header, columns = "tsv", False, {"source": 1, "target": 0}
    elif not train_files and data_cfg.name:
        raw = sources.catalog_sources(data_cfg.name, {"train": data_cfg.train_split,
                                                      "validation": data_cfg.eval_split}, data_dir)
        splits = {split: PairSource(src, data_cfg.source_field, data_cfg.target_field)
                  for split, src in raw.items()}
    elif not train_files:
        raise DataError(f"set data.files.train (csv/tsv, .gz ok) or data.name (built-in: "
                        f"{list(BUILTIN_DATASETS)}, or a TFDS catalog name such as "
                        f"wmt19_translate/zh-en)")
    if train_files:
        if not valid_files:
            raise DataError("data.files.validation is not set: give held-out pairs for evaluation")
        if file_format == "auto":  # Tatoeba's cmn.txt is tab-separated
            file_format = "csv" if train_files[0].removesuffix(".gz").endswith(".csv") else "tsv"
        if file_format not in ("csv", "tsv"):
            raise DataError(f"data.format={file_format!r}; translation reads: ['auto', 'csv', 'tsv']")
        spec = sources.LocalFilesSpec(splits={"train": train_files, "validation": valid_files},
                                      file_format=file_format, columns=columns, has_header=has_header)
        splits = sources.local_files_sources(spec, data_dir)
    for split, src in splits.items():
        if len(src) == 0:
            raise DataError(f"the {split} split of {getattr(src, 'name', src)} holds no pairs")
        src[0]  # fails now, naming the fields, if the records lack source_field / target_field
    return splits


# ----------------------------------------------------------------------------- encoding


def encode_pair(source_tokenizer: Tokenizer, target_tokenizer: Tokenizer, record: dict[str, Any],
                max_len: int | None = None) -> dict[str, np.ndarray]:
    """{"source", "target"} -> source_ids [ids..., EOS], target_in [BOS, ids...], target_out
    [ids..., EOS] (int32); BOS = [CLS], EOS = [SEP]. With `max_len`, a longer side is cut
    to max_len tokens, keeping EOS; without, nothing is cut."""
    source = source_tokenizer.encode(str(record["source"]).strip())
    target = target_tokenizer.encode(str(record["target"]).strip())
    bos, eos = target_tokenizer.cls_id, target_tokenizer.sep_id
    example = {"source_ids": np.asarray([*source, source_tokenizer.sep_id], np.int32),
               "target_in": np.asarray([bos, *target], np.int32),
               "target_out": np.asarray([*target, eos], np.int32)}
    return example if max_len is None else _cut(example, max_len)


def _cut(example: dict[str, Any], max_len: int) -> dict[str, Any]:
    """Each side cut to max_len tokens, EOS kept (target_in stays target_out shifted by one)."""
    keep_eos = lambda ids: ids if len(ids) <= max_len else np.append(ids[:max_len - 1], ids[-1])
    return {**example, "source_ids": keep_eos(example["source_ids"]),
            "target_in": example["target_in"][:max_len], "target_out": keep_eos(example["target_out"])}


def fits(example: dict[str, Any], max_len: int) -> bool:
    """Whether a pair trains: both sides hold text (an empty side encodes to EOS alone) and
    neither is longer than max_len tokens incl. BOS/EOS."""
    return 1 < len(example["source_ids"]) <= max_len and 1 < len(example["target_out"]) <= max_len


class EncodePair(grain.transforms.MapWithIndex):
    """(index, record) -> `encode_pair(...)` plus "index", the position in the split (the stream
    index modulo `split_size`, so a repeated stream still names the pair). Drops nothing."""

    def __init__(self, source_tokenizer: Tokenizer, target_tokenizer: Tokenizer,
                 max_len: int | None = None, split_size: int | None = None):
        self.tokenizers = (source_tokenizer, target_tokenizer)
        self.max_len, self.split_size = max_len, split_size

    def map_with_index(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        example = encode_pair(*self.tokenizers, record, self.max_len)
        example["index"] = index % self.split_size if self.split_size else index
        return example


def count_too_long(source, tokenizers: Sequence[Tokenizer], max_len: int, limit: int = 200_000
                   ) -> tuple[int, int]:
    """(dropped, checked): of up to `limit` evenly spaced pairs, those training drops
    (longer than max_len, or an empty side)."""
    indices = range(0, len(source), max(1, -(-len(source) // limit)))
    dropped = sum(not fits(encode_pair(*tokenizers, source[i]), max_len) for i in indices)
    return dropped, len(indices)


def train_dataset(source, source_tokenizer: Tokenizer, target_tokenizer: Tokenizer, cfg, *,
                  seed: int, shard_index: int = 0, shard_count: int = 1,
                  epochs: int | None = None) -> grain.IterDataset:
    """Per-epoch reshuffled stream of this host's token-budget batches; `epochs` None: forever.

    Pairs `fits` rejects are dropped. Every host cuts the same global batches and keeps
    its rows, so all hosts agree on each batch's shape. Its iterator state is checkpointable.
    `cfg`: a `configs.TranslationDataConfig`.
    """
    cfg = configs.section(configs.TranslationDataConfig, cfg, "data")
    if cfg.max_len < 2 or cfg.max_tokens < 1 or cfg.window < 1:
        raise DataError(f"data.max_len={cfg.max_len} (>= 2), data.max_tokens={cfg.max_tokens} and "
                        f"data.window={cfg.window} (>= 1) are too small")
    pad_lengths = batching.make_pad_lengths(cfg.pad_lengths, cfg.max_len)
    budget = batching.TokenBudgetBatches(cfg.max_tokens, cfg.batch_multiple, pad_lengths,
                                         cfg.window, seed, shard_index, shard_count, **_BATCH_LAYOUT)
    dataset = grain.MapDataset.source(source)
    if cfg.max_train_examples:
        dataset = dataset[:cfg.max_train_examples]
    # Encoding before the shuffle gives it the pair's own index (plus epoch x size), lazily.
    encode = EncodePair(source_tokenizer, target_tokenizer, split_size=len(dataset))
    dataset = dataset.map_with_index(encode).shuffle(seed=seed).repeat(epochs)
    dataset = dataset.to_iter_dataset(batching.READ_OPTIONS)
    dataset = dataset.filter(functools.partial(fits, max_len=cfg.max_len))
    dataset = grain.experimental.FlatMapIterDataset(dataset.batch(cfg.window, batch_fn=list), budget)
    if cfg.workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.workers, per_worker_buffer_size=cfg.prefetch))
    return dataset


def eval_examples(source, tokenizers: Sequence[Tokenizer], max_len: int, limit: int | None = None
                  ) -> list[dict[str, Any]]:
    """The split's first `limit` (None: all) pairs encoded in order, longer sides cut to
    max_len (EOS kept, one counted warning); empty lines are kept: they need a hypothesis too."""
    examples, cut = [], {"source": 0, "target": 0}
    for i in range(len(source) if limit is None else min(limit, len(source))):
        example = encode_pair(*tokenizers, source[i])
        cut["source"] += len(example["source_ids"]) > max_len
        cut["target"] += len(example["target_in"]) > max_len
        examples.append({**_cut(example, max_len), "index": i})
    if cut["source"] or cut["target"]:
        log.warning("%s: cut %d sources and %d targets of %d pairs to data.max_len=%d tokens",
                    getattr(source, "name", "eval"), cut["source"], cut["target"], len(examples),
                    max_len)
    return examples


def eval_batches(examples: Sequence[dict[str, Any]], *, global_batch_rows: int,
                 pad_lengths: Sequence[int], shard_index: int = 0, shard_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """One ordered, length-sorted pass of `global_batch_rows`-row batches (train keys); the
    last batch is padded with weight-0 rows."""
    return batching.eval_batches(examples, global_batch=global_batch_rows, pad_lengths=pad_lengths,
                                 shard_index=shard_index, shard_count=shard_count, **_BATCH_LAYOUT)


def example_batch(rows: int, length: int) -> dict[str, np.ndarray]:
    """A zero batch with the train keys, shapes and dtypes (for compiling)."""
    batch = {key: np.zeros((rows, length), np.int32) for key in (*SEQUENCE_KEYS, *SEGMENT_KEYS)}
    return {**batch, "weight": np.zeros(rows, np.float32), "index": np.zeros(rows, np.int32)}


def read_source_lines(path: str) -> list[str]:
    """One source sentence per line of a UTF-8 (.gz ok) file, for prediction; empty lines kept."""
    return [line.rstrip("\r\n") for line in sources.checked_lines(path)]
