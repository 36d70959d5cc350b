"""Run outputs: metrics.jsonl, TensorBoard events, console progress, PNG curves.

`python -m encoder_jax.reporting WORKDIR` redraws the plots of any run.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from encoder_jax import errors
from encoder_jax.workdir import METRICS_FILE, write_text

log = logging.getLogger("encoder_jax")


@functools.cache
def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors (this
    project logs floats and strings): seconds and hundreds of MB in every run process. A torch
    or tensorboardX the process has already imported is used as it is; torch stays hidden only
    for the first import of tensorboardX (a later `import torch` works).
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


_EVENTS_FILES = itertools.count()


def events_file_suffix(kind: str) -> str:
    """A suffix that makes each writer's events file its own.

    tensorboardX names files by the second and host and opens them with "wb": a second writer
    in the same second (a text summary, a rerun) would truncate the first one's file.
    """
    return f".{kind}.{os.getpid()}.{next(_EVENTS_FILES)}"


class MetricWriter:
    """Appends {step, split, **scalars} lines to metrics.jsonl and mirrors them to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled and tensorboard:
            self._tb = summary_writer_class()(os.path.join(workdir, "tensorboard"), flush_secs=30,
                                              filename_suffix=events_file_suffix("scalars"))

    def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if _is_number(v)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)

    def drop_after(self, step: int) -> int:
        """Removes records past `step` (what a crash between checkpoints leaves before the resume
        replays those steps) and a torn last line; returns how many were dropped."""
        if not self.enabled or not os.path.isfile(self.path):
            return 0
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        kept = [line for line in lines if _record_step(line) is not None and _record_step(line) <= step]
        if len(kept) == len(lines):
            return 0
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        log.warning("%s: dropped %d records past the restored step %d (logged after its "
                    "checkpoint; the resumed run logs those steps again)", self.path,
                    len(lines) - len(kept), step)
        return len(lines) - len(kept)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _record_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a torn or foreign line."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def write_text_summary(workdir: str, tag: str, text: str, step: int) -> None:
    """A text entry (e.g. sample translations) in `tensorboard/samples/`, its own events file.

    Not beside the scalars: TensorBoard follows only the newest events file of a directory,
    so a text file written at each eval would stop the live scalar curves.
    """
    with summary_writer_class()(os.path.join(workdir, "tensorboard", "samples"),
                                filename_suffix=events_file_suffix("text")) as writer:
        writer.add_text(tag, text, step)


def _is_number(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


class Progress:
    """A one-line console bar: step, loss, tokens/s, ETA (tqdm when on a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.enabled = enabled
        self.total, self.start = total, start
        self._bar = None
        self._t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, dynamic_ncols=True, file=sys.stderr,
                             mininterval=1.0, disable=not sys.stderr.isatty())

    def update(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
        if self._bar is not None and not self._bar.disable:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        else:
            done = step - self.start
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total} {text} eta={eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt(v: float) -> str:
    if isinstance(v, int) or (abs(v) >= 100 and float(v).is_integer()):
        return f"{int(v)}"
    return f"{v:.4g}"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"{path!r} does not exist: is {workdir!r} a run's workdir?")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# Margins set from the tick labels' text: half the time of tight_layout, which draws each
# figure once more to measure it. Y labels stay short: scientific notation outside 1e-3..1e4,
# an offset for small changes on a large value.
_PLOT_MARGINS = {"right": 0.97, "bottom": 0.14, "top": 0.93}


def _left_margin(fig, ax) -> float:
    """The figure fraction the y tick labels and the axis label need (~9 px per 10-pt character)."""
    labels = ax.yaxis.get_major_formatter().format_ticks(ax.yaxis.get_majorticklocs())
    width_px = 9 * max((len(label) for label in labels), default=1) + 40
    return min(0.4, width_px / (fig.get_figwidth() * fig.dpi))


def plot_curves(workdir: str) -> list[str]:
    """Writes plots/<metric>.png for every metric in metrics.jsonl; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for r in records:
        for k, v in r.items():
            if k in ("step", "split"):
                continue
            xs, ys = series.setdefault(k, {}).setdefault(r["split"], ([], []))
            xs.append(r["step"])
            ys.append(v)
    out_dir = os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for metric, by_split in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for split, (xs, ys) in sorted(by_split.items()):
            ax.plot(xs, ys, label=split, marker="." if len(xs) < 50 else None)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=True)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.subplots_adjust(left=_left_margin(fig, ax), **_PLOT_MARGINS)
        path = os.path.join(out_dir, f"{metric.replace('/', '_')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m encoder_jax.reporting WORKDIR", file=sys.stderr)
        return 2
    try:
        for path in plot_curves(argv[1]):
            print(path)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def write_predictions(names: Sequence[str], probs_NxC, rows: Sequence[Sequence[str]], output: str
                      ) -> str:
    """predictions.jsonl: per row its label, label id, probabilities and whether it was empty."""
    lines = []
    for index, probs_C in enumerate(probs_NxC):
        best = int(np.argmax(probs_C))
        lines.append(json.dumps({"index": index, "label": names[best], "label_id": best,
                                 "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs_C)},
                                 "empty": not any(t.strip() for t in rows[index])},
                                ensure_ascii=False) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_text(output, "".join(lines))
    log.info("wrote %d predictions to %s", len(lines), output)
    return output


if __name__ == "__main__":
    sys.exit(main(sys.argv))
