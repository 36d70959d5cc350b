"""Translation input: demo dataset, pair sources, encoding, token-budget batches, exact resume, eval, bad input."""

import gzip
import logging

import numpy as np
import pytest

from encoder_jax import configs
from encoder_jax.data import batching, translation, zh_en_numbers
from encoder_jax.data.sources import DataError
from encoder_jax.data.tokenizer import SentencePieceTokenizer

DTYPES = {"source_ids": np.int32, "target_in": np.int32, "target_out": np.int32,
          "source_segment_ids": np.int32, "target_segment_ids": np.int32,
          "weight": np.float32, "index": np.int32}
# Pad lengths 8, 16, 24 take 12, 4 and 4 rows: 4 x 24 tokens goes past the budget of 96.
SMALL = configs.TranslationDataConfig(max_len=24, pad_lengths=(8, 16), max_tokens=96,
                                      batch_multiple=4, window=64)
LENGTHS = (8, 16, 24)


@pytest.fixture(scope="module")
def pairs():
    """300 demo records, a too-long one, and two with an empty side (indices 300, 301, 302)."""
    records = [{"source": zh, "target": en} for zh, en in zh_en_numbers.demo_pairs(300, seed=5)]
    records.append({"source": "三只猫" * 20, "target": "three cats"})
    records += [{"source": "", "target": "nothing"}, {"source": "四", "target": "  "}]
    return records


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for zh, en in zh_en_numbers.demo_pairs(2000, seed=7) for t in (zh, en)]
    return SentencePieceTokenizer.train(texts, vocab_size=300)


def tokenizers(tokenizer):
    return tokenizer, tokenizer


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def write_lines(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- the demo dataset


def test_demo_dataset_is_deterministic_sized_and_disjoint(tmp_path):
    first = zh_en_numbers.write_files(str(tmp_path / "a"))
    second = zh_en_numbers.write_files(str(tmp_path / "b"))
    lines = {}
    for split, size in (("train", 20_000), ("validation", 500)):
        with open(first[split], "rb") as f, open(second[split], "rb") as g:
            data = f.read()
            assert data == g.read(), f"{split} differs between two writes"
        lines[split] = data.decode("utf-8").splitlines()
        assert len(lines[split]) == size
        assert all(len(line.split("\t")) == 2 and all(line.split("\t")) for line in lines[split])
    assert not set(lines["train"]) & set(lines["validation"])
    assert len(set(lines["validation"])) == 500
    assert zh_en_numbers.write_files(str(tmp_path / "a")) == first  # written once, then reused


@pytest.mark.parametrize("number, chinese, english", [
    (345, "三百四十五", "three hundred forty-five"), (15, "十五", "fifteen"),
    (105, "一百零五", "one hundred five"), (1050, "一千零五十", "one thousand fifty"),
    (10010, "一万零一十", "ten thousand ten"), (35000, "三万五千", "thirty-five thousand"),
    (0, "零", "zero")])
def test_demo_numerals_read_correctly(number, chinese, english):
    assert zh_en_numbers.chinese_number(number) == chinese
    assert zh_en_numbers.english_number(number) == english


def test_demo_ordinals():
    got = [zh_en_numbers.english_ordinal(n) for n in (1, 3, 12, 20, 21, 40, 99)]
    assert got == ["first", "third", "twelfth", "twentieth", "twenty-first", "fortieth",
                   "ninety-ninth"]


# ----------------------------------------------------------------------------- sources


def test_local_tsv_by_index_and_csv_by_header_name(tmp_path):
    # Tatoeba layout: english<TAB>chinese<TAB>attribution.
    tsv = [write_lines(tmp_path / f"{s}.tsv", [f"{en}\t{zh}\tCC-BY 2.0 #{i}" for i, (zh, en) in
                                               enumerate(zh_en_numbers.demo_pairs(5, seed))])
           for s, seed in (("train", 0), ("dev", 1))]
    cfg = {"files": {"train": tsv[0], "validation": tsv[1]}}
    splits = translation.open_pair_splits(cfg, str(tmp_path / "cache"))
    zh, en = zh_en_numbers.demo_pairs(5, 0)[0]
    assert len(splits["train"]) == 5 and {"source": zh, "target": en} in [
        splits["train"][i] for i in range(5)]
    csv_path = write_lines(tmp_path / "t.csv", ["en,zh", "three cats,三只猫", "the third,第三"])
    cfg = {"files": {"train": csv_path, "validation": csv_path}, "has_header": True,
           "source_column": "zh", "target_column": "en"}
    train = translation.open_pair_splits(cfg, str(tmp_path / "cache"))["train"]
    assert sorted(train[i]["source"] for i in range(2)) == ["三只猫", "第三"]


def test_builtin_demo_opens_through_the_local_files_builder(tmp_path):
    splits = translation.open_pair_splits({"name": "zh_en_numbers"}, str(tmp_path))
    assert (len(splits["train"]), len(splits["validation"])) == (20_000, 500)
    record = splits["validation"][0]
    assert sorted(record) == ["source", "target"]
    assert record["target"].isascii() and not record["source"].isascii()


class FakeCatalog:
    name = "wmt19_translate/zh-en:validation"

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return {"zh": "三只猫", "en": "three cats"}


def test_catalog_records_are_renamed_and_a_wrong_field_is_named():
    assert translation.PairSource(FakeCatalog(), "zh", "en")[0] == {"source": "三只猫",
                                                                     "target": "three cats"}
    with pytest.raises(DataError, match="no field 'chinese'.*fields: \\['en', 'zh'\\]"):
        translation.PairSource(FakeCatalog(), "chinese", "en")[0]


@pytest.mark.parametrize("content, overrides, error, message", [
    (None, {}, FileNotFoundError, "data.files.train: '.*missing.tsv' does not exist"),
    (b"three cats\t\xe4\xb8\x89\xe5\x8f\xaa\n\xff bad\t\xfe\n", {}, DataError,
     "'.*bad.tsv' is not UTF-8 at line 2"),
    ("en\tzh\nthree\t三\n", {"has_header": True, "source_column": "chinese"}, DataError,
     "'.*bad.tsv' has no column 'chinese' \\(for field 'source'\\); columns: \\['en', 'zh'\\]"),
    ("three\t三\nfour\n", {}, DataError, "'.*bad.tsv' row 2 has 1 columns, needs 2"),
    ("en\tzh\n", {"has_header": True}, DataError, "data files \\['.*bad.tsv'\\] contain no records"),
    ("three\t三\n", {"format": "lines"}, ValueError,
     "data.format='lines'; valid: \\['auto', 'csv', 'tsv'\\]"),
])
def test_bad_inputs_fail_with_one_line_naming_file_or_field(tmp_path, content, overrides, error,
                                                            message):
    path = tmp_path / ("missing.tsv" if content is None else "bad.tsv")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    cfg = {"files": {"train": str(path), "validation": str(path)}, **overrides}
    with pytest.raises(error, match=message) as raised:
        translation.open_pair_splits(cfg, str(tmp_path / "cache"))
    assert "\n" not in str(raised.value)


def test_read_source_lines_keeps_empty_lines_and_checks_utf8(tmp_path):
    path = tmp_path / "in.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("三只猫\n\n第三\r\n")
    assert translation.read_source_lines(str(path)) == ["三只猫", "", "第三"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\n")
    with pytest.raises(DataError, match="'.*bad.txt' is not UTF-8 at line 2"):
        translation.read_source_lines(str(bad))


# ----------------------------------------------------------------------------- encoding


def test_encoding_places_bos_eos_and_shifts_the_target(tokenizer):
    example = translation.encode_pair(tokenizer, tokenizer, {"source": "三只猫", "target": "three cats"})
    bos, eos = tokenizer.cls_id, tokenizer.sep_id
    assert {k: v.dtype for k, v in example.items()} == {k: np.int32 for k in translation.SEQUENCE_KEYS}
    assert example["source_ids"][-1] == eos and eos not in example["source_ids"][:-1]
    assert example["target_in"][0] == bos and example["target_out"][-1] == eos
    assert bos not in example["target_out"] and eos not in example["target_in"]
    np.testing.assert_array_equal(example["target_in"][1:], example["target_out"][:-1])
    assert tokenizer.decode(example["target_out"][:-1]) == "three cats"
    cut = translation.encode_pair(tokenizer, tokenizer, {"source": "三只猫" * 9, "target": "cats " * 9}, 5)
    assert [len(cut[k]) for k in translation.SEQUENCE_KEYS] == [5, 5, 5]
    assert cut["source_ids"][-1] == eos and cut["target_out"][-1] == eos
    np.testing.assert_array_equal(cut["target_in"][1:], cut["target_out"][:-1])


def test_too_long_and_empty_pairs_are_dropped_and_counted(pairs, tokenizer):
    encoded = [translation.encode_pair(tokenizer, tokenizer, r) for r in pairs]
    kept = [translation.fits(e, SMALL.max_len) for e in encoded]
    assert kept[-3:] == [False, False, False] and all(kept[:300])
    assert translation.count_too_long(pairs, tokenizers(tokenizer), SMALL.max_len) == (3, 303)
    dropped, checked = translation.count_too_long(pairs, tokenizers(tokenizer), SMALL.max_len, limit=101)
    assert checked == 101 and dropped == 1  # every third pair: 300 is checked, 301 and 302 not


# ----------------------------------------------------------------------------- train batches


def test_train_batches_keys_shapes_dtypes_and_token_budget(pairs, tokenizer):
    batches = take(iter(translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=0)), 30)
    assert list(batches[0]) == list(translation.BATCH_KEYS)
    assert translation.BATCH_KEYS == ("source_ids", "target_in", "target_out", "source_segment_ids",
                                      "target_segment_ids", "weight", "index")
    for batch in batches:
        rows, length = batch["source_ids"].shape
        assert {k: v.dtype for k, v in batch.items()} == DTYPES
        assert all(batch[k].shape == (rows, length) for k in DTYPES if DTYPES[k] == np.int32
                   and k != "index") and batch["weight"].shape == batch["index"].shape == (rows,)
        assert length in LENGTHS and rows % SMALL.batch_multiple == 0
        assert rows * length <= SMALL.max_tokens or rows == SMALL.batch_multiple
        assert rows == batching.budget_rows(length, SMALL.max_tokens, SMALL.batch_multiple)
        real = batch["weight"] > 0
        assert (batch["index"][~real] == -1).all() and not batch["source_segment_ids"][~real].any()
        np.testing.assert_array_equal(batch["source_segment_ids"], batch["source_ids"] > 0)
        np.testing.assert_array_equal(batch["target_segment_ids"], batch["target_out"] > 0)
        # The smallest allowed length that holds the batch's longest side.
        longest = max(batch["source_segment_ids"].sum(1).max(), batch["target_segment_ids"].sum(1).max())
        assert length == min(n for n in LENGTHS if n >= longest)
    assert len({b["source_ids"].shape for b in batches}) > 1, "expected several length buckets"
    assert [batching.budget_rows(n, 96, 4) for n in LENGTHS] == [12, 4, 4]


def test_one_epoch_holds_every_kept_pair_exactly_once(pairs, tokenizer):
    dataset = translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=3, epochs=1)
    batches = list(dataset)
    indices = np.concatenate([b["index"][b["weight"] > 0] for b in batches])
    assert sorted(indices.tolist()) == list(range(300))  # 300..302: too long or empty
    for batch in batches:
        for row in np.flatnonzero(batch["weight"]):
            example = translation.encode_pair(tokenizer, tokenizer, pairs[batch["index"][row]])
            for key in translation.SEQUENCE_KEYS:  # the row holds the pair its index names
                np.testing.assert_array_equal(batch[key][row, :len(example[key])], example[key])
    epoch_two = list(translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=3, epochs=2))
    first, second = (np.concatenate([b["index"] for b in part]) for part in
                     (epoch_two[:len(batches)], epoch_two[len(batches):]))
    assert not np.array_equal(first[:50], second[:50]), "the second epoch must be reshuffled"


def test_train_iterator_resumes_exactly(pairs, tokenizer):
    dataset = translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=1)
    iterator = iter(dataset)
    take(iterator, 5)
    state = iterator.get_state()
    expected = take(iterator, 3)
    fresh = iter(translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=1))
    fresh.set_state(state)
    for want, got in zip(expected, take(fresh, 3)):
        assert all(np.array_equal(want[k], got[k]) for k in translation.BATCH_KEYS)
    other = take(iter(translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=2)), 8)
    assert not all(np.array_equal(a["index"], b["index"]) for a, b in zip(other[5:], expected))


def test_hosts_keep_their_rows_of_the_same_global_batches(pairs, tokenizer):
    whole = take(iter(translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=0)), 6)
    hosts = [take(iter(translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=0,
                                                  shard_index=i, shard_count=2)), 6) for i in range(2)]
    for k, batch in enumerate(whole):
        for key in translation.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([hosts[0][k][key], hosts[1][k][key]]), batch[key])
    with pytest.raises(DataError, match="data.batch_multiple=4 must be a positive multiple of the "
                                        "process count 3"):
        translation.train_dataset(pairs, tokenizer, tokenizer, SMALL, seed=0, shard_count=3)


def test_example_batch_matches_the_train_keys_and_dtypes():
    batch = translation.example_batch(8, 16)
    assert list(batch) == list(translation.BATCH_KEYS)
    assert {k: v.dtype for k, v in batch.items()} == DTYPES
    assert batch["source_ids"].shape == (8, 16) and batch["weight"].shape == (8,)


# ----------------------------------------------------------------------------- eval batches


def test_eval_covers_every_example_once_in_index_order(pairs, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="encoder_jax"):
        examples = translation.eval_examples(pairs, tokenizers(tokenizer), SMALL.max_len)
    assert [r.getMessage() for r in caplog.records if "cut" in r.getMessage()] == [
        "eval: cut 1 sources and 0 targets of 303 pairs to data.max_len=24 tokens"]
    assert len(examples[300]["source_ids"]) == 24 and examples[300]["source_ids"][-1] == tokenizer.sep_id
    assert examples[301]["source_ids"].tolist() == [tokenizer.sep_id]  # empty lines are kept
    batches = list(translation.eval_batches(examples, global_batch_rows=32, pad_lengths=LENGTHS))
    assert len(batches) == 10 and all(b["source_ids"].shape[0] == 32 for b in batches)
    assert all(b["source_ids"].shape[1] in LENGTHS for b in batches)
    assert list(batches[0]) == list(translation.BATCH_KEYS)
    weights = np.concatenate([b["weight"] for b in batches])
    indices = np.concatenate([b["index"] for b in batches])[weights > 0]
    assert weights.sum() == 303 and sorted(indices.tolist()) == list(range(303))
    assert (batches[-1]["weight"] == 0).sum() == 320 - 303
    for batch in batches:  # every real row holds its example, in place
        for row in np.flatnonzero(batch["weight"]):
            example = examples[batch["index"][row]]
            for key in translation.SEQUENCE_KEYS:
                length = len(example[key])
                np.testing.assert_array_equal(batch[key][row, :length], example[key])
                assert not batch[key][row, length:].any()
    limited = translation.eval_examples(pairs, tokenizers(tokenizer), SMALL.max_len, limit=10)
    assert [e["index"] for e in limited] == list(range(10))
