"""What the topic tasks share: the corpus (labels only for scoring), encoded documents,
bag-of-words statistics, cluster scores, topic words, reports and plots.

Reports go to <workdir>/topics/: report.json and report.md (scores, per-cluster size,
label composition and top words, NPMI coherence), projection.png (2-D PCA of the
evaluation documents coloured by cluster and by true label) and, for a K search,
bic.png.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np

from encoder_jax import clustering, configs, errors
from encoder_jax import topic_models as tm
from encoder_jax import workdir as workdir_lib
from encoder_jax.data import batching, classification as data_lib, labels as labels_lib
from encoder_jax.data import tokenizer as tokenizer_lib
from encoder_jax.data.text import special_ids

log = logging.getLogger("encoder_jax")
REPORT_DIR = "topics"
BOW_FILE = "bow.npz"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and evaluation documents; labels, when the data has them, only score clusters."""

    train: Any  # random-access source of {"text_0", ..., ["label"]}
    eval: Any
    num_texts: int
    label_names: list[str] | None
    eval_labels: np.ndarray | None  # (N_eval,) class ids


def load_corpus(data_cfg: configs.ClassifyDataConfig, cache_dir: str) -> Corpus:
    """The splits of `config.data`; with data.label_field set, the evaluation labels as ids."""
    num_texts = len(data_lib.split_fields(data_cfg.text_fields, "data.text_fields"))
    splits = data_lib.open_splits(data_cfg, cache_dir)
    train, evaluation = splits["train"], splits["validation"]
    for split in (train, evaluation):
        if len(split) == 0:
            raise errors.DataError(f"{split.name} holds no documents")
    if not data_cfg.label_field:
        return Corpus(train, evaluation, num_texts, None, None)
    raw_train = labels_lib.read_raw_labels(train, num_texts, data_cfg.allow_empty_text)
    space = labels_lib.infer_label_space(data_cfg, raw_train, labels_lib.catalog_label_names(train))
    raw_eval = labels_lib.read_raw_labels(evaluation, num_texts, data_cfg.allow_empty_text)
    return Corpus(train, evaluation, num_texts, list(space.names),
                  labels_lib.encode_labels(space, raw_eval, evaluation.name))


def encoding(data_cfg: configs.ClassifyDataConfig, num_texts: int) -> data_lib.EncodingConfig:
    """Texts joined into one row of at most data.max_len tokens."""
    return data_lib.EncodingConfig(
        max_len=data_cfg.max_len,
        pad_lengths=batching.make_pad_lengths(data_cfg.pad_lengths, data_cfg.max_len),
        num_texts=num_texts, join_separator=data_cfg.join_separator)


def train_tokenizer(config, workdir: str | None, train_source, cache_dir: str):
    """The workdir's tokenizer (resume), tokenizer.model_file / vocab_file, else one trained on
    the training texts (cached per corpus)."""
    tok_cfg = configs.section(configs.TokenizerConfig, config.tokenizer, "tokenizer")

    def texts():
        for i in range(len(train_source)):
            yield from (str(v) for k, v in train_source[i].items() if k != "label")

    return tokenizer_lib.get_tokenizer(tok_cfg, workdir=workdir, cache_dir=cache_dir,
                                       corpus_id=f"{train_source!r}", texts=texts)


def encode_docs(source, tokenizer, enc: data_lib.EncodingConfig, limit: int | None = None,
                seed: int = 0) -> list[dict[str, Any]]:
    """Encoded documents (all, or a fixed random `limit` of them), indexed 0..n-1 in order."""
    indices = np.arange(len(source))
    if limit is not None and len(source) > limit:
        indices = np.sort(np.random.default_rng(seed).choice(len(source), limit, replace=False))
        source = data_lib.SubsetSource(source, indices, getattr(source, "name", "data"))
    examples = data_lib.encode_split(source, tokenizer, None, enc)
    return [{**e, "index": i} for i, e in enumerate(examples)]


# ----------------------------------------------------------------------------- bag of words


@dataclasses.dataclass(frozen=True)
class BowStats:
    """The bag-of-words terms: which count, their idf, the background log-frequency.

    Terms are the V vocabulary entries, then `bigram_buckets` hashed pairs of adjacent
    regular tokens (`topic_models.bigram_bucket`); W = V + bigram_buckets.
    """

    keep_W: np.ndarray  # float32 0/1
    idf_W: np.ndarray  # float32, smooth idf as scikit-learn's: log((1 + N) / (1 + df)) + 1
    background_W: np.ndarray  # float32 log p(term) over the kept terms (others: log of a tiny p)
    regular_V: np.ndarray  # float32 0 for special tokens
    pairs_Bx2: np.ndarray  # int32: a token pair seen in each bucket (for reports), -1 if none

    @property
    def vocab_size(self) -> int:
        return len(self.regular_V)

    @property
    def bigram_buckets(self) -> int:
        return len(self.pairs_Bx2)

    def save(self, workdir: str) -> None:
        np.savez(workdir_lib.path(workdir, BOW_FILE), keep=self.keep_W, idf=self.idf_W,
                 background=self.background_W, regular=self.regular_V, pairs=self.pairs_Bx2)

    @classmethod
    def load(cls, workdir: str) -> "BowStats | None":
        file_path = workdir_lib.path(workdir, BOW_FILE)
        if not os.path.isfile(file_path):
            return None
        with np.load(file_path) as a:
            return cls(a["keep"], a["idf"], a["background"], a["regular"], a["pairs"])

    def terms(self, ids: np.ndarray) -> np.ndarray:
        """A document's term ids: its tokens, then V + the buckets of its regular adjacent pairs."""
        ids = np.asarray(ids)
        if not self.bigram_buckets:
            return ids
        both = (self.regular_V[ids[:-1]] > 0) & (self.regular_V[ids[1:]] > 0)
        pairs = tm.bigram_bucket(ids[:-1][both], ids[1:][both], self.bigram_buckets)
        return np.concatenate([ids, self.vocab_size + pairs])


def bow_stats(examples: Sequence[dict[str, Any]], tokenizer, min_df: int, max_df: float,
              bigram_buckets: int = 0) -> BowStats:
    """Document frequencies over `examples`; terms outside [min_df, max_df x N] and special
    tokens are left out (max_df removes stop words)."""
    vocab = tokenizer.vocab_size
    regular_V = np.ones(vocab, np.float32)
    regular_V[special_ids(tokenizer)] = 0.0
    pairs_Bx2 = np.full((bigram_buckets, 2), -1, np.int32)
    shape = BowStats(np.zeros(0), np.zeros(0), np.zeros(0), regular_V, pairs_Bx2)
    width = vocab + bigram_buckets
    df_W, total_W = np.zeros(width, np.int64), np.zeros(width, np.int64)
    for example in examples:
        ids = np.asarray(example["ids"])
        terms = shape.terms(ids)
        df_W[np.unique(terms)] += 1
        np.add.at(total_W, terms, 1)
        if bigram_buckets:
            fresh = terms[len(ids):] - vocab
            unseen = pairs_Bx2[fresh, 0] < 0
            both = (regular_V[ids[:-1]] > 0) & (regular_V[ids[1:]] > 0)
            pairs_Bx2[fresh[unseen]] = np.stack([ids[:-1][both], ids[1:][both]], 1)[unseen]
    n = len(examples)
    keep_W = (df_W >= min_df) & (df_W <= max_df * n)
    keep_W[:vocab] &= regular_V > 0
    if not keep_W.any():
        raise errors.DataError(f"no vocabulary entry is in at least topics.min_df={min_df} and at most "
                               f"topics.max_df={max_df} of the {n} training documents")
    idf_W = np.log((1.0 + n) / (1.0 + df_W)) + 1.0
    kept_total = np.where(keep_W, total_W, 0).astype(np.float64)
    background_W = np.log(np.maximum(kept_total, 1e-2) / kept_total.sum())
    return BowStats(keep_W.astype(np.float32), idf_W.astype(np.float32),
                    background_W.astype(np.float32), regular_V, pairs_Bx2)


def frequent_enough(examples: Sequence[dict[str, Any]], stats: BowStats,
                    min_fraction: float = 0.002) -> np.ndarray:
    """keep_W limited to terms in at least `min_fraction` of `examples` (and 5 of them): topic
    words ranked by decoder weight alone would be rare names that never co-occur."""
    df_W = np.zeros(len(stats.keep_W), np.int64)
    for example in examples:
        df_W[np.unique(stats.terms(example["ids"]))] += 1
    return stats.keep_W * (df_W >= max(5, min_fraction * len(examples)))


def term_name(tokenizer, stats: BowStats, term: int) -> str:
    """A token's text, or the text of a token pair seen in a bigram bucket."""
    term = int(term)
    tokens = [term]
    if term >= stats.vocab_size:
        tokens = [int(t) for t in stats.pairs_Bx2[term - stats.vocab_size]]
    text = tokenizer.decode(tokens).strip() if min(tokens) >= 0 else ""
    return text or f"#{term}"


def cluster_words(examples: Sequence[dict[str, Any]], clusters_N: np.ndarray, stats: BowStats,
                  top: int) -> dict[int, list[int]]:
    """Per cluster, the `top` kept terms most characteristic of it: p(w|c) log(p(w|c) / p(w))."""
    keep_W = stats.keep_W
    counts = {int(c): np.zeros(len(keep_W)) for c in np.unique(clusters_N)}
    for example, cluster in zip(examples, clusters_N):
        np.add.at(counts[int(cluster)], stats.terms(example["ids"]), 1.0)
    overall_W = sum(counts.values()) * keep_W + 1e-9
    overall_W /= overall_W.sum()
    words = {}
    for cluster, count_W in counts.items():
        p_W = count_W * keep_W / max((count_W * keep_W).sum(), 1e-9)
        score_W = np.where(p_W > 0, p_W * np.log(np.maximum(p_W, 1e-12) / overall_W), -np.inf)
        words[cluster] = [int(t) for t in np.argsort(-score_W, kind="stable")[:top]
                          if np.isfinite(score_W[t])]
    return words


def coherence(topics_ids: Sequence[Sequence[int]], examples: Sequence[dict[str, Any]],
              stats: BowStats) -> list[float]:
    """NPMI of each topic's terms over the documents of `examples`."""
    documents = ([str(t) for t in stats.terms(e["ids"])] for e in examples)
    return clustering.npmi_coherence([[str(t) for t in topic] for topic in topics_ids], documents)


# ----------------------------------------------------------------------------- reports


def score(corpus: Corpus, clusters_N: np.ndarray) -> dict[str, float]:
    """NMI / ARI / cluster accuracy against the evaluation labels (empty without labels)."""
    if corpus.eval_labels is None:
        return {"clusters": float(len(np.unique(clusters_N)))}
    return clustering.scores(corpus.eval_labels, clusters_N)


def cluster_report(corpus: Corpus, clusters_N: np.ndarray, examples: Sequence[dict[str, Any]],
                   tokenizer, stats: BowStats, top: int,
                   reference: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per cluster: size, label composition (if labelled) and top words; mean NPMI of those words
    over the `reference` documents (training documents: more co-occurrences than a dev split)."""
    words = cluster_words(examples, clusters_N, stats, top)
    npmi = coherence(list(words.values()), reference, stats)
    sizes = dict(zip(*np.unique(clusters_N, return_counts=True)))
    composition = {}
    if corpus.eval_labels is not None:
        composition = {row["cluster"]: row for row in clustering.composition(
            corpus.eval_labels, clusters_N, corpus.label_names)}
    rows = [{"cluster": c, "size": int(sizes[c]), "npmi": round(n, 4),
             "labels": composition.get(c, {}).get("labels"),
             "words": [term_name(tokenizer, stats, t) for t in ws]}
            for (c, ws), n in zip(words.items(), npmi)]
    rows.sort(key=lambda r: -r["size"])
    return {"clusters": rows, "cluster_npmi": float(np.mean(npmi)) if npmi else 0.0}


def write_report(workdir: str | None, title: str, summary: dict[str, Any],
                 report: dict[str, Any]) -> str | None:
    """<workdir>/topics/report.json and report.md."""
    if not workdir:
        return None
    out_dir = workdir_lib.path(workdir, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    workdir_lib.write_json(os.path.join(out_dir, "report.json"), {**summary, **report})
    lines = [f"# {title}", "", " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in summary.items()), ""]
    for name in ("clusters", "topics"):
        if report.get(name):
            lines += [f"## {name}", "", "| # | size | npmi | labels | top words |", "|---|---|---|---|---|"]
            for row in report[name]:
                labels = ", ".join(f"{k} {v:.2f}" for k, v in row.get("labels") or ())
                lines.append(f"| {row.get('cluster', row.get('topic'))} | {row.get('size', '')} | "
                             f"{row['npmi']} | {labels} | {' '.join(row['words'])} |")
            lines.append("")
    return workdir_lib.write_text(os.path.join(out_dir, "report.md"), "\n".join(lines))


def plot_projection(workdir: str | None, X_NxD: np.ndarray, clusters_N: np.ndarray,
                    corpus: Corpus, title: str) -> str | None:
    """projection.png: the first two principal components, by cluster and by true label."""
    if not workdir or len(X_NxD) < 3:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centred = X_NxD - X_NxD.mean(0)
    _, _, vt = np.linalg.svd(centred[:5000], full_matrices=False)
    xy = centred @ vt[:2].T
    panels = [("clusters", clusters_N)]
    if corpus.eval_labels is not None:
        panels.append(("true labels", corpus.eval_labels))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (name, colours) in zip(axes[0], panels):
        ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=4, cmap="tab20", alpha=0.7)
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    return save_figure(fig, workdir, "projection.png")


def plot_bic(workdir: str | None, ks: Sequence[int], bics: Sequence[float], chosen: int) -> str | None:
    """bic.png: BIC against K, the chosen K marked."""
    if not workdir:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(ks), list(bics), marker="o")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen K = {chosen}")
    ax.set_xlabel("K (components)")
    ax.set_ylabel("BIC (lower is better)")
    ax.legend()
    return save_figure(fig, workdir, "bic.png")


def save_figure(fig, workdir: str, name: str) -> str:
    """<workdir>/topics/<name>; closes the figure."""
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, REPORT_DIR, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_embeddings(X_NxD: np.ndarray, ids: Sequence[str], output: str) -> str:
    """<output>.npy (N, D) float32 and <output stem>.ids.txt (one row id per line)."""
    stem = output[:-4] if output.endswith(".npy") else output
    os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
    np.save(stem + ".npy", np.asarray(X_NxD, np.float32))
    workdir_lib.write_text(stem + ".ids.txt", "".join(f"{i}\n" for i in ids))
    log.info("wrote %d embeddings of dimension %d to %s.npy", len(X_NxD), X_NxD.shape[1], stem)
    return stem + ".npy"


def embed_inputs(config, tokenizer, enc) -> tuple[list[dict[str, Any]], list[str]]:
    """The documents of predict.input, encoded, and their row ids (0-based data rows)."""
    pred_cfg = configs.section(configs.PredictConfig, config.predict, "predict")
    data_cfg = configs.section(configs.ClassifyDataConfig, config.data, "data")
    if not pred_cfg.input:
        raise errors.ConfigError("--mode embed needs --config.predict.input=FILE (csv, tsv or jsonl)")
    fields = data_lib.split_fields(pred_cfg.text_fields or data_cfg.text_fields, "predict.text_fields")
    has_header = data_cfg.has_header if pred_cfg.has_header is None else pred_cfg.has_header
    rows = data_lib.read_prediction_rows(pred_cfg.input, fields, has_header)
    if not rows:
        raise errors.DataError(f"{pred_cfg.input}: no rows to embed")
    examples = [{"ids": ids, "type_ids": types, "label": -1, "index": i}
                for i, (ids, types) in enumerate(data_lib.encode_texts(tokenizer, texts, enc)
                                                 for texts in rows)]
    return examples, [str(i) for i in range(len(rows))]
