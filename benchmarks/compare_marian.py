"""encoder_jax translation model vs Hugging Face PyTorch MarianMTModel, side by side.

Three measurements per framework, each trial a fresh subprocess (so each peak RSS is that
trial's own): the train step (`--part train`), greedy decoding and beam-4 decoding of
`new_tokens` per row (`translate_step.py` and `torch_hf_marian.py`). `--repeats` rounds,
the framework order flipping every round; then one table of medians over the rounds and
the ours / HF ratios. Before each trial it waits (briefly) for the machine to go quiet and
every trial records the CPU share other processes took while it was timed (see
benchmarks/README.md: contention flatters encoder_jax).

Usage (from the repository root, with this project's venv; the torch interpreter needs
torch and transformers, this script names no path):
  python benchmarks/compare_marian.py --torch_python /path/to/torch-venv/bin/python --shape tiny \\
      --repeats 1 --steps 2 --decode_steps 2 --quiet_wait 0     # checks that everything runs
  python benchmarks/compare_marian.py --torch_python /path/to/torch-venv/bin/python \\
      --shape marian --repeats 3 --out marian.jsonl             # the real comparison
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (benchmarks/common.py: framework-free helpers)
import compare_torch  # noqa: E402  (run_trial, wait_for_quiet, med: framework-free)
import translate_step as shared  # noqa: E402  (shapes, parts: no jax at module level)

FRAMEWORKS = {"jax": ("translate_step.py", "flops_per_step_xla"),
              "torch": ("torch_hf_marian.py", "flops_per_step_counted")}


def trial_command(framework: str, shape: str, part: str, args: argparse.Namespace) -> list[str]:
    """The command line of one fresh-process trial."""
    script, _ = FRAMEWORKS[framework]
    flags = ["--shape", shape, "--part", part, "--steps", str(args.steps),
             "--decode_steps", str(args.decode_steps), "--warmup", str(args.warmup),
             "--attention_dropout", str(args.attention_dropout), "--in_process"]
    pin = ["taskset", "-c", f"0-{args.cores - 1}"] if args.cores else []
    if framework == "jax":
        extra = [f"--xla_flags={args.xla_flags}"] if args.xla_flags is not None else []
        return [*pin, sys.executable, os.path.join(HERE, script), *flags, *extra]
    return [*pin, args.torch_python, os.path.join(HERE, script), *flags]


def run_rounds(shape: str, parts: list[str], args: argparse.Namespace
               ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """All trials: per round and part, jax first in even rounds, torch first in odd rounds."""
    records: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for index in range(args.repeats):
        order = ("jax", "torch") if index % 2 == 0 else ("torch", "jax")
        for part in parts:
            for framework in order:
                busy, waited = compare_torch.wait_for_quiet(args.quiet_threshold, args.quiet_wait)
                record = compare_torch.run_trial(trial_command(framework, shape, part, args),
                                                 compare_torch.trial_env(framework, args.host_malloc))
                record["host_malloc_policy"] = args.host_malloc
                record.update(round=index, busy_share_before=busy, quiet_wait_s=waited)
                records.setdefault((part, framework), []).append(record)
                print(f"  round {index + 1}/{args.repeats} {framework:5s} {part:6s}: "
                      f"{record['tokens_per_s']:9,.0f} tok/s  {record['step_time_s']:.3f} s/call  "
                      f"{record['cpu_s_per_step']:.2f} CPU-s/call  peak RSS "
                      f"{record['peak_rss_mb']:,.0f} MiB  others {100 * record['other_cpu_share']:.0f}% "
                      f"of CPU (waited {waited:.0f} s)  load {record['load_avg']}", flush=True)
                if args.out:
                    common.append_jsonl(record, args.out)
    return records


def summarize(shape: str, records: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the rounds per (part, framework), and the ours / HF ratios."""
    med = compare_torch.med
    out: dict[str, Any] = {"shape": shape, "shape_fields": dataclasses.asdict(shared.SHAPES[shape]),
                           "rounds": max(len(recs) for recs in records.values()), "parts": {}}
    for (part, framework), recs in records.items():
        counted = FRAMEWORKS[framework][1]
        entry = {key: med(recs, key) for key in (
            "tokens_per_s", "step_time_s", "cpu_s_per_step", "peak_rss_mb", "steady_peak_rss_mb",
            "rss_after_import_mb")}
        entry.update(rounds=len(recs), tokens_per_s_min=min(r["tokens_per_s"] for r in recs),
                     tokens_per_s_max=max(r["tokens_per_s"] for r in recs),
                     other_cpu_share=[round(r["other_cpu_share"], 2) for r in recs],
                     load_avg_1m=[r["load_avg"][0] for r in recs if r["load_avg"]],
                     settings=recs[0]["settings"], batch_size=recs[0]["batch_size"])
        if part == "train":
            entry.update(flops_per_step_analytic=med(recs, "flops_per_step_analytic"),
                         flops_per_step_counted=med(recs, counted),
                         peak_flops_own=med(recs, "peak_flops"),
                         mfu_own_peak=med(recs, lambda r, c=counted: (r[c] or float("nan"))
                                          / (r["step_time_s"] * r["peak_flops"])))
            entry["achieved_flops"] = entry["flops_per_step_counted"] / entry["step_time_s"]
        else:
            entry.update(new_tokens=f"{min(r['new_tokens_min'] for r in recs)}.."
                                    f"{max(r['new_tokens_max'] for r in recs)}",
                         eos_before_last=sum(r["eos_before_last"] for r in recs))
            if framework == "jax":
                entry["kernel_layout_s"] = med(recs, "kernel_layout_s")
        out["parts"].setdefault(part, {})[framework] = entry
    for part, sides in out["parts"].items():
        if "jax" in sides and "torch" in sides:
            sides["tokens_per_s_ratio"] = sides["jax"]["tokens_per_s"] / sides["torch"]["tokens_per_s"]
            sides["peak_rss_ratio"] = sides["jax"]["peak_rss_mb"] / sides["torch"]["peak_rss_mb"]
    return out


def table(s: dict[str, Any]) -> str:
    """The side-by-side table: one block of rows per part."""
    f = s["shape_fields"]
    rows: list[tuple[str, Any, Any, str | None]] = []
    names = {"train": "train step", "greedy": "greedy decoding", "beam": f"beam-{shared.BEAM_SIZE} decoding"}
    for part in shared.PARTS:
        if part not in s["parts"]:
            continue
        j, t = s["parts"][part]["jax"], s["parts"][part]["torch"]
        label = names[part]
        unit = "tokens/s (source + target)" if part == "train" else "generated tokens/s"
        rows += [(f"{label}: {unit}", j["tokens_per_s"], t["tokens_per_s"], "{:,.0f}"),
                 ("  min .. max over rounds", f"{j['tokens_per_s_min']:,.0f} .. {j['tokens_per_s_max']:,.0f}",
                  f"{t['tokens_per_s_min']:,.0f} .. {t['tokens_per_s_max']:,.0f}", None),
                 ("  seconds per " + ("step" if part == "train" else "decode call"), j["step_time_s"],
                  t["step_time_s"], "{:.3f}"),
                 ("  CPU-seconds per " + ("step" if part == "train" else "decode call"),
                  j["cpu_s_per_step"], t["cpu_s_per_step"], "{:.2f}")]
        if part == "train":
            rows += [("  FLOPs/step, analytic (same for both)", j["flops_per_step_analytic"],
                      t["flops_per_step_analytic"], "{:.3e}"),
                     ("  FLOPs/step, counted (XLA | torch FlopCounter)", j["flops_per_step_counted"],
                      t["flops_per_step_counted"], "{:.3e}"),
                     ("  achieved GFLOP/s (counted / step)", j["achieved_flops"] / 1e9,
                      t["achieved_flops"] / 1e9, "{:.1f}"),
                     ("  f32 matmul peak, own probe (GFLOP/s)", j["peak_flops_own"] / 1e9,
                      t["peak_flops_own"] / 1e9, "{:.0f}"),
                     ("  MFU vs own peak (counted FLOPs)", 100 * j["mfu_own_peak"],
                      100 * t["mfu_own_peak"], "{:.1f}%")]
        else:
            rows += [("  ours: step kernels laid out once per params (s)",
                      f"{j.get('kernel_layout_s', float('nan')):.3f}", "-", None),
                     ("  new tokens per row (min..max)", j["new_tokens"], t["new_tokens"], None),
                     ("  EOS before the last new token", j["eos_before_last"], t["eos_before_last"], None)]
        rows += [("  peak RSS, whole process (MiB)", j["peak_rss_mb"], t["peak_rss_mb"], "{:,.0f}"),
                 ("  peak RSS, timed calls only (MiB)", j["steady_peak_rss_mb"],
                  t["steady_peak_rss_mb"], "{:,.0f}"),
                 ("  others' CPU share while timed", j["other_cpu_share"], t["other_cpu_share"], None)]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"shape {s['shape']}: {f['encoder_layers']}+{f['decoder_layers']} layers, d_model "
             f"{f['hidden_dim']}, {f['num_heads']} heads, FFN {f['mlp_dim']}, vocab {f['vocab_size']}, "
             f"batch {f['batch_size']}, source = target length {f['seq_len']}, {f['new_tokens']} new "
             f"tokens; medians of {s['rounds']} rounds",
             f"{'':{width}s}{'encoder_jax':>20s}{'HF Marian':>20s}{'ours/HF':>10s}"]
    for label, a, b, fmt in rows:
        if fmt is None:
            lines.append(f"{label:{width}s}{str(a):>20s}{str(b):>20s}")
            continue
        ratio = a / b if b else float("nan")
        lines.append(f"{label:{width}s}{fmt.format(a):>20s}{fmt.format(b):>20s}{ratio:>9.2f}x")
    return "\n".join(lines)


def settings_check(s: dict[str, Any]) -> str:
    """Which optimizer / loss / model settings differ between the two sides (from the records)."""
    train = s["parts"].get("train") or next(iter(s["parts"].values()))
    ours, theirs = train["jax"]["settings"], train["torch"]["settings"]
    differ = {k: (ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs))
              if ours.get(k) != theirs.get(k)}
    expected = {"pre_norm", "positions"}  # pre-LN + learned (ours) vs post-LN + sinusoidal (Marian)
    unexpected = {k: v for k, v in differ.items() if k not in expected}
    line = ("settings: optimizer, loss and dropout equal on both sides; differences by design: "
            + ", ".join(f"{k} ours {v[0]} / HF {v[1]}" for k, v in differ.items() if k in expected))
    if unexpected:
        line += "\nWARNING, settings that differ: " + ", ".join(
            f"{k} ours {v[0]} / HF {v[1]}" for k, v in unexpected.items())
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch_python", required=True,
                   help="python interpreter with torch + transformers (e.g. another venv's bin/python)")
    p.add_argument("--shape", default="marian", choices=sorted(shared.SHAPES))
    p.add_argument("--parts", default=",".join(shared.PARTS),
                   help=f"comma-separated: {', '.join(shared.PARTS)}")
    p.add_argument("--repeats", type=int, default=3, help="rounds; medians over them are reported")
    p.add_argument("--steps", type=int, default=4, help="timed train steps per trial")
    p.add_argument("--decode_steps", type=int, default=3, help="timed decode calls per trial")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per trial")
    p.add_argument("--attention_dropout", type=float, default=0.0,
                   help="both sides (MarianConfig's default 0.0; the wmt variant has 0.1)")
    p.add_argument("--quiet_threshold", type=float, default=0.2,
                   help="before each trial, wait until the machine is busier than this share no more")
    p.add_argument("--quiet_wait", type=float, default=15.0,
                   help="at most this many seconds of waiting per trial (0: never wait)")
    compare_torch.add_host_malloc_flag(p)
    p.add_argument("--cores", type=int, default=0,
                   help="pin both sides to the first N cores with taskset (0: all; torch threads follow)")
    p.add_argument("--xla_flags", default=None, help="passed to translate_step.py (default: its own)")
    p.add_argument("--out", default="", help="append every trial and the summary as JSON lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Runs the alternating trials and prints the table."""
    args = parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    for part in parts:
        if part not in shared.PARTS:
            raise SystemExit(f"--parts {part!r}; valid: {list(shared.PARTS)}")
    started = time.time()
    print(f"machine: {common.machine_info()}", flush=True)
    summary = summarize(args.shape, run_rounds(args.shape, parts, args))
    if args.out:
        common.append_jsonl({"summary": True, **summary}, args.out)
    print()
    print(table(summary))
    print(settings_check(summary))
    print("notes: train tokens count source + target (B x 2L); generated tokens/s = B x new tokens / "
          "decode time (beam: the rows' tokens, not x beams). Both sides generate exactly the new "
          "tokens per row: HF via min_new_tokens (no EOS), ours with EOS made unreachable and the "
          "last token forced to EOS by translate_batch's length limit.")
    print(f"total {time.time() - started:.0f} s; load average now {common.load_average()}")


if __name__ == "__main__":
    main()
