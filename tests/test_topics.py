"""Topic discovery: embeddings, the document VAE / VaDE maths, and the two topic tasks end to end."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, tiny_config

from encoder_jax import embeddings, errors
from encoder_jax import topic_models as tm

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import topics_news  # noqa: E402


# ----------------------------------------------------------------------------- embeddings


def test_mean_pooling_ignores_padding_and_cls_takes_the_first_state():
    hidden = jax.random.normal(jax.random.key(0), (2, 5, 3))
    segments = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_allclose(embeddings.pool(hidden, segments, "mean")[0], hidden[0, :3].mean(0),
                               rtol=1e-6)
    np.testing.assert_allclose(embeddings.pool(hidden, segments, "cls"), hidden[:, 0])
    with pytest.raises(errors.ConfigError, match=r"pooling='max'; valid: \['cls', 'mean'\]"):
        embeddings.embedding_function(None, "max")


def test_whitening_fitted_on_train_gives_identity_covariance_and_l2_unit_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)) + 3.0
    white = embeddings.fit_normalizer(X, "whiten")
    np.testing.assert_allclose(np.cov(white.apply(X), rowvar=False), np.eye(4), atol=1e-4)
    again = embeddings.Normalizer.from_arrays(white.to_arrays())
    np.testing.assert_allclose(again.apply(X[:5]), white.apply(X[:5]), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embeddings.fit_normalizer(X, "l2").apply(X), axis=1), 1.0,
                               rtol=1e-5)
    with pytest.raises(errors.ConfigError, match=r"topics.normalize='pca'; valid"):
        embeddings.fit_normalizer(X, "pca")


def test_non_finite_embeddings_name_the_first_bad_row():
    X = np.ones((4, 2), np.float32)
    X[2, 1] = np.nan
    with pytest.raises(errors.NonFiniteError, match=r"^train embeddings: 1 of 4 .* \(first: row 2\)"):
        embeddings.check_finite(X, "train embeddings")


# ----------------------------------------------------------------------------- VAE / VaDE maths


def test_bag_of_words_counts_real_kept_tokens_only():
    ids = jnp.array([[2, 3, 3, 0], [4, 4, 4, 1]])
    segments = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    keep = jnp.array([0, 0, 1, 1, 1], jnp.float32)  # ids 0 and 1 are special
    counts = np.asarray(tm.bag_of_words(ids, segments, 5, keep))
    np.testing.assert_array_equal(counts, [[0, 0, 1, 2, 0], [0, 0, 0, 0, 3]])


def test_hashed_bigrams_count_adjacent_regular_pairs_as_the_host_does():
    from encoder_jax.tasks.topics.common import BowStats

    ids = np.array([[2, 5, 6, 5, 6, 3, 0], [2, 7, 3, 0, 0, 0, 0]])  # 2 = [CLS], 3 = [SEP], 0 = pad
    segments = (ids > 0).astype(np.int32)
    regular = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32)
    buckets = 16
    keep = np.concatenate([regular, np.ones(buckets, np.float32)])
    counts = np.asarray(tm.bag_of_words(jnp.asarray(ids), jnp.asarray(segments), 8, jnp.asarray(keep),
                                        buckets, jnp.asarray(regular)))
    stats = BowStats(keep, keep, keep, regular, np.full((buckets, 2), -1, np.int32))
    for row, real in zip(counts, ([2, 5, 6, 5, 6, 3], [2, 7, 3])):
        expected = np.zeros(8 + buckets)
        np.add.at(expected, stats.terms(np.array(real)), 1.0)
        expected[:8] *= regular
        np.testing.assert_array_equal(row, expected)
    # (5, 6) twice and (6, 5) once; no pair with [CLS], [SEP] or padding.
    assert counts[0, 8:].sum() == 3 and counts[1, 8:].sum() == 0
    assert counts[0, 8 + int(tm.bigram_bucket(5, 6, buckets))] >= 2


def _gaussian_kl(m, v, m2, v2):
    return 0.5 * np.sum(np.log(v2 / v) + (v + (m - m2) ** 2) / v2 - 1.0, axis=-1)


def test_kl_terms_are_closed_form_and_non_negative():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) * 0.5
    kl = np.asarray(tm.kl_standard_normal(jnp.asarray(mean), jnp.asarray(logvar)))
    np.testing.assert_allclose(kl, _gaussian_kl(mean, np.exp(logvar), 0.0, 1.0), rtol=1e-5)
    # One component with gamma = 1: VaDE's KL is the Gaussian KL to that component.
    m2, lv2 = rng.normal(size=(1, 3)), rng.normal(size=(1, 3)) * 0.3
    one = tm.kl_mixture(jnp.asarray(mean), jnp.asarray(logvar), jnp.zeros((6, 1)), jnp.zeros(1),
                        jnp.asarray(m2), jnp.asarray(lv2))
    np.testing.assert_allclose(one, _gaussian_kl(mean, np.exp(logvar), m2, np.exp(lv2)), rtol=1e-5)
    # Several components, gamma the true posterior at the mean: KL >= 0 and log gamma normalised.
    log_w = jax.nn.log_softmax(jnp.asarray(rng.normal(size=4)))
    means, logvars = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(4, 3)) * 0.3)
    log_gamma = tm.cluster_posterior(jnp.asarray(mean), log_w, means, logvars)
    np.testing.assert_allclose(jnp.exp(log_gamma).sum(-1), 1.0, rtol=1e-5)
    assert (np.asarray(tm.kl_mixture(jnp.asarray(mean), jnp.asarray(logvar), log_gamma, log_w, means,
                                     logvars)) >= 0).all()
    assert float(tm.kl_weight(jnp.array(5), 10)) == 0.5 and float(tm.kl_weight(jnp.array(50), 10)) == 1.0


def _toy_counts(rng, docs=64, vocab=12, topics=3):
    """Documents drawn from `topics` disjoint word groups."""
    groups = np.array_split(np.arange(vocab), topics)
    counts = np.zeros((docs, vocab), np.float32)
    for d in range(docs):
        np.add.at(counts[d], rng.choice(groups[d % topics], 10), 1.0)
    return jnp.asarray(counts)


def test_vae_reconstruction_improves_kl_stays_non_negative_and_gradients_flow_through_z():
    counts = _toy_counts(np.random.default_rng(0))
    model = tm.DocumentVAE(vocab_size=12, latent_dim=3, hidden_dim=16, dropout_rate=0.0)
    features = tm.document_features(counts, jnp.ones(12))
    params = model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, features)["params"]

    def loss(params, key):
        mean, logvar, log_probs, _ = model.apply({"params": params}, features, deterministic=False,
                                                 rngs={"sample": key})
        recon, kl = tm.reconstruction(counts, log_probs), tm.kl_standard_normal(mean, logvar)
        return (recon + kl).mean(), (recon.mean(), kl)

    grads = jax.grad(lambda p: loss(p, jax.random.key(2))[0])(params)
    assert float(jnp.abs(grads["to_logvar"]["kernel"]).sum()) > 0  # through z = mean + std * eps
    tx = optax.adam(2e-2)

    def train(params, _):
        def step(carry, key):
            params, opt = carry
            updates, opt = tx.update(jax.grad(lambda q: loss(q, key)[0])(params), opt)
            return (optax.apply_updates(params, updates), opt), None

        return jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.key(10), 100))[0][0]

    first = float(loss(params, jax.random.key(3))[1][0])
    params = jax.jit(train)(params, None)
    last, kl = loss(params, jax.random.key(3))[1]
    assert last < first - 3.0 and bool((kl >= 0).all())
    # The ELBO bounds the log-likelihood: -ELBO >= the ideal per-group reconstruction.
    best = float(-(counts * jnp.log(jnp.maximum(counts / counts.sum(-1, keepdims=True), 1e-9))).sum(-1).mean())
    assert last + float(kl.mean()) >= best - 1e-3


def test_vade_prior_stays_valid_whatever_its_raw_parameters():
    model = tm.DocumentVAE(vocab_size=6, latent_dim=2, hidden_dim=4, num_components=3)
    params = model.init({"params": jax.random.key(0), "sample": jax.random.key(0)}, jnp.zeros((1, 6)))["params"]
    params = {**params, "prior_logits": jnp.array([1e4, -1e4, 0.0]),
              "prior_logvars": jnp.full((3, 2), -1e3)}
    log_w, _, logvars = model.apply({"params": params}, method=tm.DocumentVAE.prior)
    np.testing.assert_allclose(float(jnp.exp(log_w).sum()), 1.0, rtol=1e-6)
    assert bool(jnp.isfinite(log_w).all() | (jnp.exp(log_w) >= 0).all())
    assert bool((jnp.exp(logvars) > 0).all() & jnp.isfinite(logvars).all())


# ----------------------------------------------------------------------------- tasks


def test_topics_variants_and_bad_ones():
    assert topics_news.get_config("vade_thucnews").topics.num_topics == 10
    assert topics_news.get_config("gmm").task == "gmm_topics"
    with pytest.raises(errors.ConfigError, match=r"variant 'lda'; valid: METHOD or METHOD_DATA"):
        topics_news.get_config("lda")


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, corpus_files, data_cache):
    """A one-step MLM run: an encoder the GMM task can embed with."""
    from encoder_jax import train

    workdir = str(tmp_path_factory.mktemp("encoder"))
    train.run(tiny_config(corpus_files, data_cache, **{"train.num_steps": 1, "ckpt.use_async": False}),
              workdir)
    return workdir


def gmm_config(data_cache, init_from, **overrides):
    config = topics_news.get_config("gmm_smoke")
    config.init_from = init_from
    config.data.data_dir = data_cache
    config.topics.max_fit_docs = 300
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def test_gmm_topics_fit_scores_reports_and_embeds(encoder_run, data_cache, tmp_path):
    from encoder_jax.tasks.topics import gmm_topics

    workdir = str(tmp_path / "gmm")
    config = gmm_config(data_cache, encoder_run, **{"topics.k_range": "2-4", "topics.normalize": "whiten"})
    summary = gmm_topics.fit(config, workdir)
    assert summary["num_topics"] in (2, 3, 4) and 0.0 <= summary["nmi"] <= 1.0
    assert summary["eval_docs"] == 200 and summary["train_docs"] == 300
    bics = json.load(open(os.path.join(workdir, "bic.json")))
    assert sorted(bics) == ["2", "3", "4"] and summary["bic"] == min(bics.values())
    for name in ("report.json", "report.md", "projection.png", "bic.png"):
        assert os.path.isfile(os.path.join(workdir, "topics", name)), name
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    bounds = [r["lower_bound"] for r in records if r["split"] == "em"]
    assert len(bounds) >= 2 and bounds[-1] >= bounds[0] - 1e-4  # EM does not lose likelihood
    docs = tmp_path / "news.csv"
    docs.write_text("title,body\nbank stock,market price up\ncup goal,team wins the match\n")
    config.predict.input = str(docs)
    output = gmm_topics.embed(config, workdir)
    X = np.load(output)
    assert X.shape[0] == 2 and np.isfinite(X).all()
    assert open(output[:-4] + ".ids.txt").read() == "0\n1\n"
    probs = np.load(output[:-4] + ".clusters.npy")
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_gmm_topics_bad_input_is_one_line(encoder_run, data_cache, tmp_path):
    from encoder_jax import train

    workdir = str(tmp_path / "gmm")
    with pytest.raises(errors.ConfigError, match=r"^gmm_topics embeds documents with a pretrained"):
        train.run(gmm_config(data_cache, None), workdir)
    with pytest.raises(errors.ConfigError, match=r"^topics.k_range='a-b': use 'LOW-HIGH'"):
        train.run(gmm_config(data_cache, encoder_run, **{"topics.k_range": "a-b"}), workdir)
    with pytest.raises(errors.ConfigError, match=r"^topics.covariance='tied'; valid"):
        train.run(gmm_config(data_cache, encoder_run, **{"topics.covariance": "tied"}), workdir)
    with pytest.raises(errors.ConfigError, match=r"^topics.num_topics=5000: more components \(5000\) than the 300"):
        train.run(gmm_config(data_cache, encoder_run, **{"topics.num_topics": 5000}), workdir)
    translation = tmp_path / "mt"
    translation.mkdir()
    (translation / "model.json").write_text(json.dumps({"task": "translate"}))
    with pytest.raises(errors.ConfigError, match=r"is a 'translate' run; gmm_topics embeds with one of"):
        train.run(gmm_config(data_cache, str(translation)), workdir)


def test_vade_fits_its_prior_after_pretraining_resumes_and_embeds(data_cache, tmp_path):
    from encoder_jax import checkpoint, train
    from encoder_jax.tasks.topics import vae_topics

    workdir = str(tmp_path / "vade")
    config = topics_news.get_config("vade_smoke")
    config.data.data_dir = data_cache
    config.topics.pretrain_steps = 2
    config.train.num_steps = 4
    config.topics.max_fit_docs = 200
    fresh = None
    summary = train.run(config, workdir)
    for step in (2, 4):
        params = checkpoint.load_params(workdir, step)
        if step == 2:
            fresh = params
    # The prior was refitted before step 3 (after the checkpoint of step 2).
    assert not np.allclose(params["prior_means"], fresh["prior_means"])
    assert 0.0 <= summary["nmi"] <= 1.0 and summary["kl"] >= 0 and np.isfinite(summary["elbo"])
    report = json.load(open(os.path.join(workdir, "topics", "report.json")))
    assert len(report["topics"]) == config.topics.latent_dim and report["clusters"]
    # Stopped at the step the prior is refitted and resumed: the hook replays, the run is the same.
    split = str(tmp_path / "vade_split")
    config.train.max_steps_per_run = 2
    train.run(config, split)
    train.run(config, split)
    resumed = checkpoint.load_params(split, 4)
    for name in ("prior_means", "prior_logvars", "topics"):
        np.testing.assert_allclose(resumed[name], params[name], rtol=1e-5, atol=1e-6, err_msg=name)
    config.predict.input = os.path.join(data_cache, "builtin", "toy_topics_v1", "validation.csv")
    output = vae_topics.embed(config, workdir)
    X, probs = np.load(output), np.load(output[:-4] + ".clusters.npy")
    assert X.shape == (200, config.topics.latent_dim) and probs.shape == (200, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
