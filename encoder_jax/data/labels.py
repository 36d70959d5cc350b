"""Label spaces of text classification: class names, raw label -> index, checks, labels.json.

Raw labels are integers (`index`: class = value - `data.label_base`) or names
(`name`); class names come from `data.classes_file`, the TFDS catalog's label
feature, or the training data (sorted names / 0..max). The run directory
records them (`workdir.record_label_space`), and a resumed run must agree.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Sequence

import numpy as np

from encoder_jax import configs, errors
from encoder_jax.data.sources import DataError

log = logging.getLogger("encoder_jax")

LABEL_FORMATS = ("auto", "index", "name")


def text_keys(count: int) -> list[str]:
    """Record keys of the text fields: text_0, text_1, ..."""
    return [f"text_{i}" for i in range(count)]


def catalog_label_names(source) -> list[str] | None:
    """Class names a TFDS catalog source declares for its `label` feature, if any."""
    inner = getattr(getattr(source, "_source", None), "_source", None)
    info = getattr(inner, "dataset_info", None)
    try:
        return list(info.features["label"].names)
    except (AttributeError, KeyError, TypeError):
        return None


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """Class names and how raw labels map to them: 'index' (int - base) or 'name'."""

    names: tuple[str, ...]
    kind: str = "index"
    base: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def encode(self, value: Any, where: str) -> int:
        """Raw label -> class index; unknown names and out-of-range ints raise DataError."""
        if self.kind == "name":
            text = str(value).strip()
            if text not in self._lookup:
                raise DataError(f"{where}: unknown label name {text!r}; valid: {list(self.names)}")
            return self._lookup[text]
        try:
            index = int(str(value).strip()) - self.base
        except ValueError:
            raise DataError(f"{where}: label {value!r} is not an integer "
                            f"(set data.label_format=name for label names)") from None
        if not 0 <= index < len(self.names):
            raise DataError(f"{where}: label {value!r} is out of range; valid: "
                            f"{self.base}..{self.base + len(self.names) - 1} (data.label_base={self.base})")
        return index

    @functools.cached_property
    def _lookup(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "kind": self.kind, "base": self.base}

    @classmethod
    def from_json(cls, data: dict[str, Any] | list[str]) -> "LabelSpace":
        """From labels.json: our dict, or a plain list of names (as interop writes)."""
        if isinstance(data, list):
            return cls(tuple(data), "name", 0)
        return cls(tuple(data["names"]), data.get("kind", "index"), int(data.get("base", 0)))


def read_class_names(path: str) -> list[str]:
    """One class name per line (blank lines skipped); duplicates are an error."""
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"data.classes_file={path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names or len(set(names)) != len(names):
        raise DataError(f"data.classes_file={path!r} must list distinct class names, one a line")
    return names


def _is_int(value: Any) -> bool:
    try:
        int(str(value).strip())
        return True
    except ValueError:
        return False


def infer_label_space(data_cfg, raw_labels: Sequence[Any], declared: list[str] | None = None
                      ) -> LabelSpace:
    """Label space from config + the training labels: class file > declared names > the data."""
    data_cfg = configs.section(configs.ClassifyDataConfig, data_cfg, "data")
    label_format = data_cfg.label_format
    if label_format not in LABEL_FORMATS:
        raise DataError(f"data.label_format={label_format!r}; valid: {list(LABEL_FORMATS)}")
    names = read_class_names(data_cfg.classes_file) if data_cfg.classes_file else declared
    if label_format == "auto":
        label_format = "index" if all(_is_int(v) for v in raw_labels) else "name"
    if label_format == "name":
        if names is None:
            names = sorted({str(v).strip() for v in raw_labels})
        return LabelSpace(tuple(names), "name", 0)
    base = data_cfg.label_base
    if names is None:
        count = data_cfg.num_classes or (max(int(str(v)) for v in raw_labels) - base + 1)
        names = [str(base + i) for i in range(int(count))]
    return LabelSpace(tuple(names), "index", base)


def read_raw_labels(source, num_texts: int, allow_empty: bool) -> list[Any]:
    """One pass over a split: its raw labels, after checking that no text field is empty."""
    if len(source) == 0:
        raise DataError(f"{source.name} holds no records")
    raw = []
    for i in range(len(source)):
        record = source[i]
        if not allow_empty:
            for key in text_keys(num_texts):
                if not str(record[key]).strip():
                    raise DataError(f"{source.name} record {i + 1}: text field {key} is empty "
                                    f"(set data.allow_empty_text=True to keep such rows)")
        raw.append(record["label"])
    return raw


def encode_labels(labels: "LabelSpace", raw: Sequence[Any], name: str) -> np.ndarray:
    """Raw labels -> class ids (N,) int32; the first bad one raises, naming its record."""
    return np.asarray([labels.encode(v, f"{name} record {i + 1}") for i, v in enumerate(raw)],
                      np.int32)


def select_examples(data_cfg: configs.ClassifyDataConfig, cv: configs.CvConfig,
                    train_ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Indices of the train split to train on and, for a CV fold, to evaluate on (else None).

    `data.max_train_examples` keeps a fixed random subset (seeded by data.subset_seed);
    `cv.fold` (with `cv.folds`) holds out one stratified fold of what remains.
    """
    indices = np.arange(len(train_ids_N))
    if data_cfg.max_train_examples:
        rng = np.random.default_rng(data_cfg.subset_seed)
        indices = np.sort(rng.permutation(indices)[:data_cfg.max_train_examples])
    if cv.fold is None:
        return indices, None
    from sklearn.model_selection import StratifiedKFold

    if not 0 <= cv.fold < cv.folds:
        raise errors.ConfigError(f"cv.fold={cv.fold}; valid: 0..{cv.folds - 1} (cv.folds={cv.folds})")
    try:
        splitter = StratifiedKFold(cv.folds, shuffle=True, random_state=cv.seed)
        train_pos, held_pos = list(splitter.split(indices, train_ids_N[indices]))[cv.fold]
    except ValueError as e:
        raise errors.ConfigError(f"cv.folds={cv.folds}: {e}") from None
    return indices[train_pos], indices[held_pos]


def warn_on_imbalance(names, train_ids_N: np.ndarray, eval_ids_N: np.ndarray) -> None:
    """Logs classes absent from training or evaluation (their metrics are 0 / skipped)."""
    for split, ids in (("training", train_ids_N), ("evaluation", eval_ids_N)):
        counts = np.bincount(ids, minlength=len(names))
        absent = [names[c] for c in np.flatnonzero(counts == 0)]
        if absent:
            log.warning("classes absent from the %s split: %s", split, absent)
