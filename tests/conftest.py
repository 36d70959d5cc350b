"""Shared fixtures: a tiny deterministic corpus and a shrunken MLM config."""

from __future__ import annotations

import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "the old man",
            "a small bird", "the farmer", "her brother", "the young girl"]
VERBS = ["sees", "likes", "feeds", "finds", "follows", "paints", "calls", "helps"]
OBJECTS = ["the red ball", "a green apple", "the big house", "a quiet river", "the tall tree",
           "a yellow flower", "the long road", "a warm coat", "the blue sky"]
PLACES = ["in the morning", "at night", "near the park", "after school", "by the sea",
          "under the bridge", "before dinner"]


def make_documents(count: int, seed: int = 0) -> list[str]:
    """Grammatical toy documents: learnable structure for loss-falls tests."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                     f"{rng.choice(PLACES)}." for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences).capitalize())
    return docs


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """{'train': path, 'validation': path}: one document per line."""
    directory = tmp_path_factory.mktemp("corpus")
    paths = {}
    for split, count, seed in (("train", 400, 0), ("validation", 40, 1)):
        path = directory / f"{split}.txt"
        path.write_text("\n".join(make_documents(count, seed)) + "\n", encoding="utf-8")
        paths[split] = str(path)
    return paths


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_cache"))


def override(config, overrides: dict):
    """Sets dotted fields ('opt.learning_rate' -> value) like --config.a.b=v; returns config."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def tiny_config(corpus_files, data_cache, **overrides):
    """experiments/bert_mlm.py:smoke on the toy corpus; overrides as 'a.b' -> value."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import bert_mlm

    config = bert_mlm.get_config("smoke")
    config.data.files.train = corpus_files["train"]
    config.data.files.validation = corpus_files["validation"]
    config.data.data_dir = data_cache
    config.tokenizer.vocab_size = 200
    config.train.log_every = 1
    return override(config, overrides)


_OWN_COMPILE_CACHE: list[str] = []  # the cache directory this process made (and removes)


def pytest_configure(config):
    # One persistent XLA compilation cache for the session, its xdist workers and every
    # subprocess they start (launch.py runs): the same tiny programs compile once.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        import tempfile

        _OWN_COMPILE_CACHE.append(tempfile.mkdtemp(prefix="encoder_jax_jit_cache_"))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILE_CACHE[0]
    # The tests run tiny programs, so compiling dominates: XLA skips its expensive
    # optimisation passes (for the workers and subprocesses too), about a fifth of the wall time.
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_unconfigure(config):
    import shutil

    for directory in _OWN_COMPILE_CACHE:
        shutil.rmtree(directory, ignore_errors=True)
