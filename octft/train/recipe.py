"""`octft train CONFIG [key=value ...]`: one fine-tune, wired from an experiment config.

The recipe is the only training code that sees the config: it audits the data, prepares the cache,
builds the model, runtime and tracker, and hands flat arguments to `fit()`.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from octft.config import ExperimentConfig, save_resolved
from octft.data.layout import CLASS_SHORT_NAMES
from octft.errors import OctftError


class AuditFailedError(OctftError, RuntimeError):
    """Training refuses data whose audit failed, unless the failed guards are allowed by name."""


@dataclass
class TrainResult:
    run_dir: Path
    run_id: str | None
    status: str
    best_value: float
    best_epoch: int | None
    best_metrics: dict
    epochs_run: int
    stop_reason: str | None
    compiles: int = 0  # XLA compiles this run caused (0 on a warm runner whose graphs it already has)
    compile_seconds: float = 0.0
    epoch_seconds: float = 0.0  # the epochs' own time, without setup


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_manifest_hash(volumes) -> str:
    """A hash of exactly what a run trains and validates on: keys, content identity, label and split."""
    digest = hashlib.sha256()
    for row in volumes.sort_values("key").itertuples(index=False):
        digest.update(f"{row.key}|{row.source_id}|{row.label}|{row.split}\n".encode())
    return digest.hexdigest()[:16]


# The audited volume table's columns a run's dataset inputs show (what each volume is, not where it is cached).
DATASET_COLUMNS = ("key", "participant_id", "label", "class_name", "split", "device", "laterality", "region", "source_id")


def log_data_inputs(tracker, volumes, uri: str) -> None:
    """Log the training and validation volumes as the run's MLflow dataset inputs: the audited table of each
    split, its manifest hash as digest, its counts per class as a tag, the data URI as source."""
    name = Path(uri.rstrip("/")).name or uri
    for split, context in (("train", "training"), ("val", "validation")):
        rows = volumes[volumes.split == split]
        counts = rows.groupby("class_name").participant_id.nunique() if "class_name" in rows else {}
        tracker.log_dataset(
            rows[[column for column in DATASET_COLUMNS if column in rows.columns]].reset_index(drop=True),
            name=f"{name}/{split}", source=uri, digest=data_manifest_hash(rows), context=context,
            tags={"octft.volumes": str(len(rows)),
                  "octft.participants_per_class": ", ".join(f"{label}={count}" for label, count in dict(counts).items())},
        )


def audited_data(data):
    """Audit the data a config names; refuse it when a guard failed that the config does not allow."""
    from octft.data.audit import audit_dataset

    report = audit_dataset(**data.audit_kwargs())
    failed = report.failed_guards(data.allow_failed_guards)
    if failed:
        names = ", ".join(g.name for g in failed)
        raise AuditFailedError(
            f"data audit of {data.uri} failed ({'; '.join(f'{g.name}: {g.detail}' for g in failed)}); "
            f"run `octft data audit --data {data.uri}` for the full report, or override on purpose with "
            f"data.allow_failed_guards=[{names}]"
        )
    return report


def check_after_cache(data, prepared) -> None:
    """The audit's split guards again, on the volumes that survived the cache.

    A volume that failed to decode at cache time can empty a class of a split the audit saw full; validation
    would then average over fewer classes without saying so. Refused like the audit refuses, naming the files.
    """
    from octft.data.audit import participants_per_class, split_class_guards

    guards = split_class_guards(participants_per_class(prepared.volumes), data.audit_kwargs()["min_per_class"])
    failed = [guard for guard in guards if not guard.passed and guard.name not in set(data.allow_failed_guards)]
    if not failed:
        return
    reasons = dict(prepared.report.failed)
    lost = prepared.failed_volumes
    lost = lost[lost.split.isin([guard.name.removeprefix("classes_in_") for guard in failed])]
    files = [f"{row.key} ({row.split}, {row.class_name}): {reasons[row.source_id]}" for row in lost.itertuples(index=False)]
    names = ", ".join(guard.name for guard in failed)
    raise AuditFailedError(
        f"after the cache, {'; '.join(guard.detail for guard in failed)}: volumes that failed to decode left "
        f"the split short ({'; '.join(files[:10])}{' ...' if len(files) > 10 else ''}); fix or replace those "
        f"files, or override on purpose with data.allow_failed_guards=[{names}]"
    )


def ended_run(run_dir: Path):
    """The outcome recorded in `run_dir/last.pt` when that run already ended (completed, early-stopped or
    pruned), printed for the user; None when there is nothing or it can go on (a failed or killed run)."""
    from octft.train.loop import ENDED, _result
    from octft.train.runtime import load_state

    if not (run_dir / "last.pt").is_file():
        return None
    try:
        state = json.loads(load_state(run_dir / "last.pt", required=("loop_state",))["loop_state"])
    except ValueError:  # not JSON: fit() refuses the file with a CheckpointError naming it
        return None
    if not isinstance(state, dict) or state.get("status") not in ENDED:
        return None
    result = _result(state)
    print(f"{run_dir} already ended: {result.status}" + (f" ({result.stop_reason})" if result.stop_reason else "")
          + f" after {result.epochs_run} epochs, best value {result.best_value:.4f} at epoch {result.best_epoch}; "
          "not training further (start a new run directory to train again)", flush=True)
    return result


@dataclass
class DataSetup:
    """A run's audited data and prepared cache, for one set of data settings (`key`)."""

    key: str
    report: object  # octft.data.audit's report
    prepared: object  # octft.data.dataset.PreparedVolumes


class DataSetups:
    """The data setup of the last data settings seen, so that a warm trial runner audits and checks
    the cache once per sweep instead of once per trial. Holds one setup: trials of a sweep share data
    settings, and keeping older ones would only grow the runner's memory.

    >>> setups = DataSetups()
    >>> train(cfg_a, setups=setups); train(cfg_b, setups=setups)   # audits once when cfg_a.data == cfg_b.data  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._last: DataSetup | None = None

    def get(self, data, *, progress: bool) -> DataSetup:
        key = data.model_dump_json()
        if self._last is None or self._last.key != key:
            self._last = None  # let the old one go before building the next
            self._last = prepare_data(data, progress=progress)
        return self._last


def prepare_data(data, *, progress: bool) -> DataSetup:
    """Audit the data a config names (refusing failed guards) and make sure its cache is complete."""
    from octft.data.dataset import prepare_volumes

    report = audited_data(data)
    prepared = prepare_volumes(volumes=report.volumes, progress=progress, **data.prepare_kwargs())
    if prepared.report.failed:
        print(f"{len(prepared.report.failed)} volumes could not be read and are left out:")
        for source, reason in prepared.report.failed:
            print(f"  {source}: {reason}")
        check_after_cache(data, prepared)
    return DataSetup(data.model_dump_json(), report, prepared)


def build_model(cfg: ExperimentConfig, num_classes: int):
    from octft.models import Classifier

    encoder, report = build_encoder_for(cfg)
    return Classifier(encoder, build_model_head(cfg, encoder.num_features, num_classes)), report


def build_encoder_for(cfg: ExperimentConfig):
    """The encoder `cfg.model` names, with its checkpoint loaded; (encoder, load report or None)."""
    from octft.models import build_encoder
    from octft.models.checkpoint import load_encoder_checkpoint

    pre = cfg.data.preprocess
    model_cfg = cfg.model
    encoder = build_encoder(
        model_cfg.size,
        img_size=(pre.height, pre.width),
        patch_size=model_cfg.patch_size,
        num_frames=pre.frames,
        tubelet_size=model_cfg.tubelet_size,
        in_chans=model_cfg.in_chans,
        use_rope=model_cfg.use_rope,
        rope_layout=model_cfg.rope_layout,
        drop_path_rate=model_cfg.drop_path_rate,
        norm_eps=model_cfg.norm_eps,
    )
    report = None
    if model_cfg.checkpoint:
        report = load_encoder_checkpoint(
            model_cfg.checkpoint, encoder, key=model_cfg.checkpoint_key,
            allow_missing=model_cfg.allow_missing, allow_unexpected=model_cfg.allow_unexpected,
        )
    return encoder, report


def build_model_head(cfg: ExperimentConfig, in_features: int, num_classes: int):
    """The head `cfg.model` names (drawing its initial weights from torch's RNG, right after the encoder's)."""
    from octft.models import build_head

    model_cfg = cfg.model
    head_kwargs = {}
    if model_cfg.head == "mlp":
        head_kwargs = {"hidden_features": model_cfg.head_hidden_features, "dropout": model_cfg.head_dropout}
    return build_head(model_cfg.head, in_features, num_classes, **head_kwargs)


def feature_key(cfg: ExperimentConfig, precision: str, train_set, val_set, kind: str):
    """The store key of this run's frozen-encoder features: every input that decides their numbers."""
    from octft.features.store import FeatureKey, checkpoint_identity

    model = cfg.model
    encoder = checkpoint_identity(model.checkpoint, cfg.train.seed)
    if model.checkpoint and model.allow_missing:
        encoder += f"+seed={cfg.train.seed}"  # parameters the checkpoint lacks keep their seeded init
    # The head's settings and the checkpoint's path do not change the encoder's outputs; its content does.
    encoder_config = model.model_dump(mode="json", exclude={"head", "head_hidden_features", "head_dropout", "checkpoint"})
    return FeatureKey(encoder=encoder, model=encoder_config, precision=precision,
                      preprocessing={**cfg.data.preprocess.model_dump(mode="json"), "cache_dtype": cfg.data.cache_dtype},
                      kind=kind,
                      sources={"train": list(train_set.volumes.source_id), "val": list(val_set.volumes.source_id)})


def stored_features(cfg: ExperimentConfig, model, train_set, val_set, runtime, *, resume_epoch: int = -1):
    """The frozen-feature store's train / val features when this run has frozen epochs left, else None."""
    unfreeze = cfg.train.unfreeze_epoch
    frozen_epochs_left = (unfreeze is None or unfreeze > resume_epoch + 1) and resume_epoch + 1 < cfg.train.epochs
    if not cfg.features.enabled or not frozen_epochs_left:
        return None
    if cfg.model.head == "attentive" and not cfg.features.tokens:
        return None  # token sequences are large: stored only when asked for (features.tokens=true)
    from octft.features.frozen import frozen_features
    from octft.features.store import STORAGE_DTYPE, FeaturePlan, FeatureStore

    kind = "tokens" if cfg.model.head == "attentive" else "pooled"
    key = feature_key(cfg, runtime.precision, train_set, val_set, kind)
    store = FeatureStore(cfg.features.dir)
    if store.open(key) is None:
        pre = cfg.data.preprocess
        tokens = math.prod(model.encoder.token_grid(pre.frames, pre.height, pre.width))
        width = model.encoder.num_features
        plan = FeaturePlan(kind, {"train": len(train_set), "val": len(val_set)},
                           (width,) if kind == "pooled" else (tokens, width), STORAGE_DTYPE[kind])
        print(f"feature store {store.root}: building {plan.describe()}", flush=True)
    features = frozen_features(store, key, model.encoder, train_set, val_set,
                               runtime=runtime,
                               # evaluation-sized batches the devices share evenly (see Runtime.batch_layout)
                               batch_size=runtime.batch_layout(cfg.train.batch_size, cfg.train.accumulation_steps,
                                                               cfg.runtime.micro_batch_rows).eval_batch_size)
    print(f"features {'built' if features.built else 'reused'}: {features.digest[:12]} ({kind}, "
          f"{features.nbytes / 2**20:.1f} MiB, {features.seconds:.1f} s)", flush=True)
    return features


def _resume_epoch(run_dir: Path, resume: bool) -> int:
    """The last finished epoch of the run being resumed (-1 for a fresh run)."""
    if not (resume and (run_dir / "last.pt").is_file()):
        return -1
    from octft.train.runtime import load_state

    return int(json.loads(load_state(run_dir / "last.pt")["loop_state"])["epoch"])


def train(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    run_dir: str | Path | None = None,
    reporter=None,
    tracker=None,
    progress: bool = True,
    setups: DataSetups | None = None,
) -> TrainResult:
    """Audit -> cache -> model -> fit, tracked in MLflow. Raises on a failed audit or a bad checkpoint.

    `setups`: reuse the audit and cache check of an earlier run with the same data settings (a warm
    trial runner passes the same one to every trial).
    """
    import torch

    from octft.train.losses import balanced_class_weights
    from octft.train.loop import fit
    from octft.train.runtime import make_runtime

    run_dir = Path(run_dir or Path(cfg.output_dir) / (cfg.tracking.run_name or cfg.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_dir / "run.json"
    previous = json.loads(run_file.read_text()) if (resume and run_file.is_file()) else {}
    if resume:
        ended = ended_run(run_dir)
        if ended is not None:
            # Neither the data, the model nor the MLflow run is touched: reopening the run would move its end time.
            return TrainResult(run_dir, previous.get("mlflow_run_id"), ended.status, ended.best_value, ended.best_epoch,
                               ended.best_metrics, ended.epochs_run, ended.stop_reason)

    # Devices first: a batch the devices cannot share is refused before any data is read.
    runtime = make_runtime(cfg.runtime.kind, cfg.runtime.precision, compile_cache_dir=cfg.runtime.compile_cache_dir)
    layout = runtime.batch_layout(cfg.train.batch_size, cfg.train.accumulation_steps, cfg.runtime.micro_batch_rows)
    print(f"{runtime}: {layout.describe()}", flush=True)
    if getattr(runtime, "compile_cache_note", None):
        print(runtime.compile_cache_note, flush=True)
    if tracker is None and not runtime.is_main:
        from octft.track import NullTracker

        tracker = NullTracker()  # only host 0 writes to MLflow
    if tracker is None:
        from octft.track.mlflow_tracker import MlflowTracker

        tracker = MlflowTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name,
                                run_id=previous.get("mlflow_run_id"), log_system_metrics=True)
    if runtime.is_main:  # on a pod slice the run folder may be shared: one writer
        run_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id}) + "\n")
    try:
        data = cfg.data
        setup = (setups or DataSetups()).get(data, progress=progress)
        report, prepared = setup.report, setup.prepared
        volumes = prepared.volumes
        train_set = prepared.dataset("train")
        val_set = prepared.dataset("val")
        class_weights = (balanced_class_weights(train_set.labels.tolist(), len(CLASS_SHORT_NAMES))
                         if cfg.loss.class_weights == "balanced" else None)

        torch.manual_seed(cfg.train.seed)
        model, checkpoint_report = build_model(cfg, len(CLASS_SHORT_NAMES))
        if cfg.init.head_from:
            from octft.train.head_from import load_head

            head_run = load_head(model, cfg.init.head_from, cfg.tracking.tracking_uri)
            tracker.set_tags({"octft.head_from": head_run})
        # Built (or found) before any training: the store holds this very encoder's outputs.
        features = stored_features(cfg, model, train_set, val_set, runtime, resume_epoch=_resume_epoch(run_dir, resume))
        if features is not None:
            tracker.log_metrics(features.metrics(), step=0)
            tracker.set_tags(features.tags())

        if runtime.is_main:
            save_resolved(cfg, run_dir / "config.yaml")
            (run_dir / "checkpoint").mkdir(exist_ok=True)
            save_resolved(cfg, run_dir / "checkpoint" / "config.yaml")
        audit_summary = report.to_dict()
        if not previous:
            tracker.log_params(cfg.flat())
            tracker.log_params(layout.params())
        tracker.set_tags({
            "octft.git_commit": git_commit(),
            "octft.runtime": runtime.name,
            "octft.device_count": str(runtime.num_devices),
            "octft.precision": runtime.precision,
            "octft.data_manifest_hash": data_manifest_hash(volumes),
            "octft.audit_passed": str(report.passed),
            "octft.train_volumes": str(len(train_set)),
            "octft.val_volumes": str(len(val_set)),
            "octft.cache_failed": str(len(prepared.report.failed)),
        })
        log_data_inputs(tracker, volumes, data.uri)
        tracker.log_dict({k: audit_summary[k] for k in ("files", "participants", "splits", "match_rate", "guards")},
                         "audit_summary.json")
        tracker.log_artifact(run_dir / "config.yaml")
        if checkpoint_report is not None:
            tracker.log_dict(checkpoint_report.to_dict(), "checkpoint_load_report.json")

        result = fit(
            model, train_set, val_set, runtime=runtime, tracker=tracker, reporter=reporter,
            class_names=CLASS_SHORT_NAMES, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
            accumulation_steps=cfg.train.accumulation_steps, micro_batch_rows=cfg.runtime.micro_batch_rows,
            unfreeze_epoch=cfg.train.unfreeze_epoch,
            lr_head=cfg.optim.lr_head, lr_encoder=cfg.optim.lr_encoder, weight_decay=cfg.optim.weight_decay,
            betas=tuple(cfg.optim.betas), warmup_epochs=cfg.optim.warmup_epochs, min_lr_ratio=cfg.optim.min_lr_ratio,
            label_smoothing=cfg.loss.label_smoothing, class_weights=class_weights, clip_norm=cfg.train.clip_norm,
            early_stopping_patience=cfg.train.early_stopping_patience,
            objective_metric=cfg.train.objective.metric, objective_direction=cfg.train.objective.direction,
            seed=cfg.train.seed, run_dir=run_dir,
            resume=resume, frozen_features=features, num_workers=cfg.train.num_workers,
        )
        best_dir = run_dir / "best"
        if runtime.is_main and best_dir.is_dir():
            tracker.log_artifact(best_dir / "val_predictions.csv")
            tracker.log_artifact(best_dir / "confusion_matrix.png")
            # The registered model is this folder: the best weights plus the config that built them.
            tracker.log_artifact(run_dir / "checkpoint", "checkpoint")
        tracker.set_tags({"octft.status": result.status, "octft.best_epoch": str(result.best_epoch)})
        if result.status == "pruned":
            tracker.finish("KILLED", result.stop_reason)
        else:
            tracker.finish("FINISHED", result.stop_reason)
    except BaseException as error:
        reason = f"{type(error).__name__}: {error}"
        tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", reason[:2000])
        raise
    return TrainResult(run_dir, tracker.run_id, result.status, result.best_value, result.best_epoch,
                       result.best_metrics, result.epochs_run, result.stop_reason, result.compiles,
                       result.compile_seconds, result.epoch_seconds)
