"""Grid search (--mode sweep) and k-fold cross-validation (--mode cv) over `train.run`.

Each run is an independent sub-workdir, `<workdir>/point_PP/seed_R` (sweep) or
`<workdir>/point_PP/fold_R` (cv), numbered point-major, so a cluster can run
them in parallel with `--config.sweep.index=i`; a finished run (final_eval.json)
is never trained again. After the runs it was given, the driver (re)writes the
results from every finished run found:
  runs.csv                one row per run: its overrides and final metrics
  results.csv / .md       one row per grid point: mean ± std over its runs
  best.json               the best point by `sweep.metric` (default eval.best_metric)
  curve.png               with sweep.curve: the metric against that grid field (e.g. a
                          label-efficiency curve over data.max_train_examples)
With `sweep.baseline`, each run also fits the task's linear baseline on its rows
(`<run>/baseline/`), shown beside the runs in the tables and the curve.
Std is the sample standard deviation (ddof=1; 0 for a single run).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import os
from typing import Any

import numpy as np

from encoder_jax import configs, errors
from encoder_jax import workdir as workdir_lib

log = logging.getLogger("encoder_jax")

MODES = ("sweep", "cv")
TABLE_METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc_macro", "loss")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a search: which grid point, which seed / fold, where."""

    index: int
    point: int
    replica: int
    overrides: dict[str, Any]  # dotted config field -> value (grid point + seed / fold)
    workdir: str


def parse_grid(text: str | None) -> dict[str, list[Any]]:
    """'{"opt.learning_rate": [1e-4, 3e-4]}' -> dict; each value a non-empty list."""
    try:
        grid = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise errors.ConfigError(f"sweep.grid is not JSON ({e.msg}): {text!r}") from None
    if not isinstance(grid, dict):
        raise errors.ConfigError(f"sweep.grid must be a JSON object of field -> list, got {text!r}")
    for field, values in grid.items():
        if not isinstance(values, list) or not values:
            raise errors.ConfigError(f"sweep.grid[{field!r}] must be a non-empty list, got {values!r}")
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The product of the grid's lists, in the order the fields were given."""
    fields = list(grid)
    return [dict(zip(fields, values)) for values in itertools.product(*grid.values())] or [{}]


def with_overrides(config, overrides: dict[str, Any]):
    """A copy of `config` with dotted fields set; an unknown field is an error naming it."""
    import ml_collections

    new = config.copy_and_resolve_references()
    with new.unlocked():
        for field, value in overrides.items():
            *parents, leaf = field.split(".")
            node = new
            for part in parents:
                node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
                raise errors.ConfigError(f"sweep.grid field {field!r} is not a config field")
            current = node[leaf]
            if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            node[leaf] = tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
    return new


def _sections(config) -> tuple[configs.SweepConfig, configs.CvConfig]:
    return (configs.section(configs.SweepConfig, config.get("sweep"), "sweep"),
            configs.section(configs.CvConfig, config.get("cv"), "cv"))


def setting_name(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(config as given)"


def plan(config, workdir: str, mode: str) -> list[Run]:
    """Every run of the search, point-major: sweep repeats seeds, cv holds out each fold."""
    if mode not in MODES:
        raise errors.ConfigError(f"--mode {mode!r}; valid: {list(MODES)}")
    sweep, cv = _sections(config)
    replicas = cv.folds if mode == "cv" else sweep.repeats
    if replicas < (2 if mode == "cv" else 1):
        raise errors.ConfigError(f"{'cv.folds' if mode == 'cv' else 'sweep.repeats'}={replicas} is too small")
    runs = []
    for p, point in enumerate(grid_points(parse_grid(sweep.grid))):
        for r in range(replicas):
            extra = {"cv.fold": r} if mode == "cv" else {"seed": config.seed + r}
            name = f"fold_{r}" if mode == "cv" else f"seed_{r}"
            runs.append(Run(len(runs), p, r, {**point, **extra},
                            os.path.join(workdir, f"point_{p:02d}", name)))
    return runs


def read_result(run: Run) -> dict[str, float] | None:
    """A finished run's final metrics, or None."""
    return workdir_lib.read_json_if_exists(workdir_lib.path(run.workdir, workdir_lib.FINAL_EVAL_FILE))


def run_one(config, run: Run) -> dict[str, float]:
    """Trains one run (unless finished) in its sub-workdir; returns its final metrics."""
    from encoder_jax import train

    done = read_result(run)
    if done is not None:
        log.info("run %d (%s) already finished", run.index, run.workdir)
        return done
    log.info("run %d: %s -> %s", run.index, setting_name(run.overrides), run.workdir)
    sub = with_overrides(config, run.overrides)
    os.makedirs(run.workdir, exist_ok=True)
    workdir_lib.write_json(os.path.join(run.workdir, "run.json"), dataclasses.asdict(run))
    return train.run(sub, run.workdir)


def run_baseline(config, run: Run) -> dict[str, Any]:
    """The task's linear baseline on the rows of `run` (its `baseline/report.json`), fitted once."""
    from encoder_jax import tasks

    done = workdir_lib.read_json_if_exists(baseline_path(run))
    if done is not None:
        return done
    return tasks.load(config.task, "baseline").baseline(with_overrides(config, run.overrides), run.workdir)


def baseline_path(run: Run) -> str:
    return os.path.join(run.workdir, workdir_lib.BASELINE_DIR, "report.json")


def ranking(config) -> tuple[str, str]:
    """(metric, 'max' | 'min') that names the best setting."""
    from encoder_jax.monitor import metric_mode

    eval_cfg = configs.section(configs.EvalConfig, config.eval, "eval")
    metric = _sections(config)[0].metric or eval_cfg.best_metric or "accuracy"
    return metric, metric_mode(metric, eval_cfg.best_mode)


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarize_runs(runs: list[Run], metric: str, mode: str) -> dict[str, Any]:
    """Per-point mean ± std of the finished runs' metrics, and the best point."""
    results = {run.index: read_result(run) for run in runs}
    points: dict[int, dict[str, Any]] = {}
    for run in runs:
        entry = points.setdefault(run.point, {"point": run.point, "runs": 0, "total": 0,
                                              "setting": {k: v for k, v in run.overrides.items()
                                                          if k not in ("seed", "cv.fold")}})
        entry["total"] += 1
        if results[run.index] is not None:
            entry["runs"] += 1
    finished = [r for r in results.values() if r]
    names = [metric] + [m for m in TABLE_METRICS if m != metric]
    names = [m for m in names if finished and all(m in r for r in finished)]
    for entry in points.values():
        mine = [results[r.index] for r in runs if r.point == entry["point"] and results[r.index]]
        entry["metrics"] = {m: mean_std([r[m] for r in mine]) for m in names if mine}
        baselines = [b for r in runs if r.point == entry["point"]
                     for b in [workdir_lib.read_json_if_exists(baseline_path(r))] if b and metric in b]
        if baselines:
            entry["baseline"] = mean_std([b[metric] for b in baselines])
            entry["num_train"] = baselines[0]["num_train"]
    scored = [e for e in points.values() if metric in e["metrics"]]
    sign = 1.0 if mode == "max" else -1.0
    best = max(scored, key=lambda e: sign * e["metrics"][metric][0]) if scored else None
    return {"metric": metric, "mode": mode, "metrics": names, "points": list(points.values()),
            "best": best, "runs": [{**dataclasses.asdict(r), "result": results[r.index]} for r in runs]}


def write_tables(summary: dict[str, Any], workdir: str, title: str) -> list[str]:
    """runs.csv, results.csv, results.md and best.json from `summarize_runs`."""
    names = summary["metrics"]
    paths = [os.path.join(workdir, n) for n in ("runs.csv", "results.csv", "results.md", "best.json")]
    _write_csv(paths[0], ["run", "point", "replica", "overrides", "workdir", *names], [
        [run["index"], run["point"], run["replica"], json.dumps(run["overrides"]), run["workdir"],
         *[(run["result"] or {}).get(m, "") for m in names]] for run in summary["runs"]])
    _write_csv(paths[1], ["point", "setting", "runs",
                          *[f"{m}_{s}" for m in names for s in ("mean", "std")]], [
        [e["point"], setting_name(e["setting"]), f"{e['runs']}/{e['total']}",
         *[v for m in names for v in e["metrics"].get(m, ("", ""))]] for e in summary["points"]])
    best = summary["best"]
    with_baseline = any("baseline" in e for e in summary["points"])
    extra = [f"baseline {summary['metric']}"] if with_baseline else []
    lines = [f"# {title}", "", f"Ranked by {summary['metric']} ({summary['mode']}); mean ± std over runs.",
             "", "| point | setting | runs | " + " | ".join(names + extra) + " |",
             "| --- " * (len(names) + len(extra) + 3) + "|"]
    for e in summary["points"]:
        cells = [f"{e['metrics'][m][0]:.4f} ± {e['metrics'][m][1]:.4f}" if m in e["metrics"] else "—"
                 for m in names]
        cells += [f"{e['baseline'][0]:.4f}" if "baseline" in e else "—"] if with_baseline else []
        mark = " **(best)**" if best is not None and e["point"] == best["point"] else ""
        lines.append(f"| {e['point']} | {setting_name(e['setting'])}{mark} | {e['runs']}/{e['total']} | "
                     + " | ".join(cells) + " |")
    if best is not None:
        mean, std = best["metrics"][summary["metric"]]
        lines += ["", f"**Best setting:** {setting_name(best['setting'])} — {summary['metric']} "
                      f"{mean:.4f} ± {std:.4f} over {best['runs']} run(s)."]
    workdir_lib.write_text(paths[2], "\n".join(lines) + "\n")
    workdir_lib.write_json(paths[3], {"metric": summary["metric"], "mode": summary["mode"], "best": best})
    return paths


def _write_csv(path: str, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    workdir_lib.write_text(path, buffer.getvalue())


def search(config, workdir: str, mode: str) -> dict[str, Any]:
    """Runs the search's runs (all, or `sweep.index` only), then writes the tables; returns the summary."""
    runs = plan(config, workdir, mode)
    sweep = _sections(config)[0]
    if sweep.curve and sweep.curve not in parse_grid(sweep.grid):  # before any training
        raise errors.ConfigError(f"sweep.curve={sweep.curve!r} is not a sweep.grid field; grid fields: "
                                 f"{list(parse_grid(sweep.grid))}")
    index = sweep.index
    if index is not None and not 0 <= index < len(runs):
        raise errors.ConfigError(f"sweep.index={index}; valid: 0..{len(runs) - 1} ({len(runs)} runs)")
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_json(os.path.join(workdir, "search.json"),
                           {"mode": mode, "runs": [dataclasses.asdict(r) for r in runs]})
    if sweep.baseline:  # a task without a baseline fails here, before any training
        from encoder_jax import tasks

        tasks.load(config.task, "baseline")
    for run in runs if index is None else [runs[index]]:
        run_one(config, run)
        if sweep.baseline:
            run_baseline(config, run)
    metric, metric_order = ranking(config)
    summary = summarize_runs(runs, metric, metric_order)
    title = "Cross-validation" if mode == "cv" else "Grid search"
    paths = write_tables(summary, workdir, f"{title} ({len(runs)} runs)")
    if sweep.curve:
        paths.append(plot_curve(summary, sweep.curve, os.path.join(workdir, "curve.png")))
    for path in paths:
        log.info("wrote %s", path)
    return summary


def curve_points(summary: dict[str, Any], field: str) -> tuple[dict[str, list], list]:
    """({other settings: [(x, mean, std)]}, [(x, baseline mean)]) of the metric against `field`.

    A None value of `field` (e.g. max_train_examples: all rows) sits at the baseline's row
    count when known, else at twice the largest value.
    """
    points = [e for e in summary["points"] if field in e["setting"]]
    if not points:
        raise errors.ConfigError(f"sweep.curve={field!r} is not a sweep.grid field")
    numeric = [e["setting"][field] for e in points if isinstance(e["setting"][field], (int, float))]
    fallback = 2 * max(numeric) if numeric else 1

    def x_of(e):
        value = e["setting"][field]
        return value if value is not None else e.get("num_train", fallback)

    def short(value):  # a run directory is named by its last component in the legend
        return os.path.basename(value.rstrip("/")) if isinstance(value, str) and "/" in value else value

    lines: dict[str, list] = {}
    baseline: dict[Any, float] = {}
    for e in points:
        rest = setting_name({k: short(v) for k, v in e["setting"].items() if k != field})
        if summary["metric"] in e["metrics"]:
            lines.setdefault(rest, []).append((x_of(e), *e["metrics"][summary["metric"]]))
        if "baseline" in e:
            baseline[x_of(e)] = e["baseline"][0]
    return {k: sorted(v) for k, v in lines.items()}, sorted(baseline.items())


def plot_curve(summary: dict[str, Any], field: str, path: str) -> str:
    """curve.png: the ranking metric (mean ± std) against a grid field, log x; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, baseline = curve_points(summary, field)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in lines.items():
        x, mean, std = (np.asarray(v, np.float64) for v in zip(*values))
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=name)
    if baseline:
        ax.plot(*zip(*baseline), "k--", marker="s", label="TF-IDF + linear baseline")
    ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_ylabel(summary["metric"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
