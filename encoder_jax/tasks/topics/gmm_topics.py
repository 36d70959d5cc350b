"""Topics as a Gaussian mixture over sentence embeddings of a pretrained encoder.

    python launch.py --config experiments/topics_news.py:gmm --workdir runs/topics_gmm \
        --config.init_from=runs/agnews          # any MLM or classification run, or init_from_hf

The encoder (`init_from` / `init_from_hf`) embeds up to topics.max_fit_docs training
documents and every evaluation document (topics.pooling, topics.normalize fitted on
the training embeddings); `encoder_jax.gmm` fits the mixture on the training
embeddings (K = topics.num_topics, or the lowest BIC over topics.k_range) and assigns
the evaluation documents. Training is EM, not gradient steps, so this task provides
`fit` (the trainer hands it the run) instead of `build`. A rerun refits from scratch
(deterministic, seeded by config.seed). The workdir gets gmm.npz (mixture and
normaliser), metrics.jsonl (EM lower bound per iteration), final_eval.json and topics/.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from encoder_jax import configs, embeddings, errors, gmm, pretrained as pretrained_lib, reporting
from encoder_jax import workdir as workdir_lib
from encoder_jax.data import sources
from encoder_jax.tasks.topics import common

log = logging.getLogger("encoder_jax")
MIXTURE_FILE = "gmm.npz"
ENCODER_TASKS = ("mlm", "classify")  # runs whose encoder embeds documents


def encoder_source(config) -> pretrained_lib.PretrainedEncoder:
    """The encoder named by init_from (an MLM or classification run) or init_from_hf."""
    if not pretrained_lib.wants_pretrained(config):
        raise errors.ConfigError("gmm_topics embeds documents with a pretrained encoder: set "
                                 "init_from=<an mlm or classify workdir> or init_from_hf=<a BERT dir>")
    if config.get("init_from"):
        record = workdir_lib.read_json_if_exists(
            workdir_lib.path(config.init_from, workdir_lib.MODEL_FILE)) or {}
        if record.get("task", "mlm") not in ENCODER_TASKS:
            raise errors.ConfigError(f"init_from={config.init_from!r} is a {record.get('task')!r} run; "
                                     f"gmm_topics embeds with one of {list(ENCODER_TASKS)}")
    return pretrained_lib.resolve(config)


def k_candidates(topics: configs.TopicsConfig) -> list[int]:
    """topics.k_range ("2-12" or "4,8,16") as a list, else [topics.num_topics]."""
    if not topics.k_range:
        return [topics.num_topics]
    text = topics.k_range.replace(" ", "")
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-"))
            ks = list(range(low, high + 1))
        else:
            ks = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise errors.ConfigError(f"topics.k_range={topics.k_range!r}: use 'LOW-HIGH' or 'K1,K2,...'") from None
    if not ks or min(ks) < 1:
        raise errors.ConfigError(f"topics.k_range={topics.k_range!r} names no K >= 1")
    return ks


def fit_mixture(key: jax.Array, X_NxD: np.ndarray, topics: configs.TopicsConfig
                ) -> tuple[gmm.Mixture, dict[int, float]]:
    """The mixture with the lowest BIC over the candidate Ks; {K: BIC}."""
    fitted, bics = {}, {}
    for k in k_candidates(topics):
        fitted[k] = gmm.fit(key, X_NxD, k, topics.covariance, n_init=topics.n_init,
                            max_iter=topics.max_iter, tol=topics.tol, reg_covar=topics.reg_covar)
        bics[k] = gmm.bic(fitted[k], X_NxD)
        log.info("GMM K=%d (%s): log-likelihood %.4f, BIC %.1f, %d iterations", k, topics.covariance,
                 float(fitted[k].lower_bound), bics[k], int(fitted[k].iterations))
    return fitted[min(bics, key=bics.get)], bics


def save_mixture(workdir: str, model: gmm.Mixture, normalizer: embeddings.Normalizer) -> None:
    arrays = {f"norm_{k}": v for k, v in normalizer.to_arrays().items()}
    np.savez(workdir_lib.path(workdir, MIXTURE_FILE), weights=np.asarray(model.weights_K),
             means=np.asarray(model.means_KxD), precisions_cholesky=np.asarray(model.precisions_cholesky),
             covariance_type=np.asarray(model.covariance_type), **arrays)


def load_mixture(workdir: str) -> tuple[gmm.Mixture, embeddings.Normalizer] | None:
    file_path = workdir_lib.path(workdir, MIXTURE_FILE)
    if not os.path.isfile(file_path):
        return None
    with np.load(file_path) as a:
        model = gmm.Mixture(a["weights"], a["means"], a["precisions_cholesky"], str(a["covariance_type"]))
        normalizer = embeddings.Normalizer.from_arrays(
            {k[len("norm_"):]: a[k] for k in a.files if k.startswith("norm_")})
    return model, normalizer


def embed_corpus(config, topics, data_cfg, pretrained, corpus) -> dict[str, Any]:
    """Train (up to topics.max_fit_docs) and evaluation documents, encoded and embedded."""
    enc = common.encoding(data_cfg, corpus.num_texts)
    if enc.max_len > pretrained.config.max_len:
        raise errors.ConfigError(f"data.max_len={enc.max_len} exceeds the encoder's max_len "
                                 f"{pretrained.config.max_len} ({pretrained.source})")
    tokenizer = pretrained.tokenizer
    train_docs = common.encode_docs(corpus.train, tokenizer, enc, topics.max_fit_docs, config.seed)
    eval_docs = common.encode_docs(corpus.eval, tokenizer, enc)
    params = pretrained.load_params()["encoder"]
    embed = embeddings.embedding_function(pretrained.config, topics.pooling)
    vectors = {name: embeddings.check_finite(embeddings.embed_examples(
        embed, params, docs, pad_lengths=enc.pad_lengths, batch_size=data_cfg.batch_size,
        desc=f"embed {name}"), f"{name} embeddings") for name, docs in
        (("train", train_docs), ("eval", eval_docs))}
    return dict(tokenizer=tokenizer, train_docs=train_docs, eval_docs=eval_docs, **vectors)


def fit(config, workdir: str) -> dict[str, float]:
    """Embeds, fits the mixture, assigns and scores the evaluation split; writes the run files."""
    topics = configs.section(configs.TopicsConfig, config.topics, "topics")
    data_cfg = configs.section(configs.ClassifyDataConfig, config.data, "data")
    workdir_lib.check_writable(workdir)
    corpus = common.load_corpus(data_cfg, data_cfg.data_dir or sources.default_data_dir())
    pretrained = encoder_source(config)
    fit_docs = min(len(corpus.train), topics.max_fit_docs)
    if max(k_candidates(topics)) > fit_docs:
        field = "k_range" if topics.k_range else "num_topics"
        raise errors.ConfigError(f"topics.{field}={getattr(topics, field)!r}: more components "
                                 f"({max(k_candidates(topics))}) than the {fit_docs} training "
                                 f"documents the mixture is fitted on")
    docs = embed_corpus(config, topics, data_cfg, pretrained, corpus)
    normalizer = embeddings.fit_normalizer(docs["train"], topics.normalize)
    X_train, X_eval = normalizer.apply(docs["train"]), normalizer.apply(docs["eval"])
    model, bics = fit_mixture(jax.random.key(config.seed), X_train, topics)
    clusters_N = np.asarray(gmm.predict(model, X_eval))
    k = int(model.weights_K.shape[0])
    summary = {**common.score(corpus, clusters_N), "num_topics": float(k),
               "log_likelihood": gmm.score(model, X_eval), "bic": bics[k],
               "train_docs": float(len(X_train)), "eval_docs": float(len(X_eval))}
    stats = common.bow_stats(docs["train_docs"], docs["tokenizer"], topics.min_df, topics.max_df)
    report = common.cluster_report(corpus, clusters_N, docs["eval_docs"], docs["tokenizer"],
                                   stats, topics.top_words, docs["train_docs"])
    summary["cluster_npmi"] = report.pop("cluster_npmi")
    if jax.process_index() == 0:
        write_run(config, workdir, model, normalizer, summary, report, bics, X_eval, clusters_N, corpus)
    log.info("GMM topics: %s", {k: round(v, 4) for k, v in summary.items()})
    return summary


def write_run(config, workdir, model, normalizer, summary, report, bics, X_eval, clusters_N, corpus):
    workdir_lib.write_config(workdir, config)
    save_mixture(workdir, model, normalizer)
    writer = reporting.MetricWriter(workdir, tensorboard=False)
    if os.path.exists(writer.path):  # a refit replaces the last fit's records
        os.remove(writer.path)
    bounds = np.asarray(model.lower_bounds)
    for i, bound in enumerate(bounds[np.isfinite(bounds)]):
        writer.write(i + 1, "em", {"lower_bound": float(bound)})
    writer.write(int(model.iterations), "eval", summary)
    writer.close()
    workdir_lib.write_json(workdir_lib.path(workdir, "bic.json"), {str(k): v for k, v in bics.items()})
    if len(bics) > 1:
        common.plot_bic(workdir, list(bics), list(bics.values()), int(model.weights_K.shape[0]))
    common.plot_projection(workdir, X_eval, clusters_N, corpus, "GMM on encoder embeddings")
    common.write_report(workdir, "GMM topics", summary, report)
    workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.FINAL_EVAL_FILE), summary)


def embed(config, workdir: str) -> str:
    """--mode embed: predict.input's documents -> <output>.npy (+ .ids.txt; + .clusters.npy, the
    cluster probabilities, when the workdir holds a fitted mixture)."""
    topics = configs.section(configs.TopicsConfig, config.topics, "topics")
    data_cfg = configs.section(configs.ClassifyDataConfig, config.data, "data")
    pred_cfg = configs.section(configs.PredictConfig, config.predict, "predict")
    pretrained = encoder_source(config)
    enc = common.encoding(data_cfg, 1)
    examples, ids = common.embed_inputs(config, pretrained.tokenizer, enc)
    function = embeddings.embedding_function(pretrained.config, topics.pooling)
    X = embeddings.check_finite(embeddings.embed_examples(
        function, pretrained.load_params()["encoder"], examples, pad_lengths=enc.pad_lengths,
        batch_size=pred_cfg.batch_size), pred_cfg.input)
    fitted = load_mixture(workdir) if os.path.isdir(workdir) else None
    normalizer = fitted[1] if fitted else embeddings.fit_normalizer(X, topics.normalize)
    X = normalizer.apply(X)
    output = common.write_embeddings(X, ids, pred_cfg.output or workdir_lib.path(workdir, "embeddings.npy"))
    if fitted:
        np.save(output[:-4] + ".clusters.npy", np.asarray(gmm.predict_proba(fitted[0], X)))
    return output
