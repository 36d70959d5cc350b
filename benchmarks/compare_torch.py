"""encoder_jax MLM train step vs Hugging Face PyTorch BertForMaskedLM, side by side.

Alternates the two benchmarks for `--rounds` rounds (the order flips every
round), each trial in a fresh subprocess (so each peak RSS is that trial's
own), then prints a table of medians and the jax/torch ratios.

On a shared machine each trial first waits (briefly) for the other processes
to go quiet, and every trial records the CPU share other processes took while
it was timed: contention hurts PyTorch's OpenMP threads far more than XLA's
thread pool, so contended trials flatter encoder_jax.

Usage (from the repository root, with this project's venv):
  python benchmarks/compare_torch.py --torch_python /path/to/torch-venv/bin/python
  python benchmarks/compare_torch.py --torch_python ... --shapes small,base --out results.jsonl

The torch interpreter needs torch and transformers; this script names no path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (benchmarks/common.py: framework-free helpers)

TARGET_RATIO = 1.5  # issue 2: tokens/s of encoder_jax >= 1.5x HF PyTorch at the small shape


def trial_command(framework: str, shape: str, steps: int, args: argparse.Namespace) -> list[str]:
    """The command line of one fresh-process trial."""
    common_args = ["--shape", shape, "--steps", str(steps), "--base_steps", "0",
                   "--warmup", str(args.warmup), "--in_process"]
    pin = ["taskset", "-c", f"0-{args.cores - 1}"] if args.cores else []
    if framework == "jax":
        cmd = [*pin, sys.executable, os.path.join(HERE, "mlm_step.py"), *common_args]
        return cmd + ([f"--xla_flags={args.xla_flags}"] if args.xla_flags is not None else [])
    return [*pin, args.torch_python, os.path.join(HERE, "torch_hf_mlm.py"), *common_args]


# glibc's malloc settings of `parallel.keep_freed_host_memory`, as the torch process's tunables
KEEP_FREED_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                       "glibc.malloc.trim_threshold=2147483647")


def trial_env(framework: str, host_malloc: str) -> dict[str, str]:
    """The environment of one trial under `--host_malloc`, glibc's malloc policy.

    keep: both keep freed memory (encoder_jax's default, `parallel.keep_freed_host_memory`;
    torch through GLIBC_TUNABLES). default: glibc's defaults for both. as_shipped: each
    framework as it runs out of the box (encoder_jax keeps, torch has glibc's defaults).
    """
    env = dict(os.environ, ENCODER_JAX_HOST_MALLOC="default" if host_malloc == "default" else "keep")
    env.pop("GLIBC_TUNABLES", None)
    if framework == "torch" and host_malloc == "keep":
        env["GLIBC_TUNABLES"] = KEEP_FREED_TUNABLES
    return env


def add_host_malloc_flag(parser: argparse.ArgumentParser) -> None:
    """`--host_malloc` (see `trial_env`), shared with compare_marian.py."""
    parser.add_argument("--host_malloc", default="keep", choices=("keep", "default", "as_shipped"),
                        help="glibc malloc policy: keep (both keep freed memory: encoder_jax's "
                             "default, parallel.keep_freed_host_memory; GLIBC_TUNABLES for torch), "
                             "default (glibc's own for both) or as_shipped (each out of the box)")


def run_trial(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs one benchmark process (in `env`, default this one's) and returns its RESULT record."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"trial failed (exit {proc.returncode}): {' '.join(cmd)}")
    return common.parse_result(proc.stdout)


def wait_for_quiet(threshold: float, max_wait_s: float) -> tuple[float, float]:
    """Waits (up to `max_wait_s`) until other processes keep < `threshold` of the CPU busy.

    Returns (busy share when the trial starts, seconds waited). The trial runs
    anyway after `max_wait_s`; its `other_cpu_share` then tells how contended it was.
    """
    started = time.perf_counter()
    share = common.machine_busy_share(2.0)
    while share > threshold and time.perf_counter() - started < max_wait_s:
        time.sleep(3.0)
        share = common.machine_busy_share(2.0)
    return share, time.perf_counter() - started


def run_rounds(shape: str, rounds: int, steps: int, args: argparse.Namespace
               ) -> dict[str, list[dict[str, Any]]]:
    """Alternating trials: jax first in even rounds, torch first in odd rounds."""
    records: dict[str, list[dict[str, Any]]] = {"jax": [], "torch": []}
    for index in range(rounds):
        order = ("jax", "torch") if index % 2 == 0 else ("torch", "jax")
        for framework in order:
            busy, waited = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            record = run_trial(trial_command(framework, shape, steps, args),
                               trial_env(framework, args.host_malloc))
            record["host_malloc_policy"] = args.host_malloc
            record.update(round=index, busy_share_before=busy, quiet_wait_s=waited)
            records[framework].append(record)
            print(f"  round {index + 1}/{rounds} {framework:5s} {shape}: "
                  f"{record['tokens_per_s']:8,.0f} tok/s  step {record['step_time_s']:.3f} s  "
                  f"{record['cpu_s_per_step']:.2f} CPU-s/step  peak RSS {record['peak_rss_mb']:,.0f} MiB  "
                  f"others {100 * record['other_cpu_share']:.0f}% of CPU (waited {waited:.0f} s)  "
                  f"load {record['load_avg']}", flush=True)
            if args.out:
                common.append_jsonl(record, args.out)
    return records


def med(records: list[dict[str, Any]], key: str | Callable[[dict[str, Any]], float]) -> float:
    """Median of a field (or of a function of the record) over trials."""
    get = key if callable(key) else (lambda r: r[key])
    values = [get(r) for r in records if get(r) is not None]
    return common.median(values) if values else float("nan")


def summarize(shape: str, records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over trials, both sides, plus the ratios the issue asks for."""
    jx, th = records["jax"], records["torch"]
    peak_common = max(med(jx, "peak_flops"), med(th, "peak_flops"))
    out = {"shape": shape, "rounds": len(jx), "batch_size": jx[0]["batch_size"],
           "seq_len": jx[0]["seq_len"], "max_predictions": jx[0]["max_predictions"],
           "usable_cores": jx[0].get("usable_cores"),
           "peak_flops_common": peak_common}
    for name, recs, counted in (("jax", jx, "flops_per_step_xla"),
                                ("torch", th, "flops_per_step_counted")):
        flops = med(recs, counted)
        step = med(recs, "step_time_s")
        out[name] = {
            "tokens_per_s": med(recs, "tokens_per_s"),
            "tokens_per_s_min": min(r["tokens_per_s"] for r in recs),
            "tokens_per_s_max": max(r["tokens_per_s"] for r in recs),
            "step_time_s": step, "cpu_s_per_step": med(recs, "cpu_s_per_step"),
            "tokens_per_cpu_s": med(recs, lambda r: r["batch_size"] * r["seq_len"] / r["cpu_s_per_step"]),
            "flops_per_step_analytic": med(recs, "flops_per_step_analytic"),
            "flops_per_step_counted": flops, "achieved_flops": flops / step,
            "peak_flops_own": med(recs, "peak_flops"),
            "mfu_own_peak": med(recs, lambda r, c=counted: r[c] / (r["step_time_s"] * r["peak_flops"])),
            "mfu_common_peak": flops / (step * peak_common),
            "peak_rss_mb": med(recs, "peak_rss_mb"),
            "steady_peak_rss_mb": med(recs, "steady_peak_rss_mb"),
            "rss_after_import_mb": med(recs, "rss_after_import_mb"),
            "other_cpu_share": [round(r["other_cpu_share"], 2) for r in recs],
            "load_avg_1m": [r["load_avg"][0] for r in recs if r["load_avg"]],
        }
    out["jax"]["flops_per_step_analytic_dense_head"] = med(jx, "flops_per_step_analytic_dense_head")
    out["tokens_per_s_ratio"] = out["jax"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
    out["achieved_flops_ratio"] = out["jax"]["achieved_flops"] / out["torch"]["achieved_flops"]
    out["peak_rss_ratio"] = out["jax"]["peak_rss_mb"] / out["torch"]["peak_rss_mb"]
    return out


def table(s: dict[str, Any]) -> str:
    """The side-by-side table of one shape's summary."""
    j, t = s["jax"], s["torch"]
    rows = [
        ("tokens/s (median of trials)", j["tokens_per_s"], t["tokens_per_s"], "{:,.0f}"),
        ("  min .. max", f"{j['tokens_per_s_min']:,.0f} .. {j['tokens_per_s_max']:,.0f}",
         f"{t['tokens_per_s_min']:,.0f} .. {t['tokens_per_s_max']:,.0f}", None),
        ("step time (s)", j["step_time_s"], t["step_time_s"], "{:.3f}"),
        ("CPU-seconds per step", j["cpu_s_per_step"], t["cpu_s_per_step"], "{:.2f}"),
        ("tokens per CPU-second", j["tokens_per_cpu_s"], t["tokens_per_cpu_s"], "{:,.0f}"),
        ("train FLOPs/step, analytic", j["flops_per_step_analytic"], t["flops_per_step_analytic"], "{:.3e}"),
        ("train FLOPs/step, counted (XLA | torch)", j["flops_per_step_counted"],
         t["flops_per_step_counted"], "{:.3e}"),
        ("achieved GFLOP/s (counted / step)", j["achieved_flops"] / 1e9, t["achieved_flops"] / 1e9, "{:.1f}"),
        ("f32 matmul peak, own probe (GFLOP/s)", j["peak_flops_own"] / 1e9, t["peak_flops_own"] / 1e9, "{:.0f}"),
        ("MFU vs own peak", 100 * j["mfu_own_peak"], 100 * t["mfu_own_peak"], "{:.1f}%"),
        (f"MFU vs common peak ({s['peak_flops_common'] / 1e9:.0f} GFLOP/s)", 100 * j["mfu_common_peak"],
         100 * t["mfu_common_peak"], "{:.1f}%"),
        ("peak RSS, whole process (MiB)", j["peak_rss_mb"], t["peak_rss_mb"], "{:,.0f}"),
        ("peak RSS, timed steps only (MiB)", j["steady_peak_rss_mb"], t["steady_peak_rss_mb"], "{:,.0f}"),
        ("RSS after imports (MiB)", j["rss_after_import_mb"], t["rss_after_import_mb"], "{:,.0f}"),
        ("others' CPU share in timed steps", j["other_cpu_share"], t["other_cpu_share"], None),
        ("1-min load average per trial", j["load_avg_1m"], t["load_avg_1m"], None),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"shape {s['shape']}: B={s['batch_size']} L={s['seq_len']}, {s['rounds']} alternating rounds, "
             f"{s['usable_cores']} cores",
             f"{'':{width}s}{'encoder_jax':>20s}{'HF torch':>20s}{'jax/torch':>11s}"]
    for label, a, b, fmt in rows:
        if fmt is None:
            lines.append(f"{label:{width}s}{str(a):>20s}{str(b):>20s}")
            continue
        ratio = a / b if b else float("nan")
        lines.append(f"{label:{width}s}{fmt.format(a):>20s}{fmt.format(b):>20s}{ratio:>10.2f}x")
    lines.append(
        f"note: encoder_jax's MLM head is sparse: vocabulary logits at P={s['max_predictions']} of "
        f"L={s['seq_len']} positions per row; HF's head is dense (all L). Analytic train FLOPs/step: "
        f"{j['flops_per_step_analytic']:.3e} (ours) vs {t['flops_per_step_analytic']:.3e} (HF), so "
        f"HF does {t['flops_per_step_analytic'] / j['flops_per_step_analytic']:.2f}x the work per step. "
        f"Ours with a dense head would be {j['flops_per_step_analytic_dense_head']:.3e}.")
    lines.append(f"work-normalised (achieved FLOP/s) ratio: {s['achieved_flops_ratio']:.2f}x")
    return "\n".join(lines)


def verdict(s: dict[str, Any]) -> str:
    """The issue's acceptance check (meant for the small shape)."""
    speed_ok = s["tokens_per_s_ratio"] >= TARGET_RATIO
    memory_ok = s["jax"]["peak_rss_mb"] <= s["torch"]["peak_rss_mb"]
    return (f"target ({s['shape']}): tokens/s ratio {s['tokens_per_s_ratio']:.2f}x >= {TARGET_RATIO}x: "
            f"{'PASS' if speed_ok else 'FAIL'}; peak RSS {s['jax']['peak_rss_mb']:,.0f} <= "
            f"{s['torch']['peak_rss_mb']:,.0f} MiB: {'PASS' if memory_ok else 'FAIL'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch_python", required=True,
                   help="python interpreter with torch + transformers (e.g. another venv's bin/python)")
    p.add_argument("--shapes", default="small", help="comma-separated: tiny, small, base")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds for `small`")
    p.add_argument("--base_rounds", type=int, default=1, help="alternating rounds for `base`")
    p.add_argument("--steps", type=int, default=6, help="timed steps per trial (small)")
    p.add_argument("--base_steps", type=int, default=2, help="timed steps per trial (base)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per trial")
    p.add_argument("--quiet_threshold", type=float, default=0.2,
                   help="before each trial, wait until the machine is busier than this share no more")
    p.add_argument("--quiet_wait", type=float, default=15.0,
                   help="at most this many seconds of waiting per trial (0: never wait)")
    add_host_malloc_flag(p)
    p.add_argument("--cores", type=int, default=0,
                   help="pin both sides to the first N cores with taskset (0: all; torch threads follow)")
    p.add_argument("--xla_flags", default=None, help="passed to mlm_step.py (default: its own)")
    p.add_argument("--out", default="", help="append every trial and the summaries as JSON lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Runs the alternating trials and prints one table per shape."""
    args = parse_args(argv)
    started = time.time()
    print(f"machine: {common.machine_info()}", flush=True)
    summaries = []
    for shape in [s for s in args.shapes.split(",") if s]:
        if shape not in common.SHAPES:
            raise SystemExit(f"--shapes {shape!r}; valid: {sorted(common.SHAPES)}")
        base = shape == "base"
        records = run_rounds(shape, args.base_rounds if base else args.rounds,
                             args.base_steps if base else args.steps, args)
        summary = summarize(shape, records)
        summaries.append(summary)
        if args.out:
            common.append_jsonl({"summary": True, **summary}, args.out)
    print()
    for summary in summaries:
        print(table(summary))
        print(verdict(summary))
        print()
    print(f"total {time.time() - started:.0f} s; load average now {common.load_average()}")


if __name__ == "__main__":
    main()
