"""A trial and its warm runner: what a worker hands over, what comes back, and the process that trains.

A worker (`octft.sweep.workers`) keeps one long-lived trial runner, `python -m octft.sweep.trial
--reply-fd N`. The runner imports torch (and torch_xla) once, then reads one `TrialRequest` per line on
stdin and runs it exactly as `octft train <base> k=v ...` would (`octft.train.recipe.train`), with an
`OptunaReporter` attached, and answers one `TrialOutcome` line on file descriptor N. Between trials it
keeps what is expensive to make again: the XLA graphs it compiled (every per-trial value enters them as
device data, so a trial with known shapes compiles nothing), the opened study, and the data setup
(audit and cache check) of the last data settings it saw.

Each trial's output, Python's and the native libraries' alike, goes to `<run_dir>/trial.log`. A runner
that dies (segfault, out-of-memory kill, XLA abort) fails only the trial it was running: the worker
describes the exit from that log and starts a new runner for the next trial. The storage URL comes from
$OCTFT_OPTUNA_STORAGE, never the command line (it may hold a password).

This module imports neither torch nor mlflow at module level: the worker imports it for the records.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna

from octft.data.layout import CLASS_SHORT_NAMES
from octft.sweep.pruners import UNFREEZE_ATTR, CollapsePruner, record_epoch
from octft.sweep.spec import STORAGE_ENV


@dataclass
class TrialRequest:
    """One trial for a runner: the replay command's parts plus where to report. Crosses a pipe as JSON.

    `base` and `overrides` are exactly what `octft train` gets on replay (fixed + sampled params + the
    launch's experiment overrides), resolved once by the worker.
    """

    trial_id: int
    number: int
    run_dir: str
    base: str
    overrides: list[str]
    study_name: str
    tracking_uri: str
    mlflow_experiment: str
    parent_run_id: str
    metric: str
    sweep: dict[str, Any]  # the resolved SweepSpec (its pruner), without the storage URL

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrialRequest":
        return cls(**json.loads(text))


@dataclass
class TrialOutcome:
    """How a trial ended, as its runner (or, when the runner died, its worker) saw it.

    `status`: "completed", "early_stopped", "pruned" or "failed" (then `stop_reason` says why).
    `compiles` / `compile_seconds`: XLA compiles this trial caused, not the runner's total.
    `epoch_seconds`: the epochs' own time; `seconds`: the whole trial inside the runner.
    """

    status: str
    best_value: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    mlflow_run_id: str | None = None
    compiles: int = 0
    compile_seconds: float = 0.0
    epoch_seconds: float = 0.0
    seconds: float = 0.0
    runner_pid: int | None = None
    runner_trials: int = 0  # trials this runner has run, this one included (1: a fresh runner)
    runner_rss_bytes: int | None = None  # the runner's resident memory after the trial
    run_status: str | None = None  # how the runner ended the trial's MLflow run (None: it did not)

    @property
    def succeeded(self) -> bool:
        return self.status in ("completed", "early_stopped") and self.best_value is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> "TrialOutcome":
        return cls(**json.loads(text))


class OptunaReporter:
    """The training loop's `Reporter` for a live Optuna trial: records each epoch and says when to prune.

    >>> reporter = OptunaReporter(trial, study.pruner, n_classes=4, unfreeze_epoch=2)   # doctest: +SKIP
    >>> reporter.report(0, 0.41, metrics)        # None, or the reason to stop          # doctest: +SKIP
    """

    def __init__(
        self, trial: optuna.trial.Trial, pruner: CollapsePruner, n_classes: int, unfreeze_epoch: int,
        *, tracker=None, metric: str = "val/balanced_accuracy",
    ) -> None:
        self.trial = trial
        self.pruner = pruner
        self.class_names = CLASS_SHORT_NAMES[:n_classes]
        self.unfreeze_epoch = unfreeze_epoch
        self.tracker = tracker
        self.metric = metric
        self._unfreeze_recorded = False

    def report(self, epoch: int, value: float, metrics: dict[str, float]) -> str | None:
        if not self._unfreeze_recorded:
            self.trial.set_user_attr(UNFREEZE_ATTR, self.unfreeze_epoch)
            self._unfreeze_recorded = True
        objective = float(metrics.get(self.metric, value))
        record_epoch(
            self.trial, epoch, objective,
            pred_frac=[metrics[f"val/pred_frac_{name}"] for name in self.class_names],
            balanced_accuracy=metrics["val/balanced_accuracy"],
        )
        if not self.trial.should_prune():
            return None
        reason = self.pruner.prune_reason(self.trial.study, self.trial) or {
            "prune_reason": "pruner", "epoch": epoch, "detail": f"{type(self.pruner).__name__} pruned at epoch {epoch}"
        }
        self.trial.set_user_attr("prune_reason", reason["prune_reason"])
        self.trial.set_user_attr("prune_epoch", int(reason["epoch"]))
        self.trial.set_user_attr("prune_detail", reason["detail"])
        if self.tracker is not None:
            self.tracker.set_tags({"octft.prune_reason": reason["prune_reason"], "octft.prune_epoch": str(reason["epoch"])})
        return f"pruned ({reason['prune_reason']}): {reason['detail']}"


class _WarmState:
    """What a runner keeps from one trial to the next: the opened study and the last data setup."""

    def __init__(self) -> None:
        from octft.train.recipe import DataSetups

        self.study: optuna.Study | None = None
        self.data = DataSetups()
        self.trials = 0

    def open_study(self, request: TrialRequest) -> optuna.Study:
        if self.study is None or self.study.study_name != request.study_name:
            from octft.sweep.pruners import build_pruner
            from octft.sweep.spec import SweepSpec
            from octft.sweep.study import open_storage

            spec = SweepSpec.model_validate(request.sweep)
            storage = open_storage(os.environ[STORAGE_ENV], heartbeat_interval=None)  # the worker beats
            # A fixed-seed random sampler: the params are already sampled; this study only reports and prunes.
            self.study = optuna.load_study(study_name=request.study_name, storage=storage, pruner=build_pruner(spec),
                                           sampler=optuna.samplers.RandomSampler(seed=0))
        return self.study


def run_trial(request: TrialRequest, warm: _WarmState) -> TrialOutcome:
    """Train one trial as `octft train <base> k=v ...` does, reporting to Optuna; never raises for a bad trial."""
    from octft.config import load_experiment
    from octft.sweep.tracking import update_parent_best
    from octft.track import MlflowTracker
    from octft.train.recipe import train

    started = time.perf_counter()
    warm.trials += 1
    study = warm.open_study(request)
    trial = optuna.trial.Trial(study, request.trial_id)
    run_dir = Path(request.run_dir)
    outcome = TrialOutcome(status="failed", runner_pid=os.getpid(), runner_trials=warm.trials)
    tracker = None
    try:
        cfg = load_experiment(request.base, request.overrides)
        cfg.tracking.tracking_uri = request.tracking_uri
        cfg.tracking.experiment = request.mlflow_experiment
        cfg.tracking.run_name = f"trial-{request.number}"
        tracker = MlflowTracker(
            request.tracking_uri, request.mlflow_experiment, cfg.tracking.run_name, parent_run_id=request.parent_run_id,
            tags={"optuna.study": request.study_name, "optuna.trial_number": str(request.number),
                  "octft.run_dir": str(run_dir)},
            log_system_metrics=True,
        )
        trial.set_user_attr("mlflow_run_id", tracker.run_id)
        # The trials told so far (on any worker): the worker leaves MLflow to its runner, and the launch updates
        # it once more at its end.
        update_parent_best(request.tracking_uri, request.parent_run_id, study, request.metric)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        reporter = OptunaReporter(trial, study.pruner, len(CLASS_SHORT_NAMES), cfg.train.unfreeze_epoch,
                                  tracker=tracker, metric=request.metric)
        result = train(cfg, run_dir=run_dir, reporter=reporter, tracker=tracker, progress=False, setups=warm.data)
    except Exception as error:
        # train() ended the MLflow run FAILED; the worker tells Optuna FAIL with this reason.
        traceback.print_exc()
        if tracker is not None and tracker.run_id is not None:
            outcome.mlflow_run_id = tracker.run_id
        outcome.stop_reason = f"{type(error).__name__}: {error}"[:2000]
    else:
        outcome.status = result.status
        outcome.best_value = result.best_value if math.isfinite(result.best_value) else None
        outcome.best_epoch = result.best_epoch
        outcome.epochs_run = result.epochs_run
        outcome.best_metrics = {key: value for key, value in result.best_metrics.items() if key.startswith("val/")}
        outcome.stop_reason = result.stop_reason
        outcome.mlflow_run_id = result.run_id
        outcome.compiles = result.compiles
        outcome.compile_seconds = result.compile_seconds
        outcome.epoch_seconds = result.epoch_seconds
    outcome.run_status = getattr(tracker, "end_status", None)
    # The trial's model, optimizer and device buffers go now, not whenever the next trial allocates.
    del trial, tracker
    gc.collect()
    outcome.seconds = time.perf_counter() - started
    outcome.runner_rss_bytes = _rss_bytes()
    return outcome


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send file descriptors 1 and 2 (Python's and native code's output) to `log_path` while the block runs."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def serve(requests: TextIO, replies: TextIO) -> int:
    """Run each request line of `requests` as a trial; answer each with one outcome line. Returns trials run."""
    warm = _WarmState()
    for line in requests:
        if not line.strip():
            continue
        request = TrialRequest.from_json(line)
        with output_to(Path(request.run_dir) / "trial.log"):
            print(f"trial {request.number} on runner pid {os.getpid()} (its trial {warm.trials + 1})", flush=True)
            outcome = run_trial(request, warm)
            print(f"trial {request.number} {outcome.status}: {outcome.compiles} XLA compiles, "
                  f"{outcome.epoch_seconds:.1f} s of epochs in {outcome.seconds:.1f} s", flush=True)
        replies.write(outcome.to_json() + "\n")
        replies.flush()
    return warm.trials


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m octft.sweep.trial", description=__doc__.split("\n")[0])
    parser.add_argument("--reply-fd", type=int, required=True, help="file descriptor the outcomes are written to")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Imported, and the MLflow store opened, before the first request arrives: the worker starts its runner
    # first thing, so this overlaps the worker's and the launch's own start instead of delaying the first trial.
    import octft.data.dataset  # noqa: F401  (the data setup's)
    import octft.train.loop  # noqa: F401  (torch)
    import octft.train.recipe  # noqa: F401
    from octft.sweep.tracking import open_tracking_store

    if os.environ.get("MLFLOW_TRACKING_URI"):  # the launch sets it to the sweep's
        open_tracking_store(os.environ["MLFLOW_TRACKING_URI"])
    # What the imports made (about 500,000 objects: torch, MLflow, scikit-learn) lives as long as the runner:
    # moved out of the collector's sight, the collection after each trial (run_trial) scans only what trials
    # made. Measured: a full collection 0.6-0.7 s with them in sight, microseconds without.
    gc.freeze()

    with os.fdopen(args.reply_fd, "w") as replies:
        try:
            serve(sys.stdin, replies)
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    code = main()
    # Every outcome is answered and every run ended: skip the interpreter's teardown of torch, XLA and MLflow
    # (about 2 s, which the worker would wait for at the end of every sweep).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
