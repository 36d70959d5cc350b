"""What every tokenizer shares: the interface, the special tokens and word-start helpers.

Every tokenizer exposes the BERT special tokens `[PAD] [UNK] [CLS] [SEP] [MASK]`,
`encode(text) -> ids` and `encode_words(text) -> (ids, word_starts)`; the
latter marks the first sub-token of every word for whole-word masking. Words
are whitespace-delimited for alphabetic text and come from jieba for Chinese.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Iterable, Protocol

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORD_SEGMENTERS = ("whitespace", "jieba", "auto")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # "auto" segments with jieba on a hit


class Tokenizer(Protocol):
    """What tasks and pipelines need from a tokenizer."""

    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_words(self, text: str) -> tuple[list[int], list[bool]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str) -> str: ...


def special_ids(tokenizer: Tokenizer) -> np.ndarray:
    """The ids that masking must never choose or produce."""
    return np.array([tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id,
                     tokenizer.sep_id, tokenizer.mask_id], np.int32)


@functools.cache  # setLogLevel clears every logger's cache: once, not per text
def _jieba():
    import jieba  # imported lazily: it loads its dictionary on first use

    jieba.setLogLevel(logging.WARNING)
    return jieba


def jieba_word_starts(text: str) -> list[int]:
    """Character offsets where jieba starts a word."""
    starts, offset = [], 0
    for word in _jieba().cut(text):
        if not word.isspace():
            starts.append(offset)
        offset += len(word)
    return starts


def whitespace_word_starts(text: str) -> list[int]:
    """Character offsets where a whitespace-delimited word starts."""
    return [m.start() for m in re.finditer(r"\S+", text)]


def char_to_byte_offsets(text: str, char_offsets: list[int]) -> list[int]:
    """UTF-8 byte offsets in `text` of the given character offsets (sorted; past-the-end ones dropped)."""
    byte_offsets, position, chars = [], 0, 0
    wanted = iter(sorted(char_offsets))
    target = next(wanted, None)
    for ch in text:
        while target is not None and target == chars:
            byte_offsets.append(position)
            target = next(wanted, None)
        position += len(ch.encode("utf-8"))
        chars += 1
    return byte_offsets


def tokens_starting_words(spans: list[tuple[int, int]], word_starts: list[int]) -> list[bool]:
    """A token begins a word when it is the first to cover a word start (same offset units as spans)."""
    pending = sorted(word_starts)
    flags, k = [], 0
    for i, (begin, end) in enumerate(spans):
        hit = False
        while k < len(pending) and pending[k] < max(end, begin + 1):
            hit = hit or pending[k] >= begin
            k += 1
        flags.append(hit or i == 0)
    return flags
