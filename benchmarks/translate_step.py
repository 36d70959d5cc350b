"""Speed of the REAL encoder_jax translation model: train step, greedy and beam-4 decoding.

`--part train`: `encoder_jax.train.make_train_step` around a translation `Task` whose model
and loss are `tasks.translate.model_functions`' (EncoderDecoder, label-smoothed
cross-entropy 0.1, dropout 0.1), with AdamW + global-norm clipping 1.0 from
`optim.build_optimizer` and the `experiments/translate_zh_en.py:wmt` optimizer settings,
jitted as `train.run` does it (explicit shardings, state donated); reused from
`mlm_step.compile_train_step` / `mlm_step.time_steps`. The batch comes from the library's
own batching (`data.translation.eval_batches`) over synthetic pairs, every token real.
`--part greedy` / `--part beam`: `tasks.translate.translate_batch` (what `--mode predict`
runs: encode, cache, `decode.greedy_search` / `decode.beam_search` with beam 4, the step
kernels laid out once beforehand by `seq2seq.decode_kernels`, timed apart), jitted
over B sources, generating exactly `new_tokens` tokens per row (see `unreachable_eos`).

The top of this module (up to `run_one`) imports neither jax nor torch:
`torch_hf_marian.py` and `compare_marian.py` share its shapes, synthetic pairs, FLOP
model, timing loop, flags and report lines.

Usage (from the repository root; `tiny` only checks that everything runs):
  python benchmarks/translate_step.py --shape tiny --steps 2 --decode_steps 2
  python benchmarks/translate_step.py --shape marian --part train,greedy,beam --out results.jsonl

Each (shape, part) runs in a fresh subprocess, so its `peak_rss_mb` (the whole process:
imports, compilation, init and the timed calls) belongs to it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import sys
import time
from typing import Any, Callable

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), REPO_ROOT]
import common  # noqa: E402  (benchmarks/common.py: framework-free helpers)
import mlm_step  # noqa: E402  (its train-step compile / timing; imports no jax at module level)


# ----------------------------------------------------------------------------- shared, framework-free


@dataclasses.dataclass(frozen=True)
class Seq2SeqShape:
    """A seq2seq benchmark shape: model size, the timed batch and the tokens decoded per row."""

    encoder_layers: int
    decoder_layers: int
    hidden_dim: int
    num_heads: int
    mlp_dim: int
    vocab_size: int  # one vocabulary, shared by source, target and the tied output layer
    seq_len: int  # tokens per side (source and target), EOS / BOS included
    batch_size: int
    new_tokens: int  # generated per row by greedy and beam decoding

    @property
    def tokens_per_step(self) -> int:
        """Source + target tokens of a train batch (the trainer's `tokens_in_batch`)."""
        return self.batch_size * 2 * self.seq_len


SHAPES: dict[str, Seq2SeqShape] = {
    "tiny": Seq2SeqShape(encoder_layers=1, decoder_layers=1, hidden_dim=32, num_heads=2, mlp_dim=64,
                         vocab_size=128, seq_len=8, batch_size=2, new_tokens=8),
    # Transformer-base / Marian (opus-mt) size: the translate_zh_en `wmt` variant's shape.
    "marian": Seq2SeqShape(encoder_layers=6, decoder_layers=6, hidden_dim=512, num_heads=8,
                           mlp_dim=2048, vocab_size=32000, seq_len=64, batch_size=16, new_tokens=64),
}
PARTS = ("train", "greedy", "beam")
BEAM_SIZE = 4
MAX_POSITIONS = 256  # position tables on both sides (the wmt variant's model.max_len)
# Synthetic vocabulary: 0 pad, 1 unk, 2 BOS ([CLS] in the task), 3 EOS ([SEP]); regular ids after.
PAD_ID, BOS_ID, EOS_ID, NUM_SPECIAL = 0, 2, 3, 4


def synthetic_pairs(shape: Seq2SeqShape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) int32 (B, L): random regular ids, each row ending with EOS, no padding."""
    rng = np.random.default_rng(seed)
    source, target = rng.integers(NUM_SPECIAL, shape.vocab_size, (2, shape.batch_size, shape.seq_len),
                                  dtype=np.int32)
    source[:, -1] = target[:, -1] = EOS_ID
    return source, target


def forward_flops_per_row(shape: Seq2SeqShape) -> float:
    """Matmul FLOPs of one row's teacher-forced forward pass (2 per multiply-add).

    Encoder layer, per source token: Q/K/V/out projections, QK^T and PV over S keys, FFN.
    Decoder layer, per target token: self-attention (projections, QK^T and PV over all T
    keys: both sides compute the masked square), cross-attention Q/out projections and
    QK^T/PV over S keys, FFN; plus the cross-attention K/V projections of the S source
    tokens. Output layer D->V at every target token. Embeddings, norms, softmax and GELU
    are left out. Both implementations do exactly this work, so one count serves both.
    """
    d, f, s = shape.hidden_dim, shape.mlp_dim, shape.seq_len
    t = s
    encoder = shape.encoder_layers * s * (2 * (4 * d * d + 2 * d * f) + 2 * 2 * s * d)
    decoder_token = (2 * (4 * d * d + 2 * d * f) + 2 * 2 * t * d  # self-attention, FFN
                     + 2 * 2 * d * d + 2 * 2 * s * d)  # cross-attention Q/out and core
    decoder = shape.decoder_layers * (t * decoder_token + s * 2 * 2 * d * d)  # + cross K/V
    return float(encoder + decoder + t * 2 * d * shape.vocab_size)


def train_flops_per_step(shape: Seq2SeqShape) -> float:
    """Analytic train-step FLOPs: forward + backward (2x forward) over the batch."""
    return 3.0 * shape.batch_size * forward_flops_per_row(shape)


def time_calls(call: Callable[[], Any], warmup: int, steps: int
               ) -> tuple[list[float], Any, dict[str, Any]]:
    """`warmup` untimed calls, then `steps` timed ones; `call` must sync (block) itself.

    Returns the wall time of each timed call, the last call's result, and the process
    CPU seconds per call, the share of the CPU other processes took meanwhile and the
    peak RSS figures (the same fields as `mlm_step.time_steps`).
    """
    out = None
    for _ in range(warmup):
        out = call()
    reset_ok = common.reset_peak_rss()
    times, cpu0 = [], time.process_time()
    with common.ContentionMeter() as contention:
        for _ in range(steps):
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
    return times, out, {
        "cpu_s_per_step": (time.process_time() - cpu0) / max(steps, 1),
        "other_cpu_share": contention.other_share,
        "steady_peak_rss_mb": common.hwm_rss_bytes() / 2 ** 20 if reset_ok else None,
        "peak_rss_mb": common.peak_rss_bytes() / 2 ** 20}


def timing_fields(times: list[float], steps: int, warmup: int, tokens: int) -> dict[str, Any]:
    """Median time of one timed call (a train step or one whole decode) and tokens/s."""
    median = common.median(times)
    return {"steps": steps, "warmup": warmup, "step_time_s": median,
            "step_times_s": [round(t, 4) for t in times], "tokens_per_s": tokens / median}


def base_record(framework: str, shape_name: str, part: str, shape: Seq2SeqShape) -> dict[str, Any]:
    """The fields every record starts with."""
    return {"framework": framework, "shape": shape_name, "part": part,
            **dataclasses.asdict(shape), "beam_size": BEAM_SIZE if part == "beam" else 1,
            **common.machine_info()}


def report_line(r: dict[str, Any], framework: str, flops_key: str, mfu_key: str) -> str:
    """One human-readable line of a record: `common.summary_line` for train, else decoding."""
    if r["part"] == "train":
        return common.summary_line(r, framework, flops_key, mfu_key) + " (tokens: source + target)"
    return (f"[{framework} {r['shape']} {r['part']} B={r['batch_size']} beam={r['beam_size']} "
            f"S={r['seq_len']} new={r['new_tokens']}] {r['tokens_per_s']:,.0f} generated tok/s | "
            f"decode {r['step_time_s'] * 1e3:.0f} ms (median of {r['steps']}, "
            f"{r['cpu_s_per_step']:.2f} CPU-s) | new tokens per row {r['new_tokens_min']}.."
            f"{r['new_tokens_max']} | peak RSS {r['peak_rss_mb']:.0f} MiB | others used "
            f"{100 * r['other_cpu_share']:.0f}% of the CPU | load {r['load_avg']}")


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The flags both sides take (each adds its own)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--part", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--batch_size", type=int, default=0, help="override the shape's batch (0: keep)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps (median is reported)")
    p.add_argument("--decode_steps", type=int, default=3,
                   help="timed decode calls, each generating new_tokens per row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--attention_dropout", type=float, default=0.0,
                   help="dropout on attention probabilities, both sides (the wmt variant has 0.1; "
                        "MarianConfig's default is 0.0)")
    p.add_argument("--peak_flops", type=float, default=0.0,
                   help="FLOP/s for MFU (0: measure the framework's float32 matmul peak)")
    p.add_argument("--out", default="", help="append one JSON line per (shape, part) to this file")
    p.add_argument("--in_process", action="store_true",
                   help="measure in this process (no fresh subprocess; peak RSS then covers all parts)")
    return p


def chosen_shape(shape_name: str, args: argparse.Namespace) -> Seq2SeqShape:
    return dataclasses.replace(SHAPES[shape_name],
                               **({"batch_size": args.batch_size} if args.batch_size else {}))


def run_parts(script: str, argv: list[str], args: argparse.Namespace, framework: str,
              measure: Callable[[str, str, argparse.Namespace], dict[str, Any]],
              flops_key: str, mfu_key: str, env: dict[str, str] | None = None) -> None:
    """Measures every (--shape, --part), in a fresh subprocess each unless --in_process."""
    shapes = [s for s in args.shape.split(",") if s]
    parts = [p for p in args.part.split(",") if p]
    for flag, given, valid in (("--shape", shapes, list(SHAPES)), ("--part", parts, list(PARTS))):
        for name in given:
            if name not in valid:
                raise SystemExit(f"{flag} {name!r}; valid: {valid}")
    child_argv = common.strip_flag(common.strip_flag(common.strip_flag(argv, "--shape"), "--out"),
                                   "--part")
    for name in shapes:
        for part in parts:
            record = (measure(name, part, args) if args.in_process
                      else common.spawn(script, name, [*child_argv, "--part", part], env))
            common.emit(record, args.out or None)
            print(report_line(record, framework, flops_key, mfu_key), flush=True)


# ----------------------------------------------------------------------------- encoder_jax side


def load_translate_config(variant: str):
    """`experiments/translate_zh_en.py:<variant>` (loaded by path: the library never imports experiments)."""
    path = os.path.join(REPO_ROOT, "experiments", "translate_zh_en.py")
    spec = importlib.util.spec_from_file_location("translate_zh_en_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def benchmark_config(variant: str, shape: Seq2SeqShape, attention_dropout: float):
    """The experiment config with the benchmark's model shape (data and tokenizer are synthetic)."""
    config = load_translate_config(variant)
    m = config.model
    m.num_layers, m.decoder_layers = shape.encoder_layers, shape.decoder_layers
    m.hidden_dim, m.num_heads, m.mlp_dim = shape.hidden_dim, shape.num_heads, shape.mlp_dim
    m.max_len = m.max_target_len = MAX_POSITIONS
    m.attention_dropout_rate = attention_dropout
    config.data.max_len = shape.seq_len
    return config


def synthetic_batch(shape: Seq2SeqShape, seed: int) -> dict[str, np.ndarray]:
    """One train batch of `synthetic_pairs`, laid out by the library's own batching."""
    from encoder_jax.data import translation as data_lib

    source, target = synthetic_pairs(shape, seed)
    examples = [{"source_ids": s, "target_in": np.concatenate([[BOS_ID], t[:-1]]).astype(np.int32),
                 "target_out": t, "index": i} for i, (s, t) in enumerate(zip(source, target))]
    (batch,) = data_lib.eval_batches(examples, global_batch_rows=shape.batch_size,
                                     pad_lengths=[shape.seq_len])
    return batch


def build_task(config, shape: Seq2SeqShape):
    """A translation Task on synthetic pairs; model and loss are `tasks.translate`'s own.

    Returns (task, model, translate config). Only data and tokenizers are replaced.
    """
    from encoder_jax import configs
    from encoder_jax.seq2seq import EncoderDecoder
    from encoder_jax.tasks import translate
    from encoder_jax.tasks.base import Task, stateless

    tr = configs.section(configs.TranslateConfig, config.translate, "translate")
    cfg = translate.model_config(config, shape.vocab_size, shape.vocab_size, None)
    model = EncoderDecoder(cfg)
    init_params, loss, _ = translate.model_functions(model, tr, shape.seq_len, BOS_ID, EOS_ID)
    task = Task(name="translate", init_params=init_params, loss_fn=stateless(loss), train_data=None,
                example_batch=synthetic_batch(shape, seed=0), summarize=translate.summarize,
                tokens_in_batch=lambda b: int((b["target_segment_ids"] > 0).sum()
                                              + (b["source_segment_ids"] > 0).sum()))
    return task, model, tr


def settings(config) -> dict[str, Any]:
    """The optimizer / loss / dropout settings in force (compare_marian.py checks both sides agree)."""
    opt, m = config.opt, config.model
    return {"optimizer": opt.name, "lr": opt.learning_rate, "betas": [opt.b1, opt.b2],
            "eps": opt.eps, "weight_decay": opt.weight_decay, "grad_clip_norm": opt.grad_clip_norm,
            "label_smoothing": config.translate.label_smoothing, "dropout": m.dropout_rate,
            "attention_dropout": m.attention_dropout_rate, "activation": m.activation,
            "pre_norm": m.pre_norm, "positions": "learned"}


def measure_train(config, shape: Seq2SeqShape, args: argparse.Namespace) -> dict[str, Any]:
    """The train step's fields of a record."""
    from encoder_jax import parallel, train

    task, _, _ = build_task(config, shape)
    compiled, state, key, batch_sharding, compile_s = mlm_step.compile_train_step(
        task, config, config.train.num_steps)
    batches = [parallel.put_batch(synthetic_batch(shape, seed=s), batch_sharding) for s in range(2)]
    peak = args.peak_flops or train.measure_peak_flops()
    times, metrics, extra = mlm_step.time_steps(compiled, state, batches, key, args.warmup,
                                                args.steps)
    step_time = common.median(times)
    xla_flops, analytic = train.compiled_flops(compiled), train_flops_per_step(shape)
    return {
        **timing_fields(times, args.steps, args.warmup, shape.tokens_per_step),
        "target_tokens_per_s": shape.batch_size * shape.seq_len / step_time,
        "flops_per_step_xla": xla_flops, "flops_per_step_analytic": analytic,
        "peak_flops": peak, "peak_flops_source": "--peak_flops" if args.peak_flops else "measured",
        "mfu_xla": xla_flops / (step_time * peak) if xla_flops else None,
        "mfu_analytic": analytic / (step_time * peak), "compile_s": compile_s,
        "loss": float(metrics["loss"] / max(metrics["denominator"], 1.0)),
        "tokens_in_batch": task.tokens_in_batch(task.example_batch), **extra,
        **mlm_step.memory_analysis_mb(compiled)}


def unreachable_eos(params: Any) -> Any:
    """Params whose decoder never prefers EOS: output bias -1e9 at EOS (HF's min_new_tokens
    masks EOS likewise). `translate_batch` still forces EOS as token number max_len (its
    per-row limit), so every row generates exactly max_len tokens, the last one EOS."""
    bias = params["decoder"]["output_bias"]
    return {**params, "decoder": {**params["decoder"], "output_bias": bias.at[EOS_ID].set(-1e9)}}


def measure_decode(config, shape: Seq2SeqShape, part: str, args: argparse.Namespace
                   ) -> dict[str, Any]:
    """One jitted `translate_batch` over B sources (greedy or beam 4): the record's fields."""
    import jax

    from encoder_jax.seq2seq import decode_kernels
    from encoder_jax.tasks import translate

    task, model, tr = build_task(config, shape)
    if tr.max_len_a + tr.max_len_b * shape.seq_len < shape.new_tokens:
        raise ValueError(f"translate.max_len_a + max_len_b * {shape.seq_len} source tokens < "
                         f"{shape.new_tokens}: rows would stop before new_tokens")
    params = unreachable_eos(jax.jit(task.init_params)(jax.random.key(config.seed)))
    batch = {k: task.example_batch[k] for k in ("source_ids", "source_segment_ids")}
    decode = functools.partial(
        translate.translate_batch, model, beam_size=BEAM_SIZE if part == "beam" else 1,
        alpha=tr.length_penalty, max_len=shape.new_tokens, max_len_a=tr.max_len_a,
        max_len_b=tr.max_len_b, bos_id=BOS_ID, eos_id=EOS_ID, cache_blocks=tr.cache_blocks)
    # As `--mode predict`: the step kernels laid out once for all batches (timed apart).
    layout = jax.jit(decode_kernels)
    jax.block_until_ready(layout(params))
    t0 = time.perf_counter()
    kernels = jax.block_until_ready(layout(params))
    layout_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = jax.jit(lambda p, k, b: decode(p, b, kernels=k)).lower(params, kernels, batch).compile()
    compile_s = time.perf_counter() - t0
    times, out, extra = time_calls(lambda: jax.block_until_ready(compiled(params, kernels, batch)),
                                   args.warmup, args.decode_steps)
    lengths, tokens = np.asarray(out.lengths[:, 0]), np.asarray(out.tokens[:, 0])
    return {**timing_fields(times, args.decode_steps, args.warmup,
                            shape.batch_size * shape.new_tokens),
            "new_tokens_min": int(lengths.min()), "new_tokens_max": int(lengths.max()),
            "eos_before_last": int((tokens[:, :shape.new_tokens - 1] == EOS_ID).sum()),
            "alpha": tr.length_penalty, "cache_blocks": tr.cache_blocks, "compile_s": compile_s,
            "kernel_layout_s": layout_s,
            **extra,
            **mlm_step.memory_analysis_mb(compiled)}


def run_one(shape_name: str, part: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measures one (shape, part) in this process (jax is imported here, after XLA_FLAGS is set)."""
    shape = chosen_shape(shape_name, args)
    rss_start = common.current_rss_bytes()
    import jax

    from encoder_jax import parallel

    host_malloc = "keep" if parallel.keep_freed_host_memory() else "default"  # as launch.py
    rss_import = common.current_rss_bytes()
    config = benchmark_config(args.config_variant, shape, args.attention_dropout)
    if args.cache_blocks:
        config.translate.cache_blocks = args.cache_blocks
    fields = (measure_train(config, shape, args) if part == "train"
              else measure_decode(config, shape, part, args))
    return {**base_record("jax", shape_name, part, shape), **fields, "settings": settings(config),
            "config_variant": args.config_variant, "rss_start_mb": rss_start / 2 ** 20,
            "rss_after_import_mb": rss_import / 2 ** 20,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
            "host_malloc": host_malloc}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = base_parser(__doc__)
    p.add_argument("--config_variant", default="wmt",
                   help="experiments/translate_zh_en.py variant for the optimizer, loss and model settings")
    p.add_argument("--cache_blocks", type=int, default=0,
                   help="decode-cache blocks for greedy / beam (0: the variant's translate.cache_blocks)")
    p.add_argument("--xla_flags", default=None,
                   help=f"XLA_FLAGS for the measured process (default: $XLA_FLAGS, else "
                        f"{mlm_step.DEFAULT_XLA_FLAGS!r})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measures each --shape and --part, in a fresh subprocess each unless --in_process."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    xla_flags = args.xla_flags if args.xla_flags is not None else os.environ.get(
        "XLA_FLAGS", mlm_step.DEFAULT_XLA_FLAGS)
    os.environ["XLA_FLAGS"] = xla_flags  # read when jax is first imported (in run_one)
    run_parts(__file__, argv, args, "jax", run_one, "flops_per_step_xla", "mfu_xla",
              {**os.environ, "XLA_FLAGS": xla_flags})


if __name__ == "__main__":
    main()
