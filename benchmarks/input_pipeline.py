"""Input-pipeline cost: CPU and wall milliseconds per training batch, with no train step.

On a CPU the input thread shares the cores with the step, so every millisecond of CPU it
spends per batch is taken from training. This builds a task's training stream from an
experiment config exactly as `launch.py` does (tokenizer, encoding, shuffling, packing or
length grouping, grain read options), skips `--warmup` batches, then times `--batches`
batches, `--repeats` times; it prints the median CPU (process time: all threads) and wall
time per batch, and tokens per batch.

Usage (from the repository root; any `--config.*` override as on the launch command line):
  python benchmarks/input_pipeline.py --config experiments/classify_news.py:thucnews \
      --set tokenizer.model_file=runs/pre_thuc/tokenizer.model
  python benchmarks/input_pipeline.py --config experiments/bert_mlm.py \
      --set data.files.train=$DATA/ag_news/train.csv.gz,$DATA/enwiki_extract/train.00.txt.gz \
      --set data.files.validation=$DATA/ag_news/dev.csv.gz --set data.text_column=1,2 \
      --set tokenizer.model_file=runs/pre_ag/tokenizer.model --batches 60
Without `tokenizer.model_file` (or `init_from`) the task first trains a tokenizer, which is
not timed.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time

from encoder_jax import api, tasks


def parse_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001, 'True' -> True, 'None' -> None; anything else (paths,
    '1,2') stays the string, as the launch command line reads it."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (bool, int, float, type(None))) else text


def time_batches(stream, warmup: int, batches: int) -> dict[str, float]:
    """Median-ready numbers of one timed window: cpu_ms, wall_ms per batch, tokens per batch."""
    iterator = iter(stream)
    for _ in range(warmup):
        next(iterator)
    tokens = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(iterator)
        tokens += int((batch["segment_ids"] > 0).sum())
    return {"cpu_ms": (time.process_time() - cpu) / batches * 1e3,
            "wall_ms": (time.perf_counter() - wall) / batches * 1e3, "tokens": tokens / batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiments/<file>.py[:variant]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. data.batch_size=64 (repeatable)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = api.load_config(args.config)
    for item in args.set:
        key, equals, text = item.partition("=")
        if not equals:
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. data.batch_size=64")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"unknown config key {key!r}")
        try:
            node[leaf] = parse_value(text)
        except TypeError:  # a string field given digits ('0'): the text, as launch reads it
            node[leaf] = text
    task = tasks.load(config.task).build(config, None)
    runs = [time_batches(task.train_data, args.warmup, args.batches) for _ in range(args.repeats)]
    summary = {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
    print(f"{args.config} {' '.join(args.set)}")
    print(f"input pipeline, median of {args.repeats} x {args.batches} batches: "
          f"{summary['cpu_ms']} ms CPU, {summary['wall_ms']} ms wall per batch, "
          f"{summary['tokens']:.0f} real tokens per batch")


if __name__ == "__main__":
    main()
