"""Metrics on host numpy: classification through scikit-learn (and the report files of a
run), translation through sacrebleu (`bleu_chrf`), and per-example eval outputs.

`classification_report(labels_N, probs_NxC, names)` returns every number the
run logs and reports: accuracy; macro / micro / weighted precision, recall and
F1; a per-class table; one-vs-rest ROC-AUC (macro over the classes that occur in
the labels: a class absent from the split has no ROC curve and is skipped with a
warning); the confusion matrix (rows = true class, columns = predicted).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from encoder_jax import errors

log = logging.getLogger("encoder_jax")

AVERAGES = ("macro", "micro", "weighted")
REPORT_FILES = ("report.json", "report.md", "confusion_matrix.png", "roc_curves.png")


def collect_outputs(outputs) -> dict[str, np.ndarray]:
    """Per-batch eval outputs -> one array per key over the real rows, each example once."""
    parts = list(outputs)
    merged = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    real = merged["weight"] > 0
    merged = {k: v[real] for k, v in merged.items()}
    _, first = np.unique(merged["index"], return_index=True)  # sorted by example index
    return {k: v[first] for k, v in merged.items()}


def softmax(logits_NxC: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (host numpy)."""
    z_NxC = np.asarray(logits_NxC, np.float64)
    z_NxC = np.exp(z_NxC - z_NxC.max(-1, keepdims=True))
    return z_NxC / z_NxC.sum(-1, keepdims=True)


def means(sums: dict[str, Any], perplexity_of: str | None = None) -> dict[str, float]:
    """Metric sums -> means over their "denominator"; perplexity = exp(mean of `perplexity_of`)."""
    denominator = max(float(sums["denominator"]), 1.0)
    out = {k: float(v) / denominator for k, v in sums.items() if k != "denominator"}
    if perplexity_of in out:
        out["perplexity"] = float(np.exp(min(out[perplexity_of], 50.0)))
    return out


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF from `sacrebleu` (one reference each), with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise errors.DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": float(bleu_score.score), "chrf": float(chrf_score.score),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def roc_auc_one_vs_rest(labels_N: np.ndarray, probs_NxC: np.ndarray
                        ) -> tuple[dict[int, float], list[int]]:
    """Per-class one-vs-rest ROC-AUC; classes without positives or negatives are skipped."""
    from sklearn.metrics import roc_auc_score

    per_class, skipped = {}, []
    for c in range(probs_NxC.shape[1]):
        positives = labels_N == c
        if positives.all() or not positives.any():
            skipped.append(c)
            continue
        per_class[c] = float(roc_auc_score(positives, probs_NxC[:, c]))
    return per_class, skipped


def classification_report(labels_N: np.ndarray, probs_NxC: np.ndarray, names: Sequence[str],
                          loss_N: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of one evaluation (see the module docstring); plain JSON types."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels_N = np.asarray(labels_N, np.int64)
    probs_NxC = np.asarray(probs_NxC, np.float64)
    if labels_N.ndim != 1 or probs_NxC.shape != (len(labels_N), len(names)):
        raise errors.DataError(f"labels {labels_N.shape} / probabilities {probs_NxC.shape} do not match "
                               f"{len(names)} classes")
    if len(labels_N) == 0:
        raise errors.DataError("no examples to evaluate")
    classes = list(range(len(names)))
    preds_N = probs_NxC.argmax(-1)
    report: dict[str, Any] = {"num_examples": int(len(labels_N)),
                              "accuracy": float(accuracy_score(labels_N, preds_N))}
    if loss_N is not None:
        report["loss"] = float(np.mean(loss_N))
    for average in AVERAGES:
        p, r, f, _ = precision_recall_fscore_support(labels_N, preds_N, labels=classes,
                                                     average=average, zero_division=0)
        report.update({f"precision_{average}": float(p), f"recall_{average}": float(r),
                       f"f1_{average}": float(f)})
    p_C, r_C, f_C, s_C = precision_recall_fscore_support(labels_N, preds_N, labels=classes,
                                                         average=None, zero_division=0)
    auc, skipped = roc_auc_one_vs_rest(labels_N, probs_NxC)
    if skipped:
        log.warning("ROC-AUC skipped for classes absent from (or alone in) the split: %s",
                    [names[c] for c in skipped])
    report["roc_auc_macro"] = float(np.mean(list(auc.values()))) if auc else float("nan")
    report["roc_auc_skipped"] = [names[c] for c in skipped]
    report["per_class"] = {
        names[c]: {"precision": float(p_C[c]), "recall": float(r_C[c]), "f1": float(f_C[c]),
                   "support": int(s_C[c]), "roc_auc": auc.get(c)} for c in classes}
    report["confusion_matrix"] = confusion_matrix(labels_N, preds_N, labels=classes).tolist()
    report["class_names"] = list(names)
    return report


def scalars(report: dict[str, Any]) -> dict[str, float]:
    """The report's scalar metrics (for metrics.jsonl / TensorBoard)."""
    return {k: float(v) for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def markdown(report: dict[str, Any], title: str = "Classification report") -> str:
    """The report as Markdown: summary, per-class table and confusion matrix."""
    names = report["class_names"]
    lines = [f"# {title}", "", f"{report['num_examples']} examples", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in scalars(report).items() if k not in ("num_examples", "step")]
    if report["roc_auc_skipped"]:
        lines += ["", f"ROC-AUC skipped (class absent from the split): {report['roc_auc_skipped']}"]
    lines += ["", "| class | precision | recall | f1 | support | roc_auc |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, row in report["per_class"].items():
        auc = "—" if row["roc_auc"] is None else f"{row['roc_auc']:.4f}"
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} "
                     f"| {row['support']} | {auc} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
              "| | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    for name, row in zip(names, report["confusion_matrix"]):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_confusion_matrix(report: dict[str, Any], path: str) -> None:
    """Confusion-matrix heat map (row-normalised colours, raw counts written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["class_names"]
    counts_CxC = np.asarray(report["confusion_matrix"])
    rates_CxC = counts_CxC / np.maximum(counts_CxC.sum(1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates_CxC, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(counts_CxC[i, j]), ha="center", va="center",
                    color="white" if rates_CxC[i, j] > 0.5 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc_curves(labels_N: np.ndarray, probs_NxC: np.ndarray, names: Sequence[str],
                    path: str) -> None:
    """One-vs-rest ROC curve per class present in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    auc, _ = roc_auc_one_vs_rest(labels_N, probs_NxC)
    fig, ax = plt.subplots(figsize=(6, 5))
    for c, value in auc.items():
        fpr, tpr, _ = roc_curve(labels_N == c, probs_NxC[:, c])
        ax.plot(fpr, tpr, label=f"{names[c]} (AUC {value:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], labels_N: np.ndarray, probs_NxC: np.ndarray,
                 directory: str, title: str = "Classification report") -> list[str]:
    """report.json, report.md, confusion_matrix.png, roc_curves.png into `directory`."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, name) for name in REPORT_FILES]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(report, title))
    plot_confusion_matrix(report, paths[2])
    plot_roc_curves(labels_N, probs_NxC, report["class_names"], paths[3])
    return paths
