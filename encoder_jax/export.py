"""`--mode export`: a trained run -> a self-contained inference artifact (`encoder_jax.artifact`).

The artifact takes the checkpoint every consumer of a run takes (`workdir.checkpoint_source`:
averaged, else best, else the latest) and says which in its card. The text encoding (max_len,
pad lengths, text mode) comes from the run's own config.json, so an export needs no experiment
config. It is written into a temporary directory beside the destination and moved into place
only when complete, so a failed export leaves an earlier artifact as it was.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from encoder_jax import artifact, checkpoint, configs
from encoder_jax import workdir as workdir_lib
from encoder_jax.models import BertEncoder, BertForClassification, BertForMaskedLM, default_segment_ids

log = logging.getLogger("encoder_jax")
EXPORT_DIR = "export"
FILL_MASK_TOP_K = 20  # candidates per [MASK] the exported fill_mask returns


def classify_function(record: workdir_lib.ModelRecord) -> Callable[..., jax.Array]:
    """(params, ids_BxL, segment_ids_BxL, type_ids_BxL) -> float32 probabilities (B, C)."""
    model = BertForClassification(record.encoder, record.fields["num_classes"],
                                  record.fields["pooling"])

    def classify(params, ids_BxL, segment_ids_BxL, type_ids_BxL):
        logits_BxC = model.apply({"params": params}, ids_BxL, segment_ids=segment_ids_BxL,
                                 type_ids=type_ids_BxL)
        return jax.nn.softmax(logits_BxC.astype(jnp.float32), axis=-1)

    return classify


def embed_function(record: workdir_lib.ModelRecord) -> Callable[..., dict[str, jax.Array]]:
    """(params, ids, segment_ids, type_ids) -> {"cls", "mean"}: float32 (B, D) last-layer states."""
    encoder = BertEncoder(record.encoder)

    def embed(params, ids_BxL, segment_ids_BxL, type_ids_BxL):
        hidden_BxLxD, _ = encoder.apply({"params": params["encoder"]}, ids_BxL,
                                        segment_ids=segment_ids_BxL, type_ids=type_ids_BxL)
        hidden_BxLxD = hidden_BxLxD.astype(jnp.float32)
        real_BxLx1 = (default_segment_ids(ids_BxL, None, segment_ids_BxL) > 0)[..., None]
        mean_BxD = (hidden_BxLxD * real_BxLx1).sum(1) / jnp.maximum(real_BxLx1.sum(1), 1)
        return {"cls": hidden_BxLxD[:, 0], "mean": mean_BxD}

    return embed


def fill_mask_function(record: workdir_lib.ModelRecord, top_k: int) -> Callable[..., dict]:
    """(params, ids, segment_ids, type_ids, positions_BxM) -> {"ids", "probs"} (B, M, top_k)."""
    model = BertForMaskedLM(record.encoder)

    def fill_mask(params, ids_BxL, segment_ids_BxL, type_ids_BxL, positions_BxM):
        logits_BxMxV = model.apply({"params": params}, ids_BxL, positions_BxM,
                                   segment_ids=segment_ids_BxL, type_ids=type_ids_BxL)
        probs_BxMxK, ids_BxMxK = jax.lax.top_k(jax.nn.softmax(logits_BxMxV, axis=-1), top_k)
        return {"ids": ids_BxMxK.astype(jnp.int32), "probs": probs_BxMxK}

    return fill_mask


def export_function(function: Callable, params: Any, max_len: int, with_positions: bool = False
                    ) -> bytes:
    """`jax.export` of function(params, ids, segment_ids, type_ids[, positions]).

    Batch and length are symbolic (length <= max_len), and so is the number of positions.
    """
    from jax import export

    batch, length, masks = export.symbolic_shape("b, l, m", constraints=[f"l <= {max_len}"])
    rows = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    extra = (jax.ShapeDtypeStruct((batch, masks), jnp.int32),) if with_positions else ()
    param_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return bytes(export.export(jax.jit(function))(param_specs, rows, rows, rows, *extra).serialize())


def run_encoding(task: str, trained_config: dict[str, Any]) -> dict[str, Any]:
    """The card's encoding, from the run's config.json data section."""
    data = trained_config.get("data") or {}
    if task == "mlm":  # packed pretraining rows; a served text is one [CLS] text [SEP] row
        seq_len = int(data.get("seq_len", 128))
        return artifact.encoding_card(seq_len, [n for n in (16, 32, 64, 128, 256) if n < seq_len])
    return artifact.encoding_card(int(data.get("max_len", 128)), data.get("pad_lengths"),
                                  data.get("text_mode", "join"), data.get("join_separator", " "))


def card(run: workdir_lib.TrainedRun, source: str, functions: tuple[str, ...]) -> dict[str, Any]:
    """model.json of the artifact: what it is, where it came from, how it scored."""
    import flax

    trained_config = workdir_lib.read_json_if_exists(
        workdir_lib.path(run.workdir, workdir_lib.CONFIG_FILE)) or {}
    return {
        "format": artifact.ARTIFACT_FORMAT, "task": run.record.task,
        "encoder": run.record.encoder.to_json(), "fields": run.record.fields,
        "functions": list(functions),
        "labels": list(run.labels.names) if run.labels else None,
        "fill_mask_top_k": FILL_MASK_TOP_K if "fill_mask" in functions else 0,
        "encoding": run_encoding(run.record.task, trained_config),
        "source": {"workdir": os.path.abspath(run.workdir),
                   "checkpoint": os.path.relpath(source, run.workdir),
                   "step": checkpoint.latest_step(source)},
        "training_data": trained_config.get("data"),
        "final_eval": workdir_lib.read_json_if_exists(
            workdir_lib.path(run.workdir, workdir_lib.FINAL_EVAL_FILE)),
        "best": workdir_lib.read_json_if_exists(workdir_lib.path(run.workdir, workdir_lib.BEST_FILE)),
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def serialized_functions(run: workdir_lib.TrainedRun, names: tuple[str, ...], max_len: int
                         ) -> dict[str, bytes]:
    builders = {"classify": lambda: classify_function(run.record),
                "embed": lambda: embed_function(run.record),
                "fill_mask": lambda: fill_mask_function(run.record, FILL_MASK_TOP_K)}
    return {name: export_function(builders[name](), run.params, max_len, name == "fill_mask")
            for name in names}


def export_run(config, workdir: str, out_dir: str | None = None) -> str:
    """Writes the artifact of the run in `workdir` (default <workdir>/export/); returns its path.

    `config` (the experiment config, may be None) only chooses the word segmenter.
    """
    import safetensors.numpy

    source = workdir_lib.checkpoint_source(workdir)  # a run with no checkpoint: one-line error
    segmenter = configs.word_segmenter(config) if config is not None else "auto"
    run = workdir_lib.load_trained(workdir, word_segmenter=segmenter)
    if run.record.task not in artifact.TASK_FUNCTIONS:
        raise ValueError(f"--mode export: {workdir!r} holds a {run.record.task!r} run; "
                         f"exportable tasks: {list(artifact.EXPORTED_TASKS)}")
    names = artifact.TASK_FUNCTIONS[run.record.task]
    out_dir = os.path.abspath(out_dir or workdir_lib.path(workdir, EXPORT_DIR))
    contents = card(run, source, names)
    blobs = serialized_functions(run, names, contents["encoding"]["max_len"])
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out_dir))
    try:
        for name, blob in blobs.items():
            with open(os.path.join(staging, artifact.function_file(name)), "wb") as f:
                f.write(blob)
        safetensors.numpy.save_file(artifact.flatten_params(run.params),
                                    os.path.join(staging, artifact.WEIGHTS_FILE))
        run.tokenizer.save(staging)
        workdir_lib.write_json(os.path.join(staging, artifact.CARD_FILE), contents)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s (checkpoint %s, step %s) to %s", workdir, contents["source"]["checkpoint"],
             contents["source"]["step"], out_dir)
    return out_dir


def predict_with_artifact(config, workdir: str) -> str:
    """--mode predict through `predict.artifact`: the server's loader, the same jsonl as predict."""
    from encoder_jax.tasks import classify

    pred_cfg = configs.section(configs.PredictConfig, config.predict, "predict")
    loaded = artifact.load_artifact(pred_cfg.artifact)
    if loaded.task != "classify":
        raise ValueError(f"predict.artifact={pred_cfg.artifact!r} is a {loaded.task!r} export; "
                         f"--mode predict labels texts with a 'classify' one")
    log.info("predicting with %s (checkpoint %s, step %s)", loaded.directory,
             loaded.card["source"]["checkpoint"], loaded.card["source"]["step"])
    _, rows = classify.predict_rows(config, pred_cfg)
    output = pred_cfg.output or workdir_lib.path(workdir, workdir_lib.PREDICTIONS_FILE)
    return classify.write_predictions(loaded.labels, loaded.classify(rows, pred_cfg.batch_size),
                                      rows, output)
