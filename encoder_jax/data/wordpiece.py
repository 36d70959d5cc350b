"""BERT's WordPiece tokenizer from a `vocab.txt`, behind the same interface as sentencepiece.

Normalisation and pre-tokenisation are BERT's (through the `tokenizers`
library): clean control characters, optionally lower-case and strip accents,
split every CJK character and every punctuation mark into its own word, then
greedy longest-match WordPiece with the `##` continuation prefix.

Options live beside the vocabulary in a Hugging Face style
`tokenizer_config.json` (`do_lower_case`, `strip_accents`,
`tokenize_chinese_chars`, special-token strings), so a BERT checkpoint
directory and a run's workdir load the same way::

    tok = WordPieceTokenizer.load("path/to/bert-dir")   # or the vocab.txt itself
    ids, starts = tok.encode_words("Héllo, 世界!")
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from encoder_jax import errors
from encoder_jax.data.text import (CJK, SPECIAL_TOKENS, WORD_SEGMENTERS, jieba_word_starts,
                                   tokens_starting_words)

CONFIG_FILENAME = "tokenizer_config.json"
# tokenizer_config.json keys of the five special tokens, in SPECIAL_TOKENS order.
SPECIAL_TOKEN_KEYS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def read_vocab(path: str) -> list[str]:
    """Tokens of a `vocab.txt`, one per line; the line number is the id (as BERT reads it)."""
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"vocabulary file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f.readlines()]
    if not tokens:
        raise errors.DataError(f"vocabulary file {path!r} is empty")
    return tokens


class WordPieceTokenizer:
    """BERT WordPiece over a fixed vocabulary; special tokens are found by name in it."""

    FILENAME = "vocab.txt"

    def __init__(self, vocab: list[str], *, lowercase: bool = True,
                 strip_accents: bool | None = None, chinese_chars: bool = True,
                 word_segmenter: str = "auto",
                 special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
        """Builds the tokenizer.

        Args:
          vocab: tokens in id order.
          lowercase: lower-case the text (BERT "uncased").
          strip_accents: remove accents; None follows `lowercase`, as in BERT.
          chinese_chars: put spaces around every CJK character.
          word_segmenter: whole-word starts: "whitespace" (BERT's words: a token
            not continuing with "##"), "jieba" (Chinese words), or "auto" (jieba
            when the text holds CJK characters).
          special_tokens: the strings of [PAD] [UNK] [CLS] [SEP] [MASK] in this vocabulary.
        """
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        if word_segmenter not in WORD_SEGMENTERS:
            raise errors.DataError(f"tokenizer.word_segmenter={word_segmenter!r}; valid: {list(WORD_SEGMENTERS)}")
        ids = {token: index for index, token in enumerate(vocab)}  # a later duplicate wins, as in BERT
        missing = [t for t in special_tokens if t not in ids]
        if missing:
            raise errors.DataError(f"WordPiece vocabulary lacks special tokens {missing}; "
                                   f"it needs all of {list(special_tokens)}")
        self._vocab = list(vocab)
        self.lowercase, self.strip_accents, self.chinese_chars = lowercase, strip_accents, chinese_chars
        self.word_segmenter = word_segmenter
        self.special_tokens = tuple(special_tokens)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            ids[t] for t in special_tokens)
        self.vocab_size = len(vocab)
        tk = Tokenizer(WordPiece(ids, unk_token=special_tokens[1], continuing_subword_prefix="##",
                                 max_input_chars_per_word=100))
        tk.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents,
            lowercase=lowercase)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece(prefix="##")
        tk.add_special_tokens(list(special_tokens))  # matched verbatim in text, as Hugging Face does
        self._tk = tk

    # Pickling for multi-process input pipelines: rebuild from the vocabulary and options.
    def __getstate__(self):
        return {"vocab": self._vocab, "options": self.options()}

    def __setstate__(self, state):
        self.__init__(state["vocab"], **state["options"])

    def options(self) -> dict:
        """Constructor keyword arguments besides the vocabulary."""
        return {"lowercase": self.lowercase, "strip_accents": self.strip_accents,
                "chinese_chars": self.chinese_chars, "word_segmenter": self.word_segmenter,
                "special_tokens": self.special_tokens}

    @classmethod
    def load(cls, path: str, word_segmenter: str = "auto") -> "WordPieceTokenizer":
        """From a `vocab.txt` or a directory holding one (+ optional tokenizer_config.json)."""
        vocab_path = os.path.join(path, cls.FILENAME) if os.path.isdir(path) else path
        options = read_options(os.path.join(os.path.dirname(vocab_path), CONFIG_FILENAME))
        return cls(read_vocab(vocab_path), word_segmenter=word_segmenter, **options)

    def save(self, directory: str) -> str:
        """Writes `vocab.txt` and `tokenizer_config.json` into `directory`; returns vocab.txt's path."""
        path = os.path.join(directory, self.FILENAME)
        _write_atomic(path, "".join(token + "\n" for token in self._vocab))
        _write_atomic(os.path.join(directory, CONFIG_FILENAME),
                      json.dumps(self.hf_config(), indent=2, ensure_ascii=False) + "\n")
        return path

    def hf_config(self) -> dict:
        """The Hugging Face `tokenizer_config.json` contents for this tokenizer."""
        return {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
                "strip_accents": self.strip_accents,
                "tokenize_chinese_chars": self.chinese_chars,
                **dict(zip(SPECIAL_TOKEN_KEYS, self.special_tokens))}

    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without [CLS]/[SEP]."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._vocab[int(token_id)]

    def encode_words(self, text: str) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it begins a word."""
        encoding = self._tk.encode(text, add_special_tokens=False)
        segmenter = self.word_segmenter
        if segmenter == "auto":
            segmenter = "jieba" if CJK.search(text) else "whitespace"
        if segmenter == "whitespace":
            # BERT's basic-tokenizer words: every token that is not a "##" continuation.
            return encoding.ids, [not t.startswith("##") or i == 0
                                  for i, t in enumerate(encoding.tokens)]
        # `offsets` are character offsets into `text`, like jieba's word starts.
        return encoding.ids, tokens_starting_words(list(encoding.offsets), jieba_word_starts(text))


def read_options(path: str) -> dict:
    """WordPieceTokenizer options from a Hugging Face `tokenizer_config.json` (defaults: BERT uncased)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise errors.DataError(f"{path}: not a readable JSON tokenizer config ({e})") from None
    options = {"lowercase": bool(hf.get("do_lower_case", True)),
               "strip_accents": hf.get("strip_accents"),
               "chinese_chars": bool(hf.get("tokenize_chinese_chars", True))}
    names = []
    for key, default in zip(SPECIAL_TOKEN_KEYS, SPECIAL_TOKENS):
        value = hf.get(key, default)
        names.append(value.get("content", default) if isinstance(value, dict) else str(value))
    options["special_tokens"] = tuple(names)
    return options


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"  # per process: hosts may write the same file at once
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
