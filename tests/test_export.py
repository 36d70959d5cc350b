"""--mode export: a classification run -> a self-contained artifact that predicts as the run does."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from encoder_jax import artifact, export, train
from encoder_jax import workdir as workdir_lib
from encoder_jax.tasks import classify

from conftest import ROOT
from test_classify import make_rows, news_config, write_csv

# Loads the artifact in a fresh interpreter in which the trainer, the tasks, the exporter and
# the experiment configs cannot be imported; prints the probabilities as JSON.
LOAD_ELSEWHERE = """
import importlib.abc, json, sys
BLOCKED = ("encoder_jax.train", "encoder_jax.tasks", "encoder_jax.export", "experiments")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(BLOCKED):
            raise ImportError(f"{name} must not be needed to load an artifact")
sys.meta_path.insert(0, Block())
from encoder_jax.artifact import load_artifact
loaded = load_artifact(sys.argv[1])
print(json.dumps(loaded.classify(json.loads(sys.argv[2])).tolist()))
"""


@pytest.fixture(scope="module")
def news(tmp_path_factory):
    directory = tmp_path_factory.mktemp("news")
    return {"train": write_csv(directory / "train.csv", make_rows(120, 0)),
            "dev": write_csv(directory / "dev.csv", make_rows(45, 1)), "dir": str(directory)}


@pytest.fixture(scope="module")
def exported_run(news, data_cache, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = news_config(news, data_cache, **{"train.num_steps": 3, "eval.every_steps": 3,
                                              "ckpt.every_steps": 3})
    train.run(config, workdir)
    return config, workdir, export.export_run(config, workdir)


def reference_probabilities(config, workdir, rows):
    """What the run's own model gives, through the training code's encoding and model."""
    run = workdir_lib.load_trained(workdir)
    data_cfg = classify.configs.section(classify.configs.ClassifyDataConfig, config.data, "data")
    encoding = classify.encoding_config(data_cfg, 2)
    model = classify.build_model(run.record)
    out = []
    for texts in rows:
        ids, types = classify.data_lib.encode_texts(run.tokenizer, texts, encoding)
        logits = model.apply({"params": run.params}, ids[None], segment_ids=(ids[None] > 0) * 1,
                             type_ids=types[None])
        out.append(np.asarray(jax.nn.softmax(logits, -1))[0])
    return np.stack(out)


def test_artifact_holds_function_weights_tokenizer_and_card(exported_run):
    _, workdir, directory = exported_run
    assert directory == os.path.join(workdir, export.EXPORT_DIR)
    for name in (artifact.function_file("classify"), artifact.function_file("embed"), artifact.WEIGHTS_FILE, artifact.CARD_FILE, "tokenizer.model"):
        assert os.path.isfile(os.path.join(directory, name)), name
    card = json.load(open(os.path.join(directory, artifact.CARD_FILE)))
    assert card["task"] == "classify" and len(card["labels"]) == card["fields"]["num_classes"]
    assert card["source"]["step"] == 3 and card["source"]["checkpoint"] in (".", "best")
    assert card["final_eval"]["step"] == 3 and card["encoding"]["pad_lengths"][-1] == card["encoding"]["max_len"]
    assert not [n for n in os.listdir(workdir) if n.startswith(".export-")]  # no staging left


def test_artifact_predicts_as_the_run_in_a_process_without_the_trainer(exported_run):
    config, workdir, directory = exported_run
    rows = [[title, body] for title, body, _ in make_rows(6, 7)] + [["", ""]]
    expected = reference_probabilities(config, workdir, rows)
    in_process = artifact.load_artifact(directory).classify(rows, batch_size=4)
    np.testing.assert_allclose(in_process, expected, atol=1e-5)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, directory, json.dumps(rows)],
                         capture_output=True, text=True, env=env, cwd=str(directory), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.asarray(json.loads(out.stdout.strip().splitlines()[-1])),
                               expected, atol=1e-5)


def test_export_without_a_checkpoint_is_one_line_and_keeps_an_earlier_artifact(news, data_cache,
                                                                             tmp_path):
    config = news_config(news, data_cache)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        export.export_run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_an_unreadable_card_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="is it an encoder_jax export"):
        artifact.load_artifact(str(tmp_path))
    (tmp_path / artifact.CARD_FILE).write_text(json.dumps({"format": 99, "task": "classify"}))
    with pytest.raises(ValueError, match="this version reads format 2"):
        artifact.load_artifact(str(tmp_path))


@pytest.fixture(scope="module")
def mlm_export(corpus_files, data_cache, tmp_path_factory):
    from conftest import tiny_config

    workdir = str(tmp_path_factory.mktemp("mlm"))
    config = tiny_config(corpus_files, data_cache, **{"train.num_steps": 2, "eval.every_steps": 2,
                                                      "ckpt.every_steps": 2})
    train.run(config, workdir)
    return workdir, export.export_run(None, workdir)  # the encoding comes from the run's config.json


def test_mlm_artifact_fills_masks_and_embeds_as_the_run_model(mlm_export):
    from encoder_jax.models import BertEncoder, BertForMaskedLM

    workdir, directory = mlm_export
    run, loaded = workdir_lib.load_trained(workdir), artifact.load_artifact(directory)
    assert sorted(loaded.functions) == ["embed", "fill_mask"] and loaded.task == "mlm"
    text = "the cat [MASK] the red ball [MASK] the morning."
    row = loaded.encode_masked(text)
    assert (row.ids[row.positions] == run.tokenizer.mask_id).all() and len(row.positions) == 2
    logits = BertForMaskedLM(run.record.encoder).apply(
        {"params": run.params}, row.ids[None], row.positions[None],
        segment_ids=np.ones_like(row.ids)[None], type_ids=row.type_ids[None])
    probs = np.asarray(jax.nn.softmax(logits, -1))[0]
    top = np.argsort(-probs, axis=-1)[:, :5]
    got = loaded.fill_mask([text], top_k=5)[0]
    assert [[token for token, _ in mask] for mask in got] == [
        [run.tokenizer.id_to_piece(int(i)) for i in ids] for ids in top]
    np.testing.assert_allclose([[p for _, p in mask] for mask in got],
                               np.take_along_axis(probs, top, -1), atol=1e-6)
    ids, types = loaded.encode(["a dog sees the tall tree."]).ids, None
    hidden, _ = BertEncoder(run.record.encoder).apply({"params": run.params["encoder"]}, ids[None])
    np.testing.assert_allclose(loaded.embed(["a dog sees the tall tree."], "cls")[0],
                               np.asarray(hidden)[0, 0], atol=1e-5)
    np.testing.assert_allclose(loaded.embed(["a dog sees the tall tree."], "mean")[0],
                               np.asarray(hidden)[0].mean(0), atol=1e-5)


def test_fill_mask_route_answers_and_refuses_text_without_a_mask(mlm_export):
    import asyncio

    import httpx

    from encoder_jax.serve_app import build_app
    from encoder_jax.serve_engine import ServeConfig

    loaded = artifact.load_artifact(mlm_export[1])
    app = build_app(loaded, ServeConfig(max_batch=2, batch_sizes=(1,), max_queue=8))
    app.app.state.engine.warm_up()  # the ASGI transport runs no lifespan

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            good = await c.post("/v1/fill-mask", json={"texts": ["the cat [MASK] a ball."], "top_k": 3})
            bad = await c.post("/v1/fill-mask", json={"texts": ["no marker"]})
            too_many = await c.post("/v1/fill-mask", json={"texts": ["[MASK] a"], "top_k": 21})
            return good, bad, too_many

    good, bad, too_many = asyncio.run(ask())
    app.app.state.engine.batcher.stop()
    assert good.status_code == 200, good.text
    expected = loaded.fill_mask(["the cat [MASK] a ball."], top_k=3)[0][0]
    assert [(c["token"], round(c["score"], 5)) for c in good.json()["results"][0]["masks"][0]] == [
        (token, round(p, 5)) for token, p in expected]
    assert (bad.status_code, bad.json()["field"]) == (422, "texts.0")
    assert (too_many.status_code, too_many.json()["field"]) == (422, "top_k")


def test_predict_through_the_artifact_writes_what_predict_on_the_workdir_writes(exported_run, news,
                                                                                tmp_path):
    from conftest import override

    config, workdir, directory = exported_run
    rows = make_rows(9, 11)
    path = write_csv(tmp_path / "new.csv", rows)
    outputs = {}
    for name, artifact_dir in (("workdir", None), ("artifact", directory)):
        cfg = override(config.copy_and_resolve_references(), {
            "predict.input": path, "predict.output": str(tmp_path / f"{name}.jsonl"),
            "predict.artifact": artifact_dir, "predict.batch_size": 4})
        out = (export.predict_with_artifact(cfg, workdir) if artifact_dir
               else train.predict(cfg, workdir))
        outputs[name] = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert len(outputs["artifact"]) == len(rows)
    for a, b in zip(outputs["workdir"], outputs["artifact"]):
        assert a["label"] == b["label"] and a["index"] == b["index"]
        np.testing.assert_allclose(list(a["probabilities"].values()),
                                   list(b["probabilities"].values()), atol=2e-6)
