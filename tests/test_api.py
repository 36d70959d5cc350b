"""The public API: a light lazy namespace, hub ids from a local cache, notebooks, the docs build."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encoder_jax as ej
from encoder_jax import hub, interop
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertForMaskedLM

from conftest import ROOT

NOTEBOOKS = sorted(n for n in os.listdir(os.path.join(ROOT, "notebooks")) if n.endswith(".ipynb"))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def test_import_starts_no_work_and_every_public_name_resolves():
    out = subprocess.run([sys.executable, "-c", (
        "import sys, encoder_jax as ej; loaded = sorted(m for m in sys.modules if m.startswith(('jax', "
        "'flax', 'encoder_jax.'))); print(loaded); import pydoc; "
        "print('load_pretrained' in pydoc.render_doc(ej, renderer=pydoc.plaintext))")],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded, listed = out.stdout.strip().splitlines()[-2:]
    assert loaded == "[]" and listed == "True"  # nothing heavy imported; help(ej) lists the API
    for name in ej.__all__:
        assert getattr(ej, name) is not None, name
    assert ej.train.run is not None and ej.__version__


def test_a_run_writes_tensorboard_events_without_importing_torch_or_truncating_them(tmp_path):
    """tensorboardX imports torch whenever it is installed: seconds and memory in every run."""
    out = subprocess.run([sys.executable, "-c", (
        "import importlib.util, sys; from encoder_jax import reporting; "
        "w = reporting.MetricWriter(sys.argv[1]); w.write(1, 'train', {'loss': 2.5}); w.close(); "
        "w = reporting.MetricWriter(sys.argv[1]); w.write(2, 'eval', {'bleu': 9.5}); w.close(); "
        "reporting.write_text_summary(sys.argv[1], 'eval/samples', 'a line', 1); "
        "print(importlib.util.find_spec('torch') is not None, 'torch' in sys.modules)"), str(tmp_path)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    scalars = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir() if p.is_file())
    # Writers opened in the same second keep their own files (tensorboardX truncates a namesake);
    # texts go to a directory of their own (TensorBoard follows a directory's newest file only).
    assert b"train/loss" in scalars and b"eval/bleu" in scalars and b"eval/samples" not in scalars
    texts = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard" / "samples").iterdir())
    assert b"eval/samples" in texts
    installed, imported = out.stdout.split()
    if installed != "True":
        pytest.skip("torch is not installed: nothing to keep out")
    assert imported == "False"


def write_hf_bert(directory, seed=0):
    """A small BERT in Hugging Face layout (config.json, model.safetensors, vocab.txt)."""
    from encoder_jax.data.wordpiece import WordPieceTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    config = EncoderConfig(vocab_size=len(words), hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32,
                           max_len=16)
    params = BertForMaskedLM(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32),
                                          jnp.zeros((1, 1), jnp.int32))["params"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    interop.export_hf(params, config, str(directory), tokenizer=WordPieceTokenizer.load(str(directory)))
    return params


def hub_cache(root, repo, files_dir, revision="0123456789abcdef0123456789abcdef01234567"):
    """The hub cache layout: models--org--name/{refs/main, snapshots/<sha>/<files>}."""
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(base, "snapshots", revision)
    os.makedirs(snapshot)
    for name in os.listdir(files_dir):
        os.link(os.path.join(files_dir, name), os.path.join(snapshot, name))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(revision)
    return revision


LOAD_FROM_HUB = """
import json, sys
import encoder_jax as ej
from encoder_jax import pretrained
out = {}
for name in sys.argv[1:]:
    try:
        model, params, tokenizer = ej.load_pretrained(name)
        out[name] = float(sum(abs(x).sum() for x in __import__("jax").tree.leaves(params)))
        out[name + " init_from_hf"] = pretrained.from_hf(name).config.hidden_dim
    except FileNotFoundError as e:
        out[name] = "error: " + str(e)
print(json.dumps(out))
"""


def test_hub_ids_load_offline_from_the_local_cache_and_a_missing_one_is_one_line(tmp_path):
    params = write_hf_bert(tmp_path / "files")
    revision = hub_cache(str(tmp_path / "cache"), "org/tiny-bert", str(tmp_path / "files"))
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    names = ["org/tiny-bert", f"org/tiny-bert@{revision}", "org/not-there"]
    out = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, *names], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(params)))
    assert result["org/tiny-bert"] == pytest.approx(expected, rel=1e-6)
    assert result[f"org/tiny-bert@{revision}"] == pytest.approx(expected, rel=1e-6)
    assert result["org/tiny-bert init_from_hf"] == 16
    message = result["org/not-there"]
    assert message.startswith("error: load_pretrained='org/not-there'") and "\n" not in message
    assert "pass its directory" in message


def test_hub_resolve_keeps_directories_and_refuses_non_ids(tmp_path):
    assert hub.resolve(str(tmp_path)) == str(tmp_path)
    assert hub.split_id("org/name@v1.0") == ("org/name", "v1.0") and hub.split_id("bert") == ("bert", None)
    with pytest.raises(FileNotFoundError, match="neither a directory nor a Hugging Face hub id"):
        hub.resolve("./no/such/dir")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    os.environ["RUNS"] = str(tmp_path)  # the kernel inherits it: runs go to this test's directory
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    finally:
        del os.environ["RUNS"]
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert len(NOTEBOOKS) >= 3
    for name in NOTEBOOKS:
        notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, name


def test_docs_build_in_strict_mode(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT,
                         env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    assert "load_pretrained" in (tmp_path / "site" / "api" / "index.html").read_text()
