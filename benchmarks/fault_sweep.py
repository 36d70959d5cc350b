"""Faults and bad input thrown at launch.py; prints one table row per case.

    python benchmarks/fault_sweep.py --out /tmp/fault_sweep            # everything (~20 min on 2 cores)
    python benchmarks/fault_sweep.py --out /tmp/fault_sweep --parts bad_inputs
    python benchmarks/fault_sweep.py --out /tmp/fault_sweep --parts kills --kills 24 --seed 1

Parts (each on the MLM smoke config over a small generated corpus, offline):
  kills       kill -9 at random moments of a run (half of them the moment a checkpoint
              save has started), rerun, kill again ... until --kills kill points are
              spent; the last rerun finishes. Its final parameters must equal an
              uninterrupted run's exactly.
  sigterm     SIGTERM mid-run: exit 75, "preempted at step N", checkpoint N; the rerun
              finishes equal to the uninterrupted run.
  corrupt     the newest checkpoint's files truncated: the rerun sets it aside, resumes
              from the previous one and finishes equal to the uninterrupted run.
  disk_full   (root only: a 3 MiB tmpfs) the disk fills before a save: one line, exit 1,
              the saved checkpoints unchanged; after freeing space the rerun finishes
              equal to the uninterrupted run.
  bad_inputs  BAD_INPUTS (48 bad configs, files and workdirs): exit status 1, one line
              naming the field or file, no traceback, the workdir's files unchanged.
Results: <out>/results.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLM = os.path.join(ROOT, "experiments", "bert_mlm.py")
CLASSIFY = os.path.join(ROOT, "experiments", "classify_news.py")
TRANSLATE = os.path.join(ROOT, "experiments", "translate_zh_en.py")
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def corpus_args(directory: str, lines: int = 400, seed: int = 0) -> list[str]:
    """Writes a small random-word corpus; the --config overrides that train on it."""
    rng = random.Random(seed)
    paths = {}
    for split, count in (("train", lines), ("validation", lines // 8)):
        paths[split] = os.path.join(directory, f"{split}.txt")
        with open(paths[split], "w", encoding="utf-8") as f:
            for _ in range(count):
                f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + "\n")
    return [f"--config.data.files.train={paths['train']}",
            f"--config.data.files.validation={paths['validation']}",
            "--config.tokenizer.vocab_size=40", "--config.eval.every_steps=100000"]


def launch_command(*args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "launch.py"), *args]


def launch(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(launch_command(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def last_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def snapshot(workdir: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under `workdir` (nothing may change on bad input)."""
    digests = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def final_params(workdir: str) -> list[np.ndarray]:
    from encoder_jax import checkpoint

    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(checkpoint.load_params(workdir))]


def same_params(a: str, b: str) -> bool:
    """Bit-exact equality of two runs' latest parameters (a resumed run replays exactly)."""
    return all(np.array_equal(x, y) for x, y in zip(final_params(a), final_params(b), strict=True))


# ----------------------------------------------------------------------------- interrupted runs


@dataclasses.dataclass
class Sweep:
    out: str
    env: dict[str, str]
    corpus: list[str]
    steps: int = 24

    def run_args(self, workdir: str, *extra: str) -> list[str]:
        return ["--config", f"{MLM}:smoke", "--workdir", workdir, *self.corpus,
                f"--config.train.num_steps={self.steps}", "--config.ckpt.every_steps=2",
                "--config.train.log_every=1", *extra]

    def reference(self) -> str:
        workdir = os.path.join(self.out, "reference")
        if not os.path.isdir(os.path.join(workdir, "checkpoints", str(self.steps))):
            began = time.monotonic()
            done = launch(*self.run_args(workdir), env=self.env)
            assert done.returncode == 0, done.stderr[-3000:]
            with open(os.path.join(self.out, "reference_wall_s"), "w") as f:
                f.write(str(time.monotonic() - began))
        return workdir

    def reference_wall_s(self) -> float:
        self.reference()
        with open(os.path.join(self.out, "reference_wall_s")) as f:
            return float(f.read())


def _saves_in_progress(workdir: str) -> set[str]:
    """Orbax writes a step into '<step>.orbax-checkpoint-tmp*' and renames it when complete."""
    directory = os.path.join(workdir, "checkpoints")
    return {n for n in os.listdir(directory) if "tmp" in n} if os.path.isdir(directory) else set()


def _latest_step(workdir: str) -> int | None:
    directory = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    return max(steps) if steps else None


def kill_once(args: list[str], env, workdir: str, mode: str, rng: random.Random,
              latest_s: float = 30.0) -> dict:
    """Starts a run and SIGKILLs it at a random moment in (0.5, latest_s) s ('random'), or the
    moment a new checkpoint save is in progress ('save'; left-overs of earlier kills ignored)."""
    leftovers, before = _saves_in_progress(workdir), _latest_step(workdir)
    proc = subprocess.Popen(launch_command(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    deadline = start + rng.uniform(0.5, latest_s)
    while proc.poll() is None:
        now = time.monotonic()
        if (mode == "save" and _saves_in_progress(workdir) - leftovers) \
                or (mode == "random" and now >= deadline) or now - start > 300:
            break
        time.sleep(0.002)
    during_save = bool(_saves_in_progress(workdir) - leftovers)
    if proc.poll() is None:
        proc.kill()
    stderr = proc.communicate()[1]
    resumed = [line for line in stderr.splitlines() if "resumed from" in line]
    return {"mode": mode, "after_s": round(time.monotonic() - start, 2), "during_save": during_save,
            "killed": proc.returncode == -signal.SIGKILL, "returncode": proc.returncode,
            "resumed_at": int(resumed[-1].rsplit(" ", 1)[-1]) if resumed else None,
            "latest_step_before": before, "latest_step_after": _latest_step(workdir)}


def part_kills(sweep: Sweep, kills: int, seed: int) -> dict:
    """kill -9 again and again on one run until `kills` kills landed; then let it finish."""
    rng = random.Random(seed)
    workdir = os.path.join(sweep.out, "killed")
    shutil.rmtree(workdir, ignore_errors=True)
    run_s = sweep.reference_wall_s()
    points, regressions = [], 0
    while sum(p["killed"] for p in points) < kills:
        point = kill_once(sweep.run_args(workdir), sweep.env, workdir,
                          "save" if len(points) % 2 else "random", rng, latest_s=run_s)
        points.append(point)
        before, after = point["latest_step_before"], point["latest_step_after"]
        regressions += before is not None and (after is None or after < before)
        print(f"  try {len(points)}: {point}", flush=True)
        if not point["killed"]:  # the run ended before the kill: start the chain again
            shutil.rmtree(workdir)
    done = launch(*sweep.run_args(workdir), env=sweep.env)
    equal = done.returncode == 0 and same_params(workdir, sweep.reference())
    killed = [p for p in points if p["killed"]]
    return {"kill_points": len(killed), "during_save": sum(p["during_save"] for p in killed),
            "after_a_resume": sum(p["resumed_at"] is not None for p in killed),
            "checkpoint_regressions": regressions, "final_rerun_rc": done.returncode,
            "resumed_identically": equal, "points": points}


def part_sigterm(sweep: Sweep) -> dict:
    workdir = os.path.join(sweep.out, "sigterm")
    shutil.rmtree(workdir, ignore_errors=True)
    proc = subprocess.Popen(launch_command(*sweep.run_args(workdir)), cwd=ROOT, env=sweep.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    while proc.poll() is None and not (os.path.isfile(metrics) and
                                       len(open(metrics).read().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    line = last_line(proc.communicate()[1])
    step = int(line.split()[3]) if line.startswith("preempted at step") else None
    saved = step is not None and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
    done = launch(*sweep.run_args(workdir), env=sweep.env)
    return {"returncode": proc.returncode, "line": line, "checkpoint_at_signalled_step": saved,
            "resumed_identically": done.returncode == 0 and same_params(workdir, sweep.reference())}


def _truncate_files(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(os.path.getsize(f.name) // 3, 1))


def part_corrupt(sweep: Sweep) -> dict:
    workdir = os.path.join(sweep.out, "corrupt")
    shutil.rmtree(workdir, ignore_errors=True)
    half = sweep.run_args(workdir, f"--config.train.max_steps_per_run={sweep.steps // 2}")
    assert launch(*half, env=sweep.env).returncode == 0
    _truncate_files(os.path.join(workdir, "checkpoints", str(sweep.steps // 2)))
    done = launch(*sweep.run_args(workdir), env=sweep.env)
    warned = [x for x in done.stderr.splitlines() if "does not restore" in x]
    return {"returncode": done.returncode, "fell_back": bool(warned),
            "warning": warned[0][warned[0].find("checkpoint step"):] if warned else None,
            "resumed_identically": done.returncode == 0 and same_params(workdir, sweep.reference())}


def part_disk_full(sweep: Sweep) -> dict:
    mount = os.path.join(sweep.out, "tmpfs")
    os.makedirs(mount, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs",
                                            mount], capture_output=True).returncode:
        return {"skipped": "needs root to mount a small tmpfs"}
    try:
        workdir = os.path.join(mount, "run")
        first = sweep.run_args(workdir, "--config.train.max_steps_per_run=4")
        assert launch(*first, env=sweep.env).returncode == 0
        filler = os.path.join(mount, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * max(shutil.disk_usage(mount).free - 200_000, 0))
        before = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints")}
        full = launch(*sweep.run_args(workdir), env=sweep.env)
        after = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints")}
        os.remove(filler)
        done = launch(*sweep.run_args(workdir), env=sweep.env)
        return {"returncode": full.returncode, "line": last_line(full.stderr),
                "traceback": "Traceback" in full.stderr, "checkpoints_unchanged": before == after,
                "resumed_identically": done.returncode == 0 and same_params(workdir, sweep.reference())}
    finally:
        subprocess.run(["umount", mount], capture_output=True)


# ----------------------------------------------------------------------------- bad input


@dataclasses.dataclass(frozen=True)
class BadInput:
    """A launch.py call that must fail in one line containing `expect`.

    `args(files, workdir)` builds the command line; `files` holds paths of prepared bad
    files (see `prepare_files`) and `workdir` is a copy of a finished run (or a new dir).
    """

    name: str
    args: Callable[[dict[str, str], str], list[str]]
    expect: str
    on_finished_run: bool = True  # run against a copy of a finished run (else a fresh workdir)
    prepare: Callable[[str], None] | None = None  # damages the copied workdir first


def _mlm(*extra: str):
    """MLM smoke on the sweep's corpus; extras may name prepared files: "--config.x={latin1}"."""
    return lambda files, workdir: ["--config", f"{MLM}:smoke", "--workdir", workdir,
                                   *files["corpus"], *[x.format(**files) for x in extra]]


def _classify(*extra: str):
    return lambda files, workdir: ["--config", f"{CLASSIFY}:smoke", "--workdir", workdir,
                                   "--config.train.num_steps=2", *[x.format(**files) for x in extra]]


def _corrupt_file(name: str):
    def prepare(workdir: str) -> None:
        with open(os.path.join(workdir, name), "r+b") as f:
            f.truncate(max(os.path.getsize(f.name) // 2, 1))
            f.seek(0)
            f.write(b"\x00garbage")
    return prepare


def _damage_checkpoints(workdir: str) -> None:
    for step in os.listdir(os.path.join(workdir, "checkpoints")):
        _truncate_files(os.path.join(workdir, "checkpoints", step))


BAD_INPUTS: list[BadInput] = [
    # the command line and the config
    BadInput("unknown key", _mlm("--config.train.nmu_steps=3"), "unknown config key 'train.nmu_steps'"),
    BadInput("unknown section", _mlm("--config.optimizer.lr=1"), "has no 'optimizer'"),
    BadInput("unknown variant", lambda f, w: ["--config", f"{MLM}:huge", "--workdir", w], "variant 'huge'"),
    BadInput("missing config file", lambda f, w: ["--config", "experiments/nope.py", "--workdir", w],
             "experiments/nope.py"),
    BadInput("int field given text", _mlm("--config.train.num_steps=abc"), "num_steps"),
    BadInput("zero steps", _mlm("--config.train.num_steps=0"), "train.num_steps=0 must be >= 1"),
    BadInput("negative steps", _mlm("--config.train.num_steps=-5"), "train.num_steps=-5 must be >= 1"),
    BadInput("negative learning rate", _mlm("--config.opt.learning_rate=-1"), "opt.learning_rate"),
    BadInput("NaN learning rate", _mlm("--config.opt.learning_rate=nan"), "opt.learning_rate"),
    BadInput("unknown optimizer", _mlm("--config.opt.name=adamx"), "opt.name='adamx'; valid"),
    BadInput("unknown schedule", _mlm("--config.opt.schedule=step"), "opt.schedule='step'; valid"),
    BadInput("zero accumulation", _mlm("--config.opt.grad_accum_steps=0"), "opt.grad_accum_steps"),
    BadInput("batch not divisible by accumulation", _mlm("--config.opt.grad_accum_steps=3"),
             "opt.grad_accum_steps=3"),
    BadInput("zero batch", _mlm("--config.data.batch_size=0"), "data.batch_size=0"),
    BadInput("sequence too short", _mlm("--config.data.seq_len=4"), "data.seq_len=4"),
    BadInput("sequence past max_len", _mlm("--config.data.seq_len=4096"), "data.seq_len=4096 exceeds"),
    BadInput("unknown activation", _mlm("--config.model.activation=swishy"), "model.activation"),
    BadInput("unknown dtype", _mlm("--config.model.dtype=float8"), "model.dtype"),
    BadInput("mesh not dividing devices", _mlm("--config.mesh.fsdp=3"), "mesh.fsdp=3"),
    BadInput("keep zero checkpoints", _mlm("--config.ckpt.keep=0"), "ckpt.keep=0"),
    BadInput("average more than kept",
             lambda f, w: ["--config", f"{TRANSLATE}:smoke", "--workdir", w, "--config.ckpt.average_last=5"],
             "ckpt.average_last=5", on_finished_run=False),
    BadInput("unknown best metric", _mlm("--config.eval.best_metric=bleu4"), "eval.best_metric"),
    BadInput("unknown best mode", _mlm("--config.eval.best_mode=up"), "eval.best_mode"),
    BadInput("zero eval interval", _mlm("--config.eval.every_steps=0"), "eval.every_steps=0"),
    BadInput("unknown tokenizer type", _mlm("--config.tokenizer.model_type=word"), "tokenizer.model_type"),
    BadInput("unknown word segmenter", _mlm("--config.tokenizer.word_segmenter=mecab"),
             "tokenizer.word_segmenter"),
    BadInput("masking rate above 1", _mlm("--config.mlm.rate=1.5"), "mlm.rate=1.5"),
    BadInput("unknown task", _mlm("--config.task=summarize"), "task='summarize'; valid"),
    BadInput("init_from missing", _mlm("--config.init_from=/nonexistent/run"), "init_from"),
    BadInput("init_from_hf not a hub id", _mlm("--config.init_from_hf=./no/such/dir"), "init_from_hf"),
    BadInput("unknown mode", _mlm("--mode=serve"), "mode"),
    # files
    BadInput("missing train file", _mlm("--config.data.files.train=/nonexistent/train.txt"),
             "data.files.train", on_finished_run=False),
    BadInput("non-UTF-8 corpus", _mlm("--config.data.files.train={latin1}"),
             "is not UTF-8 at line", on_finished_run=False),
    BadInput("empty corpus", _mlm("--config.data.files.train={empty}"), "empty",
             on_finished_run=False),
    BadInput("corpus smaller than a batch", _mlm("--config.data.files.train={tiny}"),
             "fewer than one batch", on_finished_run=False),
    BadInput("missing tokenizer file", _mlm("--config.tokenizer.model_file=/nonexistent.model"),
             "tokenizer.model_file", on_finished_run=False),
    BadInput("corrupt tokenizer file", _mlm("--config.tokenizer.model_file={garbage}"),
             "not a readable sentencepiece model", on_finished_run=False),
    BadInput("CSV cell past the limit", _classify("--config.data.files.train={huge_cell}",
                                                  "--config.data.files.validation={huge_cell}"),
             "field larger than field limit", on_finished_run=False),
    BadInput("label out of range", _classify("--config.data.files.train={bad_label}",
                                             "--config.data.files.validation={bad_label}",
                                             "--config.data.num_classes=4"),
             "label", on_finished_run=False),
    BadInput("missing classes file", _classify("--config.data.classes_file=/nonexistent/classes.txt"),
             "data.classes_file", on_finished_run=False),
    BadInput("CSV column missing", _classify("--config.data.files.train={bad_label}",
                                             "--config.data.files.validation={bad_label}",
                                             "--config.data.text_fields=7"),
             "column", on_finished_run=False),
    BadInput("translation max_len too small",
             lambda f, w: ["--config", f"{TRANSLATE}:smoke", "--workdir", w, "--config.data.max_len=2"],
             "data.max_len=2", on_finished_run=False),
    # workdirs
    BadInput("workdir under a file", lambda f, w: _mlm()(f, os.path.join(f["latin1"], "run")),
             "not writable", on_finished_run=False),
    BadInput("corrupt tokenizer in the workdir", _mlm(), "not a readable sentencepiece model",
             prepare=_corrupt_file("tokenizer.model")),
    BadInput("no checkpoint restores", _mlm("--config.train.num_steps=8"), "no checkpoint in",
             prepare=_damage_checkpoints),
    BadInput("predict without input", _mlm("--mode=predict"), "has no predict mode"),
    BadInput("export of an empty workdir", _mlm("--mode=export"), "no checkpoint",
             on_finished_run=False),
    BadInput("damaged model.json on predict",
             lambda f, w: ["--config", f"{MLM}:smoke", "--workdir", w, "--mode=export"],
             "model.json", prepare=_corrupt_file("model.json")),
]


def prepare_files(directory: str, corpus: list[str]) -> dict[str, object]:
    os.makedirs(directory, exist_ok=True)
    files: dict[str, object] = {"corpus": corpus}

    def write(name: str, data: bytes) -> None:
        files[name.split(".")[0]] = path = os.path.join(directory, name)
        with (gzip.open(path, "wb") if name.endswith(".gz") else open(path, "wb")) as f:
            f.write(data)

    write("latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    write("empty.txt", b"")
    write("tiny.txt", b"three words here\n")
    write("garbage.model", os.urandom(4096))
    write("huge_cell.csv", b'title,body,topic\n"' + b"x" * (2 ** 24 + 10) + b'",a,sports\n')
    write("bad_label.csv", b"title,body,topic\n" + b"a title,a body,7\n" * 40)
    return files


def check_bad_input(case: BadInput, files, good_run: str, scratch: str, env) -> dict:
    workdir = os.path.join(scratch, case.name.replace(" ", "_"))
    shutil.rmtree(workdir, ignore_errors=True)
    if case.on_finished_run:
        shutil.copytree(good_run, workdir)
        if case.prepare:
            case.prepare(workdir)
    before = snapshot(workdir) if os.path.isdir(workdir) else {}
    result = launch(*case.args(files, workdir), env=env)
    after = snapshot(workdir) if os.path.isdir(workdir) else {}
    if case.prepare is _damage_checkpoints:  # set aside on purpose: compare what remains elsewhere
        before = {k: v for k, v in before.items() if not k.startswith("checkpoints")}
        after = {k: v for k, v in after.items() if not k.startswith("checkpoints")}
    line = last_line(result.stderr)
    return {"case": case.name, "returncode": result.returncode, "line": line[:200],
            "one_line": "Traceback" not in result.stderr and case.expect in line,
            "workdir_intact": before == after}


def part_bad_inputs(sweep: Sweep, workers: int = 2) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    good = os.path.join(sweep.out, "good")
    if not os.path.isdir(os.path.join(good, "checkpoints")):
        done = launch("--config", f"{MLM}:smoke", "--workdir", good, *sweep.corpus,
                      "--config.train.num_steps=4", env=sweep.env)
        assert done.returncode == 0, done.stderr[-3000:]
    files = prepare_files(os.path.join(sweep.out, "bad_files"), sweep.corpus)
    scratch = os.path.join(sweep.out, "bad_runs")
    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda c: check_bad_input(c, files, good, scratch, sweep.env), BAD_INPUTS))
    for row in rows:
        print(f"  {'ok ' if row['one_line'] and row['workdir_intact'] and row['returncode'] == 1 else 'BAD'}"
              f" {row['case']}: rc={row['returncode']} {row['line']}", flush=True)
    return {"tried": len(rows), "exit_1": sum(r["returncode"] == 1 for r in rows),
            "one_line": sum(r["one_line"] for r in rows),
            "workdir_intact": sum(r["workdir_intact"] for r in rows), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="kills,sigterm,corrupt,disk_full,bad_inputs")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "ENCODER_JAX_DATA_DIR": os.path.join(args.out, "data_cache"),
           "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    sweep = Sweep(os.path.abspath(args.out), env, corpus_args(args.out))
    results = {}
    for part in args.parts.split(","):
        started = time.monotonic()
        print(f"== {part}", flush=True)
        if part == "kills":
            results[part] = part_kills(sweep, args.kills, args.seed)
        elif part == "bad_inputs":
            results[part] = part_bad_inputs(sweep)
        else:
            results[part] = globals()[f"part_{part}"](sweep)
        results[part]["wall_s"] = round(time.monotonic() - started, 1)
        summary = {k: v for k, v in results[part].items() if k not in ("points", "rows")}
        print(f"   {summary}", flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
