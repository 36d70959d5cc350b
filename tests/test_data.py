"""Local-file TFDS builder, readers, tokenizer, MLM packing pipeline and its resumable iterator."""

import gzip
import pickle

import numpy as np
import pytest

from encoder_jax.data import mlm_packing, sources
from encoder_jax.data.tokenizer import SentencePieceTokenizer

from conftest import make_documents


@pytest.fixture(scope="module")
def tokenizer():
    return SentencePieceTokenizer.train(make_documents(300), vocab_size=200)


def test_tokenizer_special_ids_and_pickling(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
            tokenizer.mask_id) == (0, 1, 2, 3, 4)
    text = "The cat sees a green apple [MASK]"
    assert 4 not in tokenizer.encode(text), "[MASK] in raw text must not become the mask id"
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(text) == tokenizer.encode(text)
    ids, starts = tokenizer.encode_words("the farmer paints")
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert starts == [p.startswith("\u2581") for p in pieces] and starts[0]


def test_readers_split_documents(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("one two\n\nthree\nfour\n\n\nfive\n", encoding="utf-8")
    assert list(sources.read_documents(str(text), "lines")) == ["one two", "three", "four", "five"]
    assert list(sources.read_documents(str(text), "paragraphs")) == ["one two", "three\nfour", "five"]
    wiki = tmp_path / "w.txt.gz"
    with gzip.open(wiki, "wt", encoding="utf-8") as f:
        f.write('<doc id="1" title="A">\nA\n\nFirst para.\n</doc>\n<doc id="2">\nB\nSecond.\n</doc>\n')
    assert list(sources.read_documents(str(wiki), "wikiextractor")) == ["A\nFirst para.", "B\nSecond."]
    assert sources.infer_format([str(wiki)]) == "wikiextractor"
    assert sources.infer_format([str(text)]) == "lines"


def test_local_files_builder_prepares_once_and_decodes(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("label\ttext\n1\thello world\n0\tsecond row\n", encoding="utf-8")
    spec = sources.LocalFilesSpec(splits={"train": [str(train)]}, file_format="tsv",
                                  columns={"text": "text", "label": "label"}, int_fields=("label",),
                                  has_header=True)
    cache = str(tmp_path / "cache")
    split = sources.local_files_sources(spec, cache)["train"]
    records = sorted((split[i]["text"], split[i]["label"]) for i in range(len(split)))
    assert records == [("hello world", 1), ("second row", 0)]
    again = sources.local_files_sources(spec, cache)["train"]
    assert len(again) == 2


def test_one_corpus_mixes_a_tasks_csv_with_wikipedia_text(tmp_path):
    """format auto is per file; text_column "1,2" joins a csv's title and description cells."""
    news = tmp_path / "news.csv"
    news.write_text('"3","Stocks rise","Markets gain"\n"1","Vote held","Polls closed"\n', encoding="utf-8")
    wiki = tmp_path / "wiki.txt"
    wiki.write_text('<doc id="1">\nA\nFirst para.\n</doc>\n', encoding="utf-8")
    config = {"files": {"train": f"{news},{wiki}", "validation": str(news)}, "text_column": "1,2",
              "data_dir": str(tmp_path / "cache")}
    split = sources.open_text_sources(config)["train"]
    assert sorted(split[i]["text"] for i in range(len(split))) == [
        "A\nFirst para.", "Stocks rise Markets gain", "Vote held Polls closed"]
    with pytest.raises(sources.DataError, match="news.csv' row 1 has 3 columns, needs 8"):
        sources.open_text_sources({**config, "text_column": "1,7",
                                   "data_dir": str(tmp_path / "cache2")})["train"][0]


def test_a_process_that_loses_the_preparation_race_uses_the_winners_copy(tmp_path, monkeypatch):
    train = tmp_path / "train.tsv"
    train.write_text("first row\nsecond row\n", encoding="utf-8")
    spec = sources.LocalFilesSpec(splits={"train": [str(train)]}, file_format="tsv",
                                  columns={"text": "0"})
    cache = str(tmp_path / "cache")
    builder_class = sources._local_files_builder_class()
    prepare = builder_class.download_and_prepare
    calls = []

    def loses_the_race(self, *args, **kwargs):  # another process finishes first; our rename fails
        calls.append(1)
        if len(calls) == 1:
            prepare(builder_class(spec=spec, data_dir=cache, file_format="array_record"))
            raise FileExistsError("Destination .../1.0.0 already exists.")
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(builder_class, "download_and_prepare", loses_the_race)
    split = sources.local_files_sources(spec, cache)["train"]
    assert sorted(split[i]["text"] for i in range(len(split))) == ["first row", "second row"]
    assert len(calls) == 1  # ours, which lost; the winner's copy is opened, not prepared again


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"good line\n\xff\xfe bad bytes\n", "is not UTF-8 at line 2"),
])
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    spec = sources.LocalFilesSpec(splits={"train": [str(path)]})
    with pytest.raises(ValueError, match=message) as error:
        sources.local_files_sources(spec, str(tmp_path / "cache"))
    assert "bad.txt" in str(error.value)


def test_missing_file_and_column_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.files.train: 'nope/.*' does not exist"):
        sources.expand_files("nope/*.txt", "data.files.train")
    path = tmp_path / "t.csv"
    path.write_text("title,body\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no column 'text'.*columns: \\['title', 'body'\\]"):
        list(sources.read_table(str(path), ",", {"text": "text"}, has_header=True))


def _source(docs):
    return [{"text": d} for d in docs]


def test_packed_batches_pin_keys_shapes_and_dtypes(tokenizer):
    data = mlm_packing.mlm_train_dataset(_source(make_documents(50)), tokenizer, seq_len=32,
                                         batch_size=4, seed=0)
    batch = next(iter(data))
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "ids": ((4, 32), "int32"), "segment_ids": ((4, 32), "int32"),
        "positions": ((4, 32), "int32"), "word_starts": ((4, 32), "bool")}
    assert (batch["segment_ids"] > 0).all(), "training rows are fully packed"
    for row_segments, row_positions in zip(batch["segment_ids"], batch["positions"]):
        starts = np.flatnonzero(np.diff(row_segments)) + 1
        assert (row_positions[starts] == 0).all() and row_positions[0] == 0
        assert (np.diff(row_positions)[np.diff(row_segments) == 0] == 1).all()


def test_eval_pass_keeps_every_token_and_pads_the_last_batch(tokenizer):
    docs = make_documents(23, seed=5)
    expected_tokens = sum(len(tokenizer.encode(d)) + 2 for d in docs)
    batches = list(mlm_packing.mlm_eval_batches(_source(docs), tokenizer, seq_len=32, batch_size=4))
    assert all(b["ids"].shape == (4, 32) for b in batches)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert real == expected_tokens
    assert (batches[-1]["segment_ids"][-1] == 0).all() or real == len(batches) * 4 * 32


def test_hosts_split_the_same_global_batches_and_eval_passes_are_equally_long(tokenizer):
    """Two hosts' rows, stacked, are the one-host batch: data order and checkpointed positions
    do not depend on the host count, and no host runs out of eval batches before another."""
    docs = _source(make_documents(40, seed=2))
    one = iter(mlm_packing.mlm_train_dataset(docs, tokenizer, seq_len=16, batch_size=4, seed=1))
    hosts = [iter(mlm_packing.mlm_train_dataset(docs, tokenizer, seq_len=16, batch_size=2, seed=1,
                                                shard_index=i, shard_count=2)) for i in (0, 1)]
    for _ in range(3):
        whole, parts = next(one), [next(h) for h in hosts]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    assert hosts[0].get_state() == hosts[1].get_state() == one.get_state()
    evals = [list(mlm_packing.mlm_eval_batches(docs[:7], tokenizer, seq_len=16, batch_size=3,
                                               shard_index=i, shard_count=2)) for i in (0, 1)]
    whole = list(mlm_packing.mlm_eval_batches(docs[:7], tokenizer, seq_len=16, batch_size=6))
    assert len(evals[0]) == len(evals[1]) == len(whole) >= 2
    np.testing.assert_array_equal(whole[-1]["ids"], np.concatenate([evals[0][-1]["ids"],
                                                                    evals[1][-1]["ids"]]))


def test_iterator_state_resumes_the_exact_position(tokenizer):
    make = lambda: mlm_packing.mlm_train_dataset(_source(make_documents(30)), tokenizer, seq_len=16,
                                                 batch_size=2, seed=3)
    first = iter(make())
    for _ in range(7):
        next(first)
    state = first.get_state()
    expected = [next(first)["ids"] for _ in range(3)]
    second = iter(make())
    second.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(second)["ids"], want)


def test_epochs_are_reshuffled(tokenizer):
    docs = [f"document number {i} words" for i in range(8)]
    data = mlm_packing.mlm_train_dataset(_source(docs), tokenizer, seq_len=8, batch_size=1, seed=0)
    it = iter(data)
    rows = [next(it)["ids"][0] for _ in range(20)]
    assert len({r.tobytes() for r in rows}) > 8


def test_worker_processes_give_the_same_batches_and_resume(tokenizer):
    make = lambda workers: mlm_packing.mlm_train_dataset(
        _source(make_documents(30)), tokenizer, seq_len=16, batch_size=2, seed=3, workers=workers)
    inline = iter(make(0))
    expected = [next(inline)["ids"] for _ in range(6)]
    parallel_it = iter(make(1))
    for want in expected[:3]:
        np.testing.assert_array_equal(next(parallel_it)["ids"], want)
    state = parallel_it.get_state()
    resumed = iter(make(1))
    resumed.set_state(state)
    for want in expected[3:]:
        np.testing.assert_array_equal(next(resumed)["ids"], want)


def test_bpe_tokenizer_trains_with_the_special_tokens():
    bpe = SentencePieceTokenizer.train(make_documents(100), vocab_size=150, model_type="bpe")
    assert (bpe.cls_id, bpe.mask_id) == (2, 4) and bpe.vocab_size == 150
    with pytest.raises(ValueError, match="tokenizer.model_type='wordpiece'; valid"):
        SentencePieceTokenizer.train(["x"], vocab_size=10, model_type="wordpiece")


def test_unknown_catalog_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.name='no_such_dataset_xyz' could not be loaded"):
        sources.catalog_sources("no_such_dataset_xyz", {"train": "train"}, str(tmp_path))
