"""A sentencepiece model as a Hugging Face fast tokenizer (`tokenizer.json`) giving the same ids.

What `transformers.AutoTokenizer` loads from an exported run: the sentencepiece pieces and
scores as a `tokenizers` Unigram model (or the BPE merges implied by the piece order), the
model's own normalisation (its precompiled NFKC charsmap, whitespace collapsing), the "▁"
word-boundary marker, and BERT's framing `[CLS] a [SEP] (b [SEP])` with the special tokens.
"""

from __future__ import annotations

from typing import Any

from encoder_jax import errors
from encoder_jax.data.text import SPECIAL_TOKENS

UNIGRAM, BPE = 1, 2  # sentencepiece TrainerSpec.model_type
UNKNOWN = 2  # sentencepiece ModelProto.SentencePiece.type
SPACE = "\u2581"


def _proto(model_proto: bytes):
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    return model


def bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges a sentencepiece BPE vocabulary implies: every split of a piece into two
    pieces, ordered by the merged piece's id (its rank), then by the parts' ids."""
    merges = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def _model(proto):
    from tokenizers import models

    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk_id = next(i for i, p in enumerate(proto.pieces) if p.type == UNKNOWN)
    kind = proto.trainer_spec.model_type
    if kind == UNIGRAM:
        return models.Unigram(pieces, unk_id=unk_id, byte_fallback=proto.trainer_spec.byte_fallback)
    if kind == BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        return models.BPE(vocab, bpe_merges(vocab), unk_token=pieces[unk_id][0], fuse_unk=True,
                          byte_fallback=proto.trainer_spec.byte_fallback)
    raise errors.DataError(f"sentencepiece model_type {kind}: only unigram ({UNIGRAM}) and bpe ({BPE}) "
                           f"convert to a fast tokenizer")


def fast_tokenizer(model_proto: bytes):
    """`tokenizers.Tokenizer` equal to `SentencePieceTokenizer(model_proto)` framed as BERT does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors

    proto = _proto(model_proto)
    tokenizer = Tokenizer(_model(proto))
    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    scheme = "always" if spec.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme)
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme=scheme)
    ids = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return tokenizer


def tokenizer_config(max_len: int) -> dict[str, Any]:
    """tokenizer_config.json for `AutoTokenizer`: a fast tokenizer with BERT's special tokens."""
    pad, unk, cls, sep, mask = SPECIAL_TOKENS
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "pad_token": pad, "unk_token": unk, "cls_token": cls, "sep_token": sep,
            "mask_token": mask, "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
