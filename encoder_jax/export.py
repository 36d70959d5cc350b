"""`--mode export`: a trained run -> a self-contained inference artifact (`encoder_jax.artifact`).

The artifact takes the checkpoint every consumer of a run takes (`workdir.checkpoint_source`:
averaged, else best, else the latest) and says which in its card. It is written into a
temporary directory beside the destination and moved into place only when complete, so a
failed export leaves an earlier artifact as it was.
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
from encoder_jax.tasks import classify

log = logging.getLogger(__name__)
EXPORT_DIR = "export"


def classify_function(run: workdir_lib.TrainedRun) -> Callable[..., jax.Array]:
    """(params, ids_BxL, segment_ids_BxL, type_ids_BxL) -> float32 probabilities (B, C)."""
    model = classify.build_model(run.record)

    def probabilities(params, ids_BxL, segment_ids_BxL, type_ids_BxL):
        logits_BxC = model.apply({"params": params}, ids_BxL, segment_ids=segment_ids_BxL,
                                 type_ids=type_ids_BxL)
        return jax.nn.softmax(logits_BxC.astype(jnp.float32), axis=-1)

    return probabilities


def export_function(function: Callable, params: Any, max_len: int) -> bytes:
    """`jax.export` of function(params, ids, segment_ids, type_ids), batch and length symbolic."""
    from jax import export

    batch, length = export.symbolic_shape("b, l", constraints=[f"l <= {max_len}"])
    rows = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    param_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return bytes(export.export(jax.jit(function))(param_specs, rows, rows, rows).serialize())


def card(config, run: workdir_lib.TrainedRun, source: str) -> dict[str, Any]:
    """model.json of the artifact: what it is, where it came from, how it scored."""
    import flax

    data_cfg = configs.section(configs.ClassifyDataConfig, config.data, "data")
    trained_config = workdir_lib.read_json_if_exists(workdir_lib.path(run.workdir,
                                                                      workdir_lib.CONFIG_FILE)) or {}
    return {
        "format": artifact.ARTIFACT_FORMAT, "task": run.record.task,
        "encoder": run.record.encoder.to_json(), "fields": run.record.fields,
        "labels": list(run.labels.names) if run.labels else None,
        "encoding": artifact.encoding_card(data_cfg.max_len, data_cfg.pad_lengths,
                                           data_cfg.text_mode, data_cfg.join_separator),
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


def export_run(config, workdir: str, out_dir: str | None = None) -> str:
    """Writes the artifact of the run in `workdir` (default <workdir>/export/); returns its path."""
    import safetensors.numpy

    source = workdir_lib.checkpoint_source(workdir)  # a run with no checkpoint: one-line error
    run = workdir_lib.load_trained(workdir, word_segmenter=configs.word_segmenter(config))
    if run.record.task not in artifact.EXPORTED_TASKS:
        raise ValueError(f"--mode export: {workdir!r} holds a {run.record.task!r} run; "
                         f"exportable tasks: {list(artifact.EXPORTED_TASKS)}")
    out_dir = os.path.abspath(out_dir or workdir_lib.path(workdir, EXPORT_DIR))
    contents = card(config, run, source)
    blob = export_function(classify_function(run), run.params, contents["encoding"]["max_len"])
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out_dir))
    try:
        with open(os.path.join(staging, artifact.FUNCTION_FILE), "wb") as f:
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
