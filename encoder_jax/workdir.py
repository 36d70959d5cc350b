"""The one owner of a run directory: its file names, atomic writes, and `load_trained`.

A run's --workdir holds::

  config.json             the experiment config as run
  model.json              ModelRecord: task, EncoderConfig, task fields (classes, pooling)
  labels.json             class names and how raw labels map to them (classification)
  tokenizer.model | vocab.txt (+ tokenizer_config.json)   the run's tokenizer
  checkpoints/<step>/     Orbax {state, data} (see `checkpoint`)
  checkpoints_corrupt/    checkpoints that failed to restore on resume, moved aside (not deleted)
  best/checkpoints/<step>/  params of the best evaluation; best.json its record
  averaged/checkpoints/<step>/  the last checkpoints' mean params (ckpt.average_last); averaged.json
  metrics.jsonl, tensorboard/, curves_*.png, final_eval.json
  report/, report_best/   evaluation reports (classification)
  predictions.jsonl       --mode predict's default output

Every JSON file is written atomically (a temporary file, then a rename), so a
crash leaves the previous version or the new one, never half of either; a file
that cannot be parsed is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from typing import Any

from encoder_jax import checkpoint, errors
from encoder_jax.data import tokenizer as tokenizer_lib
from encoder_jax.data.labels import LabelSpace
from encoder_jax.data.sources import DataError
from encoder_jax.layers import EncoderConfig

log = logging.getLogger("encoder_jax")

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
LABELS_FILE = "labels.json"
BEST_DIR = "best"
AVERAGED_DIR = "averaged"  # params averaged over the last checkpoints (ckpt.average_last)
BEST_FILE = "best.json"
FINAL_EVAL_FILE = "final_eval.json"
METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_DIR, BEST_REPORT_DIR = "report", "report_best"
BASELINE_DIR = "baseline"  # --mode baseline: the TF-IDF + linear model's report
LEGACY_ENCODER_FILE = "encoder_config.json"  # read only: what older runs and imports wrote


def path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def write_text(file_path: str, text: str) -> str:
    """Writes `text` atomically (temporary file + rename); returns the path."""
    tmp = f"{file_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, file_path)
    return file_path


def write_json(file_path: str, value: Any) -> str:
    """Writes `value` as indented UTF-8 JSON, atomically; returns the path."""
    return write_text(file_path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def read_json(file_path: str) -> Any:
    """The parsed file; a truncated or invalid one is a one-line error naming it."""
    try:
        with open(file_path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.DataError(f"{file_path} is not valid JSON ({e}); restore or delete it") from None


def read_json_if_exists(file_path: str) -> Any | None:
    return read_json(file_path) if os.path.isfile(file_path) else None


def check_writable(workdir: str) -> None:
    """Creates the workdir; an unwritable one is a one-line error naming it."""
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe per process: hosts sharing the workdir must not remove each other's.
        probe = path(workdir, f".write_test-{socket.gethostname()}-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise errors.NotWritableError(f"--workdir {workdir!r} is not writable: {e.strerror}") from None


def write_config(workdir: str, config) -> str:
    """config.json: the experiment config as run (ml_collections' best-effort JSON)."""
    return write_text(path(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- model record


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """What rebuilds a run's model without its experiment config: model.json."""

    task: str  # "mlm", "classify", ...
    encoder: EncoderConfig
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # task's own (num_classes, ...)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "encoder": self.encoder.to_json(), **self.fields}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelRecord":
        fields = {k: v for k, v in data.items() if k not in ("task", "encoder")}
        # Records written before the task was named: classification records carry num_classes.
        task = data.get("task") or ("classify" if "num_classes" in data else "mlm")
        return cls(task, EncoderConfig.from_json(data["encoder"]), fields)


def write_model_record(workdir: str, record: ModelRecord) -> str:
    return write_json(path(workdir, MODEL_FILE), record.to_json())


def read_model_record(workdir: str, vocab_size: int | None = None) -> ModelRecord | None:
    """model.json; for older runs encoder_config.json, else config.json's model (needs vocab_size)."""
    data = read_json_if_exists(path(workdir, MODEL_FILE))
    if data is not None:
        return ModelRecord.from_json(data)
    legacy = read_json_if_exists(path(workdir, LEGACY_ENCODER_FILE))
    if legacy is not None:
        return ModelRecord("mlm", EncoderConfig.from_json(legacy))
    config = read_json_if_exists(path(workdir, CONFIG_FILE))
    if config is None or vocab_size is None:
        return None
    # The model section of an MLM run of an older version: the encoder's own fields.
    return ModelRecord(config.get("task", "mlm"),
                       EncoderConfig.from_json({**config.get("model", {}), "vocab_size": vocab_size}))


# ----------------------------------------------------------------------------- labels


def record_label_space(workdir: str | None, space: LabelSpace) -> None:
    """Writes labels.json; a resumed run's recorded classes must agree with the data's."""
    if not workdir:
        return
    file_path = path(workdir, LABELS_FILE)
    recorded = read_label_space(workdir)
    if recorded is None:
        write_json(file_path, space.to_json())
    elif recorded != space:
        raise DataError(f"{file_path} records classes {list(recorded.names)} but the data gives "
                        f"{list(space.names)}: use a fresh --workdir for different labels")


def read_label_space(workdir: str) -> LabelSpace | None:
    data = read_json_if_exists(path(workdir, LABELS_FILE))
    return None if data is None else LabelSpace.from_json(data)


# ----------------------------------------------------------------------------- trained runs


def checkpoint_source(workdir: str) -> str:
    """Where a finished run's params are: <workdir>/averaged (if asked for), /best, else <workdir>."""
    def has_steps(directory):
        ckpt = os.path.join(directory, checkpoint.CHECKPOINT_DIR)
        return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))

    candidates = (path(workdir, AVERAGED_DIR), path(workdir, BEST_DIR), workdir)
    source = next((d for d in candidates if has_steps(d)), None)
    if source is None:
        raise errors.MissingFileError(f"--workdir {workdir!r} holds no checkpoint: train there first")
    return source


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's model, weights, tokenizer and task record, as `load_trained` reads them."""

    workdir: str
    record: ModelRecord
    params: Any  # host arrays; the task's full param tree
    tokenizer: Any  # data.tokenizer.Tokenizer
    labels: LabelSpace | None  # classification runs

    @property
    def encoder_config(self) -> EncoderConfig:
        return self.record.encoder


def load_tokenizer(workdir: str, word_segmenter: str = "auto"):
    """The tokenizer a run saved (tokenizer.model or vocab.txt); missing is a one-line error."""
    try:
        return tokenizer_lib.load_saved(workdir, word_segmenter)
    except FileNotFoundError:
        raise errors.MissingFileError(f"{workdir!r} has no tokenizer.model or vocab.txt: is it an "
                                      f"encoder_jax run's workdir?") from None


def load_trained(workdir: str, step: int | None = None, word_segmenter: str = "auto",
                 with_params: bool = True, need_tokenizer: bool = True) -> TrainedRun:
    """A run's (model record, params, tokenizer, labels): what predict, export and serving use.

    Params come from checkpoint `step` of <workdir>/checkpoints when given, else
    from the averaged checkpoint (ckpt.average_last), the best evaluation's if the
    run kept one, else the latest.
    Without `need_tokenizer`, a directory with no tokenizer gives `tokenizer=None`.
    """
    if not os.path.isdir(workdir):
        raise errors.MissingFileError(f"{workdir!r} does not exist")
    tokenizer = (load_tokenizer(workdir, word_segmenter) if need_tokenizer
                 else _tokenizer_or_none(workdir, word_segmenter))
    record = read_model_record(workdir, tokenizer.vocab_size if tokenizer else None)
    if record is None:
        raise errors.MissingFileError(f"{workdir!r} has no {MODEL_FILE}: is it an encoder_jax run's "
                                      f"workdir?")
    params = None
    if with_params:
        source = workdir if step is not None else checkpoint_source(workdir)
        log.info("loading params from %s", source)
        params = checkpoint.load_params(source, step)
    return TrainedRun(workdir, record, params, tokenizer, read_label_space(workdir))


def _tokenizer_or_none(workdir: str, word_segmenter: str):
    try:
        return tokenizer_lib.load_saved(workdir, word_segmenter)
    except FileNotFoundError:
        return None
