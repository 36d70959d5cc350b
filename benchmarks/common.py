"""Framework-free helpers shared by the benchmark scripts (no jax, no torch imports).

Both `mlm_step.py` (JAX) and `torch_hf_mlm.py` (PyTorch) import this module, so
the shapes, the analytic FLOP model and the memory/load probes are identical on
both sides of a comparison.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Iterable


@dataclasses.dataclass(frozen=True)
class Shape:
    """A benchmark shape: encoder size plus the batch it is timed with."""

    num_layers: int
    hidden_dim: int
    num_heads: int
    mlp_dim: int
    vocab_size: int
    seq_len: int
    batch_size: int

    @property
    def tokens_per_step(self) -> int:
        """B x L: every token of a synthetic row is real (no padding)."""
        return self.batch_size * self.seq_len


# `base` uses batch 8 (1024 tokens): a train step is already 5-10 s on 2 cores.
SHAPES: dict[str, Shape] = {
    # experiments/bert_mlm.py's default shape (the CPU recipe's size).
    "tiny": Shape(num_layers=2, hidden_dim=128, num_heads=2, mlp_dim=512,
                  vocab_size=8000, seq_len=128, batch_size=32),
    "small": Shape(num_layers=4, hidden_dim=256, num_heads=4, mlp_dim=1024,
                   vocab_size=32000, seq_len=128, batch_size=32),
    "base": Shape(num_layers=12, hidden_dim=768, num_heads=12, mlp_dim=3072,
                  vocab_size=30522, seq_len=128, batch_size=8),
}

MASK_RATE = 0.15  # fraction of positions that get an MLM label, on both sides


def max_predictions(seq_len: int, rate: float = MASK_RATE) -> int:
    """Prediction slots per row, as `encoder_jax.tasks.mlm.build` derives them: ceil(rate*L)+1."""
    return math.ceil(rate * seq_len) + 1


def forward_flops_per_row(shape: Shape, head_positions: int) -> float:
    """Matmul FLOPs of one row's forward pass (2 per multiply-add).

    Counts the Q/K/V/output projections, the two attention matmuls, the FFN and
    the MLM head (transform D->D plus tied output D->V) at `head_positions`
    positions per row. Embedding lookups, LayerNorm, softmax, GELU and the
    (tiny, unused-by-the-loss) pooler are left out, as in the usual
    6 * params * tokens accounting.
    """
    d, f, length = shape.hidden_dim, shape.mlp_dim, shape.seq_len
    per_token_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * length * d
    encoder = shape.num_layers * per_token_layer * length
    head = head_positions * 2 * (d * d + d * shape.vocab_size)
    return float(encoder + head)


def train_flops_per_step(shape: Shape, head_positions: int) -> float:
    """Analytic train-step FLOPs: forward + backward (2x forward) over the batch."""
    return 3.0 * shape.batch_size * forward_flops_per_row(shape, head_positions)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def reset_peak_rss() -> bool:
    """Resets the kernel's high-water mark (VmHWM) of this process; False where unsupported.

    Used to measure the steady-state peak of the timed steps separately from
    compilation / first-step peaks. ru_maxrss is NOT reset by this, so the
    whole-process peak stays available.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_rss_bytes() -> int:
    """VmHWM (peak RSS since the last `reset_peak_rss`), or ru_maxrss without /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def system_busy_seconds() -> float:
    """CPU-seconds all processes have spent busy since boot (/proc/stat; nan without it)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """Share of the machine's CPU taken by OTHER processes while a block runs.

    On a shared machine wall-clock numbers mean little without it: 0.0 is a
    quiet machine, 0.5 means others kept half of all cores busy.
    """

    def __enter__(self) -> "ContentionMeter":
        self.wall0, self.busy0 = time.perf_counter(), system_busy_seconds()
        self.own0 = own_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.wall0
        others = (system_busy_seconds() - self.busy0) - (own_cpu_seconds() - self.own0)
        self.other_share = max(0.0, others) / (wall * (os.cpu_count() or 1)) if wall > 0 else float("nan")


def own_cpu_seconds() -> float:
    """CPU-seconds of this process and its threads (user + system), children excluded."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_share(seconds: float = 2.0) -> float:
    """Fraction of all cores busy (any process) over the next `seconds`."""
    busy0, t0 = system_busy_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (system_busy_seconds() - busy0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the CPU is shared, so quote them with results)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under `taskset`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "load_avg": load_average(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def median(values: Iterable[float]) -> float:
    """The median of `values` as a float."""
    return float(statistics.median(list(values)))


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag value` / `flag=value` (a parent re-invoking itself per shape)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            out.append(item)
    return out


def append_jsonl(record: dict[str, Any], out_path: str) -> None:
    """Appends one JSON line to `out_path`."""
    with open(out_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def emit(record: dict[str, Any], out_path: str | None) -> None:
    """Prints one JSON line (prefixed, so a parent process can find it) and appends it to a file."""
    print("RESULT " + json.dumps(record, sort_keys=True), flush=True)
    if out_path:
        append_jsonl(record, out_path)


def parse_result(stdout: str) -> dict[str, Any]:
    """The last `RESULT {...}` line of a child benchmark's stdout."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise ValueError("no RESULT line in the benchmark output:\n" + stdout[-2000:])


def spawn(script: str, shape_name: str, argv: list[str], env: dict[str, str] | None = None
          ) -> dict[str, Any]:
    """Runs `script` for one shape in a fresh interpreter (for a per-configuration peak RSS)."""
    cmd = [sys.executable, os.path.abspath(script), *argv, "--shape", shape_name, "--in_process"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{os.path.basename(script)} on shape {shape_name!r} failed "
                           f"(exit {proc.returncode})")
    return parse_result(proc.stdout)


def summary_line(r: dict[str, Any], framework: str, flops_key: str, mfu_key: str) -> str:
    """One human-readable line of a result record."""
    mfu = r[mfu_key] if r[mfu_key] is not None else r["mfu_analytic"]
    counted = flops_key.removeprefix("flops_per_step_")
    return (f"[{framework} {r['shape']} B={r['batch_size']} L={r['seq_len']}] "
            f"{r['tokens_per_s']:,.0f} tok/s | step {r['step_time_s'] * 1e3:.0f} ms "
            f"(median of {r['steps']}, {r['cpu_s_per_step']:.2f} CPU-s) | FLOPs/step {counted} "
            f"{r[flops_key] or 0:.3e} analytic {r['flops_per_step_analytic']:.3e} | MFU "
            f"{100 * mfu:.1f}% of {r['peak_flops'] / 1e9:.0f} GFLOP/s | peak RSS "
            f"{r['peak_rss_mb']:.0f} MiB | others used {100 * r['other_cpu_share']:.0f}% of the CPU "
            f"| load {r['load_avg']}")
