"""The one path from `init_from` / `init_from_hf` to pretrained encoder weights, for every task.

`resolve(config)` maps the config fields to a `PretrainedEncoder` — its shape
(EncoderConfig), its tokenizer and a lazy loader of its params — whatever the
origin: another run's workdir (`init_from`, read through `workdir`) or a Hugging
Face BERT directory (`init_from_hf`, read through `hf_bert`). Setting both is an
error. Tasks then start from it in one of two ways:

  graft_encoder(fresh, pretrained)   the task's `encoder` subtree replaced exactly
                                     (classification, translation, topic models)
  merge_params(fresh, params)        every leaf the checkpoint has at the same path
                                     (MLM continuation: encoder and MLM head)

A new origin plugs in as another branch of `resolve` and a name in INIT_FIELDS.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from encoder_jax import checkpoint, configs, errors, hf_bert, hub
from encoder_jax import workdir as workdir_lib
from encoder_jax.data.tokenizer import SentencePieceTokenizer
from encoder_jax.data.wordpiece import WordPieceTokenizer
from encoder_jax.layers import EncoderConfig

log = logging.getLogger("encoder_jax")

Params = dict[str, Any]
INIT_FIELDS = ("init_from", "init_from_hf")  # config fields naming a pretrained encoder
# config.model fields that describe training, not the checkpoint's shape: taken from the experiment.
RUNTIME_FIELDS = ("dropout_rate", "attention_dropout_rate", "remat", "dropout_rng", "dtype",
                  "param_dtype", "use_pooler")
SHAPE_FIELDS = ("hidden_dim", "num_layers", "num_heads", "mlp_dim", "max_len", "type_vocab_size",
                "activation", "layer_norm_eps", "pre_norm", "bigram_buckets")


@dataclasses.dataclass(frozen=True)
class PretrainedEncoder:
    """A pretrained encoder: its shape, tokenizer, and a loader of its params (fresh starts only)."""

    config: EncoderConfig
    load_params: Callable[[], Params]  # -> {"encoder", + heads it has} (host arrays)
    tokenizer: Any  # a data.tokenizer.Tokenizer
    source: str  # named in error messages, e.g. "init_from='runs/mlm'"


@dataclasses.dataclass
class ImportedBert:
    """A Hugging Face BERT checkpoint in this project's terms.

    Attributes:
      config: the encoder's shape and numerics (use_pooler: the checkpoint has a pooler).
      params: `BertForMaskedLM` layout: {"encoder", and if the checkpoint has the
        MLM head, "transform", "transform_norm", "output_bias"}.
      classifier: {"kernel" (D, C), "bias" (C,)} of a sequence classifier, or None.
      label_names: class names from `id2label` (classifier checkpoints), or None.
      tokenizer: from `vocab.txt` (or a `tokenizer.model` this project exported), or None.
      missing: Hugging Face tensor names this project's models have but the checkpoint lacks.
      unused: checkpoint tensor names not imported (e.g. the next-sentence head).
      weights_file: the file the weights came from.
    """

    config: EncoderConfig
    params: Params
    classifier: Params | None
    label_names: list[str] | None
    tokenizer: Any  # WordPieceTokenizer | SentencePieceTokenizer | None
    missing: list[str]
    unused: list[str]
    weights_file: str

    @property
    def has_mlm_head(self) -> bool:
        return "transform" in self.params


def hf_tokenizer(directory: str, word_segmenter: str = "auto"):
    """A Hugging Face directory's tokenizer: vocab.txt (WordPiece), else the tokenizer.model this
    project exports beside tokenizer.json (sentencepiece); None when it has neither."""
    if os.path.isfile(os.path.join(directory, WordPieceTokenizer.FILENAME)):
        return WordPieceTokenizer.load(directory, word_segmenter)
    if os.path.isfile(os.path.join(directory, SentencePieceTokenizer.FILENAME)):
        return SentencePieceTokenizer.load(os.path.join(directory, SentencePieceTokenizer.FILENAME),
                                           word_segmenter)
    return None


def import_hf(directory: str) -> ImportedBert:
    """Reads a Hugging Face BERT directory (or hub id, see `hub`) into this project's config,
    params and tokenizer."""
    directory = hub.resolve(directory, "import_hf")
    hf_config = hf_bert.read_config(directory)
    config = hf_bert.encoder_config(hf_config, os.path.join(directory, hf_bert.CONFIG_FILE))
    tensors, weights_file = hf_bert.read_tensors(directory)
    converted = hf_bert.from_hf(tensors, config, weights_file)
    tokenizer = hf_tokenizer(directory)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise errors.ConfigError(f"{directory}: its tokenizer has {tokenizer.vocab_size} tokens but "
                                 f"config.json vocab_size={config.vocab_size}")
    label_names = hf_bert.label_names(hf_config, converted.classifier)
    config = dataclasses.replace(config, use_pooler="pooler" in converted.params["encoder"])
    return ImportedBert(config=config, params=converted.params, classifier=converted.classifier,
                        label_names=label_names, tokenizer=tokenizer, missing=converted.missing,
                        unused=converted.unused, weights_file=weights_file)


# ----------------------------------------------------------------------------- origins


def from_hf(directory: str, word_segmenter: str = "auto") -> PretrainedEncoder:
    """A Hugging Face BERT directory or hub id: config.json and vocab.txt now, the weights when loaded.

    Its config carries a pooler (fresh if the checkpoint has none, as Hugging Face
    does when fine-tuning).
    """
    directory = hub.resolve(directory, "init_from_hf")
    hf_config = hf_bert.read_config(directory)
    config = hf_bert.encoder_config(hf_config, os.path.join(directory, hf_bert.CONFIG_FILE))
    tokenizer = hf_tokenizer(directory, word_segmenter)
    if tokenizer is None:
        raise errors.MissingFileError(f"{directory}: no vocab.txt (or tokenizer.model); initialising "
                                      f"from a Hugging Face BERT needs its vocabulary")
    return PretrainedEncoder(dataclasses.replace(config, use_pooler=True),
                             lambda: import_hf(directory).params, tokenizer,
                             f"init_from_hf={directory!r}")


def from_run(run_dir: str, word_segmenter: str = "auto") -> PretrainedEncoder:
    """Another run's workdir (MLM, classification, an imported checkpoint): record, tokenizer, params."""
    if not os.path.isdir(run_dir):
        raise errors.MissingFileError(f"init_from={run_dir!r} does not exist")
    trained = workdir_lib.load_trained(run_dir, word_segmenter=word_segmenter, with_params=False)
    source = f"init_from={run_dir!r}"

    def load_params():
        params = checkpoint.load_params(workdir_lib.checkpoint_source(run_dir))
        if "encoder" not in params:
            raise errors.ConfigError(f"{source}: its params have no 'encoder' subtree (top level: "
                                     f"{sorted(params)})")
        return params

    return PretrainedEncoder(trained.encoder_config, load_params, trained.tokenizer, source)


def init_field(config) -> str | None:
    """The one config field naming a pretrained encoder (INIT_FIELDS), or None; both set is an error."""
    named = [f for f in INIT_FIELDS if config.get(f)]
    if len(named) > 1:
        raise errors.ConfigError(f"set init_from or init_from_hf, not both (init_from={config.init_from!r}, "
                                 f"init_from_hf={config.init_from_hf!r})")
    return named[0] if named else None


def wants_pretrained(config) -> bool:
    """Whether the config names a pretrained encoder (checked before loading anything)."""
    return init_field(config) is not None


def resolve(config) -> PretrainedEncoder | None:
    """The pretrained encoder named by `init_from` (a run) or `init_from_hf` (a Hugging Face BERT)."""
    field = init_field(config)
    if field is None:
        return None
    segmenter = configs.word_segmenter(config)
    if field == "init_from_hf":
        return from_hf(config.init_from_hf, segmenter)
    return from_run(config.init_from, segmenter)


# ----------------------------------------------------------------------------- shapes


def continued_config(pretrained: PretrainedEncoder, model_cfg) -> EncoderConfig:
    """The pretrained shape and numerics with the experiment's runtime fields (dropout, dtypes, ...).

    For continuing pretraining: `model.*` shape fields that differ are replaced (and logged).
    """
    given = configs.to_dict(model_cfg)
    replaced = [f"{name} {given[name]!r} -> {getattr(pretrained.config, name)!r}"
                for name in SHAPE_FIELDS
                if given.get(name) is not None and given[name] != getattr(pretrained.config, name)]
    if replaced:
        log.info("model shape from %s: %s", pretrained.source, ", ".join(replaced))
    runtime = {k: given[k] for k in RUNTIME_FIELDS if given.get(k) is not None}
    return EncoderConfig.from_json({**pretrained.config.to_json(), **runtime})


# ----------------------------------------------------------------------------- weights


def fresh_pooler(config: EncoderConfig) -> Params:
    """A pooler initialised as Hugging Face does: normal(init_std) kernel, zero bias (seed 0)."""
    rng = np.random.default_rng(0)
    return {"kernel": (config.init_std * rng.standard_normal(
        (config.hidden_dim, config.hidden_dim))).astype(np.float32),
        "bias": np.zeros((config.hidden_dim,), np.float32)}


def graft_encoder(params: Params, pretrained: PretrainedEncoder, target: str = "encoder") -> Params:
    """`params` with its `target` subtree replaced by the pretrained encoder; shapes must match.

    A pretrained encoder without a pooler gets a fresh one when the model has one.
    """
    from flax import traverse_util

    encoder = dict(pretrained.load_params()["encoder"])
    if "pooler" in params[target] and "pooler" not in encoder:
        log.info("%s: no pooler in the checkpoint; initialising a fresh one", pretrained.source)
        encoder["pooler"] = fresh_pooler(pretrained.config)
    want = traverse_util.flatten_dict(params[target])
    have = traverse_util.flatten_dict(encoder)
    missing = sorted("/".join(p) for p in set(want) - set(have))
    if missing:
        raise errors.ConfigError(f"{pretrained.source}: the pretrained encoder lacks {missing[:5]} "
                                 f"(different architecture)")
    for path, leaf in want.items():
        if np.shape(have[path]) != np.shape(leaf):
            raise errors.ConfigError(f"{pretrained.source}: encoder/{'/'.join(path)} has shape "
                                     f"{np.shape(have[path])}, this model needs {np.shape(leaf)} "
                                     f"(vocab or hidden size differ)")
    grafted = {path: jnp.asarray(have[path], leaf.dtype) for path, leaf in want.items()}
    return {**params, target: traverse_util.unflatten_dict(grafted)}


def reinit_top_blocks(grafted: Params, fresh: Params, count: int, target: str = "encoder") -> Params:
    """`grafted` with the top `count` blocks of `target` (and its pooler) taken from `fresh`.

    Re-initialising the top of a pretrained encoder helps small fine-tuning sets
    (Zhang et al. 2021, "Revisiting few-sample BERT fine-tuning"): those layers are
    the most specialised to the pretraining objective.
    """
    if count <= 0:
        return grafted
    blocks = sorted(int(name.split("_")[1]) for name in grafted[target] if name.startswith("block_"))
    if count > len(blocks):
        raise errors.ConfigError(f"finetune.reinit_top_layers={count} exceeds the encoder's "
                                 f"{len(blocks)} blocks")
    names = [f"block_{i}" for i in blocks[-count:]] + (["pooler"] if "pooler" in grafted[target] else [])
    return {**grafted, target: {**grafted[target], **{n: fresh[target][n] for n in names}}}


def merge_params(fresh: Params, imported: Params, source: str = "pretrained") -> Params:
    """`fresh` with every leaf that `imported` has at the same path replaced (cast to its dtype).

    Shape mismatches raise; fresh leaves the import lacks stay and are logged,
    as are imported leaves the model has no place for.
    """
    kept, dropped = [], []

    def walk(fresh_node, imported_node, path):
        if not isinstance(fresh_node, dict):
            if imported_node is None:
                kept.append(path)
                return fresh_node
            if isinstance(imported_node, dict) or tuple(imported_node.shape) != tuple(fresh_node.shape):
                shape = "a subtree" if isinstance(imported_node, dict) else tuple(imported_node.shape)
                raise errors.ConfigError(f"{source}: parameter {path} has shape {shape} in the checkpoint "
                                         f"but {tuple(fresh_node.shape)} in the model")
            return np.asarray(imported_node).astype(fresh_node.dtype)
        imported_node = imported_node if isinstance(imported_node, dict) else {}
        dropped.extend(f"{path}/{k}".lstrip("/") for k in imported_node if k not in fresh_node)
        return {k: walk(v, imported_node.get(k), f"{path}/{k}".lstrip("/"))
                for k, v in fresh_node.items()}

    merged = walk(dict(fresh), imported, "")
    if kept:
        log.info("%s: freshly initialised (not in the checkpoint): %s", source, ", ".join(kept))
    if dropped:
        log.info("%s: checkpoint parameters not used by this model: %s", source, ", ".join(dropped))
    return merged
