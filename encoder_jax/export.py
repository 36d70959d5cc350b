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

from encoder_jax import artifact, checkpoint, configs, errors
from encoder_jax import workdir as workdir_lib
from encoder_jax.models import BertEncoder, BertForClassification, BertForMaskedLM, default_segment_ids

log = logging.getLogger("encoder_jax")
EXPORT_DIR = "export"
FILL_MASK_TOP_K = 20  # candidates per [MASK] the exported fill_mask returns


def classify_function(record: workdir_lib.ModelRecord) -> Callable[..., jax.Array]:
    """(params, ids_BxL, segment_ids_BxL, type_ids_BxL) -> float32 probabilities (B, C)."""
    model = BertForClassification(record.encoder, **record.fields)

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


def translate_function(record: workdir_lib.ModelRecord, settings: dict[str, Any]) -> Callable:
    """(params, source_ids_BxS, source_segment_ids_BxS) -> {"tokens" (B, K, T), "scores", "lengths"}."""
    from encoder_jax.tasks import translate

    model = translate.build_model(record)

    def translate_fn(params, source_ids_BxS, source_segment_ids_BxS):
        out = translate.translate_batch(
            model, params, {"source_ids": source_ids_BxS, "source_segment_ids": source_segment_ids_BxS},
            beam_size=settings["beam_size"], alpha=settings["length_penalty"],
            max_len=settings["max_len"], max_len_a=settings["max_len_a"],
            max_len_b=settings["max_len_b"], bos_id=settings["bos_id"], eos_id=settings["eos_id"],
            cache_blocks=settings.get("cache_blocks", 1))
        return {"tokens": out.tokens, "scores": out.scores, "lengths": out.lengths}

    return translate_fn


def export_function(function: Callable, params: Any, max_len: int, kind: str = "classify") -> bytes:
    """`jax.export` of `function(params, ids, segment_ids, type_ids)` (see below for the others).

    Batch and length are symbolic (length <= max_len), and so is the number of positions;
    translate takes (ids, segment_ids), fill_mask adds positions (B, M).
    """
    from jax import export

    batch, length, masks = export.symbolic_shape("b, l, m", constraints=[f"l <= {max_len}"])
    rows = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    inputs = {"translate": (rows, rows),
              "fill_mask": (rows, rows, rows, jax.ShapeDtypeStruct((batch, masks), jnp.int32))}
    param_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return bytes(export.export(jax.jit(function))(
        param_specs, *inputs.get(kind, (rows, rows, rows))).serialize())


def translate_settings(run: workdir_lib.TrainedRun, trained_config: dict[str, Any]) -> dict[str, Any]:
    """How the exported beam search decodes: the run's `translate` settings for --mode predict."""
    tr = configs.section(configs.TranslateConfig, trained_config.get("translate") or {}, "translate")
    target = target_tokenizer(run) or run.tokenizer
    return {"beam_size": tr.beam_size, "length_penalty": tr.length_penalty,
            "max_len_a": tr.max_len_a, "max_len_b": tr.max_len_b, "cache_blocks": tr.cache_blocks,
            "max_len": int((trained_config.get("data") or {}).get("max_len", 64)),
            "bos_id": int(target.cls_id), "eos_id": int(target.sep_id)}


def target_tokenizer(run: workdir_lib.TrainedRun):
    """A translation run's separate target tokenizer (None: joint, or not a translation run)."""
    if run.record.task != "translate" or run.record.fields.get("joint_tokenizer", True):
        return None
    return workdir_lib.load_tokenizer(workdir_lib.path(run.workdir, artifact.TARGET_TOKENIZER_DIR))


def run_encoding(task: str, trained_config: dict[str, Any]) -> dict[str, Any]:
    """The card's encoding, from the run's config.json data section."""
    data = trained_config.get("data") or {}
    if task == "translate":  # max_len: tokens per side, source and generated
        return artifact.encoding_card(int(data.get("max_len", 64)), data.get("pad_lengths"))
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
        "translate": translate_settings(run, trained_config) if "translate" in functions else None,
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


def serialized_functions(run: workdir_lib.TrainedRun, contents: dict[str, Any]) -> dict[str, bytes]:
    builders = {"classify": lambda: classify_function(run.record),
                "embed": lambda: embed_function(run.record),
                "fill_mask": lambda: fill_mask_function(run.record, FILL_MASK_TOP_K),
                "translate": lambda: translate_function(run.record, contents["translate"])}
    return {name: export_function(builders[name](), run.params, contents["encoding"]["max_len"], name)
            for name in contents["functions"]}


def export_run(config, workdir: str, out_dir: str | None = None) -> str:
    """Writes the artifact of the run in `workdir` (default <workdir>/export/); returns its path.

    `config` (the experiment config, may be None) only chooses the word segmenter.
    """
    import safetensors.numpy

    source = workdir_lib.checkpoint_source(workdir)  # a run with no checkpoint: one-line error
    segmenter = configs.word_segmenter(config) if config is not None else "auto"
    run = workdir_lib.load_trained(workdir, word_segmenter=segmenter)
    if run.record.task not in artifact.TASK_FUNCTIONS:
        raise errors.ConfigError(f"--mode export: {workdir!r} holds a {run.record.task!r} run; "
                                 f"exportable tasks: {list(artifact.EXPORTED_TASKS)}")
    names = artifact.TASK_FUNCTIONS[run.record.task]
    out_dir = os.path.abspath(out_dir or workdir_lib.path(workdir, EXPORT_DIR))
    contents = card(run, source, names)
    blobs = serialized_functions(run, contents)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out_dir))
    try:
        for name, blob in blobs.items():
            with open(os.path.join(staging, artifact.function_file(name)), "wb") as f:
                f.write(blob)
        safetensors.numpy.save_file(artifact.flatten_params(run.params),
                                    os.path.join(staging, artifact.WEIGHTS_FILE))
        run.tokenizer.save(staging)
        if target_tokenizer(run) is not None:
            target_dir = os.path.join(staging, artifact.TARGET_TOKENIZER_DIR)
            os.makedirs(target_dir)
            target_tokenizer(run).save(target_dir)
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
    from encoder_jax import reporting
    from encoder_jax.data import classification

    pred_cfg = configs.section(configs.PredictConfig, config.predict, "predict")
    loaded = artifact.load_artifact(pred_cfg.artifact)
    if loaded.task != "classify":
        raise errors.ConfigError(f"predict.artifact={pred_cfg.artifact!r} is a {loaded.task!r} export; "
                                 f"--mode predict labels texts with a 'classify' one")
    log.info("predicting with %s (checkpoint %s, step %s)", loaded.directory,
             loaded.card["source"]["checkpoint"], loaded.card["source"]["step"])
    _, rows = classification.predict_rows(config.data, pred_cfg)
    output = pred_cfg.output or workdir_lib.path(workdir, workdir_lib.PREDICTIONS_FILE)
    return reporting.write_predictions(loaded.labels, loaded.classify(rows, pred_cfg.batch_size),
                                       rows, output)
