"""Linear probe: how much a frozen encoder already knows about a classification task.

Features of N training rows and of all dev rows from a run's encoder (last layer, mean over real
tokens or [CLS]) or from its token table alone (mean of the token vectors), standardised, then a
scikit-learn logistic regression; prints dev accuracy. `--random` probes a fresh initialisation
of the same shape instead of the trained weights (the floor).

Usage (from the repository root; csv rows `label,title,description` as AG News):
  python benchmarks/linear_probe.py --run runs/pre_ag --train $DATA/ag_news/train.csv.gz \
      --dev $DATA/ag_news/dev.csv.gz --rows 2000
  python benchmarks/linear_probe.py --run runs/pre_ag ... --random
THUCNews (tsv `title<TAB>label`): --text_columns 0 --label_column 1 --delimiter tab
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np

import encoder_jax as ej
from encoder_jax import api
from encoder_jax.models import BertForMaskedLM


def read_rows(path: str, text_columns: list[int], label_column: int, delimiter: str
              ) -> tuple[list[str], list[str]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        rows = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
    return [" ".join(r[i] for i in text_columns) for r in rows], [r[label_column] for r in rows]


def token_table_features(params, tokenizer, texts: list[str]) -> np.ndarray:
    """(N, D): the mean of each text's token vectors from the encoder's token table."""
    encoder = params if "token_embed" in params else params["encoder"]  # a bare HF encoder, or a run
    table = np.asarray(encoder["token_embed"]["embedding"])
    out = np.zeros((len(texts), table.shape[1]), np.float32)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if ids:
            out[i] = table[ids].mean(0)
    return out


def fresh_params(model):
    """A random initialisation of the loaded model's shape (seed 1)."""
    ids = jnp.ones((1, 8), jnp.int32)
    if isinstance(model, BertForMaskedLM):  # it also takes its prediction positions
        return model.init(jax.random.key(1), ids, jnp.zeros((1, 2), jnp.int32))["params"]
    return model.init(jax.random.key(1), ids)["params"]


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory, export or Hugging Face dir")
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--rows", type=int, default=2000, help="training rows (a seed-0 random subset)")
    p.add_argument("--text_columns", default="1,2")
    p.add_argument("--label_column", type=int, default=0)
    p.add_argument("--delimiter", default=",", help="',' or 'tab'")
    p.add_argument("--features", default="mean,cls,table", help="comma-separated: mean, cls, table")
    p.add_argument("--random", action="store_true", help="probe a fresh init of the same shape")
    args = p.parse_args()
    delimiter = "\t" if args.delimiter == "tab" else args.delimiter
    columns = [int(c) for c in args.text_columns.split(",")]
    train_texts, train_labels = read_rows(args.train, columns, args.label_column, delimiter)
    dev_texts, dev_labels = read_rows(args.dev, columns, args.label_column, delimiter)
    picked = np.random.default_rng(0).permutation(len(train_texts))[:args.rows]
    train_texts, train_labels = [train_texts[i] for i in picked], [train_labels[i] for i in picked]
    model, params, tokenizer = ej.load_pretrained(args.run)
    if args.random:
        params = fresh_params(model)
    result = {"run": args.run, "random": args.random, "rows": len(train_texts)}
    for kind in args.features.split(","):
        def features(texts):
            if kind == "table":
                return token_table_features(params, tokenizer, texts)
            return api.embed(model, params, tokenizer, texts, pooling=kind)
        x_train, x_dev = features(train_texts), features(dev_texts)
        scaler = StandardScaler().fit(x_train)
        clf = LogisticRegression(max_iter=3000).fit(scaler.transform(x_train), train_labels)
        result[kind] = round(float(clf.score(scaler.transform(x_dev), dev_labels)), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
