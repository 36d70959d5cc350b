"""A self-contained inference artifact (what `encoder_jax.export` writes) and its loader.

Directory layout:
  model.json           the card: format, task, encoder shape, task fields, label names,
                       text encoding (max_len, pad_lengths, text mode), the source run and
                       checkpoint, its final dev metrics, library versions, export time
  function.bin         the inference function serialised by `jax.export` (StableHLO) with a
                       symbolic batch and a symbolic length (<= the model's max_len)
  weights.safetensors  the params, flattened by "/"-joined path
  tokenizer.model | vocab.txt (+ tokenizer_config.json)   the run's tokenizer

`load_artifact` needs jax, numpy, safetensors and the tokenizer libraries only: it imports
neither the trainer, nor a task, nor any experiment config; the weights are arguments of the
exported function, not constants baked into it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from encoder_jax.data import tokenizer as tokenizer_lib
from encoder_jax.data.batching import make_pad_lengths

ARTIFACT_FORMAT = 1
CARD_FILE = "model.json"
FUNCTION_FILE = "function.bin"
WEIGHTS_FILE = "weights.safetensors"
EXPORTED_TASKS = ("classify",)


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


@dataclasses.dataclass
class Artifact:
    """A loaded artifact: `classify(rows)` gives class probabilities."""

    directory: str
    card: dict[str, Any]
    exported: Any  # jax.export.Exported
    params: Any
    tokenizer: Any

    @property
    def task(self) -> str:
        return self.card["task"]

    @property
    def labels(self) -> list[str]:
        return list(self.card.get("labels") or [])

    @property
    def pad_lengths(self) -> tuple[int, ...]:
        return tuple(self.card["encoding"]["pad_lengths"])

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One row's texts -> (ids (T,), type_ids (T,)) as the run's data encoding (truncated)."""
        from encoder_jax.data.classification import EncodingConfig, encode_texts

        enc = self.card["encoding"]
        cfg = EncodingConfig(max_len=enc["max_len"], pad_lengths=tuple(enc["pad_lengths"]),
                             text_mode=enc["text_mode"], num_texts=max(len(texts), 1),
                             join_separator=enc["join_separator"])
        return encode_texts(self.tokenizer, texts, cfg)

    def padded_length(self, longest: int) -> int:
        """The smallest of the card's padded lengths that holds `longest` tokens."""
        return next(length for length in self.pad_lengths if length >= longest)

    def run(self, ids_BxL: np.ndarray, type_ids_BxL: np.ndarray) -> np.ndarray:
        """The exported function on one padded batch: float32 (B, C) probabilities."""
        segment_ids_BxL = (ids_BxL != 0).astype(np.int32)
        return np.asarray(self.exported.call(self.params, jnp.asarray(ids_BxL),
                                             jnp.asarray(segment_ids_BxL),
                                             jnp.asarray(type_ids_BxL)))

    def classify(self, rows: Sequence[Sequence[str]], batch_size: int = 64) -> np.ndarray:
        """Probabilities (N, C) for N rows of texts, in batches padded to the card's lengths."""
        encoded = [self.encode(texts) for texts in rows]
        out = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            length = self.padded_length(max(len(ids) for ids, _ in chunk))
            ids = np.zeros((len(chunk), length), np.int32)
            types = np.zeros((len(chunk), length), np.int32)
            for row, (row_ids, row_types) in enumerate(chunk):
                ids[row, :len(row_ids)], types[row, :len(row_types)] = row_ids, row_types
            out.append(self.run(ids, types))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)


def read_card(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CARD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no {CARD_FILE}: is it an encoder_jax export?")
    with open(path, encoding="utf-8") as f:
        card = json.load(f)
    if card.get("format") != ARTIFACT_FORMAT or card.get("task") not in EXPORTED_TASKS:
        raise ValueError(f"{path!r}: format {card.get('format')!r}, task {card.get('task')!r}; this "
                         f"version reads format {ARTIFACT_FORMAT}, tasks {list(EXPORTED_TASKS)}")
    return card


def load_artifact(directory: str, word_segmenter: str = "auto") -> Artifact:
    """The artifact in `directory` (weights on the default device)."""
    import safetensors.numpy
    from jax import export

    card = read_card(directory)
    with open(os.path.join(directory, FUNCTION_FILE), "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    flat = safetensors.numpy.load_file(os.path.join(directory, WEIGHTS_FILE))
    params = jax.tree.map(jnp.asarray, unflatten_params(flat))
    tokenizer = tokenizer_lib.load_saved(directory, word_segmenter)
    return Artifact(os.path.abspath(directory), card, exported, params, tokenizer)


def encoding_card(max_len: int, pad_lengths: Sequence[int] | None, text_mode: str,
                  join_separator: str) -> dict[str, Any]:
    """The card's `encoding` entry (pad lengths completed up to max_len)."""
    return {"max_len": max_len, "pad_lengths": list(make_pad_lengths(pad_lengths, max_len)),
            "text_mode": text_mode, "join_separator": join_separator}
