"""Probe studies: every trial trains a head on stored frozen-encoder features, in this process, one after another.

A study whose trials never unfreeze the encoder (`train.unfreeze_epoch: null` in the base or `fixed`, and
not in the space; see `sweeps/probe.yaml`) needs no trial processes: its trials differ only in the head,
and the encoder's outputs are in the feature store. `octft sweep launch` then prepares the data, the
encoder and the features once and runs the trials here. With `--workers K`, K - 1 more processes
(`python -m octft.sweep.probe`, each one CPU thread) run trials of the same study the same way, so a host's
cores share the study: the feature store is built once (the others wait for it, then read it), and each
process samples with the study's sampler, which sees the others' running trials. Each trial is still an
Optuna trial (sampled by the study's sampler, reported per epoch, pruned on collapse) with its own MLflow
child run, and runs the very
`fit()` that `octft train <base> k=v ...` (its replay command) runs. Per-epoch metrics are written to
MLflow in one batch per trial: the writes, not the head, would otherwise be most of a probe's time.
One trial after another, not many heads in one batch: measured, a probe trial's time is mostly what
each trial pays however its head is trained (its Optuna reports and MLflow writes), and a batch of
heads would have to redraw each trial's own dropout masks to replay exactly.

    >>> run_probe_trials(spec, study, storage, study_dir=..., n_trials=50, ...)       # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from octft.config import ExperimentConfig, load_experiment, save_resolved
from octft.sweep.spec import SweepSpec

UNFREEZE_KEY = "train.unfreeze_epoch"


def is_probe_study(spec: SweepSpec, base: ExperimentConfig) -> bool:
    """True when no trial of the study ever unfreezes its encoder (so every trial is a head on features)."""
    return UNFREEZE_KEY not in spec.space and base.train.unfreeze_epoch is None and base.features.enabled


class BufferedTracker:
    """A tracker that holds per-epoch metrics and writes them in one batch on `flush()` (or `finish`)."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.run_id = tracker.run_id
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def flush(self) -> None:
        if self.rows:
            self.tracker.log_metrics_by_step(self.rows)
            self.rows = []

    def finish(self, status: str, reason: str | None = None) -> None:
        self.flush()
        self.tracker.finish(status, reason)

    def __getattr__(self, name: str):
        return getattr(self.tracker, name)


@dataclass
class _Prepared:
    """What every probe trial of a study shares: the splits, runtime, encoder and its stored features."""

    train_set: object
    val_set: object
    runtime: object
    class_weights: object
    tags: dict  # what every trial's run records about the data and code (as `octft train` does)
    encoders: dict = field(default_factory=dict)  # encoder key -> (encoder, RNG state right after building it)
    features: dict = field(default_factory=dict)  # feature digest -> FrozenFeatures


def _prepare(base: ExperimentConfig) -> _Prepared:
    from octft.data.dataset import prepare_volumes
    from octft.data.layout import CLASS_SHORT_NAMES
    from octft.train.losses import balanced_class_weights
    from octft.train.recipe import audited_data, data_manifest_hash, git_commit
    from octft.train.runtime import make_runtime

    data = base.data
    report = audited_data(data)
    prepared = prepare_volumes(volumes=report.volumes, progress=False, **data.prepare_kwargs())
    train_set, val_set = prepared.dataset("train"), prepared.dataset("val")
    weights = (balanced_class_weights(train_set.labels.tolist(), len(CLASS_SHORT_NAMES))
               if base.loss.class_weights == "balanced" else None)
    runtime = make_runtime(base.runtime.kind, base.runtime.precision)
    tags = {"octft.git_commit": git_commit(), "octft.runtime": runtime.name, "octft.precision": runtime.precision,
            "octft.data_manifest_hash": data_manifest_hash(prepared.volumes), "octft.audit_passed": str(report.passed),
            "octft.train_volumes": str(len(train_set)), "octft.val_volumes": str(len(val_set))}
    return _Prepared(train_set, val_set, runtime, weights, tags)


@contextlib.contextmanager
def _one_thread():
    """Torch's host threads set to one while a head trains on the host CPU, then restored.

    A head's step on stored features is a few (8 x D) matrix products: fanning them out over threads
    costs more than it saves, and on a busy host far more (measured: 0.8 ms a step on one thread, 6 ms
    on two busy cores). The results are the same either way, within float tolerance.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _trial_inputs(cfg: ExperimentConfig, shared: _Prepared):
    """(model, stored features) of a trial, as `octft train` builds them: the same seed, so the same head
    init; the encoder is built and its features opened (checksummed) once per study, not per trial."""
    import torch

    from octft.data.layout import CLASS_SHORT_NAMES
    from octft.models import Classifier
    from octft.train.recipe import build_encoder_for, build_model_head, stored_features

    encoder_key = (cfg.train.seed, cfg.model.model_dump_json(exclude={"head", "head_hidden_features", "head_dropout"}),
                   cfg.data.preprocess.model_dump_json())
    if encoder_key not in shared.encoders:
        torch.manual_seed(cfg.train.seed)
        encoder, _ = build_encoder_for(cfg)
        # The head's initial weights are the next draws after the encoder's: every head starts from this state.
        shared.encoders[encoder_key] = (encoder, torch.get_rng_state())
    encoder, rng_state = shared.encoders[encoder_key]
    torch.set_rng_state(rng_state)
    model = Classifier(encoder, build_model_head(cfg, encoder.num_features, len(CLASS_SHORT_NAMES)))
    features_key = (encoder_key, cfg.model.head == "attentive", cfg.features.model_dump_json())
    if features_key not in shared.features:
        first = stored_features(cfg, model, shared.train_set, shared.val_set, shared.runtime)
        # Later trials reuse them at no cost, and their runs say so.
        shared.features[features_key] = dataclasses.replace(first, built=False, seconds=0.0) if first else None
        return model, first
    return model, shared.features[features_key]


def run_probe_trials(
    spec: SweepSpec,
    study: optuna.Study,
    storage,
    *,
    study_dir: Path,
    n_trials: int | None,
    tracking_uri: str,
    experiment_overrides: Sequence[str] = (),
    deadline: float | None = None,
    worker_index: int = 0,
) -> int:
    """Run trials of the probe study `study` in this process until the budget is spent; return how many ran.

    `worker_index`: which of the launch's probe processes this is (0: the launch itself), recorded on each trial.
    """
    from octft.data.layout import CLASS_SHORT_NAMES
    from octft.sweep.space import suggest
    from octft.sweep.study import base_config, next_trial
    from octft.sweep.trial import OptunaReporter, TrialOutcome
    from octft.sweep.tracking import settle_run, update_parent_best
    from octft.sweep.workers import heartbeat, tell_outcome
    from octft.track import MlflowTracker
    from octft.train.loop import fit

    started = time.perf_counter()
    base = base_config(spec, experiment_overrides)
    shared = _prepare(base)
    # What the imports and the setup made lives as long as this process: frozen out of the collector, its full
    # collections scan only what trials make (measured: 11 of them cost 2.7 s over 50 trials otherwise).
    gc.freeze()
    parent_run_id = str(study.user_attrs["mlflow_parent_run_id"])
    print(f"probe study {spec.study_name!r}: trials run in this process on stored features "
          f"(data ready in {time.perf_counter() - started:.1f} s)", flush=True)
    done = 0
    while deadline is None or time.time() < deadline:
        trial = next_trial(study, storage, n_trials)
        if trial is None:
            break
        with heartbeat(storage, trial._trial_id):
            params = suggest(trial, spec.space)
            trial_overrides = spec.trial_overrides(params)
            cfg = load_experiment(spec.base, [*trial_overrides, *experiment_overrides])
            cfg.tracking.tracking_uri, cfg.tracking.experiment = tracking_uri, spec.mlflow.experiment
            cfg.tracking.run_name = f"trial-{trial.number}"
            run_dir = study_dir / f"trial-{trial.number}"
            tracker = BufferedTracker(MlflowTracker(
                tracking_uri, spec.mlflow.experiment, cfg.tracking.run_name, parent_run_id=parent_run_id,
                tags={"optuna.study": spec.study_name, "optuna.trial_number": str(trial.number),
                      "octft.run_dir": str(run_dir.resolve()), "octft.kind": "probe"},
            ))
            for key, value in {"mlflow_run_id": tracker.run_id, "run_dir": str(run_dir.resolve()),
                               "overrides": trial_overrides, "host": socket.gethostname(), "worker": worker_index,
                               "replay": spec.replay_command(params, extra=experiment_overrides)}.items():
                trial.set_user_attr(key, value)
            outcome, reason_if_failed = None, None
            try:
                tracker.log_params(cfg.flat())
                tracker.set_tags(shared.tags)
                # The checkpoint folder is the registered model: its weights plus the config that built them.
                (run_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
                save_resolved(cfg, run_dir / "checkpoint" / "config.yaml")
                model, features = _trial_inputs(cfg, shared)
                if features is None:
                    raise ValueError(f"trial {trial.number}: no stored features for head {cfg.model.head!r} "
                                     "(the attentive head needs features.tokens=true)")
                tracker.log_metrics(features.metrics(), step=0)
                tracker.set_tags(features.tags())
                reporter = OptunaReporter(trial, study.pruner, len(CLASS_SHORT_NAMES), 0, tracker=tracker,
                                          metric=spec.objective.metric)
                with _one_thread():
                    result = fit(
                        model, features.train, features.val, runtime=shared.runtime, tracker=tracker, reporter=reporter,
                        class_names=CLASS_SHORT_NAMES, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                        accumulation_steps=cfg.train.accumulation_steps,
                        micro_batch_rows=cfg.runtime.micro_batch_rows, unfreeze_epoch=None, lr_head=cfg.optim.lr_head,
                        lr_encoder=cfg.optim.lr_encoder, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas),
                        warmup_epochs=cfg.optim.warmup_epochs, min_lr_ratio=cfg.optim.min_lr_ratio,
                        label_smoothing=cfg.loss.label_smoothing, class_weights=shared.class_weights,
                        clip_norm=cfg.train.clip_norm, early_stopping_patience=cfg.train.early_stopping_patience,
                        seed=cfg.train.seed, run_dir=run_dir, frozen_features=features, confusion_figure=False,
                    )
                tracker.flush()
                if (run_dir / "best").is_dir():
                    tracker.log_artifact(run_dir / "best" / "val_predictions.csv")
                    tracker.log_artifact(run_dir / "checkpoint", "checkpoint")  # what promotion registers
                tracker.set_tags({"octft.status": result.status, "octft.best_epoch": str(result.best_epoch)})
                tracker.finish("KILLED" if result.status == "pruned" else "FINISHED", result.stop_reason)
                outcome = TrialOutcome(
                    status=result.status,
                    best_value=None if not math.isfinite(result.best_value) else result.best_value,
                    best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                    best_metrics={k: v for k, v in result.best_metrics.items() if k.startswith("val/")},
                    stop_reason=result.stop_reason, mlflow_run_id=tracker.run_id, runner_pid=os.getpid(),
                    runner_trials=done + 1,
                )
            except Exception as error:  # one trial's failure is recorded; the study goes on, as with processes
                reason_if_failed = f"{type(error).__name__}: {error}"[:2000]
                tracker.finish("FAILED", reason_if_failed)
                outcome = TrialOutcome(status="failed", stop_reason=reason_if_failed, mlflow_run_id=tracker.run_id,
                                       runner_pid=os.getpid(), runner_trials=done + 1)
            state, reason = tell_outcome(study, trial, outcome, run_dir / "trial.log", spec.objective.metric)
        settle_run(tracking_uri, tracker.run_id, state, reason)
        update_parent_best(tracking_uri, parent_run_id, study, spec.objective.metric)
        done += 1
        print(f"probe trial {trial.number} {state.name}" + (f" (process {worker_index})" if worker_index else "")
              + (f": {reason.splitlines()[0]}" if reason else ""), flush=True)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m octft.sweep.probe --worker-index I ...`: one more process of a probe study's launch
    (`octft sweep launch --workers K`), which writes the launch record's path to its input."""
    from octft.sweep.study import DEFAULT_HEARTBEAT_S, LaunchRecord, open_worker_study

    parser = argparse.ArgumentParser(prog="python -m octft.sweep.probe", description="one more process of a probe study")
    parser.add_argument("--worker-index", type=int, required=True)
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--heartbeat-interval", type=int, default=DEFAULT_HEARTBEAT_S)
    parser.add_argument("--grace-period", type=int)
    parser.add_argument("--deadline", type=float)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        line = sys.stdin.readline().strip()
        if not line:  # the launch failed before it needed this process, and says why
            return 0
        record = LaunchRecord.read(Path(line))
        study, storage, spec = open_worker_study(record, args.worker_index, heartbeat_interval=args.heartbeat_interval,
                                                 grace_period=args.grace_period)
        run_probe_trials(spec, study, storage, study_dir=Path(record.study_dir), n_trials=args.n_trials,
                         tracking_uri=record.tracking_uri, experiment_overrides=record.experiment_overrides,
                         deadline=args.deadline, worker_index=args.worker_index)
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["BufferedTracker", "is_probe_study", "main", "run_probe_trials"]


if __name__ == "__main__":
    sys.exit(main())
