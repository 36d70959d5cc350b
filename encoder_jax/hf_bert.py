"""The Hugging Face BERT format: config.json fields, tensor names and layouts, file reading.

Pure numpy: safetensors are read with `safetensors.numpy`; torch is imported
only to read a `pytorch_model.bin` (`weights_only=True`: no pickled code runs).

Layouts (Hugging Face -> here): a torch Linear weight is (out, in), a Flax
Dense kernel (in, out); the attention projections split heads, so query/key/
value kernels are (D, N, H) with biases (N, H), and the output kernel is (N, H, D).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from encoder_jax import errors
from encoder_jax.layers import EncoderConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Hugging Face hidden_act -> EncoderConfig.activation, and back.
IMPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                      "relu": "relu", "silu": "silu", "swish": "silu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
IGNORED_SUFFIXES = ("position_ids",)  # buffers some checkpoints store; not parameters

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: Hugging Face name (encoder names without "bert."), param path, layout, our shape."""

    name: str
    path: tuple[str, ...]
    kind: str  # copy | dense | heads_in | heads_in_bias | heads_out
    shape: tuple[int, ...]


def _dense(name: str, path: tuple[str, ...], d_in: int, d_out: int) -> list[Entry]:
    return [Entry(f"{name}.weight", (*path, "kernel"), "dense", (d_in, d_out)),
            Entry(f"{name}.bias", (*path, "bias"), "copy", (d_out,))]


def _norm(name: str, path: tuple[str, ...], dim: int) -> list[Entry]:
    return [Entry(f"{name}.weight", (*path, "scale"), "copy", (dim,)),
            Entry(f"{name}.bias", (*path, "bias"), "copy", (dim,))]


def encoder_entries(cfg: EncoderConfig) -> list[Entry]:
    """Embeddings and blocks (no pooler), paths relative to the encoder."""
    d, n, h, f = cfg.hidden_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    out = [Entry("embeddings.word_embeddings.weight", ("token_embed", "embedding"), "copy",
                 (cfg.vocab_size, d)),
           Entry("embeddings.position_embeddings.weight", ("position_embed", "embedding"), "copy",
                 (cfg.max_len, d))]
    if cfg.type_vocab_size:
        out.append(Entry("embeddings.token_type_embeddings.weight", ("type_embed", "embedding"),
                         "copy", (cfg.type_vocab_size, d)))
    out += _norm("embeddings.LayerNorm", ("embed_norm",), d)
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.layer.{i}", f"block_{i}"
        for part in ("query", "key", "value"):
            out += [Entry(f"{hf}.attention.self.{part}.weight", (ours, "attention", part, "kernel"),
                          "heads_in", (d, n, h)),
                    Entry(f"{hf}.attention.self.{part}.bias", (ours, "attention", part, "bias"),
                          "heads_in_bias", (n, h))]
        out += [Entry(f"{hf}.attention.output.dense.weight", (ours, "attention", "out", "kernel"),
                      "heads_out", (n, h, d)),
                Entry(f"{hf}.attention.output.dense.bias", (ours, "attention", "out", "bias"),
                      "copy", (d,))]
        out += _norm(f"{hf}.attention.output.LayerNorm", (ours, "attention_norm"), d)
        out += _dense(f"{hf}.intermediate.dense", (ours, "mlp", "wi"), d, f)
        out += _dense(f"{hf}.output.dense", (ours, "mlp", "wo"), f, d)
        out += _norm(f"{hf}.output.LayerNorm", (ours, "mlp_norm"), d)
    return out


def pooler_entries(cfg: EncoderConfig) -> list[Entry]:
    return _dense("pooler.dense", ("pooler",), cfg.hidden_dim, cfg.hidden_dim)


def mlm_head_entries(cfg: EncoderConfig) -> list[Entry]:
    """The MLM head outside the encoder; the decoder weight is tied to the token embeddings."""
    d = cfg.hidden_dim
    return (_dense("cls.predictions.transform.dense", ("transform",), d, d)
            + _norm("cls.predictions.transform.LayerNorm", ("transform_norm",), d)
            + [Entry("cls.predictions.bias", ("output_bias",), "copy", (cfg.vocab_size,))])


def classifier_entries(cfg: EncoderConfig, num_labels: int) -> list[Entry]:
    return _dense("classifier", (), cfg.hidden_dim, num_labels)


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of a tensor whose shape here is `shape`."""
    if kind == "dense":
        return shape[::-1]
    if kind == "heads_in":  # (D, N, H) <- (N*H, D)
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_in_bias":
        return (shape[0] * shape[1],)
    if kind == "heads_out":  # (N, H, D) <- (D, N*H)
        return (shape[2], shape[0] * shape[1])
    return shape


def to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind in ("dense", "heads_in", "heads_out"):
        w = w.T
    return np.ascontiguousarray(w.reshape(shape), np.float32)


def to_theirs(kind: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if kind == "heads_in":
        x = x.reshape(x.shape[0], -1)
    elif kind == "heads_in_bias":
        x = x.reshape(-1)
    elif kind == "heads_out":
        x = x.reshape(-1, x.shape[-1])
    if kind in ("dense", "heads_in", "heads_out"):
        x = x.T
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------- config


def read_config(directory: str) -> dict:
    """The parsed `config.json` of a Hugging Face directory."""
    if not os.path.isdir(directory):
        raise errors.MissingFileError(f"Hugging Face directory {directory!r} does not exist")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"{directory}: no {CONFIG_FILE}; a Hugging Face BERT directory "
                                      f"holds config.json, the weights and vocab.txt")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise errors.DataError(f"{path}: not valid JSON ({e})") from None


def encoder_config(hf: dict, path: str = CONFIG_FILE) -> EncoderConfig:
    """EncoderConfig equal to a BERT config.json (defaults: BertConfig's)."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type != "bert" or any(not a.startswith("Bert") for a in architectures):
        raise errors.DataError(f"{path}: model_type={model_type!r}, architectures={architectures}; "
                               f"only BERT is supported (model_type 'bert', Bert* architectures)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise errors.DataError(f"{path}: position_embedding_type={hf['position_embedding_type']!r}; "
                               f"valid: 'absolute'")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise errors.DataError(f"{path}: is_decoder/add_cross_attention are set; only the BERT encoder is supported")
    if hf.get("tie_word_embeddings", True) is False:
        raise errors.DataError(f"{path}: tie_word_embeddings=false; the MLM head here is tied to the embeddings")
    act = hf.get("hidden_act", "gelu")
    if act not in IMPORT_ACTIVATIONS:
        raise errors.DataError(f"{path}: hidden_act={act!r}; valid: {sorted(IMPORT_ACTIVATIONS)}")
    return EncoderConfig(
        vocab_size=int(hf.get("vocab_size", 30522)), hidden_dim=int(hf.get("hidden_size", 768)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)),
        max_len=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
        activation=IMPORT_ACTIVATIONS[act], layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        pre_norm=False, use_pooler=True, init_std=float(hf.get("initializer_range", 0.02)))


def hf_config(cfg: EncoderConfig, architecture: str) -> dict:
    """A BERT config.json for `cfg` (post-LN only: Hugging Face BERT has no pre-LN variant)."""
    if cfg.pre_norm:
        raise errors.DataError("model.pre_norm=True cannot be exported: Hugging Face BERT is post-LN")
    if cfg.bigram_buckets:
        raise errors.DataError(f"model.bigram_buckets={cfg.bigram_buckets} cannot be exported: Hugging "
                               f"Face BERT has no hashed-bigram embedding")
    if cfg.activation not in EXPORT_ACTIVATIONS:
        raise errors.DataError(f"model.activation={cfg.activation!r} has no Hugging Face BERT "
                               f"equivalent; valid: {sorted(EXPORT_ACTIVATIONS)}")
    return {"architectures": [architecture], "model_type": "bert",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_dim,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.mlp_dim, "hidden_act": EXPORT_ACTIVATIONS[cfg.activation],
            "hidden_dropout_prob": cfg.dropout_rate,
            "attention_probs_dropout_prob": cfg.attention_dropout_rate,
            "max_position_embeddings": cfg.max_len, "type_vocab_size": max(cfg.type_vocab_size, 1),
            "initializer_range": cfg.init_std, "layer_norm_eps": cfg.layer_norm_eps,
            "pad_token_id": 0, "position_embedding_type": "absolute",
            "tie_word_embeddings": True, "classifier_dropout": None, "dtype": "float32"}


def label_names(hf: dict, classifier: Params | None) -> list[str] | None:
    """Class names from `id2label`, in id order (None without a classifier)."""
    if classifier is None:
        return None
    num_labels = np.shape(classifier["bias"])[0]
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(num_labels)]


# ----------------------------------------------------------------------------- files


def read_tensors(directory: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of the directory's weights file(s) as numpy, and the file read."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            tensors = {}
            for shard in shards:
                tensors.update(_read_file(os.path.join(directory, shard)))
            return tensors, path
        return _read_file(path), path
    raise errors.MissingFileError(f"{directory}: no weights; expected one of {list(WEIGHT_FILES)}")


def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError

        try:
            return _read_safetensors(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise errors.DataError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        import torch
    except ImportError:
        raise errors.DataError(f"{path}: reading pytorch_model.bin needs torch "
                               f"(pip install 'encoder_jax[hf]'), or convert it to model.safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        raise errors.DataError(f"{path}: not a loadable tensor file with weights_only=True: {e}") from None
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes  # noqa: F401  (a jax dependency) registers bfloat16 with numpy for bf16 checkpoints
    from safetensors.numpy import load_file

    return load_file(path)


def write_tensors(tensors: dict[str, np.ndarray], path: str) -> None:
    """Writes float32 tensors as safetensors with the metadata transformers expects."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class Converted:
    params: Params  # {"encoder", + MLM head}
    classifier: Params | None
    missing: list[str]
    unused: list[str]


def canonical_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the "bert." prefix and renames old LayerNorm gamma/beta to weight/bias."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        name = name.removeprefix("bert.")
        if ".LayerNorm." in name:
            name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        out[name] = value
    return out


def _set(tree: Params, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _take(tensors: dict[str, np.ndarray], entries: list[Entry], source: str, used: set[str]
          ) -> tuple[Params, list[str]]:
    """Converts the entries present; returns the tree and the names missing."""
    tree, missing = {}, []
    for e in entries:
        if e.name not in tensors:
            missing.append(e.name)
            continue
        w = np.asarray(tensors[e.name])
        expected = hf_shape(e.kind, e.shape)
        if tuple(w.shape) != expected:
            raise errors.DataError(f"{source}: tensor {e.name} has shape {tuple(w.shape)} but "
                                   f"config.json implies {expected}")
        _set(tree, e.path, to_ours(e.kind, w, e.shape))
        used.add(e.name)
    return tree, missing


def from_hf(tensors: dict[str, np.ndarray], cfg: EncoderConfig, source: str) -> Converted:
    """Hugging Face tensors -> params; a partial encoder or head is an error naming the tensors."""
    tensors = canonical_names(tensors)
    used: set[str] = set()
    encoder, missing = _take(tensors, encoder_entries(cfg), source, used)
    if missing:
        raise errors.DataError(f"{source}: the encoder lacks {len(missing)} tensors: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    pooler, pooler_missing = _take(tensors, pooler_entries(cfg), source, used)
    encoder.update(pooler)
    head_entries = mlm_head_entries(cfg)
    if "cls.predictions.bias" not in tensors and "cls.predictions.decoder.bias" in tensors:
        tensors["cls.predictions.bias"] = tensors["cls.predictions.decoder.bias"]
    head, head_missing = _take(tensors, head_entries, source, used)
    _check_tied_decoder(tensors, used, source)
    classifier = None
    if "classifier.weight" in tensors:
        num_labels = np.shape(tensors["classifier.weight"])[0]
        classifier, cls_missing = _take(tensors, classifier_entries(cfg, num_labels), source, used)
        if cls_missing:
            raise errors.DataError(f"{source}: the classifier lacks {', '.join(cls_missing)}")
    for group, group_missing in ((pooler, pooler_missing), (head, head_missing)):
        if group and group_missing:
            raise errors.DataError(f"{source}: partial head; lacks {', '.join(group_missing)}")
    if head and "cls.predictions.decoder.bias" in tensors:
        used.add("cls.predictions.decoder.bias")  # tied to cls.predictions.bias
    unused = sorted(set(tensors) - used)
    return Converted(params={"encoder": encoder, **head}, classifier=classifier,
                     missing=pooler_missing + head_missing, unused=unused)


def _check_tied_decoder(tensors: dict[str, np.ndarray], used: set[str], source: str) -> None:
    name = "cls.predictions.decoder.weight"
    if name not in tensors:
        return
    embedding = tensors["embeddings.word_embeddings.weight"]
    if np.shape(tensors[name]) != np.shape(embedding) or not np.array_equal(tensors[name], embedding):
        raise errors.DataError(f"{source}: {name} differs from the word embeddings; "
                               f"only tied MLM decoders are supported")
    used.add(name)


def to_hf(params: Params, cfg: EncoderConfig, head: str, label_names: list[str] | None = None
          ) -> tuple[dict[str, np.ndarray], dict]:
    """params -> (Hugging Face tensors, config.json dict) for head "mlm" or "classifier"."""
    heads = {"mlm": "BertForMaskedLM", "classifier": "BertForSequenceClassification"}
    if head not in heads:
        raise errors.DataError(f"export head={head!r}; valid: {sorted(heads)}")
    config = hf_config(cfg, heads[head])
    encoder = params["encoder"]
    entries = encoder_entries(cfg)
    if "pooler" in encoder:
        entries += pooler_entries(cfg)
    elif head == "classifier":
        raise errors.DataError("export head='classifier' needs the pooler (model.use_pooler=True, "
                               "pooling='first'): Hugging Face classifies the pooled [CLS]")
    tensors = {f"bert.{e.name}": to_theirs(e.kind, _get(encoder, e.path)) for e in entries}
    if not cfg.type_vocab_size:  # Hugging Face always adds type 0: a zero row keeps outputs equal
        tensors["bert.embeddings.token_type_embeddings.weight"] = np.zeros((1, cfg.hidden_dim), np.float32)
    if head == "mlm":
        if "transform" not in params:
            raise errors.DataError("export head='mlm' needs the MLM head (transform, transform_norm, "
                                   "output_bias); export a classifier with head='classifier'")
        tensors.update({e.name: to_theirs(e.kind, _get(params, e.path)) for e in mlm_head_entries(cfg)})
    else:
        if "classifier" not in params:
            raise errors.DataError("export head='classifier' needs params['classifier']")
        if "wide_unigram" in params:
            raise errors.DataError("export head='classifier': the wide n-gram part "
                                   "(model.wide_buckets) has no Hugging Face counterpart")
        num_labels = np.shape(params["classifier"]["bias"])[0]
        tensors.update({e.name: to_theirs(e.kind, _get(params["classifier"], e.path))
                        for e in classifier_entries(cfg, num_labels)})
        names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
        if len(names) != num_labels:
            raise errors.DataError(f"export: {len(names)} label names for {num_labels} classes")
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    return tensors, config


def _get(tree: Params, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)
