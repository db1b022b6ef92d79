"""One trial, as a runner runs it: exactly what `octft train <base> k=v ...` runs, reporting to Optuna; and the
warm runner process (`python -m octft.sweep.trial --reply-fd N`, see `octft.sweep.runners`).

Every runner (a warm process, a fresh process, or the worker's own process) calls `run_trial(plan, number,
cache)`. It reads the trial's params from the study, turns them into the trial's overrides with the plan (the same
function that made the replay command), trains with `octft.train.recipe.train` into the MLflow run its worker
made, and hands back one typed outcome. It never raises for a bad trial: a trial that fails is an outcome.

    >>> outcome = run_trial(plan, 3, TrialCache())                                  # doctest: +SKIP
    >>> outcome.status, outcome.best_value                                          # doctest: +SKIP
    ('early_stopped', 0.71)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import optuna
import psutil
from optuna.storages import RDBStorage

from octft.console import quiet_console
from octft.data.layout import CLASS_SHORT_NAMES
from octft.sweep.plan import LaunchPlan
from octft.sweep.pruners import CollapsePruner, PassReads, build_pruner, epoch_record, reads_rungs, record_epoch
from octft.registry.model import log_trial_model
from octft.sweep.records import EpochRecord, TrialOutcome, trial_record
from octft.sweep.lifetime import watch_parent
from octft.sweep.write_behind import DeferredTracker, WriteBehind
from octft.stores import TRACKING_ENV
from octft.sweep.storage import open_study_storage
from octft.track.mlflow_store import MlflowStore, MlflowTracker
from octft.config import ExperimentConfig
from octft.train.recipe import pass_key, train, train_heads
from octft.train.setup import RunCache

# A trial's metrics are written at most this often (and when it ends): a probe's epochs take milliseconds.
METRICS_FLUSH_S = 2.0
RUNNER_ORPHANED = 3  # a runner's exit code when its worker ended first


class OptunaReporter:
    """The training loop's `Reporter` for a live Optuna trial: records each epoch and says when to prune.

    >>> reporter = OptunaReporter(trial, study.pruner, metric="val/balanced_accuracy")   # doctest: +SKIP
    >>> reporter.report(0, 0.41, metrics)        # None, or the reason to stop          # doctest: +SKIP
    """

    def __init__(self, trial: optuna.trial.Trial, pruner: CollapsePruner, *, metric: str, tracker=None) -> None:
        self.trial, self.pruner, self.metric, self.tracker = trial, pruner, metric, tracker
        self.pruned: dict | None = None  # why it was pruned: {"prune_reason", "epoch", "detail", ...}

    def report(self, epoch: int, value: float, metrics: dict[str, float]) -> str | None:
        record_epoch(self.trial, epoch, float(metrics.get(self.metric, value)),
                     pred_frac=[metrics[f"val/pred_frac_{name}"] for name in CLASS_SHORT_NAMES],
                     balanced_accuracy=metrics["val/balanced_accuracy"])
        if not self.trial.should_prune():
            return None
        return _pruned(self, self.trial.study, self.trial, epoch)


class PassReporter:
    """The `Reporter` of one head of a stacked pass: the pruner decides here, on the trial as the pass holds it (its
    epochs so far, the study's COMPLETE trials read at most once a second for the whole pass: `reads`), and the epoch's
    Optuna writes (its collapse record, then its value, as `record_epoch` makes them) go to the pass's `writer`,
    which its worker drains before it tells Optuna how the trial ended."""

    def __init__(self, frozen: optuna.trial.FrozenTrial, storage: RDBStorage, pruner: CollapsePruner, *, metric: str,
                 tracker: DeferredTracker, reads: PassReads, writer: WriteBehind) -> None:
        self.frozen, self.storage, self.pruner, self.metric = frozen, storage, pruner, metric
        self.tracker, self.reads, self.writer = tracker, reads, writer
        self.rungs = reads_rungs(pruner)
        self.pruned: dict | None = None

    def report(self, epoch: int, value: float, metrics: dict[str, float]) -> str | None:
        value = float(metrics.get(self.metric, value))
        record = epoch_record(epoch, [metrics[f"val/pred_frac_{name}"] for name in CLASS_SHORT_NAMES],
                              metrics["val/balanced_accuracy"])
        trial_id = self.frozen._trial_id
        self.writer.write_trial(self.tracker.run_id, trial_id, "set_trial_user_attr", EpochRecord.attr(epoch), record)
        self.writer.write_trial(self.tracker.run_id, trial_id, "set_trial_intermediate_value", epoch, value)
        self.frozen.user_attrs[EpochRecord.attr(epoch)] = record
        self.frozen.intermediate_values[epoch] = value
        if self.rungs:  # successive halving and Hyperband keep their rungs in the trial's system attrs, in the storage
            self.frozen.system_attrs = self.storage.get_trial_system_attrs(trial_id)
        study = self.reads.at(epoch)
        if not self.pruner.prune(study, self.frozen):
            return None
        return _pruned(self, study, self.frozen, epoch)


def _pruned(reporter: OptunaReporter | PassReporter, study, trial, epoch: int) -> str:
    """Why `reporter`'s trial is pruned at `epoch`, kept on the reporter and tagged on its run; the stop reason."""
    pruner = reporter.pruner
    reporter.pruned = pruner.prune_reason(study, trial) or {
        "prune_reason": "pruner", "epoch": epoch, "detail": f"{type(pruner).__name__} pruned at epoch {epoch}"}
    if reporter.tracker is not None:
        reporter.tracker.set_tags({"octft.prune_reason": reporter.pruned["prune_reason"],
                                   "octft.prune_epoch": str(reporter.pruned["epoch"])})
    return f"pruned ({reporter.pruned['prune_reason']}): {reporter.pruned['detail']}"


class TrialCache:
    """What a runner keeps from one trial to the next: the opened study, and what its runs built (`RunCache`)."""

    def __init__(self) -> None:
        self.run = RunCache()
        self.trials = 0
        self._study: tuple[tuple[str, str], optuna.Study, RDBStorage] | None = None
        self._writer: tuple[str, WriteBehind] | None = None

    def writer(self, plan: LaunchPlan) -> WriteBehind:
        """The helper process that makes stacked passes' writes to `plan`'s MLflow store and Optuna storage (started
        on first use)."""
        key = f"{plan.tracking_url()} {plan.storage_url()}"
        if self._writer is None or self._writer[0] != key:
            self.close()
            self._writer = (key, WriteBehind(plan.tracking_url(), plan.storage_url(),
                                             Path(plan.study_dir) / f"pass-writer-{os.getpid()}.log"))
        return self._writer[1]

    def close(self, timeout: float = 10) -> None:
        """End the pass writer, if one was started (what it still holds is written first, for up to `timeout` s)."""
        if self._writer is not None:
            self._writer[1].close(timeout)
            self._writer = None

    def study(self, plan: LaunchPlan) -> tuple[optuna.Study, RDBStorage]:
        key = (plan.storage, plan.study_name)
        if self._study is None or self._study[0] != key:
            storage = open_study_storage(plan.storage_url(), heartbeat_interval=None)  # its worker beats
            # A fixed-seed random sampler: the params are sampled already; this study only reports and prunes.
            study = optuna.load_study(study_name=plan.study_name, storage=storage, pruner=build_pruner(plan.spec()),
                                      sampler=optuna.samplers.RandomSampler(seed=0))
            self._study = (key, study, storage)
        return self._study[1], self._study[2]


def run_trial(plan: LaunchPlan, number: int, cache: TrialCache) -> TrialOutcome:
    """Train trial `number` of `plan`'s study as its replay command does, reporting to Optuna; its outcome."""
    started = time.perf_counter()
    cache.trials += 1
    tracker = None
    try:
        cfg, tracker, reporter = _trial_inputs(plan, number, cache)
        result = train(cfg, run_dir=plan.trial_dir(number), reporter=reporter, tracker=tracker, progress=False,
                       cache=cache.run)
    except Exception as error:  # the trial failed, not the runner: its worker tells Optuna FAIL with this reason
        traceback.print_exc()
        result = error
    outcome = _outcome(plan, result, reporter if tracker is not None else None, tracker, cache)
    del tracker
    # The trial's model, optimizer and device buffers go now, not whenever the next trial allocates.
    gc.collect()
    outcome.seconds = time.perf_counter() - started
    outcome.runner_rss_bytes = int(psutil.Process().memory_info().rss)
    return outcome


def run_trials(plan: LaunchPlan, numbers: list[int], cache: TrialCache) -> list[TrialOutcome]:
    """Train the probe trials `numbers` of `plan`'s study together: trials whose configs share a stacked pass
    (`octft.train.recipe.pass_key`) train their heads in one (`train_heads`), any other alone (`run_trial`). Each
    trial's outcome, its MLflow run and its folder are what its replay command gives it, to float tolerance."""
    started = time.perf_counter()
    outcomes: dict[int, TrialOutcome] = {}
    passes: dict[str, list[tuple[int, object, object, object]]] = {}
    reads = PassReads(cache.study(plan)[0])
    writer, lost = cache.writer(plan), None
    for number in numbers:
        try:
            cfg, tracker, reporter = _trial_inputs(plan, number, cache, reads=reads, writer=writer)
        except Exception as error:
            traceback.print_exc()
            outcomes[number] = _outcome(plan, error, None, None, cache)
            continue
        key = pass_key(cfg)
        if key is None:
            del tracker
            outcomes[number] = run_trial(plan, number, cache)
        else:
            passes.setdefault(key, []).append((number, cfg, tracker, reporter))
    for members in passes.values():
        cache.trials += len(members)
        try:
            results = train_heads([cfg for _, cfg, _, _ in members], [plan.trial_dir(number) for number, *_ in members],
                                  reporters=[reporter for *_, reporter in members],
                                  trackers=[tracker for _, _, tracker, _ in members], cache=cache.run)
        except Exception as error:  # the pass itself failed: each of its trials, not the runner
            traceback.print_exc()
            results = [error] * len(members)
        # Every run's writes done before its worker tells Optuna and ends the run; a run whose writes failed fails.
        if lost is None:
            try:
                failed_writes = writer.drain()
            except RuntimeError as error:  # the writer died: the records it held are lost (the next call starts one)
                traceback.print_exc()
                lost = str(error)
                cache.close(timeout=0)
        if lost is not None:
            failed_writes = {tracker.run_id: lost for _, _, tracker, _ in members}
        for (number, _, tracker, reporter), result in zip(members, results):
            if tracker.run_id in failed_writes and not isinstance(result, Exception):
                result, tracker.end_status = RuntimeError(failed_writes[tracker.run_id]), None
            outcomes[number] = _outcome(plan, result, reporter, tracker, cache)
    gc.collect()
    seconds, rss = time.perf_counter() - started, int(psutil.Process().memory_info().rss)
    for outcome in outcomes.values():
        outcome.seconds, outcome.runner_rss_bytes = seconds, rss
    return [outcomes[number] for number in numbers]


def _trial_inputs(plan: LaunchPlan, number: int, cache: TrialCache, *, reads: PassReads | None = None,
                  writer: WriteBehind | None = None
                  ) -> tuple[ExperimentConfig, MlflowTracker | DeferredTracker, OptunaReporter | PassReporter]:
    """Trial `number`'s config (from its params, as its replay command has it), its MLflow run (which its worker made)
    and its Optuna reporter. A head of a stacked pass shares the pass's study reads (`reads`) and its writer."""
    study, storage = cache.study(plan)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(plan.study_name), number)
    frozen = storage.get_trial(trial_id)
    cfg = plan.trial_config(plan.trial_overrides(frozen.params))
    spec = plan.spec()
    cfg.tracking.tracking_uri, cfg.tracking.experiment = plan.tracking_uri, spec.mlflow.experiment
    cfg.tracking.run_name = f"trial-{number}"
    # Left open: its worker ends it once Optuna holds the trial's state (`octft.sweep.tracking.settle_run`).
    run_id = trial_record(frozen).mlflow_run_id
    if writer is not None:
        tracker = DeferredTracker(writer, run_id)
        reporter = PassReporter(frozen, storage, study.pruner, metric=spec.objective.metric, tracker=tracker,
                                reads=reads, writer=writer)
        return cfg, tracker, reporter
    # A probe's epochs take milliseconds: its metrics are written once, when it ends.
    tracker = MlflowTracker(plan.tracking_url(), run_id=run_id, log_system_metrics=not plan.is_probe(),
                            flush_interval_s=math.inf if plan.is_probe() else METRICS_FLUSH_S, ends_run=False)
    reporter = OptunaReporter(optuna.trial.Trial(study, trial_id), study.pruner, metric=spec.objective.metric,
                              tracker=tracker)
    return cfg, tracker, reporter


def _outcome(plan: LaunchPlan, result, reporter: OptunaReporter | None, tracker: MlflowTracker | None,
             cache: TrialCache) -> TrialOutcome:
    """A trial's outcome from what its training returned (a `TrainResult`, or the exception that failed it)."""
    if isinstance(result, Exception):
        outcome = TrialOutcome(status="failed", stop_reason=f"{type(result).__name__}: {result}"[:2000],
                               runner_pid=os.getpid(), runner_trials=cache.trials)
    else:
        pruned = reporter.pruned or {}
        outcome = TrialOutcome(
            status=result.status, best_value=result.best_value if math.isfinite(result.best_value) else None,
            best_epoch=result.best_epoch, epochs_run=result.epochs_run,
            best_metrics={key: value for key, value in result.best_metrics.items() if key.startswith("val/")},
            stop_reason=result.stop_reason, prune_reason=pruned.get("prune_reason"), prune_epoch=pruned.get("epoch"),
            prune_detail=pruned.get("detail"), compiles=result.compiles, compile_seconds=result.compile_seconds,
            epoch_seconds=result.epoch_seconds, runner_pid=os.getpid(), runner_trials=cache.trials)
        if outcome.succeeded and not plan.is_probe():
            log_model(tracker, result, outcome)
    outcome.run_status = getattr(tracker, "end_status", None)
    return outcome


def log_model(tracker: MlflowTracker, result, outcome: TrialOutcome) -> None:
    """A fine-tune trial's best checkpoint as an MLflow LoggedModel linked to its run, with its best metrics (`octft
    promote` registers it). Probe trials get theirs when promoted: one per head would cost about a second a trial."""
    try:
        log_trial_model(tracker.store, tracker.run_id, result.run_dir / "checkpoint", outcome.best_metrics,
                        step=result.best_epoch)
    except Exception:  # the trial trained: promote logs the model from the run's checkpoint artifact instead
        traceback.print_exc()


# ---------------------------------------------------------------------------------------------------- the runner process


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send this process's output to `log_path` while the block runs: file descriptors 1 and 2 (native code's, and
    Python's in a plain process) and `sys.stdout` / `sys.stderr` (wherever they were pointed, e.g. by a test)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log, open(log_path, "a", buffering=1) as text:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
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
    cache = TrialCache()
    plans: dict[str, LaunchPlan] = {}
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        plan = plans.get(request["plan"]) or plans.setdefault(request["plan"], LaunchPlan.read(request["plan"]))
        number = int(request["trial"])
        with output_to(plan.trial_dir(number) / "trial.log"):
            print(f"trial {number} on runner pid {os.getpid()} (its trial {cache.trials + 1})", flush=True)
            outcome = run_trial(plan, number, cache)
            print(f"trial {number} {outcome.status}: {outcome.compiles} XLA compiles, {outcome.epoch_seconds:.1f} s of "
                  f"epochs in {outcome.seconds:.1f} s", flush=True)
        replies.write(outcome.to_json() + "\n")
        replies.flush()
    return cache.trials


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m octft.sweep.trial", description="a warm trial runner process")
    parser.add_argument("--reply-fd", type=int, required=True, help="file descriptor the outcomes are written to")
    args = parser.parse_args(argv)
    # This process's output is its log (runner-<i>.log, and each trial's trial.log while it runs): every library
    # record and warning goes there, none to the launch's console.
    with quiet_console(verbose=True):
        return _serve_requests(args)


def _serve_requests(args: argparse.Namespace) -> int:
    # A runner whose worker is gone stops at once, mid-trial: only the worker may tell Optuna and end the trial's run,
    # so the run stays open until the next launch (or a live worker) fails the trial and retries it.
    watch_parent(lambda: os._exit(RUNNER_ORPHANED))
    # The MLflow store opened before the first request arrives (its worker starts this process first thing, so the
    # imports and this overlap the worker's own start instead of delaying the first trial).
    if os.environ.get(TRACKING_ENV):
        with contextlib.suppress(Exception):  # a store that cannot be opened fails again inside a trial, with context
            MlflowStore(os.environ[TRACKING_ENV]).warm()
    # What the imports made (about 500,000 objects: torch, MLflow, scikit-learn) lives as long as the runner: moved out
    # of the collector's sight, the collection after each trial scans only what trials made (0.6-0.7 s otherwise).
    gc.freeze()
    with os.fdopen(args.reply_fd, "w") as replies:
        try:
            serve(sys.stdin, replies)
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    code = main()
    # Every outcome is answered and every run ended: skip the interpreter's teardown of torch, XLA and MLflow (about
    # 2 s, which the worker would wait for at the end of every sweep).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
