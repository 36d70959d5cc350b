"""Hugging Face BERT interop: numerical parity, round trips, WordPiece, bad inputs.

Every Hugging Face model here is random-initialised locally (no downloads),
with LayerNorm and bias parameters perturbed so they are not identities.
Parity is checked on a batch of 2 x 16 with padding and two token types;
real tokens only (padded positions are undefined in both implementations).
The max-abs-differences are printed (`pytest -s`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from encoder_jax import interop  # noqa: E402
from encoder_jax import workdir as workdir_lib  # noqa: E402
from encoder_jax.data.wordpiece import WordPieceTokenizer  # noqa: E402
from encoder_jax.layers import EncoderConfig  # noqa: E402
from encoder_jax.models import BertEncoder, BertForClassification, BertForMaskedLM  # noqa: E402

from conftest import ROOT, override, tiny_config  # noqa: E402

TOLERANCE = 1e-4  # float32 max abs difference
SMALL = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=64)
BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "sat", "on", "mat", "cafe", "naive", "resume", "hello", "world", "un",
         "##aff", "##able", "##s", "##ed", "over", "a", "b", "uber", "-", "cool", "fiancee",
         "我", "爱", "北", "京", "天", "安", "门", "中", "文", "，", "。", ",", ".", "!", "?", "'",
         "(", ")", "Hello", "World", "Café", "é", "##é", "cat", "ｈｅｌｌｏ"]
TEXTS = ["Hello, World! The CAFÉ's naïve résumé (über-cool) — unaffable.",
         "我爱北京天安门，中文。Hello world!",
         "The cat sat on the mat?! Fiancée\tcafé\u00a0résumés... 㐀 ｈｅｌｌｏ",
         "unaffableness [MASK] over the cat"]


def _vocab(size: int) -> list[str]:
    words = SPECIALS + WORDS
    return words + [f"w{i}" for i in range(size - len(words))]


def _perturb(model, seed: int = 0) -> None:
    """Non-trivial LayerNorms and biases (Hugging Face initialises them to 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def make_hf_dir(directory, model_class: str = "BertForPreTraining", seed: int = 0, **overrides):
    """Saves a random-initialised Hugging Face BERT + vocab.txt into `directory`; returns the model."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**{**SMALL, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    _perturb(model, seed)
    model.save_pretrained(str(directory))
    (directory / "vocab.txt").write_text("\n".join(_vocab(config.vocab_size)) + "\n", encoding="utf-8")
    return model


def make_batch(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """2 x 16: row 0 full (types 0/1), row 1 padded after 11 tokens (types 0/1/0-pad)."""
    rng = np.random.default_rng(seed)
    batch, length = 2, 16
    ids = rng.integers(5, vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, 11:] = 0
    ids[mask == 0] = 0
    ids[:, 0] = 2  # [CLS]
    types = np.zeros((batch, length), np.int64)
    types[0, 7:] = 1
    types[1, 6:11] = 1
    return {"ids": ids, "mask": mask, "types": types}


def hf_forward(model, batch):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["ids"]), attention_mask=torch.tensor(batch["mask"]),
                    token_type_ids=torch.tensor(batch["types"]), output_hidden_states=True)
    return out


def our_inputs(batch):
    return dict(mask=jnp.asarray(batch["mask"]), type_ids=jnp.asarray(batch["types"]))


def mlm_logits(params, config: EncoderConfig, batch) -> np.ndarray:
    """Our MLM logits at every position: (B, L, V)."""
    positions = np.broadcast_to(np.arange(batch["ids"].shape[1]), batch["ids"].shape)
    return np.asarray(BertForMaskedLM(config).apply(
        {"params": params}, jnp.asarray(batch["ids"]), jnp.asarray(positions), **our_inputs(batch)))


def max_diff(a, b, real=None) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float((diff[real] if real is not None else diff).max())


def check_pretraining_parity(directory, model, label: str) -> dict[str, float]:
    bert = interop.import_hf(str(directory))
    batch = make_batch(bert.config.vocab_size)
    real = batch["mask"].astype(bool)
    out = hf_forward(model, batch)
    hidden, pooled = BertEncoder(bert.config).apply(
        {"params": bert.params["encoder"]}, jnp.asarray(batch["ids"]), **our_inputs(batch))
    hf_pooled = model.bert.pooler(out.hidden_states[-1]).detach().numpy()
    diffs = {"hidden": max_diff(hidden, out.hidden_states[-1].numpy(), real),
             "pooled": max_diff(pooled, hf_pooled),
             "mlm_logits": max_diff(mlm_logits(bert.params, bert.config, batch),
                                    out.prediction_logits.numpy(), real)}
    print(f"\nparity {label}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert all(v <= TOLERANCE for v in diffs.values()), diffs
    return diffs


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("hidden_act,eps", [("gelu", 1e-12), ("gelu_new", 1e-5)])
def test_small_bert_matches_hugging_face(tmp_path, hidden_act, eps):
    model = make_hf_dir(tmp_path, hidden_act=hidden_act, layer_norm_eps=eps)
    bert = interop.import_hf(str(tmp_path))
    assert bert.config.activation == {"gelu": "gelu", "gelu_new": "gelu_tanh"}[hidden_act]
    assert bert.config.layer_norm_eps == eps and bert.config.use_pooler and bert.has_mlm_head
    assert bert.unused == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert bert.missing == []
    check_pretraining_parity(tmp_path, model, f"small {hidden_act}")


def test_the_activation_option_matters(tmp_path):
    """The comparison can fail: the tanh GELU on an exact-GELU checkpoint misses the tolerance."""
    model = make_hf_dir(tmp_path, hidden_act="gelu")
    bert = interop.import_hf(str(tmp_path))
    batch = make_batch(bert.config.vocab_size)
    wrong = dataclasses.replace(bert.config, activation="gelu_tanh")
    hf_logits = hf_forward(model, batch).prediction_logits.numpy()
    assert max_diff(mlm_logits(bert.params, wrong, batch), hf_logits) > 10 * TOLERANCE


def test_bert_base_shape_matches_hugging_face(tmp_path):
    model = make_hf_dir(tmp_path, **BASE)
    check_pretraining_parity(tmp_path, model, "BERT-base shape")


def test_masked_lm_checkpoint_has_no_pooler(tmp_path):
    model = make_hf_dir(tmp_path, "BertForMaskedLM")
    bert = interop.import_hf(str(tmp_path))
    assert not bert.config.use_pooler and "pooler" not in bert.params["encoder"]
    assert bert.missing == ["pooler.dense.weight", "pooler.dense.bias"] and bert.unused == []
    batch = make_batch(bert.config.vocab_size)
    diff = max_diff(mlm_logits(bert.params, bert.config, batch),
                    hf_forward(model, batch).logits.numpy(), batch["mask"].astype(bool))
    assert diff <= TOLERANCE


def test_sequence_classifier_matches_hugging_face(tmp_path):
    labels = {0: "sports", 1: "politics", 2: "science"}
    model = make_hf_dir(tmp_path, "BertForSequenceClassification", num_labels=3, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    bert = interop.import_hf(str(tmp_path))
    assert bert.label_names == ["sports", "politics", "science"] and not bert.has_mlm_head
    assert "cls.predictions.bias" in bert.missing
    batch = make_batch(bert.config.vocab_size)
    ours = BertForClassification(bert.config, num_classes=3).apply(
        {"params": {"encoder": bert.params["encoder"], "classifier": bert.classifier}},
        jnp.asarray(batch["ids"]), **our_inputs(batch))
    diff = max_diff(ours, hf_forward(model, batch).logits.numpy())
    print(f"\nparity classifier logits: {diff:.2e}")
    assert diff <= TOLERANCE


def test_pytorch_bin_reads_with_weights_only(tmp_path):
    model = make_hf_dir(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert os.path.basename(interop.import_hf(str(tmp_path)).weights_file) == "pytorch_model.bin"
    check_pretraining_parity(tmp_path, model, "pytorch_model.bin")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_in_a_bin_is_refused(tmp_path):
    make_hf_dir(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save({"x": _Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        interop.import_hf(str(tmp_path))


# ----------------------------------------------------------------------------- export


def hf_state(directory, model_class: str):
    model, info = getattr(transformers, model_class).from_pretrained(
        str(directory), output_loading_info=True)
    return model, {k: v.numpy() for k, v in model.state_dict().items()}, info


@pytest.mark.parametrize("model_class,head", [("BertForMaskedLM", "mlm"),
                                              ("BertForSequenceClassification", "classifier")])
def test_import_export_round_trip_is_identical(tmp_path, model_class, head):
    original = make_hf_dir(tmp_path / "hf", model_class, num_labels=4)
    bert = interop.import_hf(str(tmp_path / "hf"))
    params = dict(bert.params, **({"classifier": bert.classifier} if bert.classifier else {}))
    interop.export_hf(params, bert.config, str(tmp_path / "out"), tokenizer=bert.tokenizer,
                      head=head, label_names=bert.label_names)
    _, exported, info = hf_state(tmp_path / "out", model_class)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, value in original.state_dict().items():
        np.testing.assert_array_equal(exported[name], value.numpy(), err_msg=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"] == bert.tokenizer.encode(TEXTS[0])


def test_export_of_a_model_made_here_gives_the_same_logits(tmp_path):
    config = EncoderConfig(vocab_size=90, hidden_dim=48, num_layers=2, num_heads=3, mlp_dim=96,
                           max_len=32, activation="gelu_tanh", layer_norm_eps=1e-6)
    batch = make_batch(config.vocab_size, seed=1)
    params = BertForMaskedLM(config).init(
        jax.random.key(3), jnp.asarray(batch["ids"]), jnp.zeros((2, 3), jnp.int32))["params"]
    interop.export_hf(params, config, str(tmp_path))
    model, _, info = hf_state(tmp_path, "BertForMaskedLM")
    assert not info["missing_keys"] and set(info["unexpected_keys"]) <= {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    diff = max_diff(mlm_logits(params, config, batch), hf_forward(model, batch).logits.numpy(),
                    batch["mask"].astype(bool))
    assert diff <= TOLERANCE


def test_export_refuses_what_bert_cannot_hold(tmp_path):
    config = EncoderConfig(vocab_size=50, hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32,
                           max_len=16, pre_norm=True)
    params = BertForMaskedLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                          jnp.zeros((1, 1), jnp.int32))["params"]
    with pytest.raises(ValueError, match="pre_norm"):
        interop.export_hf(params, config, str(tmp_path))
    with pytest.raises(ValueError, match="head='classifier'"):
        interop.export_hf(params, dataclasses.replace(config, pre_norm=False),
                          str(tmp_path), head="classifier")
    with pytest.raises(ValueError, match="model.bigram_buckets=8 cannot be exported"):
        interop.export_hf(params, dataclasses.replace(config, pre_norm=False, bigram_buckets=8),
                          str(tmp_path))
    post_norm = dataclasses.replace(config, pre_norm=False)
    wide = BertForClassification(post_norm, 3, wide_buckets=8).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="wide n-gram part"):
        interop.export_hf(wide, post_norm, str(tmp_path), head="classifier")


# ----------------------------------------------------------------------------- WordPiece


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_equals_bert_tokenizer_fast(tmp_path, lowercase):
    (tmp_path / "vocab.txt").write_text("\n".join(_vocab(80)) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
    reference = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    ours = WordPieceTokenizer.load(str(tmp_path))
    encodings = [ours.encode(t) for t in TEXTS]
    assert len(set(map(tuple, encodings))) == len(TEXTS)
    assert sum(i == ours.unk_id for e in encodings for i in e) < sum(map(len, encodings)) // 2
    for text, ids in zip(TEXTS, encodings):
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 1, 2, 3, 4)


def test_wordpiece_word_starts_pickling_and_save(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(_vocab(80)) + "\n", encoding="utf-8")
    tokenizer = WordPieceTokenizer.load(str(tmp_path / "vocab.txt"), word_segmenter="whitespace")
    ids, starts = tokenizer.encode_words("unaffable cats, 北京")
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert pieces == ["un", "##aff", "##able", "cat", "##s", ",", "北", "京"]
    assert starts == [True, False, False, True, False, True, True, True]
    jieba = WordPieceTokenizer.load(str(tmp_path), word_segmenter="jieba")
    assert jieba.encode_words("我爱北京")[1] == [True, True, True, False]  # 北京 is one word
    clone = pickle.loads(pickle.dumps(jieba))
    assert clone.encode(TEXTS[1]) == jieba.encode(TEXTS[1]) and clone.word_segmenter == "jieba"
    saved = tmp_path / "saved"
    saved.mkdir()
    WordPieceTokenizer(tokenizer.vocab, lowercase=False).save(str(saved))
    again = WordPieceTokenizer.load(str(saved))
    assert not again.lowercase and again.vocab == tokenizer.vocab


def test_wordpiece_needs_the_special_tokens(tmp_path):
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])


# ----------------------------------------------------------------------------- bad inputs


def test_missing_config_is_a_clear_error(tmp_path):
    make_hf_dir(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        interop.import_hf(str(tmp_path))


def test_non_bert_architecture_is_a_clear_error(tmp_path):
    make_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "roberta", "architectures": ["RobertaForMaskedLM"]}))
    with pytest.raises(ValueError, match="only BERT is supported"):
        interop.import_hf(str(tmp_path))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    make_hf_dir(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        interop.import_hf(str(tmp_path))


def test_shape_mismatch_names_the_tensor(tmp_path):
    make_hf_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(ValueError, match=r"encoder.layer.0.intermediate.dense.weight has shape \(128, 64\)"):
        interop.import_hf(str(tmp_path))


def test_missing_encoder_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    make_hf_dir(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.bias"):
        interop.import_hf(str(tmp_path))


def test_merge_params_checks_shapes():
    fresh = {"encoder": {"w": np.zeros((2, 3), np.float32)}, "head": np.zeros(2, np.float32)}
    from encoder_jax import pretrained

    merged = pretrained.merge_params(fresh, {"encoder": {"w": np.ones((2, 3))}, "extra": np.ones(1)})
    assert merged["encoder"]["w"].dtype == np.float32 and merged["encoder"]["w"].sum() == 6
    assert merged["head"].sum() == 0
    with pytest.raises(ValueError, match=r"encoder/w has shape \(3, 2\)"):
        pretrained.merge_params(fresh, {"encoder": {"w": np.ones((3, 2))}})


# ----------------------------------------------------------------------------- end to end


# End to end through the trainer: -m slow. Import, export and parity are checked piecewise
# above; init_from_hf through the trainer in test_classification_from_an_mlm_run_continued_from_hf.
@pytest.mark.slow
def test_mlm_continues_from_hf_then_exports(corpus_files, data_cache, tmp_path):
    """init_from_hf through the trainer, two steps, CLI export: Hugging Face gives our logits."""
    from encoder_jax import checkpoint, train

    make_hf_dir(tmp_path / "hf", "BertForMaskedLM")
    config = tiny_config(corpus_files, data_cache, **{
        "init_from_hf": str(tmp_path / "hf"), "train.num_steps": 2, "eval.every_steps": 2})
    workdir = tmp_path / "run"
    train.run(config, str(workdir))
    assert (workdir / "vocab.txt").is_file()
    assert json.loads((workdir / "model.json").read_text())["encoder"]["hidden_dim"] == 64
    imported = interop.import_hf(str(tmp_path / "hf")).params
    trained = checkpoint.load_params(str(workdir))
    step = np.abs(np.asarray(trained["encoder"]["token_embed"]["embedding"])
                  - imported["encoder"]["token_embed"]["embedding"]).max()
    assert 0 < step < 0.01, "trained a little, starting from the imported weights"
    assert interop.main(["export", str(workdir), str(tmp_path / "out")]) == 0
    model, _, info = hf_state(tmp_path / "out", "BertForMaskedLM")
    assert not info["missing_keys"]
    config_here = workdir_lib.load_trained(str(workdir)).encoder_config
    batch = make_batch(config_here.vocab_size)
    diff = max_diff(mlm_logits(trained, config_here, batch), hf_forward(model, batch).logits.numpy(),
                    batch["mask"].astype(bool))
    print(f"\nparity exported trained MLM logits: {diff:.2e}")
    assert diff <= TOLERANCE


def test_cli_import_then_export_round_trip(tmp_path):
    original = make_hf_dir(tmp_path / "hf", "BertForPreTraining")
    assert interop.main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    assert json.loads((tmp_path / "imported" / "model.json").read_text())["encoder"]["num_layers"] == 2
    assert interop.main(["export", str(tmp_path / "imported"), str(tmp_path / "out")]) == 0
    _, exported, info = hf_state(tmp_path / "out", "BertForMaskedLM")
    assert not info["missing_keys"]
    for name, value in original.state_dict().items():
        if name in exported:
            np.testing.assert_array_equal(exported[name], value.numpy(), err_msg=name)
    assert interop.main(["import", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1


def test_classification_seam_takes_a_hugging_face_encoder(tmp_path):
    """pretrained.from_hf plugs into pretrained.graft_encoder; a missing pooler is made fresh."""
    from encoder_jax import pretrained

    model = make_hf_dir(tmp_path, "BertForMaskedLM")
    source = pretrained.from_hf(str(tmp_path))
    assert source.config.use_pooler and source.tokenizer.vocab_size == source.config.vocab_size
    batch = make_batch(source.config.vocab_size)
    fresh = BertForClassification(source.config, num_classes=3).init(
        jax.random.key(0), jnp.asarray(batch["ids"]))["params"]
    params = pretrained.graft_encoder(fresh, source)
    hidden, _ = BertEncoder(source.config).apply(
        {"params": params["encoder"]}, jnp.asarray(batch["ids"]), **our_inputs(batch))
    hf_hidden = hf_forward(model, batch).hidden_states[-1].numpy()
    assert max_diff(hidden, hf_hidden, batch["mask"].astype(bool)) <= TOLERANCE


def test_load_saved_finds_either_tokenizer(tmp_path):
    from encoder_jax.data import tokenizer as tokenizer_lib

    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        tokenizer_lib.load_saved(str(tmp_path))
    WordPieceTokenizer(_vocab(60)).save(str(tmp_path))
    assert isinstance(tokenizer_lib.load_saved(str(tmp_path)), WordPieceTokenizer)


def test_export_reads_a_classification_workdir(tmp_path):
    """Label names from labels.json ({"names": ...} as the classification task writes it)."""
    make_hf_dir(tmp_path / "hf", "BertForSequenceClassification", num_labels=2, hidden_act="gelu_new")
    interop.write_import(interop.import_hf(str(tmp_path / "hf")), str(tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "model.json").read_text())
    assert record["encoder"]["activation"] == "gelu_tanh"
    (tmp_path / "run" / "model.json").write_text(json.dumps(  # as a classification run records it
        {"encoder": record["encoder"], "num_classes": 2, "pooling": "first"}))
    (tmp_path / "run" / "labels.json").write_text(json.dumps(
        {"names": ["no", "yes"], "kind": "name", "base": 0}))
    run = workdir_lib.load_trained(str(tmp_path / "run"))
    assert run.record.task == "classify" and run.encoder_config.activation == "gelu_tanh"
    assert run.labels.names == ("no", "yes") and run.tokenizer is not None
    assert interop.main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["id2label"] == {"0": "no", "1": "yes"} and exported["hidden_act"] == "gelu_new"


def test_bfloat16_safetensors_import_exactly(tmp_path):
    model = make_hf_dir(tmp_path, "BertForMaskedLM").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    bert = interop.import_hf(str(tmp_path))
    kernel = bert.params["encoder"]["block_1"]["mlp"]["wo"]["kernel"]
    expected = model.bert.encoder.layer[1].output.dense.weight.detach().float().numpy().T
    assert kernel.dtype == np.float32 and np.array_equal(kernel, expected)


def test_safetensors_import_needs_no_torch(tmp_path):
    """The core path (safetensors + vocab.txt) runs with torch and transformers unimportable."""
    import subprocess
    import sys

    make_hf_dir(tmp_path)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from encoder_jax import interop\n"
            f"bert = interop.import_hf({str(tmp_path)!r})\n"
            "assert bert.tokenizer.encode('hello world') == [13, 14]\n"
            f"interop.export_hf(bert.params, bert.config, {str(tmp_path / 'out')!r}, tokenizer=bert.tokenizer)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


# ----------------------------------------------------------------------------- classification from Hugging Face

CLASSIFY = os.path.join(ROOT, "experiments", "classify_news.py")
TOY_FILLER = "the a of in on new big today says report after".split()  # as data.classification writes


def launch(*args, cache_dir):
    """launch.py in a subprocess on CPU, the built-in toy data cached in `cache_dir`."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ENCODER_JAX_DATA_DIR": str(cache_dir)}
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def make_topics_hf_dir(directory, model_class: str = "BertForPreTraining"):
    """make_hf_dir whose vocab.txt covers the toy-topics words (classify_news.py:smoke)."""
    from encoder_jax.data.classification import TOY_TOPICS

    model = make_hf_dir(directory, model_class)
    words = sorted({w for text in TOY_TOPICS.values() for w in text.split()} | set(TOY_FILLER))
    vocab = SPECIALS + words + [f"w{i}" for i in range(SMALL["vocab_size"] - len(SPECIALS) - len(words))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return model


def classify_smoke_config(data_dir, **overrides):
    """classify_news.py:smoke with its toy data under `data_dir`; overrides as 'a.b' -> value."""
    import sys

    sys.path.insert(0, os.path.dirname(CLASSIFY))
    import classify_news

    config = classify_news.get_config("smoke")
    config.data.data_dir = str(data_dir)
    config.train.peak_flops_per_device = 1e12  # skip the matmul benchmark
    return override(config, overrides)


def max_leaf_diff(a, b) -> float:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_classification_init_from_hf_is_the_imported_encoder_exactly(tmp_path):
    """The task's init_from replaces a fresh encoder by the checkpoint's, pooler included, bit for bit."""
    from encoder_jax.tasks import classify

    model = make_topics_hf_dir(tmp_path / "hf")
    task = classify.build(classify_smoke_config(tmp_path / "cache", init_from_hf=str(tmp_path / "hf")), None)
    fresh = jax.device_get(task.init_params(jax.random.key(0)))
    params = task.init_from(fresh)
    imported = interop.import_hf(str(tmp_path / "hf")).params["encoder"]
    assert "pooler" in imported and max_leaf_diff(fresh["encoder"], imported) > 0.01
    assert max_leaf_diff(params["encoder"], imported) == 0.0
    np.testing.assert_array_equal(params["encoder"]["token_embed"]["embedding"],
                                  model.bert.embeddings.word_embeddings.weight.detach().numpy())
    assert max_leaf_diff(params["classifier"], fresh["classifier"]) == 0.0, "the head stays fresh"


@pytest.mark.slow  # ~50 s; its parts run in CI: HF init (test_classification_from_an_mlm_run_continued_from_hf, the seam test), launch.py (test_launch), predict (test_classify)
def test_classification_fine_tunes_from_hf_through_launch_and_predicts(tmp_path):
    hf_dir, workdir, cache = tmp_path / "hf", tmp_path / "run", tmp_path / "cache"
    make_topics_hf_dir(hf_dir)
    common = ("--config", f"{CLASSIFY}:smoke", "--workdir", str(workdir),
              f"--config.init_from_hf={hf_dir}", "--config.train.peak_flops_per_device=1e12")
    first = launch(*common, cache_dir=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (workdir / "vocab.txt").read_text() == (hf_dir / "vocab.txt").read_text()
    assert not (workdir / "tokenizer.model").exists()
    recorded = json.loads((workdir / "model.json").read_text())["encoder"]
    assert (recorded["hidden_dim"], recorded["num_layers"], recorded["vocab_size"]) == (64, 2, 120)
    from encoder_jax import checkpoint

    drift = max_leaf_diff(checkpoint.load_params(str(workdir))["encoder"],
                          interop.import_hf(str(hf_dir)).params["encoder"])
    assert 0 < drift < 0.01, "two small Adam steps away from the Hugging Face weights"

    # (resuming through launch.py is tested for every experiment in test_launch.py)
    rows = tmp_path / "new.csv"
    rows.write_text("title,body\nball goal team,coach league win season\n"
                    "chip robot cloud,app data code laptop\n", encoding="utf-8")
    predicted = launch(*common, "--mode", "predict", f"--config.predict.input={rows}", cache_dir=cache)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = [json.loads(x) for x in (workdir / "predictions.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1]
    assert all(abs(sum(x["probabilities"].values()) - 1) < 1e-4 for x in lines)


def test_classification_from_an_mlm_run_continued_from_hf(corpus_files, data_cache, tmp_path):
    """init_from an init_from_hf MLM run: shape from its model.json, its vocab.txt, its encoder."""
    from encoder_jax import checkpoint, train

    make_hf_dir(tmp_path / "hf", "BertForMaskedLM")
    mlm_dir, cls_dir = tmp_path / "mlm", tmp_path / "cls"
    train.run(tiny_config(corpus_files, data_cache, **{
        "init_from_hf": str(tmp_path / "hf"), "train.num_steps": 1, "eval.every_steps": 1}), str(mlm_dir))
    default_shape = json.loads((mlm_dir / "config.json").read_text())["model"]
    assert (default_shape["hidden_dim"], default_shape["num_layers"]) != (64, 2), "shapes must differ"

    train.run(classify_smoke_config(data_cache, **{
        "init_from": str(mlm_dir), "opt.learning_rate": 0.0, "train.num_steps": 1,
        "eval.best_metric": None, "ckpt.use_async": False, "data.max_len": 32,
        "data.pad_lengths": (32,)}), str(cls_dir))  # one padded length: one compile
    recorded = json.loads((cls_dir / "model.json").read_text())["encoder"]
    assert (recorded["hidden_dim"], recorded["num_layers"], recorded["mlp_dim"]) == (64, 2, 128)
    assert (cls_dir / "vocab.txt").read_text() == (mlm_dir / "vocab.txt").read_text()
    mlm_encoder = checkpoint.load_params(str(mlm_dir))["encoder"]
    got = checkpoint.load_params(str(cls_dir))["encoder"]
    assert max_leaf_diff(got, mlm_encoder) == 0.0, "lr 0: the MLM run's encoder, pooler included"


def test_init_from_and_init_from_hf_together_fail_in_one_line(tmp_path):
    from encoder_jax import pretrained

    config = classify_smoke_config(tmp_path / "cache", init_from="runs/mlm", init_from_hf="bert-dir")
    with pytest.raises(ValueError, match=r"^set init_from or init_from_hf, not both"):
        pretrained.wants_pretrained(config)  # also checked on resume, where nothing is resolved
    result = launch("--config", f"{CLASSIFY}:smoke", "--workdir", str(tmp_path / "run"),
                    "--config.init_from=runs/mlm", "--config.init_from_hf=bert-dir", cache_dir=tmp_path / "cache")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("error: set init_from or init_from_hf, not both (init_from='runs/mlm', "
                    "init_from_hf='bert-dir')")


# ----------------------------------------------------------------------------- sentencepiece export


def mixed_texts(count: int, seed: int) -> list[str]:
    """English sentences with Chinese phrases, digits, punctuation and odd spacing."""
    import random

    from conftest import make_documents

    rng = random.Random(seed)
    chinese = ["我爱北京", "天安门", "中文新闻", "今天天气很好", "股票大涨", "足球比赛", "人工智能"]
    out = []
    for doc in make_documents(count, seed):
        words = doc.split()
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(chinese + ["5,000", "(ok)", "  "]))
        out.append(" ".join(words))
    return out


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_export_tokenizes_as_ours_through_auto_tokenizer(tmp_path, model_type):
    from encoder_jax.data.tokenizer import SentencePieceTokenizer

    ours = SentencePieceTokenizer.train(mixed_texts(300, 0), vocab_size=300, model_type=model_type)
    config = EncoderConfig(vocab_size=ours.vocab_size, hidden_dim=16, num_layers=1, num_heads=2,
                           mlp_dim=32, max_len=64)
    params = BertForMaskedLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                          jnp.zeros((1, 1), jnp.int32))["params"]
    interop.export_hf(params, config, str(tmp_path), tokenizer=ours)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = mixed_texts(60, 1) + TEXTS[:3] + ["  spaced   out  ", "ＦＵＬＬ ｗｉｄｔｈ １２３"]
    for text in texts:
        assert theirs(text)["input_ids"] == [ours.cls_id, *ours.encode(text.strip()), ours.sep_id], text
    pair = theirs(texts[0], texts[1])
    assert pair["token_type_ids"].count(1) == len(ours.encode(texts[1])) + 1
    assert theirs.mask_token_id == ours.mask_id and theirs.pad_token_id == ours.pad_id


def test_classification_run_exports_with_its_tokenizer_and_checkpoint(tmp_path, data_cache, capsys):
    """A sentencepiece run: HF export and the artifact take the same checkpoint and agree."""
    from encoder_jax import artifact, export, train

    from test_classify import make_rows, news_config, write_csv

    news = {"train": write_csv(tmp_path / "train.csv", make_rows(120, 0)),
            "dev": write_csv(tmp_path / "dev.csv", make_rows(45, 1))}
    config = news_config(news, data_cache, **{"train.num_steps": 4, "eval.every_steps": 2,
                                              "ckpt.every_steps": 2, "eval.best_metric": "loss"})
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    loaded = artifact.load_artifact(export.export_run(config, workdir))
    capsys.readouterr()
    assert interop.main(["export", workdir, str(tmp_path / "hf")]) == 0
    said = capsys.readouterr().out
    assert f"(checkpoint {loaded.card['source']['checkpoint']}, step {loaded.card['source']['step']})" in said
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    rows = [[title, body] for title, body, _ in make_rows(5, 9)]
    batch = tokenizer([" ".join(r) for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits, -1).numpy()
    np.testing.assert_allclose(probs, loaded.classify(rows), atol=1e-5)
    assert [model.config.id2label[i] for i in range(len(loaded.labels))] == loaded.labels
