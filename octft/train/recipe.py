"""`octft train CONFIG [key=value ...]`: one fine-tune, wired from an experiment config and recorded in MLflow.

The recipe is the only training code that sees the config: it audits the data and prepares the cache, builds the
model, the runtime and the frozen features (`octft.train.setup`), hands flat arguments to `fit()` and records the
run. Every sweep trial runs this same function, with the Optuna reporter attached and its runner's `RunCache`:

    >>> result = train(load_experiment("experiments/demo.yaml", ["optim.lr_head=1e-3"]))     # doctest: +SKIP
    >>> result.status, result.best_value                                                   # doctest: +SKIP
    ('early_stopped', 0.71)
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from octft.config import ExperimentConfig, resolved_record, save_resolved
from octft.data.layout import CLASS_SHORT_NAMES
from octft.track import NullTracker, RunDataset
from octft.track.mlflow_store import MlflowStore, MlflowTracker
from octft.errors import MissingInputError, UsageError
from octft.train.head_from import HeadFromError, check_provenance, load_head, run_id_of
from octft.train.loop import FitResult, LoopState, ended_state, fit
from octft.train.runtime import load_state, make_runtime
from octft.data.dataset import data_manifest_hash
from octft.train.provenance import run_provenance
from octft.train.setup import RunCache, class_weights_for
from octft.train.stacked import HeadRun, fit_heads

# The audited volume table's columns a run's dataset inputs show (what each volume is, not where it is cached).
DATASET_COLUMNS = ("key", "participant_id", "label", "class_name", "split", "device", "laterality", "region", "source_id")


@dataclass
class TrainResult:
    run_dir: Path
    run_id: str | None
    status: str  # completed | early_stopped | pruned
    best_value: float
    best_epoch: int | None
    best_metrics: dict
    epochs_run: int
    stop_reason: str | None
    compiles: int = 0  # XLA compiles this run caused (0 on a warm runner whose graphs it already has)
    compile_seconds: float = 0.0
    epoch_seconds: float = 0.0  # the epochs' own time, without setup

    @classmethod
    def of(cls, run_dir: Path, run_id: str | None, result: FitResult) -> "TrainResult":
        return cls(run_dir, run_id, result.status, result.best_value, result.best_epoch, result.best_metrics,
                   result.epochs_run, result.stop_reason, result.compiles, result.compile_seconds, result.epoch_seconds)


@functools.cache
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    run_dir: str | Path | None = None,
    reporter=None,
    tracker=None,
    progress: bool = True,
    cache: RunCache | None = None,
) -> TrainResult:
    """Audit -> cache -> model -> fit, tracked in MLflow. Raises on a failed audit or a bad checkpoint.

    `tracker`: default, a new MLflow run in `cfg.tracking` (the run `run_dir` recorded, on `resume`). `cache`: what
    an earlier run of this process built that this one may reuse (a warm trial runner passes its own).
    """
    cache = cache or RunCache()
    if run_dir is None:
        run_dir = default_run_dir(Path(cfg.output_dir) / (cfg.tracking.run_name or cfg.name), resume=resume)
    run_dir = Path(run_dir)
    if not resume:
        refuse_earlier_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded_run = _recorded_run_id(run_dir) if resume else None
    ended = ended_state(run_dir) if resume else None
    if ended is not None:
        # Neither the data, the model nor the MLflow run is touched: reopening the run would move its end time.
        print(f"{run_dir} already ended: {ended.status}" + (f" ({ended.stop_reason})" if ended.stop_reason else "")
              + f" after {ended.epoch + 1} epochs, best value {ended.best_value:.4f} at epoch {ended.best_epoch}; not "
              "training further (start a new run directory to train again)", flush=True)
        return TrainResult.of(run_dir, recorded_run, ended.result())

    # Devices first: a batch the devices cannot share is refused before any data is read.
    runtime = make_runtime(cfg.runtime.kind, cfg.runtime.precision, compile_cache_dir=cfg.runtime.compile_cache_dir)
    layout = runtime.batch_layout(cfg.train.batch_size, cfg.train.accumulation_steps, cfg.runtime.micro_batch_rows)
    print(f"{runtime}: {layout.describe()}", flush=True)
    if getattr(runtime, "compile_cache_note", None):
        print(runtime.compile_cache_note, flush=True)
    if tracker is None:  # only host 0 writes to MLflow
        tracker = (MlflowTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name,
                                 run_id=recorded_run, log_system_metrics=True) if runtime.is_main else NullTracker())
    if runtime.is_main:  # on a pod slice the run folder may be shared: one writer
        (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id}) + "\n")
    try:
        setup = cache.data(cfg.data, progress=progress)
        train_set, val_set = setup.prepared.run_datasets(cfg.data.inner_val_fraction, cfg.data.split.seed)
        model, checkpoint_report = cache.model(cfg, trains_encoder=cfg.train.unfreeze_epoch is not None)
        tags = {**run_provenance(cfg, setup.prepared.volumes), "octft.validation": validation_note(cfg, val_set)}
        if cfg.init.head_from:
            store = tracker.store if isinstance(tracker, MlflowTracker) else MlflowStore(cfg.tracking.tracking_uri)
            check_provenance(cfg.init.head_from, store.run(run_id_of(cfg.init.head_from)).tags, tags)
            load_head(model, cache.head(cfg.init.head_from, lambda: head_state(cfg.init.head_from, store)),
                      cfg.init.head_from)
            tags["octft.head_from"] = run_id_of(cfg.init.head_from)
        # Built (or found) before any training: the store holds this very encoder's outputs.
        features = cache.features(cfg, model, train_set, val_set, runtime, resume_epoch=_resume_epoch(run_dir, resume))
        if runtime.is_main:
            _record_start(tracker, cfg, run_dir, runtime, layout, setup, features, checkpoint_report, tags,
                          data_inputs(setup.prepared.volumes, cfg.data.uri), fresh=recorded_run is None)
        result = fit(
            model, train_set, val_set, runtime=runtime, tracker=tracker, reporter=reporter,
            class_names=CLASS_SHORT_NAMES, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
            accumulation_steps=cfg.train.accumulation_steps, micro_batch_rows=cfg.runtime.micro_batch_rows,
            unfreeze_epoch=cfg.train.unfreeze_epoch, lr_head=cfg.optim.lr_head, lr_encoder=cfg.optim.lr_encoder,
            weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), warmup_epochs=cfg.optim.warmup_epochs,
            min_lr_ratio=cfg.optim.min_lr_ratio, label_smoothing=cfg.loss.label_smoothing,
            class_weights=class_weights_for(cfg, train_set), clip_norm=cfg.train.clip_norm,
            early_stopping_patience=cfg.train.early_stopping_patience, objective_metric=cfg.train.objective.metric,
            objective_direction=cfg.train.objective.direction, seed=cfg.train.seed, run_dir=run_dir, resume=resume,
            frozen_features=features, num_workers=cfg.train.num_workers, config_record=resolved_record(cfg),
            volume_metrics=cfg.tracking.volume_metrics,
        )
        if runtime.is_main:
            _record_end(tracker, cfg, run_dir, result)
        tracker.finish("KILLED" if result.status == "pruned" else "FINISHED", result.stop_reason)
    except BaseException as error:
        tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", f"{type(error).__name__}: {error}"[:2000])
        raise
    return TrainResult.of(run_dir, tracker.run_id, result)


# What each head of a stacked pass may set for itself (`train_heads`); every other setting its pass shares.
OWN_SETTINGS = frozenset({
    "model.head", "model.head_hidden_features", "model.head_dropout", "optim.lr_head", "optim.lr_encoder",
    "optim.weight_decay", "optim.warmup_epochs", "optim.min_lr_ratio", "loss.label_smoothing", "train.epochs",
    "train.early_stopping_patience", "name", "tracking.run_name", "tracking.volume_metrics",
})


def pass_key(cfg: ExperimentConfig) -> str | None:
    """What runs must share to train in one stacked pass (`train_heads`); None for a run that cannot: one that
    unfreezes its encoder, starts from another run's head, trains an attentive head, or runs off the host CPU or in
    bfloat16."""
    if (cfg.train.unfreeze_epoch is not None or cfg.init.head_from or cfg.model.head == "attentive"
            or cfg.runtime.kind != "cpu" or cfg.runtime.precision == "bf16" or not cfg.features.enabled):
        return None
    return json.dumps({key: value for key, value in cfg.flat().items() if key not in OWN_SETTINGS}, sort_keys=True)


def train_heads(
    cfgs: list[ExperimentConfig],
    run_dirs: list[Path],
    *,
    reporters: list,
    trackers: list,
    cache: RunCache,
) -> list[TrainResult | Exception]:
    """Probe runs that share a `pass_key`, their heads trained in one stacked pass: each run recorded in its own
    tracker and folder as `train` records it, each result what `train` of that config returns (to float tolerance),
    or the exception that failed that run alone. The trackers are finished here, as `train` finishes its own."""
    keys = {pass_key(cfg) for cfg in cfgs}
    if None in keys or len(keys) != 1:
        raise UsageError("train_heads: these runs cannot share one stacked pass (see octft.train.recipe.pass_key)")
    first = cfgs[0]
    runtime = make_runtime(first.runtime.kind, first.runtime.precision)
    layout = runtime.batch_layout(first.train.batch_size, first.train.accumulation_steps, first.runtime.micro_batch_rows)
    setup = cache.data(first.data, progress=False)
    train_set, val_set = setup.prepared.run_datasets(first.data.inner_val_fraction, first.data.split.seed)
    results: list[TrainResult | Exception | None] = [None] * len(cfgs)
    runs: list[tuple[int, HeadRun]] = []
    features = None
    # The same for every run of the pass (its runs share the data, the encoder and the preprocessing): made once.
    tags = {**run_provenance(first, setup.prepared.volumes), "octft.validation": validation_note(first, val_set)}
    datasets = data_inputs(setup.prepared.volumes, first.data.uri)
    for k, (cfg, run_dir, tracker) in enumerate(zip(cfgs, run_dirs, trackers)):
        try:
            run_dir = Path(run_dir)
            refuse_earlier_run(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id}) + "\n")
            model, checkpoint_report = cache.model(cfg, trains_encoder=False)
            # One store lookup for the pass (its runs share every setting that keys the features).
            features = cache.features(cfg, model, train_set, val_set, runtime) if features is None else features.reused()
            _record_start(tracker, cfg, run_dir, runtime, layout, setup, features, checkpoint_report, tags, datasets,
                          fresh=True)
        except Exception as error:
            tracker.finish("FAILED", f"{type(error).__name__}: {error}"[:2000])
            results[k] = error
            continue
        runs.append((k, HeadRun(
            model, lr_head=cfg.optim.lr_head, weight_decay=cfg.optim.weight_decay,
            label_smoothing=cfg.loss.label_smoothing, epochs=cfg.train.epochs, run_dir=run_dir, tracker=tracker,
            reporter=reporters[k], lr_encoder=cfg.optim.lr_encoder, warmup_epochs=cfg.optim.warmup_epochs,
            min_lr_ratio=cfg.optim.min_lr_ratio, early_stopping_patience=cfg.train.early_stopping_patience,
            config_record=resolved_record(cfg), volume_metrics=cfg.tracking.volume_metrics,
            log=_log_to(run_dir / "trial.log"))))
    if runs:
        fitted = fit_heads([run for _, run in runs], features, runtime=runtime, class_names=CLASS_SHORT_NAMES,
                           batch_size=first.train.batch_size, accumulation_steps=first.train.accumulation_steps,
                           betas=tuple(first.optim.betas), class_weights=class_weights_for(first, train_set),
                           clip_norm=first.train.clip_norm, objective_metric=first.train.objective.metric,
                           objective_direction=first.train.objective.direction, seed=first.train.seed)
        for (k, run), result in zip(runs, fitted):
            results[k] = _end_head(cfgs[k], run, result)
    return results


def _end_head(cfg: ExperimentConfig, run: HeadRun, result) -> TrainResult | Exception:
    """A stacked head's run recorded and finished as `train` ends its run."""
    tracker = run.tracker
    if isinstance(result, Exception):
        tracker.finish("FAILED", f"{type(result).__name__}: {result}"[:2000])
        return result
    try:
        _record_end(tracker, cfg, Path(run.run_dir), result)
    except Exception as error:
        tracker.finish("FAILED", f"{type(error).__name__}: {error}"[:2000])
        return error
    tracker.finish("KILLED" if result.status == "pruned" else "FINISHED", result.stop_reason)
    return TrainResult.of(Path(run.run_dir), tracker.run_id, result)


def _log_to(path: Path):
    """A stacked head's epoch lines, appended to its own log (`trial.log`, where `fit()` would print them)."""

    def log(line: str) -> None:
        with path.open("a") as handle:
            handle.write(line + "\n")

    return log


# What a run leaves in its folder: a folder holding one of these holds a run, which a fresh run must not mix with.
RUN_MARKERS = ("run.json", "last.pt", "checkpoint/best.pt")


def earlier_run(run_dir: Path) -> str | None:
    """The first file in `run_dir` that shows a run was started there, or None."""
    return next((name for name in RUN_MARKERS if (run_dir / name).exists()), None)


def refuse_earlier_run(run_dir: Path) -> None:
    """A fresh run never writes into a folder that holds another run: its config and best checkpoint would be mixed
    with the earlier run's (a failed run would leave its config beside the other's weights)."""
    found = earlier_run(run_dir)
    if found is not None:
        raise UsageError(f"run directory {run_dir} holds an earlier run ({found}); pass --resume to continue it, or "
                         "another --run-dir (without --run-dir each run gets a new folder)")


def default_run_dir(named: Path, *, resume: bool) -> Path:
    """`named` (output_dir/run name), or for a fresh run the first of `named-2`, `named-3`, ... that holds no run."""
    if resume or earlier_run(named) is None:
        return named
    number = 2
    while earlier_run(named.with_name(f"{named.name}-{number}")) is not None:
        number += 1
    return named.with_name(f"{named.name}-{number}")


def validation_note(cfg: ExperimentConfig, val_set) -> str:
    """Which participants a run validated on, for its tags: the val split, or an inner split of train."""
    participants = val_set.volumes.participant_id.nunique()
    if not cfg.data.inner_val_fraction:
        return f"val split ({participants} participants)"
    return (f"inner split of train: {cfg.data.inner_val_fraction:g} of each class, seed {cfg.data.split.seed} "
            f"({participants} participants); the val split was not read")


def head_state(head_from: str, store: MlflowStore) -> dict:
    """The head's weights in the best checkpoint (`checkpoint/best.pt`) of run `head_from`, on the CPU."""
    run_id = run_id_of(head_from)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = store.download(run_id, "checkpoint/best.pt", folder)
        except MissingInputError as error:
            raise HeadFromError(f"init.head_from={head_from!r}: {error}; name a finished run of this tracking store") from None
        state = load_state(Path(path))["model"]
    return {name.removeprefix("head."): value for name, value in state.items() if name.startswith("head.")}


def _record_start(tracker, cfg: ExperimentConfig, run_dir: Path, runtime, layout, setup, features, checkpoint_report,
                  tags: dict[str, str], datasets: list[RunDataset], *, fresh: bool) -> None:
    """What a run records before it trains: its resolved config (beside the checkpoint it will write, since the two
    together are the model), params, tags, dataset inputs (`data_inputs`) and audit summary."""
    (run_dir / "checkpoint").mkdir(exist_ok=True)
    save_resolved(cfg, run_dir / "config.yaml")
    shutil.copyfile(run_dir / "config.yaml", run_dir / "checkpoint" / "config.yaml")
    if fresh:
        tracker.log_params({**cfg.flat(), **layout.params()})
    volumes, report = setup.prepared.volumes, setup.report
    tracker.set_tags({
        **tags, **(features.tags() if features is not None else {}),
        "octft.git_commit": git_commit(), "octft.runtime": runtime.name, "octft.device_count": str(runtime.num_devices),
        "octft.precision": runtime.precision,
        "octft.audit_passed": str(report.passed), "octft.train_volumes": str(int((volumes.split == "train").sum())),
        "octft.val_volumes": str(int((volumes.split == "val").sum())),
        "octft.cache_failed": str(len(setup.prepared.report.failed)),
    })
    if features is not None:
        tracker.log_metrics(features.metrics(), step=0)
    tracker.log_datasets(datasets)
    summary = report.to_dict()
    tracker.log_dict({key: summary[key] for key in ("files", "participants", "splits", "match_rate", "guards")},
                     "audit_summary.json")
    tracker.log_artifact(run_dir / "config.yaml")
    if checkpoint_report is not None:
        tracker.log_dict(checkpoint_report.to_dict(), "checkpoint_load_report.json")


def _record_end(tracker, cfg: ExperimentConfig, run_dir: Path, result: FitResult) -> None:
    """The best epoch's predictions, its confusion-matrix image (a run that fine-tunes: a probe's heads on stored
    features take milliseconds, the image a tenth of a second) and the checkpoint folder, which is the model."""
    best_dir = run_dir / "best"
    if best_dir.is_dir():
        tracker.log_artifact(best_dir / "val_predictions.csv")
        if cfg.train.unfreeze_epoch is not None:
            from octft.train.figures import write_confusion_figure  # matplotlib: about a second to import

            tracker.log_artifact(write_confusion_figure(run_dir, CLASS_SHORT_NAMES))
        tracker.log_artifact(run_dir / "checkpoint", "checkpoint")
    tracker.set_tags({"octft.status": result.status, "octft.best_epoch": str(result.best_epoch)})


def data_inputs(volumes, uri: str) -> list[RunDataset]:
    """The training and validation volumes as a run's MLflow dataset inputs: the audited table of each split, its
    manifest hash as digest, its counts per class as a tag, the data URI as source."""
    name = Path(uri.rstrip("/")).name or uri
    datasets = []
    for split, context in (("train", "training"), ("val", "validation")):
        rows = volumes[volumes.split == split]
        counts = rows.groupby("class_name").participant_id.nunique() if "class_name" in rows else {}
        datasets.append(RunDataset(
            rows[[column for column in DATASET_COLUMNS if column in rows.columns]].reset_index(drop=True),
            name=f"{name}/{split}", source=uri, digest=data_manifest_hash(rows), context=context,
            tags={"octft.volumes": str(len(rows)),
                  "octft.participants_per_class": ", ".join(f"{label}={count}" for label, count in dict(counts).items())},
        ))
    return datasets


def _recorded_run_id(run_dir: Path) -> str | None:
    run_file = run_dir / "run.json"
    return json.loads(run_file.read_text()).get("mlflow_run_id") if run_file.is_file() else None


def _resume_epoch(run_dir: Path, resume: bool) -> int:
    """The last finished epoch of the run being resumed (-1 for a fresh run)."""
    if not (resume and (run_dir / "last.pt").is_file()):
        return -1
    try:
        return LoopState.from_json(load_state(run_dir / "last.pt", required=("loop_state",))["loop_state"]).epoch
    except (ValueError, TypeError):  # not this format: fit() refuses the file, naming it
        return -1
