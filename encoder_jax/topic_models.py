"""Document VAE (NVDM / ProdLDA style) and VaDE: the modules and their ELBO terms.

A document is its bag of words over the tokenizer's vocabulary (counts (B, V)), optionally
with hashed bigrams of adjacent tokens (character bigrams for a character tokenizer);
the inference network sees log(1 + counts) x idf, L2-normalised, and returns a
diagonal Gaussian q(z|x); z = mean + std * eps (the reparameterisation trick); the
decoder (NVDM's) maps z through `topics (Z, V)` plus a background log-frequency bias to
log p(word | doc), so each latent dimension is a direction in word space whose largest
weights are its topic's words. (A ProdLDA decoder, theta = softmax(z), collapsed to the
background here without its batch normalisation: the KL went to 0 and the reconstruction
never left the unigram baseline on AG News.)

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))

with p(z) = N(0, I) (the VAE) or the Gaussian mixture sum_c pi_c N(mu_c, diag sigma_c^2)
of VaDE (Jiang et al., 2017), whose clusters are read from q(c|x) ~ p(c|z). The prior's
weights are logits and its variances log-variances, so they stay valid under any update.
Shapes: B documents, V vocabulary, Z latent dims, K mixture components.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOG_2PI = math.log(2 * math.pi)


HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash (uint32 arithmetic wraps)


def bigram_bucket(first, second, buckets: int):
    """Hash bucket in [0, buckets) of the token pair (first, second); numpy or jax, same values."""
    xp = jnp if isinstance(first, jax.Array) else np
    first, second = xp.asarray(first).astype(xp.uint32), xp.asarray(second).astype(xp.uint32)
    return ((first * xp.uint32(HASH_MULTIPLIER) + second) % xp.uint32(buckets)).astype(xp.int32)


def bag_of_words(ids_BxL: jax.Array, segment_ids_BxL: jax.Array, vocab_size: int,
                 keep_W: jax.Array, bigram_buckets: int = 0, regular_V: jax.Array | None = None
                 ) -> jax.Array:
    """(B, W) float32 counts of the kept terms of each row: W = V + bigram_buckets.

    Terms are the real tokens (columns < V) and, with `bigram_buckets`, the hashed pairs of
    adjacent real regular tokens (column V + bucket; `regular_V` is 0 for special tokens).
    A term counts when `keep_W` is 1 for it.
    """
    batch = ids_BxL.shape[0]
    real_BxL = (segment_ids_BxL > 0).astype(jnp.float32)
    rows_BxL = jnp.broadcast_to(jnp.arange(batch)[:, None], ids_BxL.shape)
    counts_BxW = jnp.zeros((batch, vocab_size + bigram_buckets), jnp.float32)
    counts_BxW = counts_BxW.at[rows_BxL, ids_BxL].add(real_BxL * keep_W[ids_BxL])
    if bigram_buckets:
        regular_BxL = real_BxL * regular_V[ids_BxL]
        pairs_BxM = vocab_size + bigram_bucket(ids_BxL[:, :-1], ids_BxL[:, 1:], bigram_buckets)
        weights_BxM = regular_BxL[:, :-1] * regular_BxL[:, 1:] * keep_W[pairs_BxM]
        counts_BxW = counts_BxW.at[rows_BxL[:, 1:], pairs_BxM].add(weights_BxM)
    return counts_BxW


def document_features(counts_BxV: jax.Array, idf_V: jax.Array) -> jax.Array:
    """log(1 + counts) x idf, each row L2-normalised: (B, V)."""
    weighted_BxV = jnp.log1p(counts_BxV) * idf_V[None]
    norm_Bx1 = jnp.sqrt((weighted_BxV ** 2).sum(-1, keepdims=True))
    return weighted_BxV / jnp.maximum(norm_Bx1, 1e-12)


class DocumentVAE(nn.Module):
    """x (B, V) features -> q(z|x); z (B, Z) -> log p(word | z) (B, V).

    Attributes:
      vocab_size: V.
      latent_dim: Z, the number of latent topics.
      hidden_dim: width of the two-layer inference MLP.
      num_components: K of the VaDE mixture prior; 0 for the standard normal prior.
      dropout_rate: on the inference MLP's output and on z before decoding.
      background_V: initial decoder bias, the log unigram frequencies (None: zeros).
    """

    vocab_size: int
    latent_dim: int
    hidden_dim: int = 256
    num_components: int = 0
    dropout_rate: float = 0.2
    background_V: np.ndarray | None = None

    def setup(self):
        self.hidden = [nn.Dense(self.hidden_dim, name=f"hidden_{i}") for i in range(2)]
        self.to_mean = nn.Dense(self.latent_dim, name="to_mean")
        self.to_logvar = nn.Dense(self.latent_dim, name="to_logvar",
                                  kernel_init=nn.initializers.zeros)
        self.topics = self.param("topics", nn.initializers.xavier_uniform(),
                                 (self.latent_dim, self.vocab_size))
        background = self.background_V
        self.background = self.param(
            "background", lambda _, shape: jnp.zeros(shape) if background is None
            else jnp.asarray(background, jnp.float32), (self.vocab_size,))
        self.dropout = nn.Dropout(self.dropout_rate)
        if self.num_components:
            k, z = self.num_components, self.latent_dim
            self.prior_logits = self.param("prior_logits", nn.initializers.zeros, (k,))
            self.prior_means = self.param("prior_means", nn.initializers.normal(1.0), (k, z))
            self.prior_logvars = self.param("prior_logvars", nn.initializers.zeros, (k, z))

    def encode(self, features_BxV: jax.Array, deterministic: bool = True
               ) -> tuple[jax.Array, jax.Array]:
        """(mean (B, Z), log-variance (B, Z)) of q(z|x)."""
        h = features_BxV
        for layer in self.hidden:
            h = nn.softplus(layer(h))
        h = self.dropout(h, deterministic=deterministic)
        return self.to_mean(h), jnp.clip(self.to_logvar(h), -10.0, 10.0)

    def decode(self, z_BxZ: jax.Array, deterministic: bool = True) -> jax.Array:
        """log p(word | z): (B, V) log-probabilities."""
        z_BxZ = self.dropout(z_BxZ, deterministic=deterministic)
        return jax.nn.log_softmax(z_BxZ @ self.topics + self.background[None], axis=-1)

    def prior(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """VaDE's (log weights (K,), means (K, Z), log-variances (K, Z))."""
        return (jax.nn.log_softmax(self.prior_logits), self.prior_means,
                jnp.clip(self.prior_logvars, -10.0, 10.0))

    def __call__(self, features_BxV: jax.Array, deterministic: bool = True):
        """(mean, logvar, log p(word | z) for a sampled z): shapes (B, Z), (B, Z), (B, V)."""
        mean_BxZ, logvar_BxZ = self.encode(features_BxV, deterministic)
        z_BxZ = mean_BxZ
        if not deterministic:
            eps_BxZ = jax.random.normal(self.make_rng("sample"), mean_BxZ.shape)
            z_BxZ = mean_BxZ + jnp.exp(0.5 * logvar_BxZ) * eps_BxZ
        if self.num_components:  # touch the prior so init creates it
            self.prior()
        return mean_BxZ, logvar_BxZ, self.decode(z_BxZ, deterministic), z_BxZ


def reconstruction(counts_BxV: jax.Array, log_probs_BxV: jax.Array) -> jax.Array:
    """-log p(x|z) per document: (B,)."""
    return -(counts_BxV * log_probs_BxV).sum(-1)


def kl_standard_normal(mean_BxZ: jax.Array, logvar_BxZ: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per document: (B,), >= 0."""
    return 0.5 * (jnp.exp(logvar_BxZ) + mean_BxZ ** 2 - 1.0 - logvar_BxZ).sum(-1)


def cluster_posterior(z_BxZ: jax.Array, log_weights_K: jax.Array, means_KxZ: jax.Array,
                      logvars_KxZ: jax.Array) -> jax.Array:
    """log p(c | z) under the mixture prior: (B, K), rows normalised."""
    diff_BxKxZ = z_BxZ[:, None] - means_KxZ[None]
    log_density_BxK = -0.5 * (LOG_2PI + logvars_KxZ[None]
                              + diff_BxKxZ ** 2 / jnp.exp(logvars_KxZ)[None]).sum(-1)
    return jax.nn.log_softmax(log_weights_K[None] + log_density_BxK, axis=-1)


def kl_mixture(mean_BxZ: jax.Array, logvar_BxZ: jax.Array, log_gamma_BxK: jax.Array,
               log_weights_K: jax.Array, means_KxZ: jax.Array, logvars_KxZ: jax.Array) -> jax.Array:
    """VaDE's KL(q(z, c | x) || p(z, c)) per document, q(c|x) = gamma: (B,), >= 0.

    = E_q(c)[ KL(q(z|x) || p(z|c)) ] + KL(q(c|x) || p(c)), both closed form.
    """
    gamma_BxK = jnp.exp(log_gamma_BxK)
    var_BxZ, prior_var_KxZ = jnp.exp(logvar_BxZ), jnp.exp(logvars_KxZ)
    per_component_BxK = 0.5 * (logvars_KxZ[None] - logvar_BxZ[:, None] - 1.0
                               + (var_BxZ[:, None] + (mean_BxZ[:, None] - means_KxZ[None]) ** 2)
                               / prior_var_KxZ[None]).sum(-1)
    categorical_B = (gamma_BxK * (log_gamma_BxK - log_weights_K[None])).sum(-1)
    return (gamma_BxK * per_component_BxK).sum(-1) + categorical_B


def kl_weight(step: jax.Array, warmup_steps: int) -> jax.Array:
    """KL annealing: rises linearly from 0 at step 0 to 1 at `warmup_steps` (1 if 0)."""
    if warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)
