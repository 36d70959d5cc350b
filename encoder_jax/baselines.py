"""The linear baseline a fine-tuned classifier must beat: TF-IDF n-grams + a linear model.

What a practitioner fits in seconds before reaching for a transformer (scikit-learn):
word 1-2-grams for space-separated text, character 1-3-grams for Chinese/Japanese
text (no word boundaries), sublinear TF, L2 rows, then a linear SVM or logistic
regression. Scores are turned into probabilities (softmax of the SVM margins), so
`metrics.classification_report` gives the same table as for the fine-tuned model.
"""

from __future__ import annotations

import re
import time
from typing import Any, Sequence

import numpy as np

from encoder_jax import configs, errors, metrics

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def cjk_fraction(texts: Sequence[str], sample: int = 2000) -> float:
    """Share of non-space characters that are CJK, over the first `sample` texts."""
    chars = "".join(texts[:sample]).replace(" ", "")
    return len(_CJK.findall(chars)) / max(1, len(chars))


def choose_features(features: str, texts: Sequence[str]) -> str:
    """'word' or 'char'; 'auto' picks char when more than a third of the characters are CJK."""
    if features == "auto":
        return "char" if cjk_fraction(texts) > 1 / 3 else "word"
    return features


def vectorizer(features: str, max_features: int | None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    if features == "word":
        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=max_features)
    return TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True,
                           max_features=max_features)


def linear_model(cfg: configs.BaselineConfig):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if cfg.model == "svm":
        return LinearSVC(C=cfg.C)
    return LogisticRegression(C=cfg.C, max_iter=1000)


def class_probabilities(model, features_NxF, num_classes: int) -> np.ndarray:
    """[N, C] probabilities (logreg) or softmax of the margins (SVM), columns in class order."""
    if hasattr(model, "predict_proba"):
        scores_NxK = np.log(np.maximum(model.predict_proba(features_NxF), 1e-12))
    else:
        scores_NxK = model.decision_function(features_NxF)
        if scores_NxK.ndim == 1:  # two classes: one margin for class 1
            scores_NxK = np.stack([-scores_NxK, scores_NxK], axis=1) / 2
    full_NxC = np.full((features_NxF.shape[0], num_classes), -1e9)
    full_NxC[:, model.classes_] = scores_NxK  # classes absent from training never win
    return metrics.softmax(full_NxC)


def fit_and_evaluate(train_texts: Sequence[str], train_labels_N: np.ndarray,
                     eval_texts: Sequence[str], eval_labels_M: np.ndarray, names: Sequence[str],
                     cfg: configs.BaselineConfig | Any = None) -> tuple[dict[str, Any], np.ndarray]:
    """(classification report with `features`, `model`, `fit_seconds`; [M, C] probabilities)."""
    cfg = configs.section(configs.BaselineConfig, cfg, "baseline")
    train_labels_N = np.asarray(train_labels_N)
    if len(train_texts) != len(train_labels_N) or len(eval_texts) != len(eval_labels_M):
        raise errors.DataError("baseline: texts and labels differ in length")
    if len(np.unique(train_labels_N)) < 2:
        raise errors.DataError("baseline: the training rows hold fewer than 2 classes")
    features = choose_features(cfg.features, list(train_texts))
    start = time.perf_counter()
    vec = vectorizer(features, cfg.max_features)
    model = linear_model(cfg).fit(vec.fit_transform(train_texts), train_labels_N)
    probs_MxC = class_probabilities(model, vec.transform(eval_texts), len(names))
    seconds = time.perf_counter() - start
    report = metrics.classification_report(eval_labels_M, probs_MxC, names)
    report.update(features=features, model=cfg.model, C=cfg.C, fit_seconds=round(seconds, 2),
                  num_train=len(train_texts))
    return report, probs_MxC
