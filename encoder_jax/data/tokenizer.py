"""Sentencepiece tokenizers (trained here, cached, or loaded) and the factory picking a run's tokenizer.

`get_tokenizer` chooses between sentencepiece and WordPiece (`data.wordpiece`)
from the config and workdir; `load_saved` reloads what a run saved. The shared
interface and word-start helpers live in `data.text`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from typing import Callable, Iterable, Iterator

from encoder_jax import errors
from encoder_jax.data.text import (CJK, SPECIAL_TOKENS, WORD_SEGMENTERS, Tokenizer,
                                   char_to_byte_offsets, jieba_word_starts, tokens_starting_words)
from encoder_jax.data.wordpiece import WordPieceTokenizer

log = logging.getLogger("encoder_jax")

MODEL_TYPES = ("unigram", "bpe", "char")  # char: one piece per character (short Chinese texts)


class SentencePieceTokenizer:
    """A sentencepiece model whose ids 0..4 are `[PAD] [UNK] [CLS] [SEP] [MASK]`."""

    FILENAME = "tokenizer.model"

    def __init__(self, model_proto: bytes, word_segmenter: str = "auto",
                 source: str = "the sentencepiece model"):
        import sentencepiece as spm

        if word_segmenter not in WORD_SEGMENTERS:
            raise errors.DataError(f"tokenizer.word_segmenter={word_segmenter!r}; valid: {list(WORD_SEGMENTERS)}")
        self._proto = model_proto
        self.word_segmenter = word_segmenter
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # sentencepiece's parse error names only its own source line
            raise errors.DataError(f"{source}: not a readable sentencepiece model (truncated or "
                                   f"corrupt?): {str(e).strip()[:160]}") from None
        ids = {piece: self._sp.piece_to_id(piece) for piece in SPECIAL_TOKENS}
        missing = [p for p, i in ids.items() if i == self._sp.unk_id() and p != "[UNK]"]
        if missing:
            raise errors.DataError(f"sentencepiece model lacks special tokens {missing}; "
                                   f"train it with encoder_jax or add them as control symbols")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            ids[p] for p in SPECIAL_TOKENS)
        self.vocab_size = self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        """The serialised sentencepiece model."""
        return self._proto

    # Pickling for multi-process input pipelines: rebuild from the model bytes.
    def __getstate__(self):
        return {"model_proto": self._proto, "word_segmenter": self.word_segmenter}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["word_segmenter"])

    @classmethod
    def load(cls, path: str, word_segmenter: str = "auto") -> "SentencePieceTokenizer":
        if not os.path.isfile(path):
            raise errors.MissingFileError(f"tokenizer.model_file={path!r} does not exist")
        with open(path, "rb") as f:
            return cls(f.read(), word_segmenter, source=path)

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int, model_type: str = "unigram",
              character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
              word_segmenter: str = "auto", seed_sentencepiece_size: int = 1_000_000,
              ) -> "SentencePieceTokenizer":
        """Trains on an iterable of documents (split into lines, empties skipped)."""
        import sentencepiece as spm

        if model_type not in MODEL_TYPES:
            raise errors.DataError(f"tokenizer.model_type={model_type!r}; valid: {list(MODEL_TYPES)}")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_sentences), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
            control_symbols=list(SPECIAL_TOKENS[2:]), max_sentence_length=1 << 16,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size, hard_vocab_limit=False,
            num_threads=os.cpu_count() or 1, minloglevel=2)
        return cls(model.getvalue(), word_segmenter)

    def save(self, directory: str) -> str:
        """Writes `tokenizer.model` into `directory` atomically; returns its path.

        The temporary file is per process: every process of a multi-host run may save the
        same tokenizer into a shared workdir at once (the last identical copy wins).
        """
        path = os.path.join(directory, self.FILENAME)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self._proto)
        os.replace(tmp, path)
        return path

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def encode_words(self, text: str) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it begins a word."""
        pieces = self._sp.encode(text, return_type="proto").pieces
        ids = [p.id for p in pieces]
        segmenter = self.word_segmenter
        if segmenter == "auto":
            segmenter = "jieba" if CJK.search(text) else "whitespace"
        if segmenter == "whitespace":
            return ids, [p.piece.startswith("\u2581") or i == 0 for i, p in enumerate(pieces)]
        byte_starts = char_to_byte_offsets(text, jieba_word_starts(text))
        return ids, tokens_starting_words([(p.begin, p.end) for p in pieces], byte_starts)


def _training_lines(texts: Iterable[str], limit: int) -> Iterator[str]:
    count = 0
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if line:
                yield line
                count += 1
                if count >= limit:
                    return


def load_saved(directory: str, word_segmenter: str = "auto") -> Tokenizer:
    """The tokenizer a run saved in `directory`: tokenizer.model (sentencepiece) or vocab.txt (WordPiece)."""
    for cls in (SentencePieceTokenizer, WordPieceTokenizer):
        if os.path.isfile(os.path.join(directory, cls.FILENAME)):
            return cls.load(os.path.join(directory, cls.FILENAME), word_segmenter)
    raise errors.MissingFileError(f"{directory!r} holds no tokenizer ({SentencePieceTokenizer.FILENAME} "
                                  f"or {WordPieceTokenizer.FILENAME})")


def _wordpiece_tokenizer(tok_cfg, workdir: str | None, segmenter: str):
    """A WordPiece tokenizer from the workdir's `vocab.txt` (resume) or `tokenizer.vocab_file`, else None."""
    if workdir and os.path.isfile(os.path.join(workdir, WordPieceTokenizer.FILENAME)):
        return WordPieceTokenizer.load(workdir, segmenter)
    if not tok_cfg.vocab_file:
        return None
    tokenizer = WordPieceTokenizer.load(tok_cfg.vocab_file, segmenter)
    if workdir:
        tokenizer.save(workdir)
    return tokenizer


def get_tokenizer(tok_cfg, *, workdir: str | None, cache_dir: str, corpus_id: str,
                  texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """The run's tokenizer: the workdir's copy (resume) > `tokenizer.vocab_file` (WordPiece)
    > `tokenizer.model_file` > trained.

    A trained model is cached under `cache_dir` by corpus and options, so it is
    trained once per corpus; the chosen model is copied into the workdir.
    """
    from encoder_jax import configs

    tok_cfg = configs.section(configs.TokenizerConfig, tok_cfg, "tokenizer")
    segmenter = tok_cfg.word_segmenter
    in_workdir = os.path.join(workdir, SentencePieceTokenizer.FILENAME) if workdir else None
    if in_workdir and os.path.isfile(in_workdir):
        return SentencePieceTokenizer.load(in_workdir, segmenter)
    wordpiece = _wordpiece_tokenizer(tok_cfg, workdir, segmenter)
    if wordpiece is not None:
        return wordpiece
    if tok_cfg.model_file:
        tokenizer = SentencePieceTokenizer.load(tok_cfg.model_file, segmenter)
    else:
        options = {k: getattr(tok_cfg, k) for k in ("model_type", "vocab_size", "character_coverage",
                                               "max_sentences")}
        key = hashlib.sha256(json.dumps([corpus_id, options], sort_keys=True).encode()).hexdigest()[:16]
        cached = os.path.join(cache_dir, "tokenizers", f"spm_{key}.model")
        if os.path.isfile(cached):
            tokenizer = SentencePieceTokenizer.load(cached, segmenter)
        else:
            log.info("training a %s sentencepiece model (vocab %d) on %s", options["model_type"],
                         options["vocab_size"], corpus_id)
            tokenizer = SentencePieceTokenizer.train(
                texts(), vocab_size=options["vocab_size"], model_type=options["model_type"],
                character_coverage=options["character_coverage"],
                max_sentences=options["max_sentences"], word_segmenter=segmenter)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp_dir = os.path.dirname(cached)
            path = tokenizer.save(tmp_dir)
            os.replace(path, cached)
    if workdir:
        tokenizer.save(workdir)
    return tokenizer
