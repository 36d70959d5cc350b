"""Topics from a document VAE (ProdLDA style) or VaDE, trained by the one trainer.

    python launch.py --config experiments/topics_news.py:vae  --workdir runs/topics_vae
    python launch.py --config experiments/topics_news.py:vade --workdir runs/topics_vade

Documents are bags of words over the tokenizer's vocabulary (stop words left out by
topics.max_df); the model is `topic_models.DocumentVAE`. The loss is the negative ELBO
per document, its KL term weighted by `kl_weight(step)` (annealing: the step reaches the
loss). With topics.prior="mixture" (VaDE) the first topics.pretrain_steps train the
plain VAE; before the next step, `before_step` fits `gmm` (diagonal, K = num_topics) to
the latent means of up to topics.max_fit_docs training documents and sets the prior from
it. Evaluation reports the held-out reconstruction, KL, ELBO and perplexity bound, and
clusters of the evaluation documents: the VAE's from a GMM fitted on the training
documents' latent means (normalised by topics.normalize), VaDE's from q(c|x). Reports go to <workdir>/topics/.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from encoder_jax import checkpoint, configs, embeddings, errors, gmm
from encoder_jax import topic_models as tm
from encoder_jax import workdir as workdir_lib
from encoder_jax.data import batching, classification as data_lib, sources
from encoder_jax.tasks.base import Task
from encoder_jax.tasks.topics import common

log = logging.getLogger("encoder_jax")
MODEL_FILE = "topic_model.json"


def make_model(fields: dict[str, Any], background_W: np.ndarray | None) -> tm.DocumentVAE:
    return tm.DocumentVAE(vocab_size=fields["vocab_size"] + fields.get("bigram_buckets", 0),
                          latent_dim=fields["latent_dim"],
                          hidden_dim=fields["hidden_dim"], num_components=fields["num_components"],
                          dropout_rate=fields["dropout_rate"], background_V=background_W)


def model_fields(topics: configs.TopicsConfig, vocab_size: int) -> dict[str, Any]:
    return {"task": "vae_topics", "vocab_size": vocab_size, "bigram_buckets": topics.bigram_buckets,
            "latent_dim": topics.latent_dim,
            "hidden_dim": topics.hidden_dim, "dropout_rate": topics.dropout_rate,
            "num_components": topics.num_topics if topics.prior == "mixture" else 0}


def functions(model: tm.DocumentVAE, stats: common.BowStats, topics: configs.TopicsConfig):
    """(loss_fn, eval_fn, latent_moments): the task's loss and eval outputs, and a jitted
    (params, ids, segment_ids, type_ids) -> (B, 2Z) of q(z|x)'s means then variances."""
    keep_W, idf_W = jnp.asarray(stats.keep_W), jnp.asarray(stats.idf_W)
    regular_V = jnp.asarray(stats.regular_V)

    def bag(ids_BxL, segment_ids_BxL):
        return tm.bag_of_words(ids_BxL, segment_ids_BxL, stats.vocab_size, keep_W,
                               stats.bigram_buckets, regular_V)

    def forward(params, batch, rng, train):
        counts_BxV = bag(batch["ids"], batch["segment_ids"])
        dropout_rng, sample_rng = jax.random.split(rng)
        mean, logvar, log_probs, z = model.apply(
            {"params": params}, tm.document_features(counts_BxV, idf_W), deterministic=not train,
            rngs={"dropout": dropout_rng, "sample": sample_rng})
        out = {"recon": tm.reconstruction(counts_BxV, log_probs), "mean": mean,
               "kl_normal": tm.kl_standard_normal(mean, logvar), "tokens": counts_BxV.sum(-1)}
        if model.num_components:
            log_w, means, logvars = model.apply({"params": params}, method=tm.DocumentVAE.prior)
            out["log_gamma"] = tm.cluster_posterior(z, log_w, means, logvars)
            out["kl_mixture"] = tm.kl_mixture(mean, logvar, out["log_gamma"], log_w, means, logvars)
        return out

    def loss_fn(params, model_state, batch, rng, step, train):
        out = forward(params, batch, rng, train)
        kl_B = out["kl_normal"]
        if model.num_components:
            kl_B = jnp.where(step >= topics.pretrain_steps, out["kl_mixture"], kl_B)
        beta = tm.kl_weight(step, topics.kl_warmup_steps)
        w_B = batch["weight"]
        denominator = jnp.maximum(w_B.sum(), 1.0)
        loss = (w_B * (out["recon"] + beta * kl_B)).sum() / denominator
        sums = {"loss": loss * w_B.sum(), "recon": (w_B * out["recon"]).sum(), "kl": (w_B * kl_B).sum(),
                "tokens": (w_B * out["tokens"]).sum(), "kl_weight": beta * w_B.sum(),
                "denominator": w_B.sum()}
        return loss, sums, model_state

    def eval_fn(params, model_state, batch, rng):
        out = forward(params, batch, rng, False)
        kl_B = out.pop("kl_mixture") if model.num_components else out["kl_normal"]
        out.pop("kl_normal")
        result = {**out, "kl": kl_B, "index": batch["index"], "weight": batch["weight"]}
        if model.num_components:
            result["cluster"] = jnp.argmax(result.pop("log_gamma"), -1)
        return result

    def latent_moments(params, ids_BxL, segment_ids_BxL, type_ids_BxL):
        """(B, 2Z): q(z|x)'s mean, then its variance."""
        counts_BxV = bag(ids_BxL, segment_ids_BxL)
        mean_BxZ, logvar_BxZ = model.apply({"params": params}, tm.document_features(counts_BxV, idf_W),
                                           method=tm.DocumentVAE.encode)
        return jnp.concatenate([mean_BxZ, jnp.exp(logvar_BxZ)], axis=-1)

    return loss_fn, eval_fn, jax.jit(latent_moments)


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Per-document reconstruction and KL, the ELBO, and the perplexity bound exp(-ELBO / tokens)."""
    docs = max(float(sums["denominator"]), 1.0)
    recon, kl = float(sums["recon"]), float(sums["kl"])
    out = {"recon": recon / docs, "kl": kl / docs, "elbo": -(recon + kl) / docs,
           "perplexity": float(np.exp(min((recon + kl) / max(float(sums["tokens"]), 1.0), 50.0)))}
    if "kl_weight" in sums:  # training: the annealed objective and its KL weight
        out["loss"] = float(sums["loss"]) / docs
        out["kl_weight"] = float(sums["kl_weight"]) / docs
    return out


def prior_from_latents(key, params, latent_moments, fit_docs, enc, topics, batch_size):
    """params with VaDE's prior set from a diagonal GMM fitted to the latent means.

    Each component's variance also gets the mean posterior variance: the aggregate
    posterior spreads around the means by that much, and a prior narrower than the
    posteriors would make the KL term dwarf the reconstruction.
    """
    moments_Nx2Z = embeddings.embed_examples(latent_moments, params, fit_docs,
                                             pad_lengths=enc.pad_lengths, batch_size=batch_size,
                                             desc="latent means")
    means_NxZ, variances_NxZ = np.split(moments_Nx2Z, 2, axis=1)
    mixture = gmm.fit(key, means_NxZ, topics.num_topics, "diag", n_init=topics.n_init,
                      max_iter=topics.max_iter, tol=topics.tol, reg_covar=topics.reg_covar)
    log.info("VaDE prior from a GMM on %d latent means: log-likelihood %.4f", len(means_NxZ),
             float(mixture.lower_bound))
    variances_KxZ = np.asarray(mixture.covariances) + variances_NxZ.mean(0)[None]
    return {**params, "prior_logits": np.log(np.asarray(mixture.weights_K)),
            "prior_means": np.asarray(mixture.means_KxD), "prior_logvars": np.log(variances_KxZ)}


def build(config, workdir: str | None, shard_index: int = 0, shard_count: int = 1) -> Task:
    """The VAE / VaDE topic task: corpus, tokenizer, bag-of-words statistics, model and hooks."""
    topics = configs.section(configs.TopicsConfig, config.topics, "topics")
    data_cfg = configs.section(configs.ClassifyDataConfig, config.data, "data")
    eval_cfg = configs.section(configs.EvalConfig, config.eval, "eval")
    cache_dir = data_cfg.data_dir or sources.default_data_dir()
    corpus = common.load_corpus(data_cfg, cache_dir)
    tokenizer = common.train_tokenizer(config, workdir, corpus.train, cache_dir)
    enc = common.encoding(data_cfg, corpus.num_texts)
    train_docs = common.encode_docs(corpus.train, tokenizer, enc)
    stats = (common.BowStats.load(workdir) if workdir else None) or common.bow_stats(
        train_docs, tokenizer, topics.min_df, topics.max_df, topics.bigram_buckets)
    fields = model_fields(topics, tokenizer.vocab_size)
    if workdir and shard_index == 0:
        os.makedirs(workdir, exist_ok=True)
        stats.save(workdir)
        workdir_lib.write_json(workdir_lib.path(workdir, MODEL_FILE), fields)
    model = make_model(fields, stats.background_W)
    loss_fn, eval_fn, latent_moments = functions(model, stats, topics)
    rng = np.random.default_rng(config.seed)
    fit_docs = [train_docs[i] for i in np.sort(rng.permutation(len(train_docs))[:topics.max_fit_docs])]
    rows = data_cfg.batch_size // shard_count
    hooks = evaluation(workdir, corpus, tokenizer, enc, stats, topics, fit_docs, eval_cfg,
                       data_cfg, shard_index, shard_count, config.seed)

    def before_step(step, state):
        if not model.num_components or step != topics.pretrain_steps:
            return None
        params = prior_from_latents(jax.random.key(config.seed), jax.device_get(state["params"]),
                                    latent_moments, fit_docs, enc, topics, data_cfg.batch_size)
        return {**state, "params": params}

    return Task(
        name="vae_topics",
        init_params=lambda key: model.init({"params": key, "sample": key, "dropout": key},
                                           jnp.zeros((1, len(stats.keep_W))))["params"],
        loss_fn=loss_fn,
        train_data=data_lib.train_dataset(
            corpus.train, tokenizer, None, enc, global_batch=data_cfg.batch_size, seed=config.seed,
            group=data_cfg.length_group, shard_index=shard_index, shard_count=shard_count,
            workers=data_cfg.workers, prefetch=data_cfg.prefetch),
        example_batch=data_lib.example_batch(rows, enc.max_len), summarize=summarize,
        tokens_in_batch=lambda b: int((b["segment_ids"] > 0).sum()), eval_fn=eval_fn,
        before_step=before_step,
        batch_rows={"data.batch_size": rows,
                    "eval.batch_size": (eval_cfg.batch_size or data_cfg.batch_size) // shard_count},
        **hooks)


def evaluation(workdir, corpus, tokenizer, enc, stats, topics, fit_docs, eval_cfg, data_cfg,
               shard_index, shard_count, seed) -> dict[str, Any]:
    """eval_batches (evaluation documents, then the VAE's GMM-fit documents), summarize_eval, on_eval."""
    eval_docs = common.encode_docs(corpus.eval, tokenizer, enc)
    mixture_prior = topics.prior == "mixture"
    extra = [] if mixture_prior else [{**d, "index": len(eval_docs) + i} for i, d in enumerate(fit_docs)]
    eval_rows = eval_cfg.batch_size or data_cfg.batch_size
    cache: dict[str, Any] = {}

    def eval_batches():
        return batching.eval_batches(eval_docs + extra, global_batch=eval_rows,
                                     pad_lengths=enc.pad_lengths, shard_index=shard_index,
                                     shard_count=shard_count)

    def summarize_eval(outputs):
        out = collect(outputs, len(eval_docs) + len(extra))
        held = slice(0, len(eval_docs))
        summary = summarize({"recon": out["recon"][held].sum(), "kl": out["kl"][held].sum(),
                             "tokens": out["tokens"][held].sum(), "denominator": len(eval_docs)})
        if mixture_prior:
            clusters_N = out["cluster"][held]
        else:
            normalizer = embeddings.fit_normalizer(out["mean"][len(eval_docs):], topics.normalize)
            mixture = gmm.fit(jax.random.key(seed), normalizer.apply(out["mean"][len(eval_docs):]),
                              topics.num_topics, "diag", n_init=topics.n_init,
                              max_iter=topics.max_iter, tol=topics.tol, reg_covar=topics.reg_covar)
            clusters_N = np.asarray(gmm.predict(mixture, normalizer.apply(out["mean"][held])))
        summary.update(common.score(corpus, clusters_N))
        cache["last"] = (clusters_N, out["mean"][held])
        return summary

    def on_eval(step, summary, state=None):
        if workdir and "last" in cache:
            clusters_N, means_NxZ = cache["last"]
            topics_ZxV = None if state is None else state["params"]["topics"]
            if topics_ZxV is not None and not topics_ZxV.is_fully_addressable:
                topics_ZxV = None  # sharded across hosts: the report lists clusters only
            write_reports(workdir, step, summary, corpus, clusters_N, means_NxZ, eval_docs,
                          tokenizer, stats, topics, topics_ZxV, fit_docs)

    return dict(eval_batches=eval_batches, summarize_eval=summarize_eval, on_eval=on_eval)


def collect(outputs, count: int) -> dict[str, np.ndarray]:
    """Per-document outputs of every eval batch, real rows only, ordered by document index."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in outputs:
        real = np.asarray(batch["weight"]) > 0
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value)[real])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(out["index"], kind="stable")
    if len(order) != count:
        raise errors.DataError(f"evaluation returned {len(order)} documents, expected {count}")
    return {k: v[order] for k, v in out.items()}


def write_reports(workdir, step, summary, corpus, clusters_N, means_NxZ, eval_docs, tokenizer,
                  stats, topics, topics_ZxV, reference) -> None:
    """Latent topics' top words (decoder rows) and the clusters' words, labels and coherence
    (NPMI over the `reference` training documents)."""
    report = common.cluster_report(corpus, clusters_N, eval_docs, tokenizer, stats,
                                   topics.top_words, reference)
    summary = {**summary, "cluster_npmi": report["cluster_npmi"]}
    if topics_ZxV is not None:
        report["topics"] = latent_topics(np.asarray(jax.device_get(topics_ZxV)), stats, reference,
                                         tokenizer, topics.top_words)
        summary["topic_npmi"] = float(np.mean([t["npmi"] for t in report["topics"]]))
    common.write_report(workdir, f"Document topics at step {step}", summary, report)
    common.plot_projection(workdir, means_NxZ, clusters_N, corpus, "latent means")


def latent_topics(topics_ZxV, stats, reference, tokenizer, top: int) -> list[dict[str, Any]]:
    """Each latent dimension's `top` words by decoder weight (among words frequent enough in the
    `reference` documents), with their NPMI over those documents."""
    candidates_W = common.frequent_enough(reference, stats)
    scores_ZxW = np.where(candidates_W[None] > 0, np.asarray(topics_ZxV), -np.inf)
    ids = [[int(t) for t in np.argsort(-row, kind="stable")[:top]] for row in scores_ZxW]
    npmi = common.coherence(ids, reference, stats)
    return [{"topic": z, "npmi": round(n, 4),
             "words": [common.term_name(tokenizer, stats, t) for t in ws]}
            for z, (ws, n) in enumerate(zip(ids, npmi))]


def embed(config, workdir: str) -> str:
    """--mode embed: predict.input's documents -> latent means <output>.npy (+ .ids.txt; for
    VaDE + .clusters.npy, q(c|x) at the mean)."""
    pred_cfg = configs.section(configs.PredictConfig, config.predict, "predict")
    data_cfg = configs.section(configs.ClassifyDataConfig, config.data, "data")
    fields = workdir_lib.read_json_if_exists(workdir_lib.path(workdir, MODEL_FILE))
    stats = common.BowStats.load(workdir) if os.path.isdir(workdir) else None
    if fields is None or stats is None:
        raise errors.MissingFileError(f"--workdir {workdir!r} holds no trained vae_topics run "
                                      f"({MODEL_FILE}, {common.BOW_FILE}): train one there first")
    tokenizer = workdir_lib.load_tokenizer(workdir, configs.word_segmenter(config))
    params = checkpoint.load_params(workdir_lib.checkpoint_source(workdir))
    model = make_model(fields, None)
    topics = configs.section(configs.TopicsConfig, config.topics, "topics")
    latent_moments = functions(model, stats, topics)[2]
    latent_mean = lambda p, *batch: latent_moments(p, *batch)[:, :model.latent_dim]
    enc = common.encoding(data_cfg, 1)
    examples, ids = common.embed_inputs(config, tokenizer, enc)
    X = embeddings.check_finite(embeddings.embed_examples(
        latent_mean, params, examples, pad_lengths=enc.pad_lengths, batch_size=pred_cfg.batch_size),
        pred_cfg.input)
    output = common.write_embeddings(X, ids, pred_cfg.output or workdir_lib.path(workdir, "embeddings.npy"))
    if fields["num_components"]:
        log_w, means, logvars = model.apply({"params": params}, method=tm.DocumentVAE.prior)
        np.save(output[:-4] + ".clusters.npy",
                np.exp(np.asarray(tm.cluster_posterior(jnp.asarray(X), log_w, means, logvars))))
    return output
