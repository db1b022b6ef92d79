"""One trial in its own process: `python -m octft.sweep.trial SPEC --trial-id ID --run-dir DIR [--override k=v ...]`.

Started by a worker (`octft.sweep.workers`), which took the trial and sampled its params. This process
builds the config (base + fixed + params + command-line overrides), opens an MLflow child run of the
study's parent run, trains with an `OptunaReporter` that reports every epoch to the live trial, and
writes `<run_dir>/outcome.json` for the worker, which tells Optuna how the trial ended. The storage URL
comes from $OCTFT_OPTUNA_STORAGE and the tracking URI from $MLFLOW_TRACKING_URI (not the command line:
they may hold passwords).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from octft.data.layout import CLASS_SHORT_NAMES
from octft.sweep.pruners import UNFREEZE_ATTR, CollapsePruner, record_epoch


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


def write_outcome(run_dir: Path, **outcome: Any) -> None:
    """`<run_dir>/outcome.json`, written atomically (the worker reads it once this process exits)."""
    path = run_dir / "outcome.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(outcome, indent=2, default=str) + "\n")
    partial.replace(path)


def run_trial(
    spec_path: str, trial_id: int, run_dir: Path, sweep_overrides: Sequence[str] = (),
    experiment_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train the trial `trial_id` of the spec's study in `run_dir`; return (and write) its outcome."""
    from octft.config import load_experiment
    from octft.sweep.pruners import build_pruner
    from octft.sweep.study import load_launch_spec, open_storage, sweep_tracking_uri
    from octft.track import MlflowTracker
    from octft.train.recipe import train

    spec, _, _ = load_launch_spec(spec_path, [*sweep_overrides, *experiment_overrides])
    tracking_uri = sweep_tracking_uri(spec)
    storage = open_storage(spec.storage, heartbeat_interval=None)  # the worker beats for this trial
    # A fixed-seed random sampler: the params are already sampled; this study only reports and prunes.
    study = optuna.load_study(study_name=spec.study_name, storage=storage, pruner=build_pruner(spec),
                              sampler=optuna.samplers.RandomSampler(seed=0))
    frozen = storage.get_trial(trial_id)
    trial = optuna.trial.Trial(study, trial_id)

    trial_overrides = spec.trial_overrides(frozen.params)
    cfg = load_experiment(spec.base, [*trial_overrides, *experiment_overrides])
    cfg.tracking.tracking_uri = tracking_uri
    cfg.tracking.experiment = spec.mlflow.experiment
    cfg.tracking.run_name = f"trial-{frozen.number}"

    tracker = MlflowTracker(
        tracking_uri, spec.mlflow.experiment, cfg.tracking.run_name,
        parent_run_id=str(study.user_attrs["mlflow_parent_run_id"]),
        tags={"optuna.study": spec.study_name, "optuna.trial_number": str(frozen.number),
              "octft.run_dir": str(run_dir.resolve())},
        log_system_metrics=True,
    )
    trial.set_user_attr("mlflow_run_id", tracker.run_id)
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    trial.set_user_attr("overrides", trial_overrides)
    trial.set_user_attr("replay", spec.replay_command(frozen.params, extra=experiment_overrides))
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())

    reporter = OptunaReporter(trial, study.pruner, len(CLASS_SHORT_NAMES), cfg.train.unfreeze_epoch,
                              tracker=tracker, metric=spec.objective.metric)
    try:
        result = train(cfg, run_dir=run_dir, reporter=reporter, tracker=tracker, progress=False)
    except Exception as error:
        # train() ended the MLflow run FAILED; the worker tells Optuna FAIL with this reason.
        write_outcome(run_dir, status="failed", best_value=None, best_epoch=None, epochs_run=None,
                      best_metrics={}, stop_reason=f"{type(error).__name__}: {error}"[:2000])
        raise
    best_metrics = {key: value for key, value in result.best_metrics.items() if key.startswith("val/")}
    outcome = {
        "status": result.status,
        "best_value": None if not math.isfinite(result.best_value) else result.best_value,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_metrics": best_metrics,
        "stop_reason": result.stop_reason,
        "mlflow_run_id": result.run_id,
    }
    write_outcome(run_dir, **outcome)
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m octft.sweep.trial", description=__doc__.split("\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--trial-id", type=int, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--sweep-override", action="append", default=[])
    parser.add_argument("--override", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_trial(args.spec, args.trial_id, Path(args.run_dir), args.sweep_override, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
