"""The HTTP server, through real HTTP: a uvicorn subprocess serving a tiny trained run's export."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from encoder_jax import artifact, export, train
from encoder_jax.serve_engine import ServeConfig

from conftest import ROOT
from test_classify import make_rows, news_config, write_csv

SERVER_FLAGS = ["--max_batch", "16", "--batch_sizes", "1,4", "--max_wait_ms", "30",
                "--max_texts", "8", "--max_chars", "300", "--max_body_bytes", "4000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path, *flags):
    """(process, base url) of `python -m encoder_jax.serve path` once /ready answers 200."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "encoder_jax.serve", path, "--port", str(port),
                             "--log_level", "warning", *flags], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server never became ready")


def stop_server(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def metrics(url) -> dict[str, float]:
    """/metrics as {"name{labels}": value} (parsed as Prometheus text)."""
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_cache):
    directory = tmp_path_factory.mktemp("news")
    news = {"train": write_csv(directory / "train.csv", make_rows(120, 0)),
            "dev": write_csv(directory / "dev.csv", make_rows(45, 1))}
    workdir = str(tmp_path_factory.mktemp("run"))
    config = news_config(news, data_cache, **{"train.num_steps": 3, "eval.every_steps": 3,
                                              "ckpt.every_steps": 3, "data.pad_lengths": (16, 32)})
    train.run(config, workdir)
    return export.export_run(config, workdir)


@pytest.fixture(scope="module")
def loaded(exported):
    return artifact.load_artifact(exported)


@pytest.fixture(scope="module")
def server(exported):
    proc, url = start_server(exported, *SERVER_FLAGS)
    yield url
    stop_server(proc)


def texts_for(count, seed):
    return [f"{title} {body}" for title, body, _ in make_rows(count, seed)]


def test_answers_equal_in_process_prediction(server, loaded):
    rows = [["stocks fell", "oil rose sharply"], "a match was won", "x " * 60]  # the last: truncated
    response = httpx.post(f"{server}/v1/classify", json={"texts": rows, "top_k": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = loaded.classify([r if isinstance(r, list) else [r] for r in rows])
    served = np.asarray([[r["probabilities"][name] for name in loaded.labels] for r in results])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert [r["label"] for r in results] == [loaded.labels[i] for i in expected.argmax(-1)]
    assert [len(r["top_k"]) for r in results] == [2, 2, 2]
    assert [r["truncated"] for r in results] == [False, False, True]
    embed = httpx.post(f"{server}/v1/embed", json={"texts": rows[1:], "pooling": "mean"}).json()
    np.testing.assert_allclose(embed["embeddings"], loaded.embed(rows[1:], "mean"), atol=1e-5)
    assert embed["dim"] == loaded.card["encoder"]["hidden_dim"] and embed["truncated"] == [False, True]


def test_concurrent_distinct_requests_share_batches_and_get_their_own_answers(server, loaded):
    texts = texts_for(48, 3)
    before = metrics(server)

    async def clients():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/classify", json={"texts": [t]})
                                          for t in texts))

    responses = asyncio.run(clients())
    assert all(r.status_code == 200 for r in responses)
    expected = loaded.classify([[t] for t in texts])
    served = np.asarray([[r.json()["results"][0]["probabilities"][n] for n in loaded.labels]
                         for r in responses])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    after = metrics(server)
    batches = after["encoder_jax_batch_rows_count"] - before.get("encoder_jax_batch_rows_count", 0)
    rows = after["encoder_jax_batch_rows_sum"] - before.get("encoder_jax_batch_rows_sum", 0)
    assert rows == 48 and batches < 48  # some batch held more than one request's row
    assert after["encoder_jax_compilations_total"] == before["encoder_jax_compilations_total"]


BAD_REQUESTS = [  # (endpoint, raw body, status, field)
    ("/v1/classify", b'{"texts": ["a"', 400, "body"),
    ("/v1/classify", b'{"texts": "one string"}', 422, "texts"),
    ("/v1/classify", b'{"texts": []}', 422, "texts"),
    ("/v1/classify", b'{"texts": [1]}', 422, "texts.0"),
    ("/v1/classify", b'{}', 422, "texts"),
    ("/v1/classify", json.dumps({"texts": ["a"] * 9}).encode(), 422, "texts"),
    ("/v1/classify", json.dumps({"texts": ["ok", "y" * 301]}).encode(), 422, "texts.1"),
    ("/v1/classify", b'{"texts": ["a"], "top_k": 0}', 422, "top_k"),
    ("/v1/embed", b'{"texts": ["a"], "pooling": "max"}', 422, "pooling"),
    ("/v1/classify", json.dumps({"texts": ["z" * 600] * 8}).encode(), 413, "body"),
]


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(server):
    for endpoint, body, status, field in BAD_REQUESTS:
        response = httpx.post(f"{server}{endpoint}", content=body,
                              headers={"content-type": "application/json"})
        assert (response.status_code, response.json().get("field")) == (status, field), (body, response.text)
        assert field.split(".")[0] in response.json()["error"]
        good = httpx.post(f"{server}/v1/classify", json={"texts": ["still serving"]})
        assert good.status_code == 200
    assert httpx.post(f"{server}/v1/fill-mask", json={"texts": ["a [MASK]"]}).status_code == 404


def test_metrics_are_prometheus_text_and_count_requests(server):
    httpx.post(f"{server}/v1/classify", json={"texts": ["count me"]})
    values = metrics(server)
    assert values["encoder_jax_requests_total{endpoint=/v1/classify,status=200}"] >= 1
    assert values["encoder_jax_request_seconds_count{endpoint=/v1/classify}"] >= 1
    assert values["encoder_jax_ready"] == 1 and values["encoder_jax_tokens_total"] > 0
    for name in ("encoder_jax_queue_rows", "encoder_jax_tokens_per_second",
                 "encoder_jax_batch_seconds_count", "encoder_jax_compilations_total"):
        assert name in values, name
    ready = httpx.get(f"{server}/ready").json()
    assert ready["lengths"] == [16, 32] and ready["batch_sizes"] == [1, 4, 16]


def test_warm_up_compiles_every_shape_so_requests_compile_nothing(server):
    before = metrics(server)["encoder_jax_compilations_total"]
    for count, words in ((1, 2), (3, 5), (5, 40), (16 // 2, 9)):  # every row count and length
        texts = [" ".join(["word"] * words)] * min(count, 8)
        assert httpx.post(f"{server}/v1/classify", json={"texts": texts}).status_code == 200
        assert httpx.post(f"{server}/v1/embed", json={"texts": texts}).status_code == 200
    assert metrics(server)["encoder_jax_compilations_total"] == before


def test_shutdown_finishes_in_flight_requests_and_refusing_long_texts(exported):
    proc, url = start_server(exported, "--max_wait_ms", "1500", "--batch_sizes", "1",
                             "--max_batch", "4", "--no_truncate")
    try:
        refused = httpx.post(f"{url}/v1/classify", json={"texts": ["x " * 60]})
        assert refused.status_code == 422 and "--no_truncate" in refused.json()["error"]
        answers = []
        client = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{url}/v1/classify", json={"texts": ["in flight"]}, timeout=30)))
        client.start()
        time.sleep(0.5)  # the request waits in the batcher for up to 1.5 s
        proc.send_signal(signal.SIGTERM)
        client.join(30)
        assert answers and answers[0].status_code == 200, answers
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "encoder_jax.serve", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    for field in ServeConfig.__dataclass_fields__:
        assert f"--{field}" in out.stdout or (field == "truncate" and "--no_truncate" in out.stdout)


def test_a_missing_path_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "encoder_jax.serve", str(tmp_path / "nothing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nothing" in out.stderr


def test_openapi_documents_the_endpoints_and_a_full_queue_answers_429(loaded):
    """In process (ASGI): /openapi.json lists the routes; requests beyond max_queue get 429."""
    from encoder_jax.serve_app import build_app

    app = build_app(loaded, ServeConfig(max_batch=2, batch_sizes=(2,), lengths=(32,), max_queue=2))
    engine = app.app.state.engine
    engine.warm_up()
    gate = threading.Event()
    run = engine.artifact.run
    engine.artifact.run = lambda *a, **k: (gate.wait(30), run(*a, **k))[1]  # a slow model

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=60) as c:
            spec = (await c.get("/openapi.json")).json()
            tasks = [asyncio.create_task(c.post("/v1/classify", json={"texts": [f"text {i}"]}))
                     for i in range(6)]
            await asyncio.sleep(0.5)
            gate.set()
            return spec, await asyncio.gather(*tasks)

    try:
        spec, responses = asyncio.run(ask())
    finally:
        engine.artifact.run = run
        engine.batcher.stop()
    assert {"/v1/classify", "/v1/embed", "/health", "/ready", "/metrics"} <= set(spec["paths"])
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert "queue full" in refused.json()["error"] and refused.headers["retry-after"] == "1"
