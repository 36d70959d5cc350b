"""Hugging Face BERT checkpoints in and out: weights, config and WordPiece vocabulary.

A Hugging Face BERT directory holds `config.json`, the weights
(`model.safetensors`, or `pytorch_model.bin`, or a sharded `*.index.json` of
either) and usually `vocab.txt` (+ `tokenizer_config.json`). Safetensors are
read with numpy and need no torch; a `.bin` is read only with
`torch.load(weights_only=True)`, which loads tensors without executing pickled
code, and only when torch is installed (`pip install encoder_jax[hf]`).

In a notebook::

    bert = import_hf("bert-dir")                 # ImportedBert: config, params, tokenizer, ...
    logits = BertForMaskedLM(bert.config).apply({"params": bert.params}, ids, positions_BxP)
    export_hf(bert.params, bert.config, "out-dir", tokenizer=bert.tokenizer)

From the shell::

    python -m encoder_jax.interop import bert-dir runs/bert_imported
    python -m encoder_jax.interop export runs/mlm bert-out [--head mlm|classifier] [--step N]

`import` writes a directory laid out like a run's workdir, so
`config.init_from=runs/bert_imported` (or `export`) reads it like any run:
`checkpoints/0` (Orbax, state {"step", "params"}; params in the
`BertForMaskedLM` layout, plus "classifier" when the checkpoint has one),
`encoder_config.json`, `vocab.txt` + `tokenizer_config.json`, and
`labels.json` when the checkpoint names its labels. `export` reads a run's
workdir (its latest checkpoint, or `--step`) and writes a directory that
`transformers` loads with `from_pretrained`.

Tasks initialise from a Hugging Face directory with `load_config_for_init`
(model shape and tokenizer, cheap), `load_for_init` (+ params) and
`merge_params` (imported leaves into fresh ones); classification through
`pretrained_encoder_from_hf`, a `pretrained.PretrainedEncoder`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, NamedTuple

import numpy as np

from encoder_jax import hf_bert
from encoder_jax.data.wordpiece import WordPieceTokenizer
from encoder_jax.layers import EncoderConfig

log = logging.getLogger("encoder_jax")

Params = dict[str, Any]
# config.model fields that describe training, not the checkpoint's shape: taken from the experiment.
RUNTIME_FIELDS = ("dropout_rate", "attention_dropout_rate", "remat", "dtype", "param_dtype",
                  "use_pooler")
ENCODER_CONFIG_FILE = "encoder_config.json"
LABELS_FILE = "labels.json"


@dataclasses.dataclass
class ImportedBert:
    """A Hugging Face BERT checkpoint in this project's terms.

    Attributes:
      config: the encoder's shape and numerics (use_pooler: the checkpoint has a pooler).
      params: `BertForMaskedLM` layout: {"encoder", and if the checkpoint has the
        MLM head, "transform", "transform_norm", "output_bias"}.
      classifier: {"kernel" (D, C), "bias" (C,)} of a sequence classifier, or None.
      label_names: class names from `id2label` (classifier checkpoints), or None.
      tokenizer: from `vocab.txt`, or None when the directory has none.
      missing: Hugging Face tensor names this project's models have but the checkpoint lacks.
      unused: checkpoint tensor names not imported (e.g. the next-sentence head).
      weights_file: the file the weights came from.
    """

    config: EncoderConfig
    params: Params
    classifier: Params | None
    label_names: list[str] | None
    tokenizer: WordPieceTokenizer | None
    missing: list[str]
    unused: list[str]
    weights_file: str

    @property
    def has_mlm_head(self) -> bool:
        return "transform" in self.params


class InitSource(NamedTuple):
    """What a task needs to start from a Hugging Face checkpoint."""

    config: EncoderConfig  # checkpoint shape; runtime fields from the experiment
    params: Params  # BertForMaskedLM layout (encoder, + MLM head if present)
    tokenizer: WordPieceTokenizer
    classifier: Params | None  # {"kernel", "bias"} or None


def import_hf(directory: str) -> ImportedBert:
    """Reads a Hugging Face BERT directory into this project's config, params and tokenizer."""
    hf_config = hf_bert.read_config(directory)
    config = hf_bert.encoder_config(hf_config, os.path.join(directory, hf_bert.CONFIG_FILE))
    tensors, weights_file = hf_bert.read_tensors(directory)
    converted = hf_bert.from_hf(tensors, config, weights_file)
    tokenizer = None
    if os.path.isfile(os.path.join(directory, WordPieceTokenizer.FILENAME)):
        tokenizer = WordPieceTokenizer.load(directory)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"{directory}: vocab.txt has {tokenizer.vocab_size} tokens but "
                             f"config.json vocab_size={config.vocab_size}")
    label_names = hf_bert.label_names(hf_config, converted.classifier)
    config = dataclasses.replace(config, use_pooler="pooler" in converted.params["encoder"])
    return ImportedBert(config=config, params=converted.params, classifier=converted.classifier,
                        label_names=label_names, tokenizer=tokenizer, missing=converted.missing,
                        unused=converted.unused, weights_file=weights_file)


def runtime_config(config: EncoderConfig, model_cfg=None) -> EncoderConfig:
    """The checkpoint's shape with the experiment's runtime fields (dropout, dtypes, remat, pooler).

    Without `model_cfg`: the checkpoint's own dropout, float32, and a pooler
    (fresh if the checkpoint has none, as Hugging Face does when fine-tuning).
    """
    if model_cfg is None:
        return dataclasses.replace(config, use_pooler=True)
    import jax.numpy as jnp

    values = {}
    for name in RUNTIME_FIELDS:
        if name in model_cfg:
            values[name] = model_cfg[name]
            if name.endswith("dtype"):
                try:
                    values[name] = jnp.dtype(values[name])
                except TypeError:
                    raise ValueError(f"model.{name}={values[name]!r}; valid: float32, bfloat16, "
                                     f"float16") from None
    return dataclasses.replace(config, **values)


def _log_replaced_shape(config: EncoderConfig, model_cfg, directory: str) -> None:
    replaced = [f"{name} {model_cfg[name]!r} -> {getattr(config, name)!r}"
                for name in ("hidden_dim", "num_layers", "num_heads", "mlp_dim", "max_len",
                             "type_vocab_size", "activation", "layer_norm_eps", "pre_norm")
                if name in model_cfg and model_cfg[name] != getattr(config, name)]
    if replaced:
        log.info("model shape from %s/config.json: %s", directory, ", ".join(replaced))


def load_config_for_init(directory: str, model_cfg=None, word_segmenter: str = "auto"
                         ) -> tuple[EncoderConfig, WordPieceTokenizer]:
    """Model config and tokenizer of a Hugging Face directory, reading no weights (cheap)."""
    hf_config = hf_bert.read_config(directory)
    config = hf_bert.encoder_config(hf_config, os.path.join(directory, hf_bert.CONFIG_FILE))
    if model_cfg is not None:
        _log_replaced_shape(config, model_cfg, directory)
    return runtime_config(config, model_cfg), _require_tokenizer(directory, word_segmenter)


def load_for_init(directory: str, model_cfg=None, word_segmenter: str = "auto") -> InitSource:
    """(EncoderConfig, params, tokenizer, classifier or None) to initialise a task from.

    `model_cfg` (the experiment's `config.model`, optional) supplies the runtime
    fields (RUNTIME_FIELDS); the shape always comes from `config.json`.
    """
    bert = import_hf(directory)
    return InitSource(runtime_config(bert.config, model_cfg), bert.params,
                      _require_tokenizer(directory, word_segmenter), bert.classifier)


def pretrained_encoder_from_hf(directory: str, word_segmenter: str = "auto"):
    """A `pretrained.PretrainedEncoder` for fine-tuning (classification) from a Hugging Face directory.

    Reads config.json and vocab.txt now, the weights only when its params are
    loaded. A checkpoint without a pooler (e.g. BertForMaskedLM) gets a fresh
    one, initialised as Hugging Face does (normal(initializer_range), zero bias).
    """
    from encoder_jax.pretrained import PretrainedEncoder

    config, tokenizer = load_config_for_init(directory, None, word_segmenter)

    def load_params():
        encoder = dict(import_hf(directory).params["encoder"])
        if "pooler" not in encoder:
            log.info("%s: no pooler in the checkpoint; initialising a fresh one", directory)
            rng = np.random.default_rng(0)
            encoder["pooler"] = {
                "kernel": (config.init_std * rng.standard_normal(
                    (config.hidden_dim, config.hidden_dim))).astype(np.float32),
                "bias": np.zeros((config.hidden_dim,), np.float32)}
        return encoder

    return PretrainedEncoder(config, load_params, tokenizer, f"init_from_hf={directory!r}")


def merge_params(fresh: Params, imported: Params, source: str = "init_from_hf") -> Params:
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
                raise ValueError(f"{source}: parameter {path} has shape {shape} in the checkpoint "
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


def export_hf(params: Params, config: EncoderConfig, out_dir: str, *,
              tokenizer=None, head: str | None = None, label_names: list[str] | None = None
              ) -> str:
    """Writes a Hugging Face BERT directory (config.json, model.safetensors, tokenizer files).

    Args:
      params: `BertForMaskedLM` params, or `BertForClassification` params
        ({"encoder", "classifier"}).
      config: the encoder config the params belong to.
      out_dir: created if missing.
      tokenizer: a WordPieceTokenizer writes vocab.txt + tokenizer_config.json;
        other tokenizers are skipped (Hugging Face BERT expects WordPiece).
      head: "mlm" (BertForMaskedLM) or "classifier" (BertForSequenceClassification);
        None: "classifier" if params has one, else "mlm".
      label_names: class names for `id2label` (classifier only).

    Returns:
      out_dir.
    """
    head = head or ("classifier" if "classifier" in params else "mlm")
    tensors, hf_config = hf_bert.to_hf(params, config, head, label_names)
    if tokenizer is not None:
        hf_config["pad_token_id"] = int(tokenizer.pad_id)
    os.makedirs(out_dir, exist_ok=True)
    hf_bert.write_tensors(tensors, os.path.join(out_dir, hf_bert.SAFETENSORS_FILE))
    _write_json(os.path.join(out_dir, hf_bert.CONFIG_FILE), hf_config)
    if isinstance(tokenizer, WordPieceTokenizer):
        tokenizer.save(out_dir)
        tokenizer_config = {**tokenizer.hf_config(), "model_max_length": config.max_len}
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)
    elif tokenizer is not None:
        log.warning("export: %s is not WordPiece; no tokenizer files written to %s",
                    type(tokenizer).__name__, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- workdirs


def config_from_params(params: Params, *, activation: str = "gelu",
                       layer_norm_eps: float = 1e-12) -> EncoderConfig:
    """The EncoderConfig whose shapes `params` has (numerics given separately)."""
    encoder = params["encoder"]
    blocks = sorted(k for k in encoder if k.startswith("block_"))
    if not blocks:
        raise ValueError("params['encoder'] has no block_* entries; not an encoder param tree")
    query = np.shape(encoder[blocks[0]]["attention"]["query"]["kernel"])  # (D, N, H)
    type_embed = encoder.get("type_embed")
    return EncoderConfig(
        vocab_size=np.shape(encoder["token_embed"]["embedding"])[0], hidden_dim=query[0],
        num_layers=len(blocks), num_heads=query[1],
        mlp_dim=np.shape(encoder[blocks[0]]["mlp"]["wi"]["kernel"])[1],
        max_len=np.shape(encoder["position_embed"]["embedding"])[0],
        type_vocab_size=np.shape(type_embed["embedding"])[0] if type_embed else 0,
        activation=activation, layer_norm_eps=layer_norm_eps,
        pre_norm="final_norm" in encoder, use_pooler="pooler" in encoder)


def read_workdir(workdir: str, step: int | None = None):
    """(params, EncoderConfig, tokenizer or None, label names or None) of a run's workdir."""
    from encoder_jax import checkpoint

    params = checkpoint.load_params(workdir, step)
    numerics = {}
    # First found wins: this module's record, the classification task's, the experiment config.
    for name, section in ((ENCODER_CONFIG_FILE, None), ("model.json", "encoder"),
                          ("config.json", "model")):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            saved = saved.get(section) or {} if section else saved
            numerics = {k: saved[k] for k in ("activation", "layer_norm_eps")
                        if saved.get(k) is not None}
            if numerics:
                break
    config = config_from_params(params, **numerics)
    tokenizer = None
    if os.path.isfile(os.path.join(workdir, WordPieceTokenizer.FILENAME)):
        tokenizer = WordPieceTokenizer.load(workdir)
    labels_path = os.path.join(workdir, LABELS_FILE)
    labels = None
    if os.path.isfile(labels_path):
        with open(labels_path, encoding="utf-8") as f:
            labels = json.load(f)
        labels = labels.get("names") if isinstance(labels, dict) else labels  # classify: {"names", ...}
    return params, config, tokenizer, labels


def write_import(bert: ImportedBert, out_dir: str) -> str:
    """Saves an ImportedBert as a workdir-like directory (see the module docstring)."""
    from encoder_jax import checkpoint

    os.makedirs(out_dir, exist_ok=True)
    params = dict(bert.params)
    if bert.classifier is not None:
        params["classifier"] = bert.classifier
    checkpointer = checkpoint.Checkpointer(out_dir, keep=1, use_async=False)
    checkpointer.save(0, {"step": np.zeros((), np.int32), "params": params}, force=True)
    checkpointer.close()
    save_encoder_config(out_dir, bert.config)
    if bert.tokenizer is not None:
        bert.tokenizer.save(out_dir)
    if bert.label_names is not None:
        _write_json(os.path.join(out_dir, LABELS_FILE), bert.label_names)
    return out_dir


def encoder_config_dict(config: EncoderConfig) -> dict:
    """EncoderConfig as JSON-ready values (dtypes by name)."""
    values = dataclasses.asdict(config)
    for name in ("dtype", "param_dtype"):
        values[name] = np.dtype(values[name]).name
    return values


def save_encoder_config(directory: str, config: EncoderConfig) -> str:
    """Writes `encoder_config.json` (read back by `export`); returns its path."""
    path = os.path.join(directory, ENCODER_CONFIG_FILE)
    _write_json(path, encoder_config_dict(config))
    return path


def _require_tokenizer(directory: str, word_segmenter: str = "auto") -> WordPieceTokenizer:
    if not os.path.isfile(os.path.join(directory, WordPieceTokenizer.FILENAME)):
        raise FileNotFoundError(f"{directory}: no vocab.txt; initialising from a Hugging Face "
                                f"BERT needs its WordPiece vocabulary")
    return WordPieceTokenizer.load(directory, word_segmenter)


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m encoder_jax.interop import|export ...`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m encoder_jax.interop", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face BERT directory -> workdir-like directory")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    exp = sub.add_parser("export", help="run workdir -> Hugging Face BERT directory")
    exp.add_argument("workdir")
    exp.add_argument("out_dir")
    exp.add_argument("--head", choices=("mlm", "classifier"), default=None,
                     help="default: classifier if the params have one, else mlm")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument("--labels", default=None, help="comma-separated class names (classifier)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        if args.command == "import":
            bert = import_hf(args.hf_dir)
            write_import(bert, args.out_dir)
            print(f"imported {args.hf_dir} ({os.path.basename(bert.weights_file)}) -> {args.out_dir}")
            print(f"  mlm head: {bert.has_mlm_head}, pooler: {bert.config.use_pooler}, "
                  f"classifier: {bert.classifier is not None}, tokenizer: {bert.tokenizer is not None}")
            for kind in ("missing", "unused"):
                if getattr(bert, kind):
                    print(f"  {kind}: {', '.join(getattr(bert, kind))}")
        else:
            params, config, tokenizer, labels = read_workdir(args.workdir, args.step)
            labels = args.labels.split(",") if args.labels else labels
            export_hf(params, config, args.out_dir, tokenizer=tokenizer, head=args.head,
                      label_names=labels)
            print(f"exported {args.workdir} -> {args.out_dir}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
