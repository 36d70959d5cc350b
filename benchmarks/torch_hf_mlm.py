"""The reference point: a Hugging Face PyTorch `BertForMaskedLM` train step of the same shape.

Random init, float32, dropout 0.1 (hidden and attention, as `experiments/bert_mlm.py`),
AdamW (lr, betas, eps, weight decay 0.01 without decay on biases/LayerNorm, global-norm
clipping at 1.0: the bert_mlm optimizer settings), one fixed batch of random tokens with
15% of the positions per row labelled and the rest -100, `torch.set_num_threads(cores)`.
HF's MLM head is dense: it computes the vocabulary logits at all L positions.

Runs under any interpreter with torch and transformers (this script names none):
  /path/to/torch-venv/bin/python benchmarks/torch_hf_mlm.py --shape small --out results.jsonl

Prints one `RESULT {json}` line per shape; each shape runs in a fresh subprocess so
`peak_rss_mb` (ru_maxrss of the whole process) is per configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: framework-free helpers)

# The optimizer settings of experiments/bert_mlm.py (kept here: this runs without ml_collections).
ADAMW = {"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
GRAD_CLIP_NORM = 1.0
DROPOUT = 0.1


def build_model(shape: common.Shape, attn_implementation: str):
    """A randomly initialised HF BertForMaskedLM (tied output embeddings, no pooler)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_dim,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        intermediate_size=shape.mlp_dim, hidden_act="gelu", hidden_dropout_prob=DROPOUT,
        attention_probs_dropout_prob=DROPOUT, max_position_embeddings=512, type_vocab_size=2,
        layer_norm_eps=1e-12, initializer_range=0.02, tie_word_embeddings=True,
        attn_implementation=attn_implementation)
    return BertForMaskedLM(config)


def build_optimizer(model, foreach: bool | None):
    """AdamW with decay on weights only (not biases or LayerNorm), like encoder_jax.optim.decay_mask."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": ADAMW["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"],
                             foreach=foreach)


def random_batch(shape: common.Shape, seed: int) -> dict[str, Any]:
    """Random ids, all-ones attention mask, MASK_RATE of the positions of each row labelled."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, shape.vocab_size, (shape.batch_size, shape.seq_len), generator=gen)
    labelled = round(common.MASK_RATE * shape.seq_len)
    order = torch.rand(shape.batch_size, shape.seq_len, generator=gen).argsort(dim=1)
    labels = torch.full_like(ids, -100)
    rows = torch.arange(shape.batch_size)[:, None]
    labels[rows, order[:, :labelled]] = ids[rows, order[:, :labelled]]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids), "labels": labels}


def train_step(model, optimizer, batch: dict[str, Any]) -> float:
    """Forward, backward, clip, AdamW update; returns the loss."""
    import torch

    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def count_flops(model, optimizer, batch: dict[str, Any]) -> float | None:
    """FLOPs of one forward+backward, counted by torch.utils.flop_counter (matmuls/attention)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure_peak_flops(dim: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 matmul FLOP/s (the same probe as encoder_jax.train.measure_peak_flops)."""
    import torch

    x = torch.ones(dim, dim)
    torch.mm(x, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(x, x)
        times.append(time.perf_counter() - t0)
    return 2 * dim ** 3 / common.median(times)


def run_one(shape_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measures one shape in this process."""
    shape = dataclasses.replace(common.SHAPES[shape_name],
                                **({"batch_size": args.batch_size} if args.batch_size else {}))
    rss_start = common.current_rss_bytes()
    import torch
    import transformers

    rss_import = common.current_rss_bytes()
    threads = args.threads or common.usable_cores()
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")  # plain float32 matmuls (no bf16/TF32 shortcuts)
    torch.manual_seed(0)
    model = build_model(shape, args.attn_implementation).train()
    optimizer = build_optimizer(model, {"default": None, "on": True, "off": False}[args.foreach])
    batches = [random_batch(shape, seed=s) for s in range(2)]
    flops = count_flops(model, optimizer, batches[0])
    peak = args.peak_flops or measure_peak_flops()
    steps = args.base_steps if shape_name == "base" and args.base_steps else args.steps
    for i in range(args.warmup):
        train_step(model, optimizer, batches[i % 2])
    reset_ok = common.reset_peak_rss()
    times, loss, cpu0 = [], float("nan"), time.process_time()
    with common.ContentionMeter() as contention:
        for i in range(steps):
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, batches[(args.warmup + i) % 2])
            times.append(time.perf_counter() - t0)
    cpu_per_step = (time.process_time() - cpu0) / max(steps, 1)
    step_time = common.median(times)
    analytic = common.train_flops_per_step(shape, shape.seq_len)  # dense head: all L positions
    return {
        "framework": "torch_hf", "shape": shape_name, **dataclasses.asdict(shape),
        "steps": steps, "warmup": args.warmup, "step_time_s": step_time,
        "step_times_s": [round(t, 4) for t in times], "cpu_s_per_step": cpu_per_step,
        "other_cpu_share": contention.other_share,
        "tokens_per_s": shape.tokens_per_step / step_time,
        "flops_per_step_counted": flops, "flops_per_step_analytic": analytic,
        "peak_flops": peak, "peak_flops_source": "--peak_flops" if args.peak_flops else "measured",
        "mfu_counted": flops / (step_time * peak) if flops else None,
        "mfu_analytic": analytic / (step_time * peak), "loss": loss,
        "rss_start_mb": rss_start / 2 ** 20, "rss_after_import_mb": rss_import / 2 ** 20,
        "steady_peak_rss_mb": common.hwm_rss_bytes() / 2 ** 20 if reset_ok else None,
        "peak_rss_mb": common.peak_rss_bytes() / 2 ** 20,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "optimizer_foreach": args.foreach, "threads": threads,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        **common.machine_info(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", help="comma-separated: tiny, small, base")
    p.add_argument("--batch_size", type=int, default=0, help="override the shape's batch (0: keep)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median is reported)")
    p.add_argument("--base_steps", type=int, default=3, help="timed steps for `base` (0: --steps)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all usable cores)")
    p.add_argument("--attn_implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--foreach", default="default", choices=("default", "on", "off"),
                   help="torch.optim.AdamW(foreach=...): default lets torch choose")
    p.add_argument("--peak_flops", type=float, default=0.0,
                   help="FLOP/s for MFU (0: measure torch's float32 matmul peak)")
    p.add_argument("--out", default="", help="append one JSON line per shape to this file")
    p.add_argument("--in_process", action="store_true", help="measure in this process")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measures each --shape, in a fresh subprocess unless --in_process."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    shapes = [s for s in args.shape.split(",") if s]
    for name in shapes:
        if name not in common.SHAPES:
            raise SystemExit(f"--shape {name!r}; valid: {sorted(common.SHAPES)}")
    for name in shapes:
        record = (run_one(name, args) if args.in_process
                  else common.spawn(__file__, name, common.strip_flag(common.strip_flag(argv, "--shape"), "--out")))
        common.emit(record, args.out or None)
        print(common.summary_line(record, "torch_hf", "flops_per_step_counted", "mfu_counted"), flush=True)


if __name__ == "__main__":
    main()
