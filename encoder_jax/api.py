"""The front door for notebooks and scripts: load any model this project can read, and use it.

    import encoder_jax as ej
    model, params, tokenizer = ej.load_pretrained("runs/agnews")   # a run, an export, an HF dir or hub id
    probs = ej.classify(model, params, tokenizer, ["Stocks fell as oil rose"])   # (1, C)
    ej.fill_mask(*ej.load_pretrained("runs/mlm"), ["the cat [MASK] on the mat"])
    config = ej.load_config("experiments/bert_mlm.py:smoke", **{"train.num_steps": 20})
    ej.train.run(config, "runs/nb_mlm")

Every helper takes plain Python strings and returns numpy arrays or lists; batches are padded
to multiples of 16 tokens so repeated calls reuse a few compiled shapes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from encoder_jax import errors
from encoder_jax import artifact as artifact_lib
from encoder_jax import hub, pretrained
from encoder_jax import workdir as workdir_lib
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertEncoder, BertForClassification, BertForMaskedLM
from encoder_jax.seq2seq import EncoderDecoder, Seq2SeqConfig

PAD_MULTIPLE = 16
_JITTED: dict[tuple[int, str], Any] = {}


@dataclasses.dataclass
class Pretrained:
    """A loaded model; unpacks as `model, params, tokenizer`."""

    model: Any  # a flax module: BertForClassification | BertForMaskedLM | EncoderDecoder | BertEncoder
    params: Any
    tokenizer: Any
    task: str  # "classify" | "mlm" | "translate" | "encoder" (a checkpoint without a head)
    labels: list[str] | None = None
    target_tokenizer: Any = None  # translation with a separate target vocabulary
    source: str = ""

    def __iter__(self):
        return iter((self.model, self.params, self.tokenizer))


def build_model(task: str, encoder: EncoderConfig, fields: dict[str, Any]):
    """The flax module of a run's task from its model record."""
    if task == "classify":
        return BertForClassification(encoder, **fields)
    if task == "translate":
        seq2seq = {k: v for k, v in fields.items() if k != "joint_tokenizer"}
        return EncoderDecoder(Seq2SeqConfig(encoder=encoder, **seq2seq))
    return BertForMaskedLM(encoder)


def _from_artifact(directory: str) -> Pretrained:
    loaded = artifact_lib.load_artifact(directory)
    encoder = EncoderConfig.from_json(loaded.card["encoder"])
    return Pretrained(build_model(loaded.task, encoder, loaded.card["fields"]), loaded.params,
                      loaded.tokenizer, loaded.task, loaded.labels or None, loaded.target_tokenizer,
                      directory)


def _from_run(workdir: str, step: int | None) -> Pretrained:
    run = workdir_lib.load_trained(workdir, step)
    target = None
    if run.record.task == "translate" and not run.record.fields.get("joint_tokenizer", True):
        target = workdir_lib.load_tokenizer(workdir_lib.path(workdir, artifact_lib.TARGET_TOKENIZER_DIR))
    return Pretrained(build_model(run.record.task, run.record.encoder, run.record.fields),
                      run.params, run.tokenizer, run.record.task,
                      list(run.labels.names) if run.labels else None, target, workdir)


def _from_hf(name: str) -> Pretrained:
    directory = hub.resolve(name, "load_pretrained")
    bert = pretrained.import_hf(directory)
    if bert.classifier is not None:
        params = {"encoder": bert.params["encoder"], "classifier": bert.classifier}
        classes = bert.classifier["bias"].shape[0]
        return Pretrained(BertForClassification(bert.config, classes), params, bert.tokenizer,
                          "classify", bert.label_names, source=directory)
    if bert.has_mlm_head:
        return Pretrained(BertForMaskedLM(bert.config), bert.params, bert.tokenizer, "mlm",
                          source=directory)
    return Pretrained(BertEncoder(bert.config), bert.params["encoder"], bert.tokenizer, "encoder",
                      source=directory)


def load_pretrained(source: str, step: int | None = None) -> Pretrained:
    """A model from a run's workdir (its averaged / best / latest checkpoint, or `step`), an
    export (`--mode export`), a Hugging Face BERT directory, or a hub id (`bert-base-uncased`,
    `org/name@revision`, from the local hub cache or downloaded)."""
    if artifact_lib.is_artifact(source):
        return _from_artifact(source)
    if os.path.isfile(os.path.join(source, workdir_lib.MODEL_FILE)) or os.path.isdir(
            os.path.join(source, "checkpoints")):
        return _from_run(source, step)
    return _from_hf(source)


# ----------------------------------------------------------------------------- helpers


def _jitted(model, name: str, fn):
    key = (id(model), name)
    if key not in _JITTED:
        _JITTED[key] = (model, jax.jit(fn))  # the module is kept so its id stays unique
    return _JITTED[key][1]


def encode(tokenizer, texts: Sequence[str | Sequence[str]], max_len: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Texts (or lists of fields, joined by a space) -> ids, type ids int32 (N, L): [CLS] text
    [SEP], cut to max_len, padded with [PAD] to a multiple of 16 tokens."""
    from encoder_jax.data.classification import EncodingConfig, encode_texts

    cfg = EncodingConfig(max_len=max_len, pad_lengths=(max_len,))
    rows = [encode_texts(tokenizer, [t] if isinstance(t, str) else list(t), cfg)[0] for t in texts]
    length = min(-(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE, max_len)
    ids = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids, np.zeros_like(ids)


def load_tokenizer(directory: str):
    """The tokenizer saved in a run, an export or a Hugging Face directory (sentencepiece or WordPiece)."""
    from encoder_jax.data import tokenizer as tokenizer_lib

    return tokenizer_lib.load_saved(directory)


def _encoder_config(model) -> EncoderConfig:
    config = model.config
    return config.encoder if isinstance(config, Seq2SeqConfig) else config


def _batches(texts, batch_size):
    for start in range(0, len(texts), batch_size):
        yield texts[start:start + batch_size]


def classify(model, params, tokenizer, texts: Sequence[str | Sequence[str]], batch_size: int = 64,
             max_len: int = 128) -> np.ndarray:
    """Class probabilities float32 (N, C) of a classification model."""
    if not isinstance(model, BertForClassification):
        raise TypeError(f"classify needs a classification model, got {type(model).__name__}")
    apply = _jitted(model, "classify", lambda p, ids: jax.nn.softmax(
        model.apply({"params": p}, ids, segment_ids=(ids > 0).astype(jnp.int32)), axis=-1))
    max_len = min(max_len, model.config.max_len)
    return np.concatenate([np.asarray(apply(params, encode(tokenizer, chunk, max_len)[0]))
                           for chunk in _batches(list(texts), batch_size)])


def embed(model, params, tokenizer, texts: Sequence[str], pooling: str = "cls",
          batch_size: int = 64, max_len: int = 128) -> np.ndarray:
    """Sentence embeddings float32 (N, D) from any model's encoder: the last layer's [CLS]
    state ("cls") or its mean over real tokens ("mean")."""
    if pooling not in ("cls", "mean"):
        raise errors.ConfigError(f"pooling={pooling!r}; valid: ['cls', 'mean']")
    config = _encoder_config(model)
    encoder = BertEncoder(config)
    encoder_params = params if isinstance(model, BertEncoder) else params["encoder"]

    def pooled(p, ids):
        hidden, _ = encoder.apply({"params": p}, ids, segment_ids=(ids > 0).astype(jnp.int32))
        real = (ids > 0)[..., None]
        mean = (hidden * real).sum(1) / jnp.maximum(real.sum(1), 1)
        return hidden[:, 0] if pooling == "cls" else mean

    apply = _jitted(model, f"embed_{pooling}", pooled)
    max_len = min(max_len, config.max_len)
    return np.concatenate([np.asarray(apply(encoder_params, encode(tokenizer, chunk, max_len)[0]))
                           for chunk in _batches(list(texts), batch_size)])


def fill_mask(model, params, tokenizer, texts: Sequence[str], top_k: int = 5
              ) -> list[list[list[tuple[str, float]]]]:
    """For each text, for each `[MASK]` in it, the top_k (token, probability) of an MLM model."""
    if not isinstance(model, BertForMaskedLM):
        raise TypeError(f"fill_mask needs a masked-LM model, got {type(model).__name__}")
    probs = _jitted(model, "fill_mask", lambda p, ids, pos: jax.nn.softmax(
        model.apply({"params": p}, ids, pos, segment_ids=(ids > 0).astype(jnp.int32)), axis=-1))
    out = []
    for text in texts:
        row = artifact_lib.encode_masked(tokenizer, text, model.config.max_len)
        p = np.asarray(probs(params, row.ids[None], row.positions[None]))[0]
        top = np.argsort(-p, axis=-1)[:, :top_k]
        out.append([[(tokenizer.id_to_piece(int(i)), float(p[m, i])) for i in top[m]]
                    for m in range(len(row.positions))])
    return out


def translate(model, params, tokenizer, texts: Sequence[str], target_tokenizer=None,
              beam_size: int = 4, max_len: int = 64, length_penalty: float = 0.6
              ) -> list[str]:
    """Translations of `texts` by an encoder-decoder (beam search; 1: greedy)."""
    from encoder_jax.tasks.translate import translate_batch

    if not isinstance(model, EncoderDecoder):
        raise TypeError(f"translate needs an EncoderDecoder, got {type(model).__name__}")
    target = target_tokenizer or tokenizer
    run = _jitted(model, f"translate_{beam_size}_{max_len}", lambda p, ids: translate_batch(
        model, p, {"source_ids": ids, "source_segment_ids": (ids > 0).astype(jnp.int32)},
        beam_size=beam_size, alpha=length_penalty, max_len=max_len, max_len_a=10, max_len_b=1.5,
        bos_id=target.cls_id, eos_id=target.sep_id).tokens)
    rows = [artifact_lib.encode_source(tokenizer, t, max_len) for t in texts]
    length = -(-max(len(r.ids) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    ids, _, _ = artifact_lib.pad_rows(rows, len(rows), min(length, max_len))
    tokens = np.asarray(run(params, ids))
    return ["" if not text.strip() else artifact_lib.detokenize(target, tokens[i, 0])
            for i, text in enumerate(texts)]


# ----------------------------------------------------------------------------- configs


def load_config(spec: str, **overrides: Any):
    """An experiment config from 'path/to/experiment.py[:variant]', with 'a.b' -> value overrides
    (as `--config.a.b=value` on the command line)."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(
        f"encoder_jax_experiment_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant or None)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise errors.ConfigKeyError(f"unknown config key {key!r}")
        node[leaf] = value
    return config
