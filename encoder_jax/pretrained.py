"""Pretrained encoders for fine-tuning: one record type, whatever the origin.

`PretrainedEncoder` carries an encoder's shape (EncoderConfig), its tokenizer and
a loader of its params. `load_mlm_run(workdir)` reads an encoder_jax MLM run
(`config.init_from`); `interop.pretrained_encoder_from_hf(dir)` a Hugging Face
BERT directory (`config.init_from_hf`); `pretrained_encoder(EncoderConfig,
encoder params, tokenizer)` wraps anything else. `resolve_pretrained` maps the
config fields to one of them (setting both is an error); add new sources there
and in `INIT_FIELDS`.
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

INIT_FIELDS = ("init_from", "init_from_hf")  # config fields naming a pretrained encoder


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


def load_mlm_run(workdir: str, word_segmenter: str = "auto") -> PretrainedEncoder:
    """An MLM run's encoder: its shape, its saved tokenizer (tokenizer.model or vocab.txt), lazy params."""
    from encoder_jax import checkpoint
    from encoder_jax.data import tokenizer as tokenizer_lib

    try:
        tokenizer = tokenizer_lib.load_saved(workdir, word_segmenter)
    except FileNotFoundError:
        raise FileNotFoundError(f"init_from={workdir!r} has no tokenizer.model or vocab.txt: "
                                f"is it an encoder_jax run's workdir?") from None
    cfg = run_encoder_config(workdir, tokenizer.vocab_size)

    def load_params():
        params = checkpoint.load_params(workdir)
        if "encoder" not in params:
            raise ValueError(f"init_from={workdir!r}: its params have no 'encoder' subtree "
                             f"(top level: {sorted(params)})")
        return params["encoder"]

    return PretrainedEncoder(cfg, load_params, tokenizer, f"init_from={workdir!r}")


def run_encoder_config(workdir: str, vocab_size: int) -> EncoderConfig:
    """An MLM run's shape: its encoder_config.json (written by init_from_hf runs) > config.json's model."""
    from encoder_jax.interop import ENCODER_CONFIG_FILE
    from encoder_jax.tasks.mlm import encoder_config

    # An init_from_hf run's config.json still holds the experiment's default shape.
    recorded_path = os.path.join(workdir, ENCODER_CONFIG_FILE)
    if os.path.isfile(recorded_path):
        with open(recorded_path, encoding="utf-8") as f:
            recorded = json.load(f)
        names = {field.name for field in dataclasses.fields(EncoderConfig)}
        values = {k: v for k, v in recorded.items() if k in names}
        for name in ("dtype", "param_dtype"):
            if name in values:
                values[name] = jnp.dtype(values[name])
        return EncoderConfig(**values)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"init_from={workdir!r} has no {ENCODER_CONFIG_FILE} or config.json: "
                                f"is it an encoder_jax run's workdir?")
    with open(config_path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    return encoder_config(ml_collections.ConfigDict(model), vocab_size)


def init_field(config) -> str | None:
    """The one config field naming a pretrained encoder (INIT_FIELDS), or None; both set is an error."""
    named = [f for f in INIT_FIELDS if config.get(f)]
    if len(named) > 1:
        raise ValueError(f"set init_from or init_from_hf, not both (init_from={config.init_from!r}, "
                         f"init_from_hf={config.init_from_hf!r})")
    return named[0] if named else None


def wants_pretrained(config) -> bool:
    """Whether the config names a pretrained encoder (checked before loading anything)."""
    return init_field(config) is not None


def resolve_pretrained(config) -> PretrainedEncoder | None:
    """The pretrained encoder named by `init_from` (an MLM run) or `init_from_hf` (a Hugging Face BERT)."""
    field = init_field(config)
    segmenter = config.tokenizer.get("word_segmenter", "auto")
    if field == "init_from_hf":
        from encoder_jax import interop

        return interop.pretrained_encoder_from_hf(config.init_from_hf, segmenter)
    if field == "init_from":
        return load_mlm_run(config.init_from, segmenter)
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
