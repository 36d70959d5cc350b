"""A self-contained inference artifact (what `encoder_jax.export` writes) and its loader.

Directory layout:
  model.json           the card: format, task, encoder shape, task fields, label names,
                       text encoding (max_len, pad_lengths, text mode), the functions it holds,
                       the source run and checkpoint, its final dev metrics, versions, export time
  <function>.bin       each inference function serialised by `jax.export` (StableHLO) with a
                       symbolic batch and a symbolic length (<= the model's max_len):
                         classify   (params, ids, segment_ids, type_ids) -> probabilities (B, C)
                         embed      (params, ids, segment_ids, type_ids) -> {"cls", "mean"} (B, D)
                         fill_mask  (params, ids, segment_ids, type_ids, positions (B, M))
                                    -> {"ids", "probs"} (B, M, K), the K most likely tokens
                         translate  (params, source_ids, source_segment_ids) -> {"tokens"
                                    (B, K, T), "scores" (B, K), "lengths" (B, K)}: beam search
  weights.safetensors  the params, flattened by "/"-joined path
  tokenizer.model | vocab.txt (+ tokenizer_config.json)   the run's tokenizer
  target_tokenizer/    translation with separate vocabularies: the target side's

`load_artifact` needs jax, numpy, safetensors and the tokenizer libraries only: it imports
neither the trainer, nor a task, nor any experiment config; the weights are arguments of the
exported functions, not constants baked into them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from encoder_jax import errors
from encoder_jax.data import tokenizer as tokenizer_lib
from encoder_jax.data.batching import make_pad_lengths

ARTIFACT_FORMAT = 2
CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
MASK_TOKEN = "[MASK]"  # how a fill-mask text marks the tokens to predict
# The run tasks that export, and the functions each one's artifact holds.
TASK_FUNCTIONS = {"classify": ("classify", "embed"), "mlm": ("fill_mask", "embed"),
                  "translate": ("translate",)}
TARGET_TOKENIZER_DIR = "target_tokenizer"
EXPORTED_TASKS = tuple(TASK_FUNCTIONS)
POOLINGS = ("cls", "mean")


class InputError(errors.Error, ValueError):
    """A request the artifact cannot answer (the message names the field)."""


def function_file(name: str) -> str:
    return f"{name}.bin"


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """{"encoder/block_0/attention/query/kernel": array, ...} (host numpy)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(jax.device_get(leaf))
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """The nested dict `flatten_params` came from."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


@dataclasses.dataclass(frozen=True)
class Row:
    """One encoded input: ids and type ids (T,), fill-mask positions (M,), whether cut to fit."""

    ids: np.ndarray
    type_ids: np.ndarray
    positions: np.ndarray | None = None
    truncated: bool = False


def pad_rows(rows: Sequence[Row], num_rows: int, length: int, num_positions: int = 0
             ) -> tuple[np.ndarray, ...]:
    """Rows -> (ids, segment_ids, type_ids) int32 (num_rows, length) [+ positions (num_rows, M)].

    Padding rows are all [PAD] (segment 0), so they attend to nothing and change no real row.
    """
    ids = np.zeros((num_rows, length), np.int32)
    types = np.zeros((num_rows, length), np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row.ids)], types[r, :len(row.type_ids)] = row.ids, row.type_ids
    arrays = (ids, (ids != 0).astype(np.int32), types)
    if not num_positions:
        return arrays
    positions = np.zeros((num_rows, num_positions), np.int32)
    for r, row in enumerate(rows):
        positions[r, :len(row.positions)] = row.positions
    return (*arrays, positions)


def encode_masked(tokenizer, text: str, max_len: int) -> Row:
    """A text with `[MASK]` markers -> [CLS] ... [MASK] ... [SEP] (<= max_len) and the masks'
    positions; a text without a marker, or with one beyond max_len, is an `InputError`."""
    pieces = text.split(MASK_TOKEN)
    if len(pieces) < 2:
        raise InputError(f"texts: {text[:60]!r} has no {MASK_TOKEN}")
    ids = [tokenizer.cls_id]
    for i, piece in enumerate(pieces):
        if i:
            ids.append(tokenizer.mask_id)
        ids.extend(tokenizer.encode(piece.strip()) if piece.strip() else [])
    ids.append(tokenizer.sep_id)
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    truncated = len(ids) > max_len
    if truncated:
        if positions[-1] >= max_len - 1:
            raise InputError(f"texts: a {MASK_TOKEN} of {text[:60]!r} lies beyond the model's "
                             f"{max_len} tokens")
        ids = ids[:max_len - 1] + [tokenizer.sep_id]
    ids_T = np.asarray(ids, np.int32)
    return Row(ids_T, np.zeros_like(ids_T), np.asarray(positions, np.int32), truncated)


def encode_source(tokenizer, text: str, max_len: int) -> Row:
    """A translation source: [ids..., EOS], cut to max_len keeping EOS (as the run's data)."""
    ids = [*tokenizer.encode(text.strip()), tokenizer.sep_id]
    truncated = len(ids) > max_len
    if truncated:
        ids = ids[:max_len - 1] + ids[-1:]
    ids_T = np.asarray(ids, np.int32)
    return Row(ids_T, np.zeros_like(ids_T), truncated=truncated)


def detokenize(target_tokenizer, tokens_T: np.ndarray) -> str:
    """Generated target ids up to (not including) EOS, as text ([PAD] dropped)."""
    ids = [int(t) for t in tokens_T]
    if target_tokenizer.sep_id in ids:
        ids = ids[:ids.index(target_tokenizer.sep_id)]
    return target_tokenizer.decode([i for i in ids if i != 0])


@dataclasses.dataclass
class Artifact:
    """A loaded artifact: encode texts to `Row`s, run the exported functions on padded batches."""

    directory: str
    card: dict[str, Any]
    functions: dict[str, Any]  # name -> jitted call of the deserialised function
    params: Any
    tokenizer: Any
    target_tokenizer: Any = None  # translation: the target side's (None: `tokenizer`)

    @property
    def task(self) -> str:
        return self.card["task"]

    @property
    def labels(self) -> list[str]:
        return list(self.card.get("labels") or [])

    @property
    def max_len(self) -> int:
        return int(self.card["encoding"]["max_len"])

    @property
    def pad_lengths(self) -> tuple[int, ...]:
        return tuple(self.card["encoding"]["pad_lengths"])

    @property
    def top_k(self) -> int:
        """How many candidates fill_mask returns per masked position."""
        return int(self.card.get("fill_mask_top_k", 0))

    def _encoding(self, num_texts: int, max_len: int):
        from encoder_jax.data.classification import EncodingConfig

        enc = self.card["encoding"]
        return EncodingConfig(max_len=max_len, pad_lengths=(max_len,), text_mode=enc["text_mode"],
                              num_texts=max(num_texts, 1), join_separator=enc["join_separator"])

    def encode(self, texts: Sequence[str]) -> Row:
        """One row's texts, encoded as the run's data was ([CLS] a [SEP] (b [SEP])), cut to max_len."""
        from encoder_jax.data.classification import encode_texts

        ids, types = encode_texts(self.tokenizer, texts, self._encoding(len(texts), 1 << 30))
        if len(ids) <= self.max_len:
            return Row(ids, types)
        ids, types = encode_texts(self.tokenizer, texts, self._encoding(len(texts), self.max_len))
        return Row(ids, types, truncated=True)

    def encode_masked(self, text: str) -> Row:
        """A text with `[MASK]` markers -> [CLS] ... [MASK] ... [SEP] and the masks' positions."""
        return encode_masked(self.tokenizer, text, self.max_len)

    def encode_source(self, text: str) -> Row:
        """A translation source: [ids..., EOS], cut to max_len keeping EOS (as the run's data)."""
        return encode_source(self.tokenizer, text, self.max_len)

    def detokenize(self, tokens_T: np.ndarray) -> str:
        """Generated target ids up to (not including) EOS, as text."""
        return detokenize(self.target_tokenizer or self.tokenizer, tokens_T)

    def padded_length(self, longest: int) -> int:
        """The smallest of the card's padded lengths that holds `longest` tokens."""
        return next(length for length in self.pad_lengths if length >= longest)

    def run(self, name: str, rows: Sequence[Row], num_rows: int | None = None,
            length: int | None = None, num_positions: int = 0) -> Any:
        """Function `name` on rows padded to (num_rows, length): its outputs for all padded rows."""
        if name not in self.functions:
            raise InputError(f"this {self.task!r} artifact has no {name!r} function; "
                             f"it has {sorted(self.functions)}")
        length = length or self.padded_length(max(len(row.ids) for row in rows))
        if name == "fill_mask":
            num_positions = num_positions or max(len(row.positions) for row in rows)
        arrays = pad_rows(rows, num_rows or len(rows), length, num_positions)
        if name == "translate":
            arrays = arrays[:2]  # source ids and segment ids
        return jax.tree.map(np.asarray, self.functions[name](self.params, *map(jnp.asarray, arrays)))

    def _batched(self, name: str, rows: Sequence[Row], batch_size: int) -> Any:
        outs = [self.run(name, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def classify(self, rows: Sequence[Sequence[str]], batch_size: int = 64) -> np.ndarray:
        """Probabilities (N, C) for N rows of texts."""
        if not rows:
            return np.zeros((0, len(self.labels)), np.float32)
        return self._batched("classify", [self.encode(texts) for texts in rows], batch_size)

    def embed(self, texts: Sequence[str], pooling: str = "cls", batch_size: int = 64) -> np.ndarray:
        """Sentence embeddings (N, D): the last layer's [CLS] state or its mean over real tokens."""
        if pooling not in POOLINGS:
            raise InputError(f"pooling={pooling!r}; valid: {list(POOLINGS)}")
        return self._batched("embed", [self.encode([t]) for t in texts], batch_size)[pooling]

    def fill_mask(self, texts: Sequence[str], top_k: int = 5) -> list[list[list[tuple[str, float]]]]:
        """For each text, for each [MASK] in it, the top_k (token, probability) pairs."""
        rows = [self.encode_masked(t) for t in texts]
        out = []
        for row in rows:
            result = self.run("fill_mask", [row])
            out.append([[(self.tokenizer.id_to_piece(int(i)), float(p))
                         for i, p in zip(ids[:top_k], probs[:top_k])]
                        for ids, probs in zip(result["ids"][0], result["probs"][0])])
        return out


    def translate(self, texts: Sequence[str], nbest: int = 1, batch_size: int = 16
                  ) -> list[list[tuple[str, float]]]:
        """For each source text, its `nbest` (translation, score) hypotheses, best first."""
        out = self._batched("translate", [self.encode_source(t) for t in texts], batch_size)
        return [[(self.detokenize(out["tokens"][r, k]), float(out["scores"][r, k]))
                 for k in range(min(nbest, out["tokens"].shape[1]))] for r in range(len(texts))]


def read_card(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CARD_FILE)
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"{directory!r} has no {CARD_FILE}: is it an encoder_jax export?")
    with open(path, encoding="utf-8") as f:
        card = json.load(f)
    if card.get("format") != ARTIFACT_FORMAT or card.get("task") not in EXPORTED_TASKS:
        raise errors.DataError(f"{path!r}: format {card.get('format')!r}, task {card.get('task')!r}; this "
                               f"version reads format {ARTIFACT_FORMAT}, tasks {list(EXPORTED_TASKS)}")
    return card


def is_artifact(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CARD_FILE)) and os.path.isfile(
        os.path.join(directory, WEIGHTS_FILE))


def load_artifact(directory: str, word_segmenter: str = "auto") -> Artifact:
    """The artifact in `directory` (weights on the default device)."""
    import safetensors.numpy
    from jax import export

    card = read_card(directory)
    functions = {}
    for name in card["functions"]:
        with open(os.path.join(directory, function_file(name)), "rb") as f:
            functions[name] = jax.jit(export.deserialize(bytearray(f.read())).call)
    flat = safetensors.numpy.load_file(os.path.join(directory, WEIGHTS_FILE))
    params = jax.tree.map(jnp.asarray, unflatten_params(flat))
    tokenizer = tokenizer_lib.load_saved(directory, word_segmenter)
    target_dir = os.path.join(directory, TARGET_TOKENIZER_DIR)
    target = tokenizer_lib.load_saved(target_dir, word_segmenter) if os.path.isdir(target_dir) else None
    return Artifact(os.path.abspath(directory), card, functions, params, tokenizer, target)


def encoding_card(max_len: int, pad_lengths: Sequence[int] | None, text_mode: str = "join",
                  join_separator: str = " ") -> dict[str, Any]:
    """The card's `encoding` entry (pad lengths completed up to max_len)."""
    return {"max_len": max_len, "pad_lengths": list(make_pad_lengths(pad_lengths, max_len)),
            "text_mode": text_mode, "join_separator": join_separator}
