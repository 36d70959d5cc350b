"""Optimizers, schedules, weight-decay masks and parameter freezing from config."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import traverse_util

from encoder_jax import configs, errors

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad",
              "adafactor", "lamb", "lion")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int,
                           decay: str = "linear", end_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup to `peak`, then constant / linear / cosine / inverse-sqrt decay."""
    if decay not in SCHEDULES:
        raise errors.ConfigError(f"opt.schedule={decay!r}; valid: {list(SCHEDULES)}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    decay_steps = max(1, total_steps - warmup_steps)
    if decay == "constant":
        after = optax.constant_schedule(peak)
    elif decay == "linear":
        after = optax.linear_schedule(peak, peak * end_fraction, decay_steps)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_fraction)
    else:
        after = lambda step: peak * jax.numpy.sqrt(max(warmup_steps, 1) / jax.numpy.maximum(
            step + max(warmup_steps, 1), 1.0))
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after],
                                [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: not biases, not LayerNorm scales/offsets."""
    flat = traverse_util.flatten_dict(params)
    mask = {path: not (path[-1] in ("bias", "scale") or path[-1].endswith("_bias")
                       or any("norm" in part for part in path[:-1]))
            for path in flat}
    return traverse_util.unflatten_dict(mask)


def _base_optimizer(name: str, learning_rate, cfg: configs.OptConfig) -> optax.GradientTransformation:
    wd, b1, b2, eps = cfg.weight_decay, cfg.b1, cfg.b2, cfg.eps
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name in ("momentum", "nesterov"):
        return optax.sgd(learning_rate, momentum=cfg.momentum, nesterov=name == "nesterov")
    if name == "adam":
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if name == "adamw":
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
    if name == "rmsprop":
        return optax.rmsprop(learning_rate, decay=cfg.rms_decay, eps=eps,
                             momentum=cfg.momentum or None)
    if name == "adagrad":
        return optax.adagrad(learning_rate, eps=eps)
    if name == "adafactor":
        return optax.adafactor(learning_rate, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    if name == "lamb":
        return optax.lamb(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
    if name == "lion":
        return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=wd, mask=decay_mask)
    raise errors.ConfigError(f"opt.name={name!r}; valid: {list(OPTIMIZERS)}")


def trainable_mask(params: Any, rule: str) -> Any:
    """Which parameters train: 'all' | 'head' | 'top:K' (top K blocks + head) | 're:<regex>'.

    'head' means everything outside the `encoder` subtree.
    """
    flat = traverse_util.flatten_dict(params)
    paths = {path: "/".join(path) for path in flat}
    if rule == "all":
        mask = {path: True for path in flat}
    elif rule == "head":
        mask = {path: path[0] != "encoder" for path in flat}
    elif rule.startswith("top:"):
        k = int(rule[4:])
        blocks = sorted({int(m.group(1)) for p in paths.values() for m in [re.search(r"block_(\d+)", p)] if m})
        top = set(blocks[-k:]) if k > 0 else set()
        mask = {}
        for path, name in paths.items():
            m = re.search(r"block_(\d+)", name)
            in_encoder = path[0] == "encoder"
            mask[path] = (not in_encoder) or (m is not None and int(m.group(1)) in top) or (
                "pooler" in name or "final_norm" in name)
    elif rule.startswith("re:"):
        pattern = re.compile(rule[3:])
        mask = {path: bool(pattern.search(name)) for path, name in paths.items()}
    else:
        raise errors.ConfigError(f"finetune.trainable={rule!r}; valid: 'all', 'head', 'top:K', 're:<regex>'")
    if not any(mask.values()):
        raise errors.ConfigError(f"finetune.trainable={rule!r} selects no parameters")
    return traverse_util.unflatten_dict(mask)


def layer_lr_decay_scale(decay: float, num_layers: int) -> Callable[[tuple[str, ...]], float]:
    """Layer-wise LR decay: path -> decay ** (num_layers + 1 - depth).

    Depth 0 is the encoder's embeddings, block_i is i + 1, and everything above
    the blocks (final_norm, pooler, task heads outside `encoder`) is num_layers + 1.
    """
    if not 0.0 < decay <= 1.0:
        raise errors.ConfigError(f"finetune.layer_lr_decay={decay}; valid: (0, 1]")

    def scale(path: tuple[str, ...]) -> float:
        depth = num_layers + 1
        if path and path[0] == "encoder" and len(path) > 1:
            match = re.fullmatch(r"block_(\d+)", path[1])
            if match:
                depth = int(match.group(1)) + 1
            elif path[1] not in ("final_norm", "pooler"):
                depth = 0
        return float(decay ** (num_layers + 1 - depth))

    return scale


def prefix_lr_scale(prefix: str, factor: float) -> Callable[[tuple[str, ...]], float]:
    """path -> `factor` for top-level parameters named `prefix...`, else 1."""
    return lambda path: factor if path and path[0].startswith(prefix) else 1.0


def product_of_scales(*scales: Callable[[tuple[str, ...]], float] | None
                      ) -> Callable[[tuple[str, ...]], float] | None:
    """The per-path product of the given learning-rate factors (None ones skipped; all None: None)."""
    given = [s for s in scales if s is not None]
    if not given:
        return None
    return lambda path: float(np.prod([s(path) for s in given]))


def scale_by_path(scale: Callable[[tuple[str, ...]], float]) -> optax.GradientTransformation:
    """Multiplies each update by `scale(path)` (a per-parameter learning-rate factor)."""

    def update(updates, state, params=None):
        del params
        names = lambda key_path: tuple(str(getattr(k, "key", k)) for k in key_path)
        return jax.tree_util.tree_map_with_path(lambda p, u: u * scale(names(p)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg, total_steps: int, trainable: Callable[[Any], Any] | None = None,
                    lr_scale: Callable[[tuple[str, ...]], float] | None = None
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clipping + optimizer + schedule; frozen parameters get `set_to_zero` and no state.

    `lr_scale` (path -> factor) multiplies each parameter's update, e.g. layer-wise decay.
    """
    cfg = configs.section(configs.OptConfig, cfg, "opt")
    schedule = learning_rate_schedule(cfg.learning_rate, total_steps, cfg.warmup_steps,
                                      cfg.schedule, cfg.end_lr_fraction)
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(_base_optimizer(cfg.name, schedule, cfg))
    if lr_scale is not None:
        parts.append(scale_by_path(lr_scale))
    tx = optax.chain(*parts)
    if trainable is not None:
        labels = lambda params: jax.tree_util.tree_map(
            lambda t: "train" if t else "freeze", trainable(params))
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx, schedule
