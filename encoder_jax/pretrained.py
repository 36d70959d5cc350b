"""Pretrained encoders for fine-tuning: one record type, whatever the origin.

`PretrainedEncoder` carries an encoder's shape (EncoderConfig), its tokenizer and
a loader of its params. `load_mlm_run(workdir)` reads an encoder_jax MLM run;
`pretrained_encoder(EncoderConfig, encoder params, tokenizer)` wraps anything
else (e.g. a Hugging Face checkpoint converted by `interop`). `resolve_pretrained`
maps config fields to one of them: add new sources (config.init_from_hf) there
and in `wants_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import numpy as np

from encoder_jax.layers import EncoderConfig



@dataclasses.dataclass(frozen=True)
class PretrainedEncoder:
    """A pretrained encoder: its shape, tokenizer, and a loader of its params (fresh starts only)."""

    config: EncoderConfig
    load_params: Callable[[], Any]  # -> the `encoder` params subtree (host arrays)
    tokenizer: Any  # a data.tokenizer.Tokenizer
    source: str  # named in error messages


def pretrained_encoder(encoder_cfg: EncoderConfig, encoder_params: Any, tokenizer,
                       source: str = "pretrained") -> PretrainedEncoder:
    """Wraps an in-memory encoder (e.g. converted from Hugging Face) for classification."""
    return PretrainedEncoder(encoder_cfg, lambda: encoder_params, tokenizer, source)


def load_mlm_run(workdir: str) -> PretrainedEncoder:
    """An MLM run's encoder: shape from its config.json, its tokenizer.model, lazy params."""
    from encoder_jax import checkpoint
    from encoder_jax.data.tokenizer import SentencePieceTokenizer
    from encoder_jax.tasks.mlm import encoder_config

    config_path = os.path.join(workdir, "config.json")
    tokenizer_path = os.path.join(workdir, SentencePieceTokenizer.FILENAME)
    for path in (config_path, tokenizer_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init_from={workdir!r} has no {os.path.basename(path)}: "
                                    f"is it an encoder_jax run's workdir?")
    with open(config_path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    tokenizer = SentencePieceTokenizer.load(tokenizer_path)
    cfg = encoder_config(ml_collections.ConfigDict(model), tokenizer.vocab_size)

    def load_params():
        params = checkpoint.load_params(workdir)
        if "encoder" not in params:
            raise ValueError(f"init_from={workdir!r}: its params have no 'encoder' subtree "
                             f"(top level: {sorted(params)})")
        return params["encoder"]

    return PretrainedEncoder(cfg, load_params, tokenizer, f"init_from={workdir!r}")


def wants_pretrained(config) -> bool:
    """Whether the config names a pretrained encoder (checked before loading anything)."""
    return bool(config.get("init_from"))


def resolve_pretrained(config) -> PretrainedEncoder | None:
    """The pretrained encoder named by the config, if any (init_from_hf plugs in here)."""
    if config.get("init_from"):
        return load_mlm_run(config.init_from)
    return None


def graft_encoder(params: Any, encoder_params: Any, source: str) -> Any:
    """params with `encoder` replaced by the pretrained one; shapes must match exactly."""
    from flax import traverse_util

    want = traverse_util.flatten_dict(params["encoder"])
    have = traverse_util.flatten_dict(encoder_params)
    missing = sorted("/".join(p) for p in set(want) - set(have))
    if missing:
        raise ValueError(f"{source}: the pretrained encoder lacks {missing[:5]} (different architecture)")
    for path, leaf in want.items():
        if np.shape(have[path]) != np.shape(leaf):
            raise ValueError(f"{source}: encoder/{'/'.join(path)} has shape {np.shape(have[path])}, "
                             f"this model needs {np.shape(leaf)} (vocab or hidden size differ)")
    grafted = {path: jnp.asarray(have[path], leaf.dtype) for path, leaf in want.items()}
    return {**params, "encoder": traverse_util.unflatten_dict(grafted)}
