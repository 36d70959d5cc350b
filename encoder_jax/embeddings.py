"""Sentence embeddings from any encoder the project can load, and how they are normalised.

    embed = embedding_function(encoder_config, pooling="mean")      # jitted
    X_NxD = embed_examples(embed, encoder_params, examples, pad_lengths=(32, 64, 128))
    norm = fit_normalizer(X_train, "whiten"); Z = norm.apply(X_dev)

`examples` are the encoded records of `data.classification` ({"ids", "type_ids",
"index"}); batches are length-sorted and padded to a few lengths, so the encoder
compiles once per length and rows come back in the examples' order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from encoder_jax import errors
from encoder_jax.data import batching
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertEncoder, default_segment_ids

POOLINGS = ("cls", "mean")
NORMALIZATIONS = ("none", "l2", "whiten")


def pool(hidden_BxLxD: jax.Array, segment_ids_BxL: jax.Array, pooling: str) -> jax.Array:
    """(B, D) float32: the [CLS] state, or the mean over real (segment > 0) tokens."""
    hidden_BxLxD = hidden_BxLxD.astype(jnp.float32)
    if pooling == "cls":
        return hidden_BxLxD[:, 0]
    if pooling != "mean":
        raise errors.ConfigError(f"pooling={pooling!r}; valid: {list(POOLINGS)}")
    real_BxLx1 = (segment_ids_BxL > 0)[..., None]
    return (hidden_BxLxD * real_BxLx1).sum(1) / jnp.maximum(real_BxLx1.sum(1), 1)


def embedding_function(config: EncoderConfig, pooling: str = "mean") -> Callable[..., jax.Array]:
    """jitted (encoder_params, ids_BxL, segment_ids_BxL, type_ids_BxL) -> (B, D) float32."""
    if pooling not in POOLINGS:
        raise errors.ConfigError(f"pooling={pooling!r}; valid: {list(POOLINGS)}")
    encoder = BertEncoder(config)

    @jax.jit
    def embed(encoder_params, ids_BxL, segment_ids_BxL, type_ids_BxL):
        segment_ids_BxL = default_segment_ids(ids_BxL, None, segment_ids_BxL)
        hidden_BxLxD, _ = encoder.apply({"params": encoder_params}, ids_BxL,
                                        segment_ids=segment_ids_BxL, type_ids=type_ids_BxL)
        return pool(hidden_BxLxD, segment_ids_BxL, pooling)

    return embed


def embed_examples(embed: Callable[..., jax.Array], params: Any, examples: Sequence[dict[str, Any]],
                   *, pad_lengths: Sequence[int], batch_size: int = 64, desc: str = "embed"
                   ) -> np.ndarray:
    """(N, D) float32: `embed(params, ids, segment_ids, type_ids)` of every example, in order.

    `embed` may be any such function (an encoder's pooled states, a VAE's latent means).
    """
    from tqdm import tqdm

    if not examples:
        raise errors.DataError(f"{desc}: no documents to embed")
    out: list[np.ndarray | None] = [None] * len(examples)
    ordered = [{**e, "index": i} for i, e in enumerate(examples)]  # rows come back by position
    batches = batching.eval_batches(ordered, global_batch=batch_size, pad_lengths=pad_lengths)
    total = -(-len(examples) // batch_size)
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
        vectors_BxD = np.asarray(jax.device_get(embed(params, batch["ids"], batch["segment_ids"],
                                                      batch["type_ids"])))
        for row, index in enumerate(batch["index"]):
            if batch["weight"][row] > 0:
                out[int(index)] = vectors_BxD[row]
    return np.stack(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """How embeddings are normalised: fitted on one split (train), applied to any."""

    method: str
    mean_D: np.ndarray | None = None  # whiten: the fitted mean
    projection_DxE: np.ndarray | None = None  # whiten: eigenvectors / sqrt(eigenvalues)

    def apply(self, X_NxD: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, E) float32 (E = D except whitening, which drops null directions)."""
        X = np.asarray(X_NxD, np.float64)
        if self.method == "whiten":
            X = (X - self.mean_D) @ self.projection_DxE
        elif self.method == "l2":
            X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X.astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"method": np.asarray(self.method)}
        if self.method == "whiten":
            arrays.update(mean=self.mean_D, projection=self.projection_DxE)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Any) -> "Normalizer":
        method = str(arrays["method"])
        if method == "whiten":
            return cls(method, np.asarray(arrays["mean"]), np.asarray(arrays["projection"]))
        return cls(method)


def fit_normalizer(X_NxD: np.ndarray, method: str, eps: float = 1e-6) -> Normalizer:
    """A normalizer fitted on X: PCA whitening keeps directions with variance > eps x the largest."""
    if method not in NORMALIZATIONS:
        raise errors.ConfigError(f"topics.normalize={method!r}; valid: {list(NORMALIZATIONS)}")
    if method != "whiten":
        return Normalizer(method)
    X = np.asarray(X_NxD, np.float64)
    mean_D = X.mean(0)
    covariance_DxD = np.cov(X - mean_D, rowvar=False).reshape(X.shape[1], X.shape[1])
    values_D, vectors_DxD = np.linalg.eigh(covariance_DxD)
    keep = values_D > eps * max(values_D.max(), 1e-30)
    return Normalizer(method, mean_D, vectors_DxD[:, keep] / np.sqrt(values_D[keep]))


def check_finite(X_NxD: np.ndarray, name: str) -> np.ndarray:
    """X itself; one line naming the first bad row when an embedding holds NaN or inf."""
    bad = ~np.isfinite(X_NxD).all(axis=1)
    if bad.any():
        raise errors.NonFiniteError(f"{name}: {int(bad.sum())} of {len(X_NxD)} embeddings hold NaN or "
                                    f"inf (first: row {int(np.argmax(bad))}); the encoder's weights or "
                                    f"inputs are broken")
    return X_NxD
