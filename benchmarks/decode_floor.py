"""The memory floor of one cached decode step at a `translate_step` shape, on this machine.

At batch 16 a decode step multiplies every decoder weight by a handful of rows: it could run
as fast as the machine streams the weights (and the caches) from memory, and how close a
framework gets depends on its matmul kernels. This script measures four things in one
process:

  stream_gb_per_s   the machine's read bandwidth: a jitted float32 sum over a 1 GiB array
                    (median of --repeats; XLA's reduction runs on all cores);
  bytes per step    what one step of `decode.greedy_search` / `decode.beam_search` must read
                    at least: the decoder's per-token weights (self-attention Q/K/V/out,
                    cross-attention Q/out, feed-forward) and the tied output table, plus
                    the self-attention cache at its mean filled length (HF grows its
                    cache; ours reads all of it) and the source's cross-attention keys
                    and values; the floor is bytes / stream_gb_per_s;
  compute floor     the step's matmul FLOPs / this machine's float32 matmul peak
                    (`train.measure_peak_flops`, the probe the MFU figures use);
  gemm_loop_ms      the step's weight matmuls alone (the same shapes: rows = B x beams, in
                    the decoder's column layout, kernel (out, in) @ hidden (in, rows)),
                    chained in a 64-step `lax.fori_loop` as in decoding, nothing else.

Given a `compare_marian.py` JSON-lines file (--marian_jsonl), it also prints HF's median time
per generated position and the best ours/HF ratio each floor allows.

  python benchmarks/decode_floor.py --shape marian --marian_jsonl marian.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import translate_step  # noqa: E402  (shapes; no jax at module level)

FLOAT_BYTES = 4
LOOP_STEPS = 64


def step_flops(shape: translate_step.Seq2SeqShape, beams: int) -> float:
    """Matmul FLOPs of one decode step: every row through the weights, attention over the
    filled self-attention cache (mean) and the source."""
    d, f = shape.hidden_dim, shape.mlp_dim
    rows = shape.batch_size * beams
    weights = shape.decoder_layers * (6 * d * d + 2 * d * f) + shape.vocab_size * d
    attention = shape.decoder_layers * 2 * d * ((shape.new_tokens + 1) / 2 + shape.seq_len)
    return 2.0 * rows * (weights + attention)


def step_bytes(shape: translate_step.Seq2SeqShape, beams: int) -> dict[str, float]:
    """Bytes one decode step reads at least, by part (float32)."""
    d, f, layers = shape.hidden_dim, shape.mlp_dim, shape.decoder_layers
    rows = shape.batch_size * beams
    per_layer_weights = (4 * d * d) + (2 * d * d) + (2 * d * f)  # self QKVO, cross Q/O, FFN
    mean_filled = (shape.new_tokens + 1) / 2
    return {
        "decoder_weights": FLOAT_BYTES * layers * per_layer_weights,
        "output_table": FLOAT_BYTES * shape.vocab_size * d,
        "self_cache_mean": FLOAT_BYTES * layers * 2 * rows * mean_filled * d,
        "cross_cache": FLOAT_BYTES * layers * 2 * shape.batch_size * shape.seq_len * d,
    }


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * common.median(times)


def stream_gb_per_s(repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    data = jnp.ones((2 ** 28,), jnp.float32)  # 1 GiB
    total = jax.jit(jnp.sum)
    return data.nbytes / 1e9 / (median_ms(lambda: total(data).block_until_ready(), repeats) / 1e3)


def gemm_loop_ms(shape: translate_step.Seq2SeqShape, beams: int, repeats: int) -> float:
    """Milliseconds per step of the decoder's weight matmuls alone, in a fori_loop."""
    import jax
    import jax.numpy as jnp

    d, f = shape.hidden_dim, shape.mlp_dim
    rows = shape.batch_size * beams
    keys = iter(jax.random.split(jax.random.key(0), 8 * shape.decoder_layers + 2))
    # stored (out, in) and multiplied kernel @ columns, as `decoder_block` does
    weight = lambda n_in, n_out: 0.02 * jax.random.normal(next(keys), (n_out, n_in))
    layers = [dict(qkv=weight(d, 3 * d), out=weight(d, d), cross_q=weight(d, d),
                   cross_out=weight(d, d), wi=weight(d, f), wo=weight(f, d))
              for _ in range(shape.decoder_layers)]
    table = weight(shape.vocab_size, d)
    x = jax.random.normal(next(keys), (d, rows))

    @jax.jit
    def run(x, layers, table):
        def step(_, carry):
            y, _ = carry
            for w in layers:
                y = y + w["out"] @ (w["qkv"] @ y)[:d]
                y = y + w["cross_out"] @ (w["cross_q"] @ y)
                y = y + w["wo"] @ jax.nn.relu(w["wi"] @ y)
            logits_VxN = table @ y  # vocabulary-major, as the decoder computes it
            return 0.1 * y, jnp.argmax(logits_VxN, axis=0)
        return jax.lax.fori_loop(0, LOOP_STEPS, step, (x, jnp.zeros((rows,), jnp.int32)))

    return median_ms(lambda: jax.block_until_ready(run(x, layers, table)), repeats) / LOOP_STEPS


def ms_per_position(path: str, framework: str, part: str, shape_name: str) -> float | None:
    """A framework's median decode-call time / new tokens, from a compare_marian.py
    JSON-lines file ("jax" or "torch_hf")."""
    times = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if (r.get("framework"), r.get("part"), r.get("shape")) == (framework, part, shape_name):
                times.append(1e3 * r["step_time_s"] / r["new_tokens"])
    return common.median(times) if times else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="marian", choices=sorted(translate_step.SHAPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--marian_jsonl", default="", help="compare_marian.py --out file (HF's times)")
    args = p.parse_args()
    shape = translate_step.SHAPES[args.shape]
    from encoder_jax import train

    bandwidth = stream_gb_per_s(args.repeats)
    peak = train.measure_peak_flops()
    print(f"shape {args.shape}, batch {shape.batch_size}; stream read {bandwidth:.1f} GB/s, "
          f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    for part, beams in (("greedy", 1), ("beam", translate_step.BEAM_SIZE)):
        parts = step_bytes(shape, beams)
        total = sum(parts.values())
        memory_ms = total / 1e9 / bandwidth * 1e3
        compute_ms = step_flops(shape, beams) / peak * 1e3
        floor_ms = max(memory_ms, compute_ms)
        gemm_ms = gemm_loop_ms(shape, beams, args.repeats)
        print(f"{part} ({shape.batch_size * beams} rows): reads >= {total / 1e6:.0f} MB per step ("
              + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in parts.items())
              + f"): {memory_ms:.1f} ms; {step_flops(shape, beams) / 1e9:.2f} GFLOP: "
              f"{compute_ms:.1f} ms; weight matmuls alone (XLA) {gemm_ms:.1f} ms per step")
        if args.marian_jsonl:
            hf = ms_per_position(args.marian_jsonl, "torch_hf", part, args.shape)
            ours = ms_per_position(args.marian_jsonl, "jax", part, args.shape)
            if hf and ours:
                print(f"  per generated position (encoder included): ours {ours:.1f} ms, HF "
                      f"{hf:.1f} ms ({hf / ours:.2f}x); best ours/HF at the floor "
                      f"{hf / floor_ms:.2f}x, with the weight matmuls alone {hf / gemm_ms:.2f}x")


if __name__ == "__main__":
    main()
