"""What a trial costs besides its epochs: `octft sweep launch` with warm trial runners, with
`--fresh-process-per-trial` (one process per trial, as before warm runners), and a plain in-process
`study.optimize` loop calling the recipe (the peer), on the same trials in the same runtime.

Params are drawn once from the demo space (sweeps/demo.yaml) with a seeded RandomSampler and enqueued in
the same order in every mode; pruning is off (`pruner.collapse.enabled=false pruner.wrapped.type=none`),
so every trial runs the same epochs everywhere. Data: a synthetic release in the demo's shape, its cache
built before any mode runs. Per mode it prints the wall time, the epochs' share of it, and per trial: its
worker, the runner's pid and how many trials that runner had run, XLA compiles, epochs' seconds, the
overhead (time from the trial's start to the next trial's start on the same worker, minus its epochs'
seconds) and the runner's RSS after the trial.

    .venv/bin/python benchmarks/bench_sweep.py --trials 4 --epochs 2                 # eager CPU
    PJRT_DEVICE=CPU .venv/bin/python benchmarks/bench_sweep.py --runtime xla --trials 4 --epochs 2
    .venv/bin/python benchmarks/bench_sweep.py --modes warm --trials 10 --epochs 1   # runner RSS over 10 trials
    .venv/bin/python benchmarks/bench_sweep.py --workers 2 --trials 6                # the demo sweep's shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_pruning import copy_specs, draw_params, prepare

NO_PRUNING = ["pruner.collapse.enabled=false", "pruner.wrapped.type=none"]
MODES = ("warm", "fresh", "peer")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="fixed.train.epochs (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="workers of octft sweep launch (the peer loop has one)")
    parser.add_argument("--participants", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", choices=["cpu", "xla"], default="cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--peer-child", type=Path, help=argparse.SUPPRESS)  # internal: run the peer loop here
    return parser.parse_args(argv)


@dataclass
class TrialRow:
    number: int
    worker: int
    pid: int | None
    runner_trials: int | None
    compiles: int | None
    epoch_s: float
    started: float  # seconds since the mode started
    overhead_s: float | None = None
    rss_mb: float | None = None


@dataclass
class ModeResult:
    name: str
    wall_s: float
    rows: list[TrialRow]
    load: tuple[float, float]


def overheads(rows: list[TrialRow], wall_end: float) -> None:
    """Fill `overhead_s`: next start on the same worker (or the end of the run) minus this start and its epochs."""
    by_worker: dict[int, list[TrialRow]] = {}
    for row in sorted(rows, key=lambda r: r.started):
        by_worker.setdefault(row.worker, []).append(row)
    for worker_rows in by_worker.values():
        for row, following in zip(worker_rows, [*worker_rows[1:], None]):
            end = following.started if following is not None else wall_end
            row.overhead_s = end - row.started - row.epoch_s


def run_octft(name: str, root: Path, spec_path: Path, params: list[dict[str, Any]], args, data_dir: Path,
              cache_dir: Path) -> ModeResult:
    import optuna

    from octft.sweep.study import launch

    directory = root / name
    directory.mkdir(parents=True)
    storage = f"sqlite:///{directory / 'optuna.db'}"
    study_name = f"bench-sweep-{name}"
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
    for trial_params in params:
        study.enqueue_trial(trial_params)
    overrides = [f"study_name={study_name}", f"mlflow.tracking_uri=sqlite:///{directory / 'mlflow.db'}",
                 f"fixed.train.epochs={args.epochs}", *NO_PRUNING, f"data.uri={data_dir}", f"data.cache_dir={cache_dir}",
                 f"runtime.kind={args.runtime}", f"output_dir={directory / 'runs'}"]
    load_before = os.getloadavg()[0]
    print(f"== {name}: octft sweep launch, {args.workers} worker(s)", flush=True)
    started = time.time()
    result = launch(spec_path, n_trials=len(params), workers=args.workers, storage=storage, overrides=overrides,
                    fresh_process_per_trial=name == "fresh")
    wall = time.time() - started
    if any(result.worker_exit_codes):
        raise SystemExit(f"{name}: a worker exited with {result.worker_exit_codes}; see {result.study_dir}")
    rows = []
    for trial in optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False):
        attrs = trial.user_attrs
        rss = attrs.get("runner_rss_bytes")
        rows.append(TrialRow(
            number=trial.number, worker=int(attrs.get("worker", 0)), pid=attrs.get("pid"),
            runner_trials=attrs.get("runner_trials"), compiles=attrs.get("xla_compiles"),
            epoch_s=float(attrs.get("epoch_seconds") or 0.0),
            # Optuna stores naive local datetimes, which .timestamp() reads as local time.
            started=trial.datetime_start.timestamp() - started, rss_mb=None if rss is None else rss / 2**20,
        ))
    overheads(rows, wall)
    return ModeResult(name, wall, rows, (load_before, os.getloadavg()[0]))


def run_peer(root: Path, spec_path: Path, params: list[dict[str, Any]], args, data_dir: Path, cache_dir: Path) -> ModeResult:
    """The peer loop in a process of its own (a fresh interpreter, as a user's script would be)."""
    directory = root / "peer"
    directory.mkdir(parents=True)
    job = {"spec": str(spec_path), "params": params, "epochs": args.epochs, "runtime": args.runtime,
           "data_dir": str(data_dir), "cache_dir": str(cache_dir), "dir": str(directory)}
    (directory / "job.json").write_text(json.dumps(job))
    print("== peer: in-process study.optimize calling octft.train.recipe.train", flush=True)
    load_before = os.getloadavg()[0]
    started = time.time()
    subprocess.run([sys.executable, __file__, "--peer-child", str(directory / "job.json")], check=True)
    wall = time.time() - started
    rows = [TrialRow(**row) for row in json.loads((directory / "rows.json").read_text())]
    overheads(rows, wall)
    return ModeResult("peer", wall, rows, (load_before, os.getloadavg()[0]))


def peer_child(job_path: Path) -> None:
    """What a user writes without octft's launcher: an Optuna loop that builds each config and trains it."""
    started = time.time()
    import optuna
    import psutil

    from octft.config import load_experiment
    from octft.sweep.space import suggest
    from octft.sweep.spec import load_sweep
    from octft.train.recipe import train

    job = json.loads(job_path.read_text())
    directory = Path(job["dir"])
    spec = load_sweep(job["spec"], [f"fixed.train.epochs={job['epochs']}"])
    extra = [f"data.uri={job['data_dir']}", f"data.cache_dir={job['cache_dir']}", f"runtime.kind={job['runtime']}",
             f"output_dir={directory / 'runs'}", f"tracking.tracking_uri=sqlite:///{directory / 'mlflow.db'}"]
    rows = []

    def objective(trial: optuna.Trial) -> float:
        trial_started = time.time() - started
        params = suggest(trial, spec.space)  # the enqueued params
        cfg = load_experiment(spec.base, [*spec.trial_overrides(params), *extra, f"tracking.run_name=trial-{trial.number}"])
        result = train(cfg, progress=False)
        rows.append({"number": trial.number, "worker": 0, "pid": os.getpid(), "runner_trials": trial.number + 1,
                     "compiles": result.compiles, "epoch_s": result.epoch_seconds, "started": trial_started,
                     "rss_mb": psutil.Process().memory_info().rss / 2**20})
        return result.best_value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for trial_params in job["params"]:
        study.enqueue_trial(trial_params)
    study.optimize(objective, n_trials=len(job["params"]))
    (directory / "rows.json").write_text(json.dumps(rows))


def print_report(results: list[ModeResult], args) -> None:
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"demo space, {args.trials} trials x {args.epochs} epochs, {args.participants} participants, "
          f"runtime.kind={args.runtime}, no pruning, octft workers {args.workers}")
    header = f"{'mode':<7}{'wall s':>8}{'epochs s':>9}{'share':>7}{'overhead median s':>19}{'compiles':>9}{'load':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        epochs = sum(row.epoch_s for row in r.rows)
        compiles = [row.compiles for row in r.rows if row.compiles is not None]
        median = statistics.median(row.overhead_s for row in r.rows) if r.rows else float("nan")
        print(f"{r.name:<7}{r.wall_s:>8.0f}{epochs:>9.0f}{epochs / max(args.workers if r.name != 'peer' else 1, 1) / r.wall_s:>7.2f}"
              f"{median:>19.1f}{sum(compiles) if compiles else '-':>9}{r.load[0]:>5.1f}->{r.load[1]:<5.1f}")
    for r in results:
        print(f"\n{r.name}: per trial")
        print(f"{'trial':>5}{'worker':>7}{'pid':>8}{'runner trial':>13}{'compiles':>9}{'epochs s':>9}{'overhead s':>11}{'RSS MiB':>9}")
        for row in sorted(r.rows, key=lambda row: row.number):
            print(f"{row.number:>5}{row.worker:>7}{row.pid or '-':>8}{row.runner_trials or '-':>13}"
                  f"{'-' if row.compiles is None else row.compiles:>9}{row.epoch_s:>9.1f}"
                  f"{'-' if row.overhead_s is None else f'{row.overhead_s:.1f}':>11}"
                  f"{'-' if row.rss_mb is None else f'{row.rss_mb:.0f}':>9}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.peer_child:
        peer_child(args.peer_child)
        return
    if args.runtime == "xla":
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    root = args.dir or Path(tempfile.mkdtemp(prefix="octft-bench-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    spec_path = copy_specs(root)
    data_dir, cache_dir = prepare(root, args.participants)
    params = draw_params(spec_path, args.trials, args.seed)
    results = []
    for mode in args.modes:
        if mode == "peer":
            results.append(run_peer(root, spec_path, params, args, data_dir, cache_dir))
        else:
            results.append(run_octft(mode, root, spec_path, params, args, data_dir, cache_dir))
    print_report(results, args)
    print(f"\nfiles under {root}")


if __name__ == "__main__":
    main()
