"""The translation task: metrics equal sacrebleu's, predict, init_from an MLM run, bad input."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from encoder_jax import checkpoint, metrics, train
from encoder_jax import workdir as workdir_lib

from conftest import ROOT, override, tiny_config

_spec = importlib.util.spec_from_file_location(
    "translate_zh_en", os.path.join(ROOT, "experiments", "translate_zh_en.py"))
translate_zh_en = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(translate_zh_en)


def smoke_config(data_cache, **overrides):
    config = translate_zh_en.get_config("smoke")
    config.data.data_dir = data_cache
    return override(config, overrides)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_cache):
    workdir = str(tmp_path_factory.mktemp("translate_smoke"))
    result = train.run(smoke_config(data_cache), workdir)
    return workdir, result


def test_bleu_and_chrf_equal_sacrebleu_on_fixed_strings():
    import sacrebleu

    hyps = ["the cat sat on the mat", "two children play", "", "May 17, 2023"]
    refs = ["the cat sat on a mat", "two children are playing", "nothing", "May 17, 2023"]
    ours = metrics.bleu_chrf(hyps, refs)
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert ours["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert metrics.bleu_chrf(refs, refs)["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="3 hypotheses but 4 references"):
        metrics.bleu_chrf(hyps[:3], refs)


def test_smoke_run_evaluates_bleu_and_writes_translations(smoke_run):
    workdir, result = smoke_run
    assert {"bleu", "chrf", "loss", "nll", "perplexity", "accuracy"} <= set(result)
    record = workdir_lib.read_model_record(workdir)
    assert record.task == "translate" and record.fields["decoder_layers"] == 1
    text = open(os.path.join(workdir, "translations", "step_2.txt"), encoding="utf-8").read()
    assert "BLEU signature: nrefs:1" in text and "SRC " in text and "HYP " in text
    hypotheses = open(os.path.join(workdir, "translations", "step_2.hyp"), encoding="utf-8")
    assert len(hypotheses.read().splitlines()) == 64  # data.max_eval_examples
    assert os.path.isfile(os.path.join(workdir, "plots", "bleu.png"))
    events = b"".join(open(os.path.join(root, name), "rb").read()
                      for root, _, names in os.walk(os.path.join(workdir, "tensorboard"))
                      for name in names)
    assert b"eval/translations" in events, "sample translations reach TensorBoard as text"


def test_predict_writes_one_line_per_input_with_scores_and_nbest(smoke_run, data_cache, tmp_path):
    workdir, _ = smoke_run
    source = tmp_path / "in.zh.txt"
    source.write_text("三百四十五\n\n" + "五" * 200 + "\n第三\n", encoding="utf-8")
    config = smoke_config(data_cache, **{"predict.input": str(source), "predict.nbest": 2,
                                         "predict.output": str(tmp_path / "out.txt")})
    output = train.predict(config, workdir)
    lines = open(output, encoding="utf-8").read().split("\n")
    assert len(lines) == 5 and lines[1] == "" and lines[4] == ""  # 4 inputs, the empty one stays empty
    records = [json.loads(x) for x in open(tmp_path / "out.jsonl", encoding="utf-8")]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert all(len(r["nbest"]) == 2 for r in records)
    assert all(r["nbest"][0]["score"] >= r["nbest"][1]["score"] for r in records)
    assert records[0]["translation"] == lines[0]


def test_predict_refuses_a_run_of_another_task(smoke_run, data_cache, tmp_path, corpus_files):
    mlm_dir = str(tmp_path / "mlm")
    train.run(tiny_config(corpus_files, data_cache, **{"train.num_steps": 1}), mlm_dir)
    config = smoke_config(data_cache, **{"predict.input": "x.txt"})
    with pytest.raises(ValueError, match="task='mlm' has no predict mode"):
        train.predict(tiny_config(corpus_files, data_cache), mlm_dir)
    with pytest.raises(FileNotFoundError, match="holds no translation run"):
        from encoder_jax.tasks import translate

        translate.predict(config, workdir_lib.load_trained(mlm_dir))


def test_encoder_initialised_from_an_mlm_run(corpus_files, data_cache, tmp_path):
    mlm_dir, mt_dir = str(tmp_path / "mlm"), str(tmp_path / "mt")
    train.run(tiny_config(corpus_files, data_cache, **{"train.num_steps": 1}), mlm_dir)
    with pytest.raises(ValueError, match="share_embeddings=True with init_from="):
        train.run(smoke_config(data_cache, init_from=mlm_dir), str(tmp_path / "shared"))
    config = smoke_config(data_cache, **{"init_from": mlm_dir, "model.share_embeddings": False,
                                         "opt.learning_rate": 0.0, "train.num_steps": 1})
    train.run(config, mt_dir)
    want = checkpoint.load_params(mlm_dir)["encoder"]
    got = checkpoint.load_params(mt_dir)["encoder"]
    for path in ("token_embed", "block_0", "embed_norm"):
        for a, b in zip(jax.tree_util.tree_leaves(want[path]), jax.tree_util.tree_leaves(got[path])):
            np.testing.assert_array_equal(a, b)
    assert "pooler" not in got, "the translation encoder has no pooler"
    record = workdir_lib.read_model_record(mt_dir)
    assert not record.fields["joint_tokenizer"] and not record.encoder.pre_norm  # the MLM run's shape
    assert os.path.isfile(os.path.join(mt_dir, "target_tokenizer", "tokenizer.model"))
    assert open(os.path.join(mt_dir, "tokenizer.model"), "rb").read() == \
        open(os.path.join(mlm_dir, "tokenizer.model"), "rb").read()
    broken = json.load(open(os.path.join(mlm_dir, "model.json")))
    broken["encoder"]["vocab_size"] += 1
    workdir_lib.write_json(os.path.join(mlm_dir, "model.json"), broken)
    with pytest.raises(ValueError, match=r"encoder vocab \d+ != tokenizer vocab \d+"):
        train.run(config, str(tmp_path / "mismatch"))


def test_data_longer_than_the_model_is_a_one_line_error(data_cache, tmp_path):
    config = smoke_config(data_cache, **{"data.max_len": 200, "data.pad_lengths": (16, 200)})
    with pytest.raises(ValueError, match=r"^data.max_len=200 exceeds model.max_len=128"):
        train.run(config, str(tmp_path / "run"))


def test_predict_through_launch_py(smoke_run, data_cache, tmp_path):
    import subprocess
    import sys

    workdir, _ = smoke_run
    source = tmp_path / "in.txt"
    source.write_text("五十二\n一把椅子\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
         os.path.join(ROOT, "experiments", "translate_zh_en.py") + ":smoke", "--workdir", workdir,
         "--mode", "predict", f"--config.predict.input={source}", f"--config.data.data_dir={data_cache}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(open(os.path.join(workdir, "predictions.txt"), encoding="utf-8").read().splitlines()) == 2
    missing = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
         os.path.join(ROOT, "experiments", "translate_zh_en.py") + ":smoke", "--workdir", workdir,
         "--mode", "predict", f"--config.predict.input={tmp_path / 'nope.txt'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and str(tmp_path / "nope.txt") in missing.stderr.splitlines()[-1]


@pytest.mark.slow
def test_the_demo_learns_dev_bleu_rises_well_above_its_first_evaluation(data_cache, tmp_path):
    """The demo data with a small model: BLEU after 600 steps >> after 50 (about 3 minutes)."""
    config = smoke_config(data_cache, **{
        "model.hidden_dim": 64, "model.num_heads": 4, "model.mlp_dim": 256, "model.num_layers": 2,
        "model.decoder_layers": 2, "tokenizer.vocab_size": 600, "data.max_tokens": 2048,
        "train.num_steps": 600, "eval.every_steps": 50, "opt.warmup_steps": 100,
        "data.max_eval_examples": 200, "ckpt.every_steps": 600, "train.log_every": 50})
    train.run(config, str(tmp_path / "run"))
    evals = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    bleu = [r["bleu"] for r in evals if r["split"] == "eval"]
    assert bleu[-1] > bleu[0] + 20, bleu


def test_export_translates_as_predict_and_serves_v1_translate(smoke_run, data_cache, tmp_path):
    """The exported beam search (symbolic batch and source length) gives predict's hypotheses."""
    import asyncio

    import httpx

    from encoder_jax import artifact, export
    from encoder_jax.serve_app import build_app
    from encoder_jax.serve_engine import ServeConfig

    workdir, _ = smoke_run
    sentences = ["三百四十五", "第三", "二〇二三年五月十七日", ""]
    source = tmp_path / "in.zh.txt"
    source.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    config = smoke_config(data_cache, **{"predict.input": str(source), "predict.nbest": 2,
                                         "predict.output": str(tmp_path / "out.txt")})
    train.predict(config, workdir)
    expected = [json.loads(x) for x in open(tmp_path / "out.jsonl", encoding="utf-8")]
    loaded = artifact.load_artifact(export.export_run(None, workdir, str(tmp_path / "export")))
    assert loaded.card["translate"]["beam_size"] == config.translate.beam_size
    got = loaded.translate(sentences, nbest=2, batch_size=3)
    for hyps, record in zip(got[:3], expected):
        assert [h for h, _ in hyps] == [n["translation"] for n in record["nbest"]]
        np.testing.assert_allclose([s for _, s in hyps], [n["score"] for n in record["nbest"]],
                                   atol=1e-4)
    app = build_app(loaded, ServeConfig(max_batch=4, batch_sizes=(4,), lengths=(16,), max_queue=8))
    app.app.state.engine.warm_up()

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.post("/v1/translate", json={"texts": sentences, "nbest": 2}),
                    await c.post("/v1/translate", json={"texts": ["三"], "nbest": 99}))

    good, too_many = asyncio.run(ask())
    app.app.state.engine.batcher.stop()
    assert good.status_code == 200, good.text
    served = good.json()["results"]
    assert [r["translation"] for r in served[:3]] == [r["translation"] for r in expected[:3]]
    assert served[3]["translation"] == "" and len(served[0]["nbest"]) == 2
    assert (too_many.status_code, too_many.json()["field"]) == (422, "nbest")
