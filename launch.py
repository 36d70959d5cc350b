"""Runs an experiment config: python launch.py --config experiments/bert_mlm.py --workdir runs/mlm

Modes: train (default; resumes from --workdir), plot (redraw a workdir's curves),
predict (label config.predict.input with the workdir's model, or with an exported
artifact given as config.predict.artifact), embed (config.predict.input's documents as
vectors: .npy + row ids; topic tasks), export (the workdir's
model as a self-contained artifact in <workdir>/export/), sweep (grid over
config.sweep.grid) and cv (k-fold cross-validation), each run in a sub-workdir, and
baseline (classification: TF-IDF + linear model on the same rows, report in <workdir>/baseline/).
Errors in configs, files or data (`encoder_jax.errors.Error`) and a full disk print one
line naming the field or file (set ENCODER_JAX_TRACEBACK=1 for the full traceback); any
other exception is a bug and keeps its traceback. SIGTERM or Ctrl-C during training finishes
the step in flight, saves it, prints "preempted at step N ..." and exits with status 75;
rerunning the same command continues. A second Ctrl-C stops at once.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, plots)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "plot", "predict", "export", "embed", "sweep", "cv",
                                           "baseline"],
                          "what to do")
flags.mark_flags_as_required(["config", "workdir"])

DISK_FULL = (28, 122)  # ENOSPC, EDQUOT


def main(argv):
    del argv
    from encoder_jax import parallel

    parallel.keep_freed_host_memory()  # before JAX's threads first allocate
    import jax

    from encoder_jax import reporting, train

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # silences orbax's per-save chatter
    logging.getLogger("encoder_jax").setLevel(logging.INFO)
    parallel.maybe_initialize_distributed()
    if _MODE.value == "plot":
        for path in reporting.plot_curves(_WORKDIR.value):
            print(path)
        return
    logging.getLogger("encoder_jax").info("JAX %s on %d %s device(s), process %d of %d", jax.__version__,
                 jax.device_count(), jax.devices()[0].platform, jax.process_index(),
                 jax.process_count())
    if _MODE.value == "predict":
        if (_CONFIG.value.get("predict") or {}).get("artifact"):
            from encoder_jax import export

            print("predictions:", export.predict_with_artifact(_CONFIG.value, _WORKDIR.value))
            return
        print("predictions:", train.predict(_CONFIG.value, _WORKDIR.value))
        return
    if _MODE.value == "embed":
        from encoder_jax import tasks

        print("embeddings:", tasks.load(_CONFIG.value.task, "embed").embed(_CONFIG.value, _WORKDIR.value))
        return
    if _MODE.value == "baseline":
        from encoder_jax import tasks

        report = tasks.load(_CONFIG.value.task, "baseline").baseline(_CONFIG.value, _WORKDIR.value)
        print("baseline:", {k: round(report[k], 4) for k in ("accuracy", "f1_macro", "fit_seconds")})
        return
    if _MODE.value == "export":
        from encoder_jax import export

        print("artifact:", export.export_run(_CONFIG.value, _WORKDIR.value))
        return
    if _MODE.value in ("sweep", "cv"):
        from encoder_jax import search

        summary = search.search(_CONFIG.value, _WORKDIR.value, _MODE.value)
        best = summary["best"]
        print("best:", search.setting_name(best["setting"]) if best else "no finished run",
              {k: round(v[0], 4) for k, v in best["metrics"].items()} if best else "")
        return
    result = train.run(_CONFIG.value, _WORKDIR.value)
    print("final eval:", {k: round(v, 4) for k, v in result.items()})


def check_config_overrides(argv: list[str]) -> None:
    """Fails early, in one line, on a bad variant or an unknown `--config.a.b` key."""
    import importlib.util

    from encoder_jax import errors

    spec_arg = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec_arg = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec_arg = argv[i + 1]
    if spec_arg is None:
        return
    path, _, variant = spec_arg.partition(":")
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"--config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant or None)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                parent = ".".join(walked) or "config"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                raise errors.ConfigKeyError(f"unknown config key {key!r}: {parent!r} has no {part!r}; "
                                            f"valid: {valid}")
            node = node[part]
            walked.append(part)


def error_line(error: BaseException) -> str | None:
    """The one line to print for an error the user can fix; None for anything else (a bug)."""
    from encoder_jax import errors

    if isinstance(error, errors.Error):
        return errors.one_line(error)
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        where = f" writing {error.filename}" if error.filename else ""
        return (f"no space left on the device{where} ({error.strerror}); checkpoints already "
                f"written are intact: free space and rerun the same command to continue")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, its errors (bad --mode, a value of the wrong type) as one line."""
    from encoder_jax import errors

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise errors.ConfigError(str(e)) from None


def run_main():
    from encoder_jax.preemption import EXIT_CODE, Preempted

    try:
        check_config_overrides(sys.argv[1:])
        app.run(main, flags_parser=parse_flags)
    except Preempted as e:  # SIGTERM / Ctrl-C: the step in flight finished and was checkpointed
        print(str(e), file=sys.stderr)
        sys.exit(EXIT_CODE)
    except Exception as e:  # noqa: BLE001 -- only the project's own errors become one line
        line = error_line(e)
        if line is None or os.environ.get("ENCODER_JAX_TRACEBACK"):
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main()
