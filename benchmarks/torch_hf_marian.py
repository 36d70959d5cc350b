"""The reference point: Hugging Face PyTorch `MarianMTModel` of the same shape as translate_step.py.

Random init, float32, `torch.set_num_threads(cores)`. Config matched to ours: one shared
vocabulary with tied output, d_model/heads/FFN/layers from the shape, exact GELU,
dropout 0.1, attention dropout `--attention_dropout` (0.0 by default, like ours),
no embedding scaling, pad 0, EOS 3, decoder start = our BOS 2, no forced EOS. What stays
different: Marian has sinusoidal positions and post-LN; ours learned positions and pre-LN
(with a final LayerNorm per stack).

`--part train`: forward on (source, [BOS] + target[:-1]), label-smoothed (0.1) cross-entropy
on target (`torch.nn.functional.cross_entropy(label_smoothing=0.1)`, the same formula as
`losses.output_cross_entropy`), backward, global-norm clipping at 1.0, AdamW with the
`experiments/translate_zh_en.py:wmt` settings (weight decay 0.01 not on biases/LayerNorm).
`--part greedy` / `--part beam`: `model.generate(max_new_tokens=N, min_new_tokens=N,
num_beams=1|4, do_sample=False)` over B sources: exactly N non-EOS tokens per row.

Runs under any interpreter with torch and transformers (this script names none):
  /path/to/torch-venv/bin/python benchmarks/torch_hf_marian.py --shape tiny --steps 2 --decode_steps 2
  /path/to/torch-venv/bin/python benchmarks/torch_hf_marian.py --shape marian --out results.jsonl

Prints one `RESULT {json}` line per (shape, part); each runs in a fresh subprocess so
`peak_rss_mb` (ru_maxrss of the whole process) is that measurement's own.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: framework-free helpers)
import torch_hf_mlm  # noqa: E402  (its float32 matmul peak probe; imports no torch at module level)
import translate_step as shared  # noqa: E402  (shapes, pairs, FLOP model, timing: no jax at module level)

# The optimizer and loss settings of experiments/translate_zh_en.py:wmt (kept here: this runs
# without ml_collections; compare_marian.py checks them against the JAX side's record).
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-9, "weight_decay": 0.01}
GRAD_CLIP_NORM = 1.0
LABEL_SMOOTHING = 0.1
DROPOUT = 0.1


def build_model(shape: shared.Seq2SeqShape, attention_dropout: float, attn_implementation: str):
    """A randomly initialised MarianMTModel matched to encoder_jax's EncoderDecoder."""
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=shape.vocab_size, d_model=shape.hidden_dim,
        encoder_layers=shape.encoder_layers, decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.num_heads, decoder_attention_heads=shape.num_heads,
        encoder_ffn_dim=shape.mlp_dim, decoder_ffn_dim=shape.mlp_dim,
        max_position_embeddings=shared.MAX_POSITIONS, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True, dropout=DROPOUT, attention_dropout=attention_dropout,
        activation_dropout=0.0, activation_function="gelu", scale_embedding=False,
        pad_token_id=shared.PAD_ID, eos_token_id=shared.EOS_ID,
        decoder_start_token_id=shared.BOS_ID, forced_eos_token_id=None,
        attn_implementation=attn_implementation)
    return MarianMTModel(config)


def build_optimizer(model, foreach: bool | None):
    """AdamW, decay on weights only (not biases or norms), like encoder_jax.optim.decay_mask.

    The frozen sinusoidal position tables are left out (they have no gradient).
    """
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": ADAMW["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"],
                             foreach=foreach)


def train_batch(shape: shared.Seq2SeqShape, seed: int) -> dict[str, Any]:
    """`shared.synthetic_pairs` as Marian inputs: teacher forcing on [BOS] + target[:-1]."""
    import torch

    source, target = (torch.from_numpy(x).long() for x in shared.synthetic_pairs(shape, seed))
    target_in = torch.cat([torch.full_like(target[:, :1], shared.BOS_ID), target[:, :-1]], dim=1)
    return {"input_ids": source, "attention_mask": torch.ones_like(source),
            "decoder_input_ids": target_in, "labels": target}


def loss_of(model, batch: dict[str, Any]):
    """Mean label-smoothed cross-entropy over the target tokens (all real)."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             batch["labels"].reshape(-1),
                                             label_smoothing=LABEL_SMOOTHING)


def train_step(model, optimizer, batch: dict[str, Any]) -> float:
    """Forward, backward, clip, AdamW update; returns the loss."""
    import torch

    loss = loss_of(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def count_flops(model, batch: dict[str, Any]) -> float | None:
    """FLOPs of one forward+backward of the train loss, counted by torch.utils.flop_counter."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    with FlopCounterMode(display=False) as counter:
        loss_of(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def settings(attention_dropout: float) -> dict[str, Any]:
    """The optimizer / loss / dropout settings in force (compare_marian.py checks both sides agree)."""
    return {"optimizer": "adamw", "lr": ADAMW["lr"], "betas": list(ADAMW["betas"]),
            "eps": ADAMW["eps"], "weight_decay": ADAMW["weight_decay"],
            "grad_clip_norm": GRAD_CLIP_NORM, "label_smoothing": LABEL_SMOOTHING,
            "dropout": DROPOUT, "attention_dropout": attention_dropout, "activation": "gelu",
            "pre_norm": False, "positions": "sinusoidal"}


def measure_train(model, shape: shared.Seq2SeqShape, args: argparse.Namespace) -> dict[str, Any]:
    """The train step's fields of a record."""
    model.train()
    optimizer = build_optimizer(model, {"default": None, "on": True, "off": False}[args.foreach])
    batches = [train_batch(shape, seed=s) for s in range(2)]
    flops = count_flops(model, batches[0])
    peak = args.peak_flops or torch_hf_mlm.measure_peak_flops()
    alternating = itertools.cycle(batches)
    times, loss, extra = shared.time_calls(
        lambda: train_step(model, optimizer, next(alternating)), args.warmup, args.steps)
    step_time = common.median(times)
    analytic = shared.train_flops_per_step(shape)
    return {**shared.timing_fields(times, args.steps, args.warmup, shape.tokens_per_step),
            "target_tokens_per_s": shape.batch_size * shape.seq_len / step_time,
            "flops_per_step_counted": flops, "flops_per_step_analytic": analytic,
            "peak_flops": peak, "peak_flops_source": "--peak_flops" if args.peak_flops else "measured",
            "mfu_counted": flops / (step_time * peak) if flops else None,
            "mfu_analytic": analytic / (step_time * peak), "loss": loss,
            "optimizer_foreach": args.foreach, **extra}


def measure_decode(model, shape: shared.Seq2SeqShape, part: str, args: argparse.Namespace
                   ) -> dict[str, Any]:
    """`model.generate` over B sources, exactly new_tokens per row: the record's fields."""
    import torch

    model.eval()
    source = torch.from_numpy(shared.synthetic_pairs(shape, seed=0)[0]).long()
    beams = shared.BEAM_SIZE if part == "beam" else 1
    kwargs = dict(input_ids=source, attention_mask=torch.ones_like(source),
                  max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens,
                  num_beams=beams, do_sample=False, num_return_sequences=1)

    def generate():
        with torch.inference_mode():
            return model.generate(**kwargs)

    times, out, extra = shared.time_calls(generate, args.warmup, args.decode_steps)
    new = out[:, 1:]  # after the decoder start token
    is_eos = new == shared.EOS_ID  # lengths as ours count them: up to the first EOS, included
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, new.shape[1])
    return {**shared.timing_fields(times, args.decode_steps, args.warmup,
                                   shape.batch_size * shape.new_tokens),
            "new_tokens_min": int(lengths.min()), "new_tokens_max": int(lengths.max()),
            "eos_before_last": int((new[:, :-1] == shared.EOS_ID).sum()),
            "output_shape": list(out.shape), **extra}


def run_one(shape_name: str, part: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measures one (shape, part) in this process."""
    shape = shared.chosen_shape(shape_name, args)
    rss_start = common.current_rss_bytes()
    import torch
    import transformers

    rss_import = common.current_rss_bytes()
    threads = args.threads or common.usable_cores()
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")  # plain float32 matmuls (no bf16/TF32 shortcuts)
    torch.manual_seed(0)
    model = build_model(shape, args.attention_dropout, args.attn_implementation)
    fields = (measure_train(model, shape, args) if part == "train"
              else measure_decode(model, shape, part, args))
    return {**shared.base_record("torch_hf", shape_name, part, shape), **fields,
            "settings": settings(args.attention_dropout),
            "rss_start_mb": rss_start / 2 ** 20, "rss_after_import_mb": rss_import / 2 ** 20,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "threads": threads, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = shared.base_parser(__doc__)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all usable cores)")
    p.add_argument("--attn_implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--foreach", default="default", choices=("default", "on", "off"),
                   help="torch.optim.AdamW(foreach=...): default lets torch choose")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measures each --shape and --part, in a fresh subprocess each unless --in_process."""
    argv = sys.argv[1:] if argv is None else argv
    shared.run_parts(__file__, argv, parse_args(argv), "torch_hf", run_one,
                     "flops_per_step_counted", "mfu_counted")


if __name__ == "__main__":
    main()
