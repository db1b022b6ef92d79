"""A launch plan: everything a study's trials need, resolved once by `octft sweep launch`, typed and versioned.

The launch reads the sweep file and the command line once and resolves them into a `LaunchPlan`: the sweep
(space, fixed keys, objective, sampler, pruner), the base experiment, the overrides every trial adds (the command
line's, plus what the launch fixed: one micro-batch shape on XLA, the LP-FT head of a probe study), the stores
(their URLs with any password hidden), the study's folder and MLflow parent run, and how this launch runs its
trials (workers, devices, budget, runner kind). The plan is written into the study folder under its content hash
(`plans/<hash>.json`); workers and runners are given its path and a trial number, and nothing else: a trial's
config is `plan.trial_config(plan.trial_overrides(params))`, exactly what its replay command runs.

Passwords are the one thing a plan does not hold: a process that needs one finds it where the user put it (the
environment variable the launch was given, `~/.pgpass`), see `octft.stores.with_password`.

    >>> plan = resolve_plan("sweeps/demo.yaml", storage=storage, overrides=["data.uri=/data"])   # doctest: +SKIP
    >>> plan.trial_overrides({"optim.lr_head": 0.001, ...})                                       # doctest: +SKIP
    ['train.objective.metric=val/balanced_accuracy', ..., 'optim.lr_head=0.001', ..., 'data.uri=/data']
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError

from octft.config import ConfigError, ExperimentConfig, _Strict, load_experiment, parse_override
from octft.io import write_text_atomic
from octft.redaction import redact
from octft.stores import (STORAGE_ENV, TRACKING_ENV, artifact_location, check_not_shared, check_shared_artifacts,
                          is_database_server, remember_password, resolve_tracking_uri, with_password)
from octft.sweep.pruners import collapsed_at_best
from octft.sweep.records import HEAD_FROM_ATTR, trial_record
from octft.sweep.space import check_batch_layouts, shared_micro_batch_rows
from octft.sweep.spec import OBJECTIVE_KEYS, SweepSpec, format_value, load_sweep
from octft.sweep.storage import DEFAULT_HEARTBEAT_S, open_study_storage
from octft.train.devices import default_devices_per_trial, platform
from octft.train.head_from import HeadFromError, head_settings, is_run_uri

PLAN_FORMAT = 1
# Sections of a sweep file; every other key=value on the command line addresses the base experiment.
SWEEP_SECTIONS = frozenset(SweepSpec.model_fields)
MICRO_BATCH_KEY = "runtime.micro_batch_rows"
UNFREEZE_KEY = "train.unfreeze_epoch"
RunnerKind = Literal["warm", "fresh", "in_process"]


class LaunchSettings(_Strict):
    """How one launch runs its trials (another launch of the study may run them otherwise)."""

    index: int = 0  # 0 for the study's first launch on any host, then 1, 2, ...: keeps sampler seeds apart
    workers: int = Field(1, ge=1)
    devices_per_trial: int = Field(1, ge=1)
    n_trials: int | None = None  # the study's whole budget, all workers and hosts together
    deadline: float | None = None  # time.time() after which no trial starts
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S
    grace_period: int | None = None
    runner: RunnerKind = "warm"


class LaunchPlan(_Strict):
    """See the module docstring. Build it with `resolve_plan`; read one with `LaunchPlan.read`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = PLAN_FORMAT
    study_name: str
    study_dir: str
    sweep: dict[str, Any]  # the resolved sweep file, without its storage
    base: str  # the base experiment file
    experiment_overrides: list[str]
    storage: str  # Optuna's storage, password hidden
    tracking_uri: str  # MLflow's store, password hidden
    parent_run_id: str = ""
    head_from: dict[str, Any] | None = None  # LP-FT: the probe study's best run this study's heads start from
    probe: bool = False  # no trial ever unfreezes its encoder: every trial is a head on stored features
    launch: LaunchSettings = LaunchSettings()
    _spec: SweepSpec | None = PrivateAttr(None)
    _path: Path | None = PrivateAttr(None)

    def updated(self, **changes: Any) -> "LaunchPlan":
        """A copy with `changes` (e.g. the parent run a launch made), not yet written."""
        plan = self.model_copy(update=changes)
        plan._path, plan._spec = None, None
        return plan

    # -- what a trial runs

    def spec(self) -> SweepSpec:
        if self._spec is None:
            self._spec = SweepSpec.model_validate({**self.sweep, "storage": self.storage})
        return self._spec

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's overrides of the base experiment: the objective, `fixed`, its params, then the launch's."""
        return [*self.spec().trial_overrides(params), *self.experiment_overrides]

    def trial_config(self, overrides: Sequence[str]) -> ExperimentConfig:
        return load_experiment(self.base, list(overrides))

    def replay_command(self, overrides: Sequence[str]) -> str:
        """The shell command that reruns a trial: `octft train <base> k=v ...`."""
        return shlex.join(["octft", "train", self.base, *overrides])

    def trial_dir(self, number: int) -> Path:
        return Path(self.study_dir) / f"trial-{number}"

    def is_probe(self) -> bool:
        """Whether no trial ever unfreezes its encoder (every trial a head on stored features)."""
        return self.probe

    # -- the stores, with their passwords from where the user gave them

    def storage_url(self) -> str:
        return with_password(self.storage, STORAGE_ENV)

    def tracking_url(self) -> str:
        return with_password(self.tracking_uri, TRACKING_ENV)

    def store_environment(self) -> dict[str, str]:
        """The stores' URLs with their passwords, for a child process's environment: in memory, never on disk."""
        return {STORAGE_ENV: self.storage_url(), TRACKING_ENV: self.tracking_url()}

    # -- on disk

    def config_digest(self) -> str:
        """What every trial's config shares, whatever it samples: a relaunch must keep it."""
        shared = [sorted(self.spec().fixed.items()), self.experiment_overrides, self.spec().objective.model_dump()]
        return hashlib.sha256(json.dumps(shared, default=str).encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        """Where the plan lies: what workers and runners are given (written by `write`, or read from there)."""
        if self._path is None:
            raise ValueError("this launch plan has not been written yet: call plan.write() first")
        return self._path

    def write(self) -> Path:
        """Write the plan as `<study dir>/plans/<content hash>.json` (whole or not at all); returns the path."""
        text = self.model_dump_json(indent=2)
        path = Path(self.study_dir) / "plans" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        write_text_atomic(path, text + "\n")
        self._path = path
        return path

    @classmethod
    def read(cls, path: str | Path) -> "LaunchPlan":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path}: cannot read this launch plan ({error}); relaunch the study with octft sweep "
                              "launch") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{path}: a launch plan of another octft version (format {data.get('format') if isinstance(data, dict) else '?'}, "
                              f"this one reads {PLAN_FORMAT}); relaunch the study with this octft's octft sweep launch")
        try:
            plan = cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(f"{path}: not a valid launch plan ({error.errors()[0]['msg']}); relaunch the study") from None
        plan._path = Path(path)
        return plan


# ---------------------------------------------------------------------------------------------------- resolving


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line key=value pairs -> (sweep-file overrides, base-experiment overrides), by first key part.

    >>> split_overrides(["n_trials=2", "fixed.train.epochs=3", "data.uri=/data/aireadi"])
    (['n_trials=2', 'fixed.train.epochs=3'], ['data.uri=/data/aireadi'])
    """
    sweep, experiment = [], []
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        (sweep if key.split(".", 1)[0] in SWEEP_SECTIONS else experiment).append(text)
    return sweep, experiment


def override_keys(overrides: Sequence[str]) -> set[str]:
    return {text.split("=", 1)[0].strip() for text in overrides}


def load_launch_spec(spec_path: str | Path, overrides: Sequence[str] = (), storage: str | None = None
                     ) -> tuple[SweepSpec, list[str]]:
    """The sweep spec with the command line's sweep overrides applied, and its experiment overrides, checked:
    none may give trials another objective or overwrite a key of the search space (the trial's sampled value would
    be silently replaced), and all must apply to the base experiment."""
    sweep_overrides, experiment_overrides = split_overrides(overrides)
    spec = load_sweep(spec_path, sweep_overrides)
    if storage:
        spec.storage = storage  # validated on assignment: its password percent-encoded before any parsing
    keys = override_keys(experiment_overrides)
    objective = sorted(keys & set(OBJECTIVE_KEYS))
    if objective:
        raise ConfigError(f"{spec_path}: override {', '.join(objective)} would give trials another objective than the "
                          "study's; set objective.metric=... / objective.direction=... (the sweep's objective) instead")
    clash = sorted(keys & set(spec.space))
    if clash:
        raise ConfigError(f"{spec_path}: override {', '.join(clash)} is a key of the search space; change the space "
                          f"instead, e.g. space.{clash[0]}.low=... or fixed.{clash[0]}=... with space.{clash[0]}=null")
    base_config(spec, experiment_overrides)  # every override is checked before anything starts
    return spec, experiment_overrides


def base_config(spec: SweepSpec, experiment_overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The base experiment with the objective, `fixed` and the command-line overrides (no trial params)."""
    fixed = spec.objective_overrides() + [f"{key}={format_value(value)}" for key, value in spec.fixed.items()]
    return load_experiment(spec.base, fixed + list(experiment_overrides))


def is_probe_study(spec: SweepSpec, base: ExperimentConfig) -> bool:
    """True when no trial ever unfreezes its encoder: every trial is a head on stored features."""
    return UNFREEZE_KEY not in spec.space and base.train.unfreeze_epoch is None and base.features.enabled


def resolve_plan(
    spec_path: str | Path,
    *,
    storage: str | None = None,
    overrides: Sequence[str] = (),
    n_trials: int | None = None,
    workers: int = 1,
    devices_per_trial: int | None = None,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    fresh_process_per_trial: bool = False,
    runner: RunnerKind | None = None,
) -> tuple[LaunchPlan, SweepSpec]:
    """The plan of launching `spec_path` with these settings, and the spec (whose storage keeps its password).

    `runner`: where trials train (`octft.sweep.runners`); default: in-process for a probe study, else a warm
    process per worker (a fresh one per trial with `fresh_process_per_trial`). Nothing is created here: the study
    and its MLflow parent run are made by the launch, which then fills in `parent_run_id` and `launch.index` (a
    database tracking store is opened, to check where its artifacts go: MLflow makes its tables there if it has none).
    """
    if devices_per_trial is None:
        devices_per_trial = default_devices_per_trial(workers)
    if workers < 1 or devices_per_trial < 1:
        raise ConfigError(f"--workers ({workers}) and --devices-per-trial ({devices_per_trial}) must be at least 1")
    spec, experiment_overrides = load_launch_spec(spec_path, overrides, storage)
    if n_trials is not None:
        spec.n_trials = n_trials
    tracking_uri = resolve_tracking_uri(spec.mlflow.tracking_uri)
    check_not_shared(tracking_uri, spec.storage)
    check_artifact_store(tracking_uri, spec.mlflow.experiment)
    base = base_config(spec, experiment_overrides)
    check_trial_layouts(spec, base, devices_per_trial)
    layout = fixed_micro_batch(spec, base, devices_per_trial, experiment_overrides)
    if layout:
        print(f"{layout[0]} for every trial: one micro-batch shape, so trials share compiled graphs", flush=True)
    experiment_overrides = [*experiment_overrides, *layout]
    head_from = lpft_head(spec, base, spec_path, tracking_uri)
    if head_from is not None:
        # Where the sweep file set it (fixed), else beside the command line's overrides; the head's shape comes with
        # it (a warm start needs the probe's head), so every trial and replay builds that head.
        resolved = {**head_from["head"], "init.head_from": head_from["run"]}
        if "init.head_from" in spec.fixed:
            spec.fixed = {**spec.fixed, **{key: parse_override(f"k={text}")[1] for key, text in resolved.items()}}
        else:
            experiment_overrides += [f"{key}={text}" for key, text in resolved.items()]
    base = base_config(spec, experiment_overrides)
    probe = is_probe_study(spec, base)
    plan = LaunchPlan(
        study_name=spec.study_name,
        study_dir=str((Path(base.output_dir) / "sweeps" / spec.study_name).resolve()),
        # Only what the file and overrides set: defaults of another sampler type would not validate again.
        sweep=redact(spec.model_dump(mode="json", exclude_unset=True, exclude={"storage"})),  # a plan is a file
        # A URL password on the command line too: a sweep's trials take their MLflow store from the plan.
        base=spec.base, experiment_overrides=redact(experiment_overrides),
        storage=remember_password(spec.storage), tracking_uri=remember_password(tracking_uri), head_from=head_from,
        probe=probe,
        launch=LaunchSettings(
            workers=workers, devices_per_trial=devices_per_trial, n_trials=spec.n_trials,
            deadline=time.time() + spec.timeout_s if spec.timeout_s else None, heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            runner=runner or ("in_process" if probe else "fresh" if fresh_process_per_trial else "warm"),
        ),
    )
    return plan, spec


def check_artifact_store(tracking_uri: str, experiment: str) -> None:
    """Refuse, before the study exists, a database tracking store whose experiment would keep its artifacts on one
    host's disk (`octft.stores.check_shared_artifacts`): the experiment's own location where it exists, else the one
    the launch would create it with. Only a database store is opened here (MLflow's tables made, one host at a time):
    a SQLite store is one machine's, and a tracking server decides where artifacts go."""
    if not is_database_server(tracking_uri):
        return
    # MLflow here only for a database store: its experiment's location is in that database.
    from octft.track.mlflow_store import MlflowStore

    existing = MlflowStore(tracking_uri).experiment_artifact_location(experiment)
    location = existing if existing is not None else artifact_location(tracking_uri, experiment)
    check_shared_artifacts(tracking_uri, location, experiment, exists=existing is not None)


def check_trial_layouts(spec: SweepSpec, base: ExperimentConfig, devices_per_trial: int) -> None:
    """Refuse at launch a space whose sampled batch layouts the trials' devices cannot hold (XLA runtimes; an eager
    runtime trains on one device), or cannot cut into micro-batches of a `runtime.micro_batch_rows` the user set."""
    xla = base.runtime.kind in ("xla", "auto") and bool(platform())
    micro = None if MICRO_BATCH_KEY in spec.space else base.runtime.micro_batch_rows
    if xla or micro is not None:
        check_batch_layouts(spec.space, base.train.batch_size, base.train.accumulation_steps,
                            devices_per_trial if xla else 1, micro_batch_rows=micro)


def fixed_micro_batch(spec: SweepSpec, base: ExperimentConfig, devices_per_trial: int,
                      experiment_overrides: Sequence[str] = ()) -> list[str]:
    """The override that gives every trial of an XLA sweep one micro-batch shape (`runtime.micro_batch_rows`), so
    that trials with other accumulation counts or batch sizes compile nothing new; [] on an eager runtime, when the
    space samples one effective batch, or when the user sets the key (null included) anywhere."""
    if base.runtime.kind not in ("xla", "auto") or not platform():
        return []
    if (base.runtime.micro_batch_rows is not None or MICRO_BATCH_KEY in spec.space or MICRO_BATCH_KEY in spec.fixed
            or MICRO_BATCH_KEY in override_keys(experiment_overrides)):
        return []
    rows = shared_micro_batch_rows(spec.space, base.train.batch_size, base.train.accumulation_steps, devices_per_trial)
    return [] if rows is None else [f"{MICRO_BATCH_KEY}={rows}"]


def lpft_head(spec: SweepSpec, base: ExperimentConfig, spec_path: str | Path, tracking_uri: str) -> dict | None:
    """LP-FT: when the trials' `init.head_from` names a probe sweep file, that study's best trial, as
    {"from": <file>, "run": "runs:/<id>", "head": {<head keys>: <values>}}. Resolved once per study and recorded on
    it, so a probe study that ran on since does not change the head of trials already run, or of their replays."""
    value = base.init.head_from
    if not value or is_run_uri(value):
        return None
    storage = open_study_storage(spec.storage, heartbeat_interval=None)
    try:
        recorded = optuna.load_study(study_name=spec.study_name, storage=storage).user_attrs.get(HEAD_FROM_ATTR)
    except KeyError:  # the study does not exist yet
        recorded = None
    if not (recorded and recorded.get("from") == value):
        # Relative to where octft runs, else to the sweep file's repo root (as `base` is).
        path = value if Path(value).is_file() else str(Path(spec_path).resolve().parent.parent / value)
        run = best_probe_run(path, spec.storage)
        # MLflow only here, for an LP-FT study's first launch: a launch resolves its plan and starts its first runner
        # before it imports MLflow (octft.sweep.launch).
        from octft.track.mlflow_store import MlflowStore

        recorded = {"from": value, "run": run, "head": head_settings(run, MlflowStore(tracking_uri))}
        print(f"init.head_from={value} -> {run} (its best trial; head {recorded['head']}), fixed for this study",
              flush=True)
    return dict(recorded)


def best_probe_run(sweep_file: str, storage: str) -> str:
    """`runs:/<run id>` of the best COMPLETE trial of the study of `sweep_file` (in `storage`, beside this one) that
    did not collapse at its best epoch (`collapsed_at_best`) and recorded its run."""
    if not sweep_file.endswith((".yaml", ".yml")):
        raise HeadFromError(f"init.head_from={sweep_file!r} is neither runs:/<MLflow run id> nor a sweep file "
                            "(sweeps/<name>.yaml)")
    probe = load_sweep(sweep_file)
    probe.storage = storage
    try:
        study = optuna.load_study(study_name=probe.study_name, storage=open_study_storage(storage, heartbeat_interval=None))
    except KeyError:
        raise HeadFromError(f"init.head_from={sweep_file!r}: study {probe.study_name!r} does not exist in "
                            f"{probe.storage_redacted}; run `octft sweep launch {sweep_file}` first") from None
    complete = [trial for trial in study.get_trials(deepcopy=False) if trial.state.name == "COMPLETE"]
    if not complete:
        raise HeadFromError(f"init.head_from={sweep_file!r}: study {probe.study_name!r} has no COMPLETE trial yet")
    # The best head that did not collapse (by the probe study's own collapse rule): a one-class head is no start.
    healthy = [trial for trial in complete if collapsed_at_best(trial, probe) is None and trial_record(trial).mlflow_run_id]
    if not healthy:
        raise HeadFromError(f"init.head_from={sweep_file!r}: every COMPLETE trial of study {probe.study_name!r} collapsed "
                            "at its best epoch (pruner.collapse's rule); run more probe trials, or name a run with "
                            "runs:/<id>")
    best = max(healthy, key=lambda trial: trial.value if study.direction.name == "MAXIMIZE" else -trial.value)
    return f"runs:/{trial_record(best).mlflow_run_id}"
