"""Text-classification data: sources, the toy dataset, [CLS] a [SEP] (b [SEP]) encoding, train stream.

Every split is read as records `{"text_0": str, ["text_1": str, ...], "label": str | int}`:
local csv/tsv(.gz) files go through the local-files TFDS builder of `sources`
(columns chosen by header name or 0-based index), a TFDS catalog dataset (e.g.
`ag_news_subset`) through `catalog_sources` with its fields renamed. Labels and
their checks live in `encoder_jax.data.labels`.

Batches (padded by `encoder_jax.data.batching`, which also cuts the length-grouped
train and ordered eval batches) hold, for B rows padded to one of a few lengths L
(`pad_lengths`):
  ids          int32   (B, L)  [CLS] a [SEP] (b [SEP]), 0 = padding
  type_ids     int32   (B, L)  0 for [CLS] a [SEP], 1 for b [SEP] (sentence pairs)
  segment_ids  int32   (B, L)  1 for real tokens, 0 for padding
  label        int32   (B,)    class index
  weight       float32 (B,)    1 for a real row, 0 for a padding row (last eval batch)
  index        int32   (B,)    position of the example in its split (eval), or in the stream (train)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
from typing import Any, Sequence

import grain
import numpy as np

from encoder_jax import configs, errors
from encoder_jax.data import batching, sources
from encoder_jax.data.labels import LabelSpace, text_keys
from encoder_jax.data.sources import DataError
from encoder_jax.data.text import Tokenizer


TEXT_MODES = ("join", "pair")
BATCH_KEYS = ("ids", "type_ids", "segment_ids", "label", "weight", "index")


def split_fields(value: Any, field: str) -> list[str]:
    """'title,description' (or a tuple) -> ['title', 'description']; empty is an error."""
    parts = [str(p).strip() for p in (value.split(",") if isinstance(value, str) else value or ())]
    parts = [p for p in parts if p]
    if not parts:
        raise DataError(f"{field} is empty: name at least one column (header name or 0-based index)")
    return parts


# ----------------------------------------------------------------------------- sources


class FieldSource:
    """A random-access source whose records are renamed to text_0.., label (and checked)."""

    def __init__(self, source, text_fields: Sequence[str], label_field: str | None):
        self._source = source
        self.name = getattr(source, "name", repr(source))
        self._fields = {key: f for key, f in zip(text_keys(len(text_fields)), text_fields)}
        if label_field is not None:
            self._fields["label"] = label_field

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        try:
            return {key: record[f] for key, f in self._fields.items()}
        except KeyError as e:
            raise DataError(f"{self.name}: records have no field {e.args[0]!r}; "
                            f"fields: {sorted(record)}") from None

    def __repr__(self) -> str:
        return f"FieldSource({self.name}, {dict(self._fields)})"


class SubsetSource:
    """The records of `source` at `indices` (a fold, a subset), random access."""

    def __init__(self, source, indices: Sequence[int], name: str):
        self._source = source
        self._indices = np.asarray(indices, np.int64)
        self.name = f"{getattr(source, 'name', source)}[{name}]"

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._indices[index])]

    def __repr__(self) -> str:
        return f"SubsetSource({self.name}, {len(self)} records)"


TOY_TOPICS = {  # the built-in offline smoke / demo dataset: topic words, learnable
    "sports": "ball goal team match player score coach league win season race cup",
    "tech": "computer software chip internet phone data code robot cloud app network laptop",
    "money": "bank market stock price trade profit fund dollar share economy tax loan",
    "science": "space planet cell gene climate physics atom study lab energy ocean fossil"}
BUILTIN_DATASETS = ("toy_topics",)


def toy_topics_files(cache_dir: str, sizes: tuple[int, int] = (800, 200)) -> dict[str, str]:
    """Writes the toy topics csv (title,body,topic) once, deterministically; {split: path}."""
    out_dir = os.path.join(cache_dir, "toy_topics_v1")
    paths = {split: os.path.join(out_dir, f"{split}.csv") for split in ("train", "validation")}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    filler = "the a of in on new big today says report after".split()
    for (split, path), count, seed in zip(paths.items(), sizes, (0, 1)):
        rng = random.Random(seed)
        tmp = path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["title", "body", "topic"])
            for i in range(count):
                topic = list(TOY_TOPICS)[i % len(TOY_TOPICS)]
                words = TOY_TOPICS[topic].split()
                writer.writerow([" ".join(rng.choices(words, k=3)),
                                 " ".join(rng.choices(words + filler, k=rng.randint(4, 14))), topic])
        os.replace(tmp, path)
    return paths


def open_splits(data_cfg, data_dir: str, need_validation: bool = True) -> dict[str, Any]:
    """{'train', 'validation'} sources of text_i/label records chosen by `config.data`.

    data.files.train set -> local csv/tsv; else data.name is a built-in dataset
    (toy_topics) or a TFDS catalog name. Without `need_validation` (cross-validation)
    a missing validation file is fine. `data_cfg`: a `configs.ClassifyDataConfig`.
    """
    data_cfg = configs.section(configs.ClassifyDataConfig, data_cfg, "data")
    text_fields = split_fields(data_cfg.text_fields, "data.text_fields")
    label_field = str(data_cfg.label_field) if data_cfg.label_field else None  # None: unlabelled
    train_files = sources.expand_files(data_cfg.files.train, "data.files.train")
    valid_files = sources.expand_files(data_cfg.files.validation, "data.files.validation")
    file_format, has_header = data_cfg.format or "auto", data_cfg.has_header
    if not train_files and data_cfg.name in BUILTIN_DATASETS:
        paths = toy_topics_files(os.path.join(data_dir, "builtin"))
        train_files, valid_files = [paths["train"]], [paths["validation"]]
        file_format, has_header = "csv", True
    elif not train_files:
        if not data_cfg.name:
            raise DataError(f"set data.files.train (csv/tsv, .gz ok) or data.name (built-in: "
                            f"{list(BUILTIN_DATASETS)}, or a TFDS catalog name such as ag_news_subset)")
        raw = sources.catalog_sources(data_cfg.name, {"train": data_cfg.train_split,
                                                      "validation": data_cfg.eval_split}, data_dir)
        return {split: FieldSource(src, text_fields, label_field) for split, src in raw.items()}
    if not valid_files and need_validation:
        raise DataError("data.files.validation is not set: give a held-out file for evaluation "
                        "(or use --mode cv)")
    if file_format == "auto":
        file_format = sources.infer_format(train_files)
    if file_format not in ("csv", "tsv"):
        raise DataError(f"data.format={file_format!r}; classification reads csv or tsv "
                        f"(set data.format for other extensions, e.g. .txt)")
    columns = dict(zip(text_keys(len(text_fields)), text_fields))
    if label_field is not None:
        columns["label"] = label_field
    splits = {"train": train_files, **({"validation": valid_files} if valid_files else {})}
    spec = sources.LocalFilesSpec(splits=splits, file_format=file_format, columns=columns,
                                  has_header=has_header)
    return sources.local_files_sources(spec, data_dir)


# ----------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True)
class EncodingConfig:
    """How records become token rows."""

    max_len: int  # tokens per row incl. [CLS]/[SEP], the longest padded length
    pad_lengths: tuple[int, ...]  # allowed padded lengths (ascending, last = max_len)
    text_mode: str = "join"  # "join": one text; "pair": text_0 is A, the rest joined is B
    num_texts: int = 1
    join_separator: str = " "

    def __post_init__(self):
        if self.text_mode not in TEXT_MODES:
            raise DataError(f"data.text_mode={self.text_mode!r}; valid: {list(TEXT_MODES)}")
        if self.text_mode == "pair" and self.num_texts < 2:
            raise DataError("data.text_mode='pair' needs two or more data.text_fields")
        if self.max_len < 4:
            raise DataError(f"data.max_len={self.max_len} must be >= 4")


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Longest-first truncation of two token lists to a total of `budget`."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], cfg: EncodingConfig
                 ) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (ids (T,), type_ids (T,)) as [CLS] a [SEP] (b [SEP]), T <= max_len."""
    if cfg.text_mode == "join":
        a = tokenizer.encode(cfg.join_separator.join(t.strip() for t in texts if t.strip()))
        a = a[: cfg.max_len - 2]
        ids = [tokenizer.cls_id, *a, tokenizer.sep_id]
        return np.asarray(ids, np.int32), np.zeros(len(ids), np.int32)
    a = tokenizer.encode(texts[0].strip())
    b = tokenizer.encode(cfg.join_separator.join(t.strip() for t in texts[1:] if t.strip()))
    a, b = truncate_pair(a, b, cfg.max_len - 3)
    ids = [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return np.asarray(ids, np.int32), np.asarray(types, np.int32)


class EncodeRecord(grain.transforms.MapWithIndex):
    """(index, record) -> {"ids", "type_ids" (T,), "label", "index"} (label -1 if absent)."""

    def __init__(self, tokenizer: Tokenizer, labels: LabelSpace | None, cfg: EncodingConfig,
                 name: str = "data"):
        self.tokenizer, self.labels, self.cfg, self.name = tokenizer, labels, cfg, name

    def map_with_index(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        ids, types = encode_texts(self.tokenizer, [str(record[k]) for k in text_keys(self.cfg.num_texts)],
                                  self.cfg)
        label = -1
        if self.labels is not None and "label" in record:
            label = self.labels.encode(record["label"], f"{self.name} record {index + 1}")
        return {"ids": ids, "type_ids": types, "label": label, "index": index}


class StreamIndex(grain.transforms.MapWithIndex):
    """An encoded example's `index` becomes its position in the shuffled, repeated stream
    (as when encoding on the fly), which seeds the length-grouped batch order."""

    def map_with_index(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "index": index}


# Training splits up to this size are encoded once, in memory (about 0.5 kB a record), so
# that the input thread does not compete with the step for the CPU at every epoch.
ENCODE_ONCE_MAX_RECORDS = 2_000_000


def train_dataset(source, tokenizer: Tokenizer, labels: LabelSpace, cfg: EncodingConfig, *,
                  global_batch: int, seed: int, group: int = 8, shard_index: int = 0,
                  shard_count: int = 1, workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
    """Infinite, per-epoch reshuffled, length-grouped stream of this host's batches.

    Every host reads the same global stream and keeps its rows, so all hosts agree
    on each batch's padded length. Its iterator state is checkpointable.
    """
    if global_batch % shard_count:
        raise DataError(f"data.batch_size={global_batch} must divide by the process count {shard_count}")
    if len(source) <= ENCODE_ONCE_MAX_RECORDS:  # epochs then cost no reading or tokenizing
        dataset = grain.MapDataset.source(encode_split(source, tokenizer, labels, cfg))
        dataset = dataset.shuffle(seed=seed).repeat().map_with_index(StreamIndex())
        dataset = dataset.to_iter_dataset(batching.IN_MEMORY_READ_OPTIONS)
    else:
        dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        dataset = dataset.map_with_index(EncodeRecord(tokenizer, labels, cfg,
                                                      getattr(source, "name", "train")))
        dataset = dataset.to_iter_dataset(batching.READ_OPTIONS)
    dataset = dataset.batch(global_batch * max(1, group), batch_fn=list)
    dataset = grain.experimental.FlatMapIterDataset(dataset, batching.LengthGroupedBatches(
        global_batch, max(1, group), cfg.pad_lengths, seed, shard_index, shard_count))
    if workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=prefetch))
    return dataset


def encode_split(source, tokenizer: Tokenizer, labels: LabelSpace | None, cfg: EncodingConfig
                 ) -> list[dict[str, Any]]:
    """Every record of a (held-out) split, encoded, in source order."""
    encode = EncodeRecord(tokenizer, labels, cfg, getattr(source, "name", "data"))
    return [encode.map_with_index(i, source[i]) for i in range(len(source))]


def example_batch(rows: int, length: int) -> dict[str, np.ndarray]:
    """A zero batch with the train keys, shapes and dtypes (for compiling)."""
    return {"ids": np.zeros((rows, length), np.int32), "type_ids": np.zeros((rows, length), np.int32),
            "segment_ids": np.ones((rows, length), np.int32), "label": np.zeros(rows, np.int32),
            "weight": np.ones(rows, np.float32), "index": np.zeros(rows, np.int32)}


def read_prediction_rows(path: str, text_fields: list[str], has_header: bool) -> list[list[str]]:
    """Texts per row of a csv / tsv (header names or indices) / jsonl (field names) file."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".jsonl"):
        rows = []
        for number, line in enumerate(sources.read_documents(path, "lines"), 1):
            try:
                record = json.loads(line)
                rows.append([str(record[f]) for f in text_fields])
            except json.JSONDecodeError as e:
                raise DataError(f"predict.input {path!r} record {number}: not JSON ({e.msg})") from None
            except KeyError as e:
                raise DataError(f"predict.input {path!r} record {number} has no field "
                                f"{e.args[0]!r}; fields: {sorted(record)}") from None
        return rows
    if not name.endswith((".csv", ".tsv")):
        raise DataError(f"predict.input={path!r}; valid: .csv, .tsv, .jsonl (.gz ok)")
    columns = {key: f for key, f in zip(text_keys(len(text_fields)), text_fields)}
    table = sources.read_table(path, "," if name.endswith(".csv") else "\t", columns, has_header)
    return [[row[k] for k in columns] for row in table]


def predict_rows(data_cfg, pred_cfg) -> tuple[list[str], list[list[str]]]:
    """(text fields, the texts of each row of `predict.input`); `data_cfg`/`pred_cfg`: their sections."""
    data_cfg = configs.section(configs.ClassifyDataConfig, data_cfg, "data")
    pred_cfg = configs.section(configs.PredictConfig, pred_cfg, "predict")
    if not pred_cfg.input:
        raise errors.ConfigError("--mode predict needs --config.predict.input=FILE (csv, tsv or jsonl)")
    fields = split_fields(pred_cfg.text_fields or data_cfg.text_fields, "predict.text_fields")
    has_header = data_cfg.has_header if pred_cfg.has_header is None else pred_cfg.has_header
    return fields, read_prediction_rows(pred_cfg.input, fields, has_header)
