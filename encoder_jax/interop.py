"""Hugging Face BERT checkpoints in and out: weights, config and WordPiece vocabulary.

A Hugging Face BERT directory holds `config.json`, the weights
(`model.safetensors`, or `pytorch_model.bin`, or a sharded `*.index.json` of
either) and usually `vocab.txt` (+ `tokenizer_config.json`); an export of a run
with a sentencepiece tokenizer carries it as `tokenizer.json`. Safetensors are
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
`model.json`, `vocab.txt` + `tokenizer_config.json`, and
`labels.json` when the checkpoint names its labels. `export` reads a run's
workdir (the checkpoint `--mode predict` also uses: averaged, else best, else the
latest; or `--step`) and writes a directory that
`transformers` loads with `from_pretrained`.

Tasks initialise from a Hugging Face directory through `config.init_from_hf`,
resolved by `encoder_jax.pretrained` (the one pretrained-weights path, which
also holds `import_hf`); this module writes directories, it never trains.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from encoder_jax import checkpoint, hf_bert
from encoder_jax import workdir as workdir_lib
from encoder_jax.data import hf_tokenizer
from encoder_jax.data.tokenizer import SentencePieceTokenizer
from encoder_jax.data.wordpiece import WordPieceTokenizer
from encoder_jax.layers import EncoderConfig
from encoder_jax.pretrained import ImportedBert, import_hf

__all__ = ["ImportedBert", "import_hf", "export_hf", "write_import", "main"]

log = logging.getLogger("encoder_jax")

Params = dict[str, Any]


def export_hf(params: Params, config: EncoderConfig, out_dir: str, *,
              tokenizer: Any = None, head: str | None = None, label_names: list[str] | None = None
              ) -> str:
    """Writes a Hugging Face BERT directory (config.json, model.safetensors, tokenizer files).

    Args:
      params: `BertForMaskedLM` params, or `BertForClassification` params
        ({"encoder", "classifier"}).
      config: the encoder config the params belong to.
      out_dir: created if missing.
      tokenizer: a WordPieceTokenizer writes vocab.txt + tokenizer_config.json; a
        SentencePieceTokenizer writes tokenizer.json (a fast tokenizer giving its ids, see
        `data.hf_tokenizer`) + tokenizer_config.json + the original tokenizer.model.
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
    workdir_lib.write_json(os.path.join(out_dir, hf_bert.CONFIG_FILE), hf_config)
    if isinstance(tokenizer, WordPieceTokenizer):
        tokenizer.save(out_dir)
        tokenizer_config = {**tokenizer.hf_config(), "model_max_length": config.max_len}
        workdir_lib.write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.save(out_dir)  # the original, for sentencepiece users
        fast = hf_tokenizer.fast_tokenizer(tokenizer.model_proto)
        workdir_lib.write_text(os.path.join(out_dir, "tokenizer.json"), fast.to_str(pretty=True))
        workdir_lib.write_json(os.path.join(out_dir, "tokenizer_config.json"),
                               hf_tokenizer.tokenizer_config(config.max_len))
    elif tokenizer is not None:
        log.warning("export: %s cannot be written as a Hugging Face tokenizer; none written to %s",
                    type(tokenizer).__name__, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- workdirs


def write_import(bert: ImportedBert, out_dir: str) -> str:
    """Saves an ImportedBert as a workdir-like directory (see the module docstring)."""
    import numpy as np

    os.makedirs(out_dir, exist_ok=True)
    params = dict(bert.params)
    if bert.classifier is not None:
        params["classifier"] = bert.classifier
    checkpointer = checkpoint.Checkpointer(out_dir, keep=1, use_async=False)
    checkpointer.save(0, {"step": np.zeros((), np.int32), "params": params}, force=True)
    checkpointer.close()
    workdir_lib.write_model_record(out_dir, workdir_lib.ModelRecord("mlm", bert.config))
    if bert.tokenizer is not None:
        bert.tokenizer.save(out_dir)
    if bert.label_names is not None:
        workdir_lib.write_json(workdir_lib.path(out_dir, workdir_lib.LABELS_FILE), bert.label_names)
    return out_dir


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
    exp.add_argument("--step", type=int, default=None,
                     help="checkpoint step (default: the best evaluation's if kept, else the latest)")
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
            source = (args.workdir if args.step is not None
                      else workdir_lib.checkpoint_source(args.workdir))
            run = workdir_lib.load_trained(args.workdir, args.step, need_tokenizer=False)
            labels = run.labels.names if run.labels else None
            labels = args.labels.split(",") if args.labels else labels
            export_hf(run.params, run.encoder_config, args.out_dir, tokenizer=run.tokenizer,
                      head=args.head, label_names=labels and list(labels))
            step = args.step if args.step is not None else checkpoint.latest_step(source)
            print(f"exported {args.workdir} (checkpoint {os.path.relpath(source, args.workdir)}, "
                  f"step {step}) -> {args.out_dir}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
