"""Throughput, FLOPs, MFU and peak memory of the REAL encoder_jax MLM train step.

The step is `encoder_jax.train.make_train_step` around an MLM `Task` (dynamic
80/10/10 masking inside the jitted step, BertForMaskedLM with the sparse tied
head, dropout 0.1, AdamW + global-norm clipping from `build_optimizer` with the
`experiments/bert_mlm.py` optimizer settings), jitted exactly as the trainer
does it (explicit shardings, state donated). Batches are synthetic packed rows
(1-3 documents per row, no padding), so every one of B*L tokens is real.

Usage (from the repository root):
  python benchmarks/mlm_step.py --shape small --out results.jsonl
  python benchmarks/mlm_step.py --shape small,base --steps 10 --base_steps 3

Each shape runs in a fresh subprocess, so its peak RSS (`peak_rss_mb`, the
whole process: imports, compilation, init and the timed steps) belongs to that
configuration alone. `steady_peak_rss_mb` is the high-water mark of the timed
steps only (reset after warmup through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from typing import Any

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs from a checkout without `pip install -e .`: the package and benchmarks/common.py.
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), REPO_ROOT]
import common  # noqa: E402  (benchmarks/common.py: framework-free helpers)

# XLA CPU flags applied by default: none; the ones tried and their measured effect are in
# benchmarks/README.md.
DEFAULT_XLA_FLAGS = ""

# Token ids below this are "special" in the synthetic vocabulary: 0 pad, 1 unk, 2 cls, 3 sep, 4 mask.
NUM_SPECIAL = 5
MASK_ID = 4


# experiments/bert_mlm.py variant whose optimizer / model settings a shape uses by default
# (the shape's own name where the experiment has that variant).
DEFAULT_VARIANTS = {"tiny": "default"}


def load_experiment_config(variant: str):
    """`experiments/bert_mlm.py:<variant>` (loaded by path: the library never imports experiments)."""
    path = os.path.join(REPO_ROOT, "experiments", "bert_mlm.py")
    spec = importlib.util.spec_from_file_location("bert_mlm_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def benchmark_config(config_variant: str, shape: common.Shape):
    """The experiment config with the benchmark's model shape, sequence length and batch."""
    config = load_experiment_config(config_variant)
    config.model.num_layers = shape.num_layers
    config.model.hidden_dim = shape.hidden_dim
    config.model.num_heads = shape.num_heads
    config.model.mlp_dim = shape.mlp_dim
    config.data.seq_len = shape.seq_len
    config.data.batch_size = shape.batch_size
    return config


def synthetic_batch(shape: common.Shape, seed: int) -> dict[str, np.ndarray]:
    """One packed host batch: 1-3 documents per row filling all L tokens, random regular ids."""
    rng = np.random.default_rng(seed)
    batch, length = shape.batch_size, shape.seq_len
    ids = rng.integers(NUM_SPECIAL, shape.vocab_size, (batch, length), dtype=np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(8, length - 8), rng.integers(0, 3), replace=False))
        for doc, (start, stop) in enumerate(zip([0, *cuts], [*cuts, length]), start=1):
            segment_ids[row, start:stop] = doc
            positions[row, start:stop] = np.arange(stop - start)
    word_starts = rng.random((batch, length)) < 0.7
    return {"ids": ids, "segment_ids": segment_ids, "positions": positions,
            "word_starts": word_starts}


def build_task(config, shape: common.Shape):
    """An MLM Task on synthetic data whose model and loss are `tasks.mlm.model_and_loss`'s.

    Only the data and tokenizer are replaced (synthetic ids, NUM_SPECIAL special
    ids); model, masking and loss are the library's own functions.
    """
    from encoder_jax import configs
    from encoder_jax.layers import EncoderConfig
    from encoder_jax.tasks import mlm
    from encoder_jax.tasks.base import Task, stateless

    model_cfg = EncoderConfig.from_config(config.model, shape.vocab_size)
    synthetic_tokenizer = type("SyntheticIds", (), dict(
        pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=MASK_ID, vocab_size=shape.vocab_size))
    masking = mlm.masking_config(configs.section(configs.MaskedLmConfig, config.mlm, "mlm"),
                                 synthetic_tokenizer, shape.seq_len)
    init_params, loss = mlm.model_and_loss(model_cfg, masking, shape.seq_len)
    task = Task(name="mlm", init_params=init_params, loss_fn=stateless(loss), train_data=None,
                example_batch=synthetic_batch(shape, seed=0), summarize=mlm.summarize,
                tokens_in_batch=lambda b: int((b["segment_ids"] > 0).sum()))
    return task, masking.max_predictions


def compile_train_step(task, config, num_steps: int):
    """Initial state and the compiled train step, jitted and compiled as `encoder_jax.train.run`
    does (explicit shardings, donated state, `parallel.compile_step` with `train.cpu_scheduler`)."""
    import jax

    from encoder_jax import configs, optim, parallel, train

    opt_cfg = configs.section(configs.OptConfig, config.opt, "opt")
    mesh_cfg = configs.section(configs.MeshConfig, config.mesh, "mesh")
    mesh = parallel.make_mesh(mesh_cfg.fsdp)
    tx, schedule = optim.build_optimizer(opt_cfg, num_steps, task.trainable)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    abstract = jax.eval_shape(lambda rng: train.init_train_state(task, tx, rng), init_key)
    shardings = parallel.state_shardings(abstract, mesh, mesh_cfg.min_shard_size)
    batch_sharding = parallel.batch_sharding(mesh)
    state = jax.jit(lambda rng: train.init_train_state(task, tx, rng),
                    out_shardings=shardings)(init_key)
    step_fn = train.make_train_step(task, tx, schedule, opt_cfg.grad_accum_steps)
    example = parallel.put_batch(task.example_batch, batch_sharding)
    t0 = time.perf_counter()
    lowered = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, None),
                      out_shardings=(shardings, None), donate_argnums=0).lower(state, example, train_key)
    compiled = parallel.compile_step(lowered, configs.section(configs.TrainConfig, config.train,
                                                              "train").cpu_scheduler)
    compile_s = time.perf_counter() - t0
    parallel.release_freed_host_memory()  # as train.run does after compiling
    return compiled, state, train_key, batch_sharding, compile_s


def time_steps(compiled, state, batches: list, key, warmup: int, steps: int
               ) -> tuple[list[float], dict[str, Any], dict[str, float]]:
    """Runs warmup + timed steps, one host sync per step.

    Returns the wall time of each timed step, the last metrics, and the process
    CPU seconds per step (all threads; less sensitive than wall time to other
    jobs on a shared machine), the share of the CPU other processes took
    meanwhile, and the peak RSS figures.
    """
    import jax

    metrics = None
    for i in range(warmup):
        state, metrics = compiled(state, batches[i % len(batches)], key)
        jax.block_until_ready(metrics)
    reset_ok = common.reset_peak_rss()
    times, cpu0 = [], time.process_time()
    with common.ContentionMeter() as contention:
        for i in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batches[(warmup + i) % len(batches)], key)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    extra = {"cpu_s_per_step": (time.process_time() - cpu0) / max(steps, 1),
             "other_cpu_share": contention.other_share,
             "steady_peak_rss_mb": common.hwm_rss_bytes() / 2 ** 20 if reset_ok else None,
             "peak_rss_mb": common.peak_rss_bytes() / 2 ** 20}
    return times, jax.device_get(metrics), extra


def memory_analysis_mb(compiled) -> dict[str, float]:
    """XLA's own buffer accounting of the compiled step (MiB), where the backend gives it."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional on some backends
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "temp_size_in_bytes")
    return {f"xla_{n.replace('_size_in_bytes', '')}_mb": getattr(stats, n) / 2 ** 20
            for n in names if hasattr(stats, n)}


def run_one(shape_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measures one shape in this process (jax is imported here, after XLA_FLAGS is set)."""
    shape = dataclasses.replace(common.SHAPES[shape_name],
                                **({"batch_size": args.batch_size} if args.batch_size else {}))
    rss_start = common.current_rss_bytes()
    import jax

    from encoder_jax import parallel, train

    host_malloc = "keep" if parallel.keep_freed_host_memory() else "default"  # as launch.py
    rss_import = common.current_rss_bytes()
    config = benchmark_config(args.config_variant or DEFAULT_VARIANTS.get(shape_name, shape_name), shape)
    task, slots = build_task(config, shape)
    steps = args.base_steps if shape_name == "base" and args.base_steps else args.steps
    compiled, state, key, batch_sharding, compile_s = compile_train_step(
        task, config, config.train.num_steps)
    batches = [parallel.put_batch(synthetic_batch(shape, seed=s), batch_sharding) for s in range(2)]
    peak = args.peak_flops or train.measure_peak_flops()
    times, metrics, extra = time_steps(compiled, state, batches, key, args.warmup, steps)
    step_time = common.median(times)
    xla_flops = train.compiled_flops(compiled)
    sparse_flops = common.train_flops_per_step(shape, slots)
    dense_flops = common.train_flops_per_step(shape, shape.seq_len)
    record = {
        "framework": "jax", "shape": shape_name, **dataclasses.asdict(shape),
        "max_predictions": slots, "steps": steps, "warmup": args.warmup,
        "step_time_s": step_time, "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s": shape.tokens_per_step / step_time,
        "flops_per_step_xla": xla_flops, "flops_per_step_analytic": sparse_flops,
        "flops_per_step_analytic_dense_head": dense_flops,
        "peak_flops": peak, "peak_flops_source": "--peak_flops" if args.peak_flops else "measured",
        "mfu_xla": xla_flops / (step_time * peak) if xla_flops else None,
        "mfu_analytic": sparse_flops / (step_time * peak),
        "compile_s": compile_s, "loss": float(metrics["loss"] / max(metrics["denominator"], 1.0)),
        "rss_start_mb": rss_start / 2 ** 20, "rss_after_import_mb": rss_import / 2 ** 20, **extra,
        **memory_analysis_mb(compiled),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
        "host_malloc": host_malloc, **common.machine_info(),
    }
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", help="comma-separated: tiny, small, base")
    p.add_argument("--batch_size", type=int, default=0, help="override the shape's batch (0: keep)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median is reported)")
    p.add_argument("--base_steps", type=int, default=3, help="timed steps for `base` (0: --steps)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--peak_flops", type=float, default=0.0,
                   help="FLOP/s for MFU (0: measure the float32 matmul peak, train.measure_peak_flops)")
    p.add_argument("--config_variant", default="",
                   help="experiments/bert_mlm.py variant for opt/model settings (default: the shape name; "
                        "tiny: default)")
    p.add_argument("--xla_flags", default=None,
                   help=f"XLA_FLAGS for the measured process (default: $XLA_FLAGS, else {DEFAULT_XLA_FLAGS!r})")
    p.add_argument("--out", default="", help="append one JSON line per shape to this file")
    p.add_argument("--in_process", action="store_true",
                   help="measure in this process (no fresh subprocess; peak RSS then covers all shapes)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measures each --shape, in a fresh subprocess unless --in_process."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    shapes = [s for s in args.shape.split(",") if s]
    for name in shapes:
        if name not in common.SHAPES:
            raise SystemExit(f"--shape {name!r}; valid: {sorted(common.SHAPES)}")
    xla_flags = args.xla_flags if args.xla_flags is not None else os.environ.get(
        "XLA_FLAGS", DEFAULT_XLA_FLAGS)
    for name in shapes:
        if args.in_process:
            os.environ["XLA_FLAGS"] = xla_flags  # read when jax is first imported (in run_one)
            record = run_one(name, args)
        else:
            record = common.spawn(__file__, name, common.strip_flag(common.strip_flag(argv, "--shape"), "--out"),
                                  {**os.environ, "XLA_FLAGS": xla_flags})
        common.emit(record, args.out or None)
        print(common.summary_line(record, "jax", "flops_per_step_xla", "mfu_xla"), flush=True)


if __name__ == "__main__":
    main()
