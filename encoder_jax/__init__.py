"""encoder_jax: BERT-style Transformer encoders in JAX/Flax — MLM pretraining, classification
fine-tuning, translation, export and serving.

The public API (imported lazily: `import encoder_jax` parses no flags, starts no work and loads
only what is used)::

    import encoder_jax as ej
    model, params, tokenizer = ej.load_pretrained("runs/agnews")   # a run, an export, an HF dir, a hub id
    ej.classify(model, params, tokenizer, ["Stocks fell as oil rose"])
    enc = ej.BertEncoder(ej.EncoderConfig(num_layers=2, hidden_dim=128, num_heads=2, mlp_dim=512,
                                          vocab_size=8000))
    config = ej.load_config("experiments/classify_news.py:smoke", **{"train.num_steps": 50})
    ej.train.run(config, "runs/nb")

Configs: EncoderConfig, Seq2SeqConfig. Modules: BertEncoder, BertForMaskedLM,
BertForClassification, EncoderDecoder, attention_mask. Loading: load_pretrained, Pretrained, load_artifact,
import_hf, export_hf. Using: classify, embed, fill_mask, translate, greedy_search, beam_search.
Tokenizers: SentencePieceTokenizer, WordPieceTokenizer, load_tokenizer. Running: load_config,
and the modules train (`train.run`), export (`export.export_run`), artifact.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "EncoderConfig": "encoder_jax.layers",
    "attention_mask": "encoder_jax.layers",
    "Seq2SeqConfig": "encoder_jax.seq2seq",
    "BertEncoder": "encoder_jax.models",
    "BertForMaskedLM": "encoder_jax.models",
    "BertForClassification": "encoder_jax.models",
    "EncoderDecoder": "encoder_jax.seq2seq",
    "greedy_search": "encoder_jax.decode",
    "beam_search": "encoder_jax.decode",
    "SentencePieceTokenizer": "encoder_jax.data.tokenizer",
    "WordPieceTokenizer": "encoder_jax.data.wordpiece",
    "load_artifact": "encoder_jax.artifact",
    "import_hf": "encoder_jax.pretrained",
    "export_hf": "encoder_jax.interop",
    "Pretrained": "encoder_jax.api",
    "load_pretrained": "encoder_jax.api",
    "load_tokenizer": "encoder_jax.api",
    "classify": "encoder_jax.api",
    "embed": "encoder_jax.api",
    "fill_mask": "encoder_jax.api",
    "translate": "encoder_jax.api",
    "load_config": "encoder_jax.api",
}
_SUBMODULES = ("train", "export", "artifact")  # ej.train.run(config, workdir), ej.export.export_run(...)
__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # importing a submodule binds it as the package's attribute
        return importlib.import_module(f"encoder_jax.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'encoder_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
