"""The topic-discovery acceptance table: the scikit-learn baseline beside this project's runs.

(a) TF-IDF + truncated SVD (LSA, rows L2-normalised) + KMeans, fitted on the training split and
    assigning the evaluation split: what a practitioner tries first. For Chinese it is run with
    character 1-2-grams and with jieba words; the better of the two is the baseline.
(b)-(e) read from finished runs' final_eval.json (gmm_topics / vae_topics workdirs).

  python benchmarks/topics_table.py --data ag_news --runs b=runs/gmm_mlm c=runs/gmm_cls \
      d=runs/topics_vae e=runs/topics_vade

Data: $ENCODER_JAX_SHARED_DATA (default ../shared/data beside the repository). Labels score
the clusters only. Prints a markdown table and writes it as JSON with --out.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from encoder_jax import clustering  # noqa: E402

DATASETS = {  # train file, eval file, reader, K, language
    "ag_news": ("ag_news/train.csv.gz", "ag_news/dev.csv.gz", "ag_news", 4, "en"),
    "thucnews": ("thucnews/train.txt.gz", "thucnews/dev.txt.gz", "thucnews", 10, "zh"),
}


def shared_data(*parts: str) -> str:
    root = os.environ.get("ENCODER_JAX_SHARED_DATA",
                          os.path.join(REPO_ROOT, os.pardir, "shared", "data"))
    return os.path.normpath(os.path.join(root, *parts))


def read(path: str, kind: str) -> tuple[list[str], np.ndarray]:
    """(texts, labels) of an AG News csv (class,title,description) or THUCNews tsv (title, label)."""
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = csv.reader(f) if kind == "ag_news" else (line.rstrip("\n").split("\t") for line in f)
        for row in rows:
            if kind == "ag_news":
                labels.append(int(row[0]) - 1)
                texts.append(f"{row[1]} {row[2]}")
            else:
                texts.append(row[0])
                labels.append(int(row[1]))
    return texts, np.asarray(labels)


def lsa_kmeans(train: list[str], evaluation: list[str], k: int, seed: int, **tfidf) -> np.ndarray:
    """Clusters of the evaluation texts from TF-IDF -> SVD(100) -> L2 -> KMeans fitted on train."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    vectorizer = TfidfVectorizer(min_df=2, max_df=0.5, sublinear_tf=True, **tfidf)
    lsa = make_pipeline(TruncatedSVD(100, random_state=seed), Normalizer(copy=False))
    X_train = lsa.fit_transform(vectorizer.fit_transform(train))
    X_eval = lsa.transform(vectorizer.transform(evaluation))
    kmeans = KMeans(k, n_init=10, random_state=seed).fit(X_train)
    return kmeans.predict(X_eval)


def baseline(data: str, seeds: int) -> dict[str, dict[str, float]]:
    train_file, eval_file, kind, k, language = DATASETS[data]
    train, _ = read(shared_data(train_file), kind)
    evaluation, labels = read(shared_data(eval_file), kind)
    variants = {"words": dict(stop_words="english")} if language == "en" else {
        "chars 1-2": dict(analyzer="char", ngram_range=(1, 2)),
        "jieba words": dict(tokenizer=jieba_words, token_pattern=None)}
    results = {}
    for name, options in variants.items():
        start = time.perf_counter()
        runs = [clustering.scores(labels, lsa_kmeans(train, evaluation, k, seed, **options))
                for seed in range(seeds)]
        results[f"(a) TF-IDF ({name}) + SVD + KMeans"] = {
            **{m: float(np.mean([r[m] for r in runs])) for m in ("nmi", "ari", "accuracy")},
            "nmi_std": float(np.std([r["nmi"] for r in runs])), "seconds": time.perf_counter() - start}
    return results


def jieba_words(text: str) -> list[str]:
    import jieba

    return [w for w in jieba.lcut(text) if w.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=sorted(DATASETS), default="ag_news")
    parser.add_argument("--runs", nargs="*", default=[], help="NAME=WORKDIR of finished topic runs")
    parser.add_argument("--seeds", type=int, default=3, help="baseline seeds (mean reported)")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    table = baseline(args.data, args.seeds)
    for spec in args.runs:
        name, _, workdir = spec.partition("=")
        with open(os.path.join(workdir, "final_eval.json"), encoding="utf-8") as f:
            result = json.load(f)
        table[f"({name}) {workdir}"] = {m: result.get(m, float("nan")) for m in ("nmi", "ari", "accuracy")}
    print(f"| {args.data} (dev) | NMI | ARI | cluster accuracy |\n|---|---|---|---|")
    for name, r in table.items():
        spread = f" ± {r['nmi_std']:.3f}" if "nmi_std" in r else ""
        print(f"| {name} | {r['nmi']:.3f}{spread} | {r['ari']:.3f} | {r['accuracy']:.3f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
