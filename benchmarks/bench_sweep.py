"""What a trial costs besides its epochs: `octft sweep launch` with warm trial runners, with
`--fresh-process-per-trial` (one process per trial, as before warm runners), and a plain in-process
`study.optimize` loop calling the recipe (the peer), on the same trials in the same runtime.

Modes: `warm` (octft sweep launch), `fresh` (the same, a process per trial), `peer` (the loop in one
process), `peers` (the loop in `--workers` processes sharing one sqlite study, the way Optuna runs a study in
parallel: the same script started once per worker; its MLflow database is created first, since processes
creating one at once fail in its migrations).

Params are drawn once from the demo space (sweeps/demo.yaml, its unfreeze range cut below `--epochs`) with a
seeded RandomSampler and enqueued in the same order in every mode; pruning is off
(`pruner.collapse.enabled=false pruner.wrapped.type=none`), so every trial runs the same epochs everywhere.
Data: a synthetic release in the demo's shape (8 x 64 x 64), its cache built before any mode runs; each mode
has its own Optuna and MLflow sqlite files and feature store. `octft sweep launch` runs as a user runs it,
the command line in a fresh interpreter, and each peer process in a fresh interpreter (with the devices one
octft worker's trials get); all are timed from their interpreter's start, imports included. On XLA:CPU the
devices are shared as `make demo` shares them: CPU_NUM_DEVICES (4) divided among the workers.

Per mode it prints the wall time, the epochs' share of it (per worker), when the first trial started, the
median overhead per trial (time from a trial's start to the next trial's start on the same worker, minus
its epochs' seconds; the launch's end for a worker's last trial) over all trials and over the trials that
were not their runner's first, XLA compiles (all trials / the most one trial compiled), and how much a
runner's RSS grew after its second trial; then per trial its worker, runner pid, the runner's trial
count, compiles, epochs' seconds, overhead and the runner's RSS after it. Which worker takes which trial
depends on timing, and with it how many graphs each worker compiles.

Run times on the quiet 2-core development machine (docs/figures.md, "Sweep speed", has the figures):

    .venv/bin/python benchmarks/bench_sweep.py --modes warm peer                 # eager, 4 trials, 1 worker: 35 s
    .venv/bin/python benchmarks/bench_sweep.py --modes warm --trials 10          # runner RSS over 10 trials: 30 s
    .venv/bin/python benchmarks/bench_sweep.py --runtime xla --modes warm peer   # XLA:CPU, 4 trials, 1 worker: 74 s
    .venv/bin/python benchmarks/bench_sweep.py --runtime xla --workers 2 --trials 6 --modes warm peers peer
                                                                                 # XLA:CPU, the demo's shape: 2.5 min
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

from octft.sweep.records import TrialOutcome, trial_record
from octft.train.devices import trial_device_env as device_env

NO_PRUNING = ["pruner.collapse.enabled=false", "pruner.wrapped.type=none"]
MODES = ("warm", "fresh", "peer", "peers")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="fixed.train.epochs (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="workers of octft sweep launch (and processes of `peers`)")
    parser.add_argument("--participants", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", choices=["cpu", "xla"], default="cpu")
    parser.add_argument("--devices-per-trial", type=int, default=None,
                        help="default: as `make demo`, CPU_NUM_DEVICES / workers on XLA:CPU, 1 on eager CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--peer-child", type=Path, help=argparse.SUPPRESS)  # internal: run the peer loop here
    parser.add_argument("--peer-index", type=int, default=0, help=argparse.SUPPRESS)
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
    ended: float | None = None  # seconds since the mode started when the trial's outcome was known


@dataclass
class ModeResult:
    name: str
    wall_s: float
    rows: list[TrialRow]
    load: tuple[float, float]


def overheads(rows: list[TrialRow], wall_end: float) -> None:
    """Fill `overhead_s`: next start on the same worker minus this start and its epochs. A worker's last
    trial has no next one: it counts to its own end (its outcome told), so that waiting for another worker's
    trial or the launch's exit is not charged to it (the summary's `tail` shows that part)."""
    by_worker: dict[int, list[TrialRow]] = {}
    for row in sorted(rows, key=lambda r: r.started):
        by_worker.setdefault(row.worker, []).append(row)
    for worker_rows in by_worker.values():
        for row, following in zip(worker_rows, [*worker_rows[1:], None]):
            end = following.started if following is not None else (row.ended if row.ended is not None else wall_end)
            row.overhead_s = end - row.started - row.epoch_s


def bench_spec(root: Path, epochs: int) -> Path:
    """The demo sweep copied under `root` with `epochs` fixed, its unfreeze range cut below `epochs` (a
    trial must unfreeze before its last epoch, or the spec is refused)."""
    import yaml

    spec_path = copy_specs(root)
    tree = yaml.safe_load(spec_path.read_text())
    tree["fixed"]["train.epochs"] = epochs
    unfreeze = tree["space"]["train.unfreeze_epoch"]
    unfreeze["high"] = min(unfreeze["high"], epochs - 1)
    unfreeze["low"] = min(unfreeze["low"], unfreeze["high"])
    spec_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return spec_path


def run_octft(name: str, root: Path, spec_path: Path, params: list[dict[str, Any]], args, data_dir: Path,
              cache_dir: Path) -> ModeResult:
    """`octft sweep launch` as a user runs it: the command line in a fresh interpreter, timed from its start."""
    import optuna

    directory = root / name
    directory.mkdir(parents=True)
    storage = f"sqlite:///{directory / 'optuna.db'}"
    study_name = f"bench-sweep-{name}"
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
    for trial_params in params:
        study.enqueue_trial(trial_params)
    command = [str(Path(sys.executable).with_name("octft")), "sweep", "launch", str(spec_path), "--storage", storage,
               "--n-trials", str(len(params)), "--workers", str(args.workers),
               "--devices-per-trial", str(args.devices_per_trial),
               f"study_name={study_name}", f"mlflow.tracking_uri=sqlite:///{directory / 'mlflow.db'}", *NO_PRUNING,
               *data_overrides(args, data_dir, cache_dir, directory)]
    if name == "fresh":
        command.append("--fresh-process-per-trial")
    load_before = os.getloadavg()[0]
    print(f"== {name}: octft sweep launch, {args.workers} worker(s)", flush=True)
    started = time.time()
    with open(directory / "launch.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - started
    if code:
        raise SystemExit(f"{name}: octft sweep launch exited with {code}; see {directory / 'launch.log'}")
    rows = []
    for trial in optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False):
        record = trial_record(trial)
        outcome = record.outcome or TrialOutcome(status="failed")
        rss = outcome.runner_rss_bytes
        rows.append(TrialRow(
            number=trial.number, worker=int(record.worker or 0), pid=record.runner_pid,
            runner_trials=outcome.runner_trials, compiles=outcome.compiles, epoch_s=outcome.epoch_seconds,
            # Optuna stores naive local datetimes, which .timestamp() reads as local time.
            started=trial.datetime_start.timestamp() - started, rss_mb=None if rss is None else rss / 2**20,
            ended=None if trial.datetime_complete is None else trial.datetime_complete.timestamp() - started,
        ))
    overheads(rows, wall)
    return ModeResult(name, wall, rows, (load_before, os.getloadavg()[0]))


def data_overrides(args, data_dir: Path, cache_dir: Path, directory: Path) -> list[str]:
    """Every mode's experiment overrides: the shared data and cache, its own runs and feature store."""
    return [f"data.uri={data_dir}", f"data.cache_dir={cache_dir}", f"runtime.kind={args.runtime}",
            f"output_dir={directory / 'runs'}", f"features.dir={directory / 'features'}"]


def run_peer(root: Path, spec_path: Path, params: list[dict[str, Any]], args, data_dir: Path, cache_dir: Path,
             processes: int = 1) -> ModeResult:
    """The peer loop in `processes` processes of its own (fresh interpreters, as a user's script would be),
    started together; with more than one they share one sqlite study, the way Optuna runs a study in parallel
    (the same script started once per worker), each with one octft worker's devices."""
    name = "peer" if processes == 1 else "peers"
    directory = root / name
    directory.mkdir(parents=True)
    storage = f"sqlite:///{directory / 'optuna.db'}" if processes > 1 else None
    if storage:
        import optuna

        study = optuna.create_study(storage=storage, study_name="peers", direction="maximize")
        for trial_params in params:
            study.enqueue_trial(trial_params)
        # Created here, before the clock starts: processes creating one MLflow database at once fail in its
        # migrations (alembic "expected to match one row"), which octft's launch avoids by creating it first.
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{directory / 'mlflow.db'}").search_experiments()
    what = "in-process study.optimize calling octft.train.recipe.train"
    print(f"== {name}: {what}" + (f", {processes} processes sharing one sqlite study" if storage else ""), flush=True)
    load_before = os.getloadavg()[0]
    started = time.time()
    job = {"spec": str(spec_path), "params": params, "dir": str(directory), "storage": storage,
           "overrides": data_overrides(args, data_dir, cache_dir, directory), "started": started}
    (directory / "job.json").write_text(json.dumps(job))
    children = []
    for index in range(processes):
        # The devices one octft worker's trials get (`octft.sweep.runners.runner_environment`), so both train alike.
        env = dict(os.environ, **device_env(index, args.devices_per_trial))
        with open(directory / f"peer-{index}.log", "w") as log:
            children.append(subprocess.Popen(
                [sys.executable, __file__, "--peer-child", str(directory / "job.json"), "--peer-index", str(index)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [child.wait() for child in children]
    wall = time.time() - started
    if any(codes):
        raise SystemExit(f"{name}: exited with {codes}; see {directory}/peer-*.log")
    rows = [TrialRow(**row) for index in range(processes)
            for row in json.loads((directory / f"rows-{index}.json").read_text())]
    overheads(rows, wall)
    return ModeResult(name, wall, rows, (load_before, os.getloadavg()[0]))


def peer_child(job_path: Path, index: int) -> None:
    """What a user writes without octft's launcher: an Optuna loop that builds each config and trains it."""
    import optuna
    import psutil

    from octft.config import load_experiment
    from octft.sweep.space import suggest
    from octft.sweep.spec import load_sweep
    from octft.train.recipe import train

    job = json.loads(job_path.read_text())
    started = job["started"]  # when the parent started this interpreter: its imports count, as octft's do
    directory = Path(job["dir"])
    spec = load_sweep(job["spec"])
    extra = [*job["overrides"], f"tracking.tracking_uri=sqlite:///{directory / 'mlflow.db'}"]
    rows = []

    def objective(trial: optuna.Trial) -> float:
        trial_started = time.time() - started
        params = suggest(trial, spec.space)  # the enqueued params
        cfg = load_experiment(spec.base, [*spec.trial_overrides(params), *extra, f"tracking.run_name=trial-{trial.number}"])
        result = train(cfg, progress=False)
        rows.append({"number": trial.number, "worker": index, "pid": os.getpid(), "runner_trials": len(rows) + 1,
                     "compiles": result.compiles, "epoch_s": result.epoch_seconds, "started": trial_started,
                     "rss_mb": psutil.Process().memory_info().rss / 2**20, "ended": time.time() - started})
        return result.best_value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if job["storage"]:  # one of several processes: the enqueued trials are taken from the shared study
        study = optuna.load_study(study_name="peers", storage=job["storage"])
        from optuna.trial import TrialState

        # Trials taken, running or ended; the enqueued ones wait in the study from the start. Two processes
        # checking at the same moment may both start one more (Optuna's own budget has that race): the
        # table would then show a trial more, with sampled params.
        taken = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        budget = optuna.study.MaxTrialsCallback(len(job["params"]), states=taken)
        study.optimize(objective, callbacks=[budget])
    else:
        study = optuna.create_study(direction="maximize")
        for trial_params in job["params"]:
            study.enqueue_trial(trial_params)
        study.optimize(objective, n_trials=len(job["params"]))
    (directory / f"rows-{index}.json").write_text(json.dumps(rows))


def summary(result: ModeResult, workers: int) -> dict[str, Any]:
    """The mode's figures: wall, epochs and their share, overheads, compiles, RSS."""
    rows = sorted(result.rows, key=lambda row: row.started)
    epochs = sum(row.epoch_s for row in rows)
    first_of_runner = {}
    for row in rows:
        first_of_runner.setdefault(row.pid, row)
    later = [row.overhead_s for row in rows if first_of_runner[row.pid] is not row]
    compiles = [row.compiles for row in rows if row.compiles is not None]
    rss = {}  # runner pid -> RSS after each of its trials
    for row in rows:
        if row.rss_mb is not None:
            rss.setdefault(row.pid, []).append(row.rss_mb)
    # Growth after a runner's second trial: its first allocates what every trial reuses (graphs, data, pools).
    growth = [values[-1] - values[1] for values in rss.values() if len(values) >= 3]
    return {
        "wall": result.wall_s, "epochs": epochs, "share": epochs / workers / result.wall_s,
        "first_start": rows[0].started if rows else float("nan"),
        "overhead": statistics.median(row.overhead_s for row in rows) if rows else float("nan"),
        "overhead_warm": statistics.median(later) if later else float("nan"),
        "compiles": sum(compiles) if compiles else None, "compiles_max": max(compiles) if compiles else None,
        "rss_growth": max(growth) if growth else None,
        # From the last trial's end to the run's: workers and runners exiting, the launch's closing writes.
        "tail": result.wall_s - max((row.ended for row in rows if row.ended is not None), default=result.wall_s),
    }


def print_report(results: list[ModeResult], args, seconds: float) -> None:
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"demo space, {args.trials} trials x {args.epochs} epochs, {args.participants} participants, "
          f"runtime.kind={args.runtime}, {args.devices_per_trial} device(s) per trial, no pruning, "
          f"octft workers {args.workers} (the peer: one process)")
    print("overhead: from a trial's start to the next one's on its worker (its own end for a worker's last), less its "
          "epochs;\n  tail: from the last trial's end to the run's end (exits, closing writes);\n  'after 1st': the median over trials that were not their runner's first; compiles: all trials / the most "
          "one trial compiled;\n  RSS growth: a runner's RSS after its last trial less after its second")
    header = (f"{'mode':<7}{'wall s':>8}{'epochs s':>9}{'share':>7}{'1st trial at s':>15}{'overhead median s':>19}"
              f"{'after 1st':>10}{'tail s':>8}{'compiles':>10}{'RSS growth MiB':>16}{'load':>12}")
    print(header)
    print("-" * len(header))
    for result in results:
        figures = summary(result, 1 if result.name == "peer" else args.workers)  # peers: one per worker
        compiles = "-" if figures["compiles"] is None else f"{figures['compiles']}/{figures['compiles_max']}"
        growth = "-" if figures["rss_growth"] is None else f"{figures['rss_growth']:+.0f}"
        print(f"{result.name:<7}{figures['wall']:>8.1f}{figures['epochs']:>9.0f}{figures['share']:>7.2f}"
              f"{figures['first_start']:>15.1f}{figures['overhead']:>19.1f}{figures['overhead_warm']:>10.1f}"
              f"{figures['tail']:>8.1f}{compiles:>10}{growth:>16}{result.load[0]:>6.1f}->{result.load[1]:<5.1f}")
    for result in results:
        print(f"\n{result.name}: per trial")
        print(f"{'trial':>5}{'worker':>7}{'pid':>8}{'runner trial':>13}{'started s':>10}{'compiles':>9}{'epochs s':>9}"
              f"{'overhead s':>11}{'RSS MiB':>9}")
        for row in sorted(result.rows, key=lambda row: row.number):
            print(f"{row.number:>5}{row.worker:>7}{row.pid or '-':>8}{row.runner_trials or '-':>13}{row.started:>10.1f}"
                  f"{'-' if row.compiles is None else row.compiles:>9}{row.epoch_s:>9.1f}"
                  f"{'-' if row.overhead_s is None else f'{row.overhead_s:.1f}':>11}"
                  f"{'-' if row.rss_mb is None else f'{row.rss_mb:.0f}':>9}")
    print(f"\nthis benchmark took {seconds:.0f} s (data and cache included)")


# What every mode imports: compiled to bytecode once, before any mode is timed.
WARM_IMPORTS = ("octft.cli", "octft.sweep.launch", "octft.sweep.worker", "octft.sweep.trial", "octft.train.recipe",
                "octft.train.loop", "octft.data.dataset", "octft.data.audit", "octft.track.mlflow_store",
                "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "optuna")


def cache_bytecode(args) -> None:
    """Let every process of every mode read cached bytecode, as on a user's machine.

    The development machine sets PYTHONDONTWRITEBYTECODE=1 and its venv holds no bytecode: each process
    would compile torch, mlflow and the rest from source (15-30 s of CPU), which is no cost of octft's design
    or the peer's. Children get a bytecode cache under `~/.cache/octft/bench-pycache`, filled here first.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(Path.home() / ".cache" / "octft" / "bench-pycache")
    imports = WARM_IMPORTS + (("torch_xla", "torch_xla.runtime") if args.runtime == "xla" else ())
    started = time.time()
    subprocess.run([sys.executable, "-c", "; ".join(f"import {name}" for name in imports)], check=True)
    print(f"bytecode cache {os.environ['PYTHONPYCACHEPREFIX']}: ready ({time.time() - started:.0f} s)", flush=True)


def main(argv=None) -> None:
    begun = time.time()
    args = parse_args(argv)
    if args.peer_child:
        peer_child(args.peer_child, args.peer_index)
        return
    if args.runtime == "xla":
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    if args.devices_per_trial is None:
        # As `make demo` shares XLA:CPU devices: CPU_NUM_DEVICES among the workers; eager trials use one.
        devices = int(os.environ.get("CPU_NUM_DEVICES", "4")) if args.runtime == "xla" else args.workers
        args.devices_per_trial = max(1, devices // args.workers)
    root = args.dir or Path(tempfile.mkdtemp(prefix="octft-bench-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    cache_bytecode(args)
    spec_path = bench_spec(root, args.epochs)
    data_dir, cache_dir = prepare(root, args.participants)
    params = draw_params(spec_path, args.trials, args.seed)
    results = []
    for mode in args.modes:
        if mode in ("peer", "peers"):
            processes = 1 if mode == "peer" else args.workers
            results.append(run_peer(root, spec_path, params, args, data_dir, cache_dir, processes))
        else:
            results.append(run_octft(mode, root, spec_path, params, args, data_dir, cache_dir))
    print_report(results, args, time.time() - begun)
    print(f"\nfiles under {root}")


if __name__ == "__main__":
    main()
