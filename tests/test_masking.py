"""Dynamic MLM masking: rates, 80/10/10, specials never chosen, whole words together."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encoder_jax.data.tokenizer import SentencePieceTokenizer
from encoder_jax.tasks.mlm import MaskingConfig, choose_positions, mask_batch, mlm_loss_and_metrics

SPECIALS = (0, 1, 2, 3, 4)
VOCAB = 1000


def _batch(batch=64, length=128, seed=0, pad_from=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (batch, length)).astype(np.int32)
    ids[:, 0], ids[:, 60], ids[:, 61], ids[:, -1] = 2, 3, 2, 3  # [CLS] .. [SEP][CLS] .. [SEP]
    segments = np.ones((batch, length), np.int32)
    segments[:, 61:] = 2
    if pad_from is not None:
        ids[:, pad_from:], segments[:, pad_from:] = 0, 0
    starts = rng.random((batch, length)) < 0.6
    return {"ids": jnp.asarray(ids), "segment_ids": jnp.asarray(segments),
            "positions": jnp.zeros_like(jnp.asarray(ids)), "word_starts": jnp.asarray(starts)}


def _cfg(**kw):
    return MaskingConfig(mask_id=4, special_ids=SPECIALS, vocab_size=VOCAB,
                         max_predictions=kw.pop("max_predictions", 24), **kw)


def test_rate_and_80_10_10_split():
    batch = _batch()
    out = mask_batch(jax.random.key(0), batch, _cfg())
    weights = np.asarray(out["target_weights"])
    eligible = 128 - 4
    np.testing.assert_array_equal(weights.sum(1), np.round(0.15 * eligible))
    rows = np.arange(64)[:, None]
    chosen_now = np.asarray(out["masked_ids"])[rows, np.asarray(out["masked_positions"])][weights > 0]
    targets = np.asarray(out["targets"])[weights > 0]
    frac_mask = np.mean(chosen_now == 4)
    frac_keep = np.mean(chosen_now == targets)
    frac_random = 1 - frac_mask - frac_keep
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_keep - 0.1) < 0.025 and abs(frac_random - 0.1) < 0.025
    changed = np.asarray(out["masked_ids"]) != np.asarray(batch["ids"])
    chosen = np.zeros_like(changed)
    np.put_along_axis(chosen, np.asarray(out["masked_positions"]), weights > 0, axis=1)
    assert not (changed & ~chosen).any(), "only chosen positions may change"


def test_special_and_padding_tokens_are_never_chosen():
    batch = _batch(pad_from=100)
    for seed in range(5):
        out = mask_batch(jax.random.key(seed), batch, _cfg(rate=0.5, max_predictions=64))
        weights = np.asarray(out["target_weights"]) > 0
        targets = np.asarray(out["targets"])[weights]
        assert not np.isin(targets, SPECIALS).any()
        positions = np.asarray(out["masked_positions"])[weights]
        assert (positions < 100).all()
        random_tokens = np.asarray(out["masked_ids"])
        assert not np.isin(random_tokens[:, 100:], np.arange(1, VOCAB)).any()


def test_random_replacements_never_produce_special_tokens():
    out = mask_batch(jax.random.key(3), _batch(), _cfg(mask_fraction=0.0, random_fraction=1.0))
    weights = np.asarray(out["target_weights"]) > 0
    rows = np.arange(64)[:, None]
    new = np.asarray(out["masked_ids"])[rows, np.asarray(out["masked_positions"])][weights]
    assert not np.isin(new, SPECIALS).any()


def test_masks_depend_only_on_the_key():
    batch = _batch()
    a = mask_batch(jax.random.key(7), batch, _cfg())
    b = mask_batch(jax.random.key(7), batch, _cfg())
    c = mask_batch(jax.random.key(8), batch, _cfg())
    np.testing.assert_array_equal(a["masked_ids"], b["masked_ids"])
    assert not np.array_equal(a["masked_positions"], c["masked_positions"])


def _word_ids(starts):
    return np.cumsum(starts, axis=-1)


def test_whole_word_masking_takes_every_piece_of_a_word():
    batch = _batch()
    cfg = _cfg(whole_word=True)
    positions, weights = choose_positions(jax.random.key(1), batch["ids"], batch["segment_ids"],
                                          batch["word_starts"], cfg)
    positions, weights = np.asarray(positions), np.asarray(weights) > 0
    starts = np.asarray(batch["word_starts"]).copy()
    ids = np.asarray(batch["ids"])
    starts |= np.isin(ids, SPECIALS)  # specials split words
    starts[:, 61] = True  # segment boundary
    words = _word_ids(starts)
    eligible = ~np.isin(ids, SPECIALS)
    total = 0
    for row in range(len(ids)):
        chosen = set(positions[row][weights[row]].tolist())
        total += len(chosen)
        assert len(chosen) <= round(0.15 * 124)
        for word in {words[row, p] for p in chosen}:
            members = {i for i in np.flatnonzero(words[row] == word) if eligible[row, i]}
            assert members <= chosen, f"row {row}: word {word} partly masked"
    assert total / len(ids) > 0.8 * round(0.15 * 124)  # close to the budget


def test_whole_word_masking_on_chinese_uses_jieba_words():
    texts = ["中华人民共和国成立了，北京是首都。", "我们喜欢学习自然语言处理和机器学习。"] * 20
    tok = SentencePieceTokenizer.train(texts, vocab_size=60, character_coverage=1.0,
                                       max_sentences=1000)
    ids, starts = tok.encode_words("我们喜欢学习自然语言处理")
    pieces = [tok.id_to_piece(i).replace("\u2581", "") for i in ids]
    words, current = [], ""
    for piece, start in zip(pieces, starts):
        if start and current:
            words.append(current)
            current = ""
        current += piece
    words.append(current)
    assert "".join(words) == "我们喜欢学习自然语言处理"
    assert {"我们", "喜欢", "学习", "自然语言", "处理"} <= set(words) or \
        {"我们", "喜欢", "学习", "处理"} <= set(words), words
    length = len(ids) + 2
    batch = {"ids": jnp.asarray([[2, *ids, 3]], jnp.int32),
             "segment_ids": jnp.ones((1, length), jnp.int32),
             "word_starts": jnp.asarray([[True, *starts, True]])}
    cfg = MaskingConfig(mask_id=tok.mask_id, special_ids=SPECIALS, vocab_size=tok.vocab_size,
                        rate=0.4, max_predictions=length, whole_word=True)
    word_of = _word_ids(np.asarray(batch["word_starts"])[0])
    for seed in range(10):
        positions, weights = choose_positions(jax.random.key(seed), batch["ids"], batch["segment_ids"],
                                              batch["word_starts"], cfg)
        chosen = set(np.asarray(positions)[0][np.asarray(weights)[0] > 0].tolist())
        for word in {word_of[p] for p in chosen}:
            assert set(np.flatnonzero(word_of == word).tolist()) <= chosen


def test_loss_is_mean_over_real_predictions():
    logits = jnp.zeros((2, 3, 5)).at[0, 0, 1].set(10.0)
    targets = jnp.array([[1, 2, 0], [3, 0, 0]])
    weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, sums = mlm_loss_and_metrics(logits, targets, weights)
    assert float(sums["denominator"]) == 3 and float(sums["accuracy"]) == 1
    np.testing.assert_allclose(loss, sums["loss"] / 3)
    np.testing.assert_allclose(float(sums["loss"]) - 2 * np.log(5), -np.log(np.exp(10) / (np.exp(10) + 4)), atol=1e-5)


def test_bad_rate_is_rejected():
    with pytest.raises(ValueError, match="mlm.rate"):
        _cfg(rate=1.5)
