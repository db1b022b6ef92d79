"""A sweep as YAML: a base experiment, fixed overrides, a search space, and how Optuna searches and prunes it.

Every trial is the base experiment plus dotted overrides, so any trial replays as one `octft train` command:

    >>> spec = load_sweep("sweeps/demo.yaml")                                   # doctest: +SKIP
    >>> spec.trial_overrides({"optim.lr_head": 0.0012, ...})                    # doctest: +SKIP
    ['train.epochs=6', 'optim.lr_head=0.0012', ...]
    >>> spec.replay_command({"optim.lr_head": 0.0012, ...})                     # doctest: +SKIP
    'octft train experiments/demo.yaml train.epochs=6 optim.lr_head=0.0012 ...'

Every space and fixed key is checked against the base experiment when the sweep loads, so a misspelled
path fails before the first trial, not in it.
"""

from __future__ import annotations

import json
import numbers
import os
import shlex
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from octft.config import (SEED_LIMIT, ConfigError, ObjectiveConfig, Seed, _explain, _Strict, load_experiment, parse_override,
                          read_yaml)
from octft.sweep.space import Param, parse_space, sample_values
from octft.redaction import normalise_url, redact_url
from octft.stores import DEFAULT_STORAGE, STORAGE_ENV
_ENTRY_FIELDS = {"type", "low", "high", "step", "log", "choices"}


class MlflowSpec(_Strict):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "octft-sweep"


# The study's objective reaches every trial as these overrides, so a trial picks its best epoch, stops
# early and writes best.pt by the very figure the study ranks it by, and its replay command says so.
OBJECTIVE_KEYS = ("train.objective.metric", "train.objective.direction")


# The arguments each sampler is built with (besides `seed`), in the order they are recorded.
SAMPLER_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "tpe": ("n_startup_trials", "n_ei_candidates", "multivariate", "group", "constant_liar"),
    "random": (),
    "gp": ("n_startup_trials", "deterministic_objective"),
    "cmaes": ("n_startup_trials", "sigma0", "popsize", "consider_pruned_trials", "use_separable_cma", "with_margin",
              "lr_adapt"),
    "qmc": ("qmc_type", "scramble"),
}
# Optuna's own default of n_startup_trials differs by sampler; the recorded value is always the one used.
_DEFAULT_STARTUP = {"tpe": 10, "gp": 10, "cmaes": 1}


class SamplerSpec(_Strict):
    """Optuna's sampler, every argument spelled out: Optuna 5 changed TPE's defaults once and may again.

    - `tpe`: the default; with `constant_liar`, parallel workers avoid the points their running trials hold.
    - `random`: independent draws.
    - `gp`: Gaussian-process Bayesian optimisation, for few expensive trials. It has no constant liar: it
      ignores running trials, so K parallel workers may propose K nearly identical points; use it with
      one or two workers.
    - `cmaes`: CMA-ES over float and int parameters (categorical ones fall back to random draws); its
      generations need many trials (tens at least).
    - `qmc`: a quasi-random (Sobol or Halton) sequence that spreads trials evenly. All workers share one
      sequence: they get the same seed (no per-worker offset) and Optuna hands out its points in order.
    Each worker of each launch gets `seed` + an offset (except `qmc`), so that workers do not repeat each
    other's random draws.
    """

    type: Literal["tpe", "random", "gp", "cmaes", "qmc"] = "tpe"
    seed: Seed | None = 0
    n_startup_trials: int | None = Field(None, ge=0)  # tpe, gp (default 10), cmaes (default 1)
    n_ei_candidates: int = Field(24, ge=1)  # tpe
    multivariate: bool = True
    group: bool = False
    constant_liar: bool = True
    deterministic_objective: bool = False  # gp
    sigma0: float | None = Field(None, gt=0)  # cmaes
    popsize: int | None = Field(None, ge=1)
    consider_pruned_trials: bool = False
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False
    qmc_type: Literal["sobol", "halton"] = "sobol"  # qmc
    scramble: bool = False

    @model_validator(mode="after")
    def _check(self) -> "SamplerSpec":
        allowed = set(SAMPLER_ARGUMENTS[self.type]) | {"type", "seed"}
        misplaced = sorted(self.model_fields_set - allowed)
        if misplaced:
            owners = {name: [kind for kind, names in SAMPLER_ARGUMENTS.items() if name in names] for name in misplaced}
            raise ValueError("; ".join(f"{name} applies to type: {' / '.join(owners[name])}" for name in misplaced)
                             + f", not type: {self.type}; remove it")
        if self.group and not self.multivariate:
            raise ValueError("group: true needs multivariate: true")
        if self.type == "qmc" and self.scramble and self.seed is None:
            raise ValueError("qmc with scramble: true needs a seed: every worker must scramble the same sequence")
        if self.type == "cmaes" and self.use_separable_cma and self.with_margin:
            raise ValueError("use_separable_cma and with_margin cannot both be true (Optuna's CMA-ES refuses it)")
        return self


class CollapseSpec(_Strict):
    """When a trial counts as collapsed; see `octft.sweep.pruners.CollapsePruner`.

    `enabled: false` turns the collapse rule off, leaving only the wrapped pruner (to measure what the rule saves).
    """

    enabled: bool = True
    max_class_share: float = Field(0.9, gt=0, le=1)
    chance_margin: float = Field(0.05, ge=0, lt=1)
    patience: int = Field(2, ge=1)
    grace_epochs: int = Field(1, ge=0)


_WRAPPED_FIELDS = {
    "percentile": ("percentile",),
    "n_startup_trials": ("median", "percentile"),
    "interval_steps": ("median", "percentile"),
    "n_min_trials": ("median", "percentile"),
    "min_resource": ("hyperband", "successive_halving"),
    "reduction_factor": ("hyperband", "successive_halving"),
    "bootstrap_count": ("hyperband", "successive_halving"),
    "max_resource": ("hyperband",),
    "min_early_stopping_rate": ("successive_halving",),
}


class WrappedPrunerSpec(_Strict):
    """The pruner CollapsePruner defers to for ordinary underperformers (`type: none` for no such pruner).

    Optuna's pruners with their own arguments. `n_warmup_steps` (any type) counts from each trial's
    unfreeze epoch: the pruner judges a trial only from its unfreeze epoch + n_warmup_steps on. Hyperband's
    and successive halving's rungs (`min_resource` x `reduction_factor`^k epochs) count from epoch 0, as
    Optuna defines them; set `max_resource` to the trials' epochs so that brackets exist from the first trial.
    """

    type: Literal["median", "percentile", "hyperband", "successive_halving", "none"] = "median"
    n_warmup_steps: int = Field(0, ge=0)
    percentile: float | None = Field(None, ge=0, le=100)  # percentile only
    n_startup_trials: int = Field(5, ge=0)  # median, percentile
    interval_steps: int = Field(1, ge=1)
    n_min_trials: int = Field(1, ge=1)
    min_resource: int = Field(1, ge=1)  # hyperband, successive_halving
    reduction_factor: int = Field(3, ge=2)
    bootstrap_count: int = Field(0, ge=0)
    max_resource: int | Literal["auto"] = "auto"  # hyperband
    min_early_stopping_rate: int = Field(0, ge=0)  # successive_halving

    @model_validator(mode="before")
    @classmethod
    def _none_means_none(cls, value: Any) -> Any:
        return {"type": "none"} if value is None or value == "none" else value

    @model_validator(mode="after")
    def _check(self) -> "WrappedPrunerSpec":
        if self.type == "percentile" and self.percentile is None:
            raise ValueError("type: percentile needs percentile (0..100), e.g. percentile: 25")
        # `type: none` ignores the rest, so one override switches a configured pruner off.
        misplaced = sorted(name for name in self.model_fields_set & set(_WRAPPED_FIELDS)
                           if self.type != "none" and self.type not in _WRAPPED_FIELDS[name])
        if misplaced:
            raise ValueError(", ".join(f"{name} applies to type: {' / '.join(_WRAPPED_FIELDS[name])}" for name in misplaced)
                             + f", not type: {self.type}; remove it")
        if isinstance(self.max_resource, int) and self.max_resource < self.min_resource:
            raise ValueError(f"max_resource {self.max_resource} is below min_resource {self.min_resource}")
        return self


class PrunerSpec(_Strict):
    collapse: CollapseSpec = CollapseSpec()
    wrapped: WrappedPrunerSpec = WrappedPrunerSpec()


class PromoteSpec(_Strict):
    """Which registered model the best trial becomes, and the per-class F1 it must reach to be promoted."""

    model_name: str | None = None  # default: the study name
    min_class_f1: float = Field(0.05, ge=0, le=1)


MAX_HEADS_PER_PASS = 64


class SweepSpec(_Strict):
    """A validated sweep; build it with `load_sweep` so that its keys are checked against the base experiment."""

    base: str
    study_name: str
    # May hold a database password: kept out of repr; log `storage_redacted` instead.
    storage: str = Field(DEFAULT_STORAGE, repr=False)
    mlflow: MlflowSpec = MlflowSpec()
    # What ranks trials and promotion; passed to every trial as train.objective.* (see OBJECTIVE_KEYS).
    objective: ObjectiveConfig = ObjectiveConfig()
    n_trials: int | None = Field(8, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    fixed: dict[str, Any] = {}
    space: dict[str, Annotated[Param, Field(discriminator="type")]] = {}
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    promote: PromoteSpec = PromoteSpec()
    # A probe study's heads trained together in one pass over the stored features, each its own trial
    # (`octft.train.stacked`); auto: half the study's trials, 8 to 64 (`resolved_heads_per_pass`); 1: one at a time.
    heads_per_pass: Annotated[int, Field(ge=1, le=MAX_HEADS_PER_PASS)] | Literal["auto"] = "auto"

    @field_validator("study_name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("study_name is empty; name the study (it keys the Optuna storage)")
        return value

    @field_validator("storage")
    @classmethod
    def _encoded_password(cls, value: str) -> str:
        # Before anything parses it: a raw '/', '#', '?' or '@' in a password would be read as URL syntax.
        return normalise_url(value)

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        both = sorted(set(self.fixed) & set(self.space))
        if both:
            raise ValueError(f"{', '.join(both)} are both fixed and in the space; keep each in one of them")
        objective = sorted((set(self.fixed) | set(self.space)) & set(OBJECTIVE_KEYS))
        if objective:
            raise ValueError(f"{', '.join(objective)} is set by the sweep's objective: section (metric, direction); "
                             "remove it from fixed / space")
        if self.promote.model_name is None:
            self.promote.model_name = self.study_name
        return self

    def resolved_heads_per_pass(self) -> int:
        """`heads_per_pass`, with auto as half the study's trials, from 8 to 64 (32 for a study bounded by time alone).

        A pass costs about the same for 8 heads as for 64 (its step is a few stacked matrix products on one thread),
        so fewer, fuller passes are faster; two passes at least let the sampler draw the second half from the
        first half's results (docs/figures.md, "Many heads per pass")."""
        if self.heads_per_pass != "auto":
            return self.heads_per_pass
        half = -(-self.n_trials // 2) if self.n_trials is not None else 32
        return min(MAX_HEADS_PER_PASS, max(8, half))

    @property
    def storage_redacted(self) -> str:
        """`storage` with any password replaced by `***`, safe for logs and MLflow params."""
        return redact_url(self.storage)

    def objective_overrides(self) -> list[str]:
        """The study's objective as trial overrides: `train.objective.metric=...`, `train.objective.direction=...`."""
        return [f"{OBJECTIVE_KEYS[0]}={format_value(self.objective.metric)}",
                f"{OBJECTIVE_KEYS[1]}={format_value(self.objective.direction)}"]

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """`key=value` overrides of one trial: the objective, `fixed`, then `params` in space order.

        Floats are written with `repr`, so parsing them back gives the very same number.
        """
        unknown = sorted(set(params) - set(self.space))
        missing = sorted(set(self.space) - set(params))
        if unknown or missing:
            raise ValueError(
                f"params do not match the space of study {self.study_name!r}: unknown {unknown}, missing {missing} "
                f"(space: {sorted(self.space)})"
            )
        return self.objective_overrides() + [f"{key}={format_value(value)}" for key, value in self.fixed.items()] + [
            f"{key}={format_value(params[key])}" for key in self.space
        ]

    def replay_command(self, params: dict[str, Any], extra: Iterable[str] = ()) -> str:
        """The shell command that reruns one trial: `octft train <base> k=v ...` (shell-quoted)."""
        return shlex.join(["octft", "train", self.base, *self.trial_overrides(params), *extra])


def format_value(value: Any) -> str:
    """One override value as the CLI reads it back (`octft.config.parse_override`): exact, or an error."""
    if value is None or isinstance(value, bool):
        text = yaml.safe_dump(value).split("\n", 1)[0]  # null / true / false
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real):
        text = repr(float(value))  # numpy floats repr as 'np.float64(...)'; plain repr is the shortest exact form
    elif isinstance(value, str):
        text = value if _read_back(value) == (value, str) else json.dumps(value)
    else:
        text = json.dumps(value)
    if _read_back(text) != (value, type(value)) and not (
        isinstance(value, numbers.Real) and _read_back(text)[0] == value
    ):
        raise ConfigError(
            f"value {value!r} cannot be written as an override that reads back the same (it reads back as "
            f"{_read_back(text)[0]!r}); use a plain number, true/false, or a string that does not look like one"
        )
    return text


def _read_back(text: str) -> tuple[Any, type]:
    value = parse_override(f"key={text}")[1]
    return value, type(value)


def sampler_settings(spec: SweepSpec, *, seed_offset: int = 0) -> dict[str, Any]:
    """Every argument the sampler is built with, for recording with the study (MLflow params, study attrs).

    `seed_offset` (a worker's index) gives each parallel worker its own seed; otherwise workers that start
    together draw the same random startup trials. `qmc` ignores it: its workers share one sequence.
    """
    sampler = spec.sampler
    if sampler.type == "qmc":
        seed_offset = 0
    # Wrapped into the generators' range: a seed near its top plus a worker's offset is still a seed.
    seed = None if sampler.seed is None else (sampler.seed + seed_offset) % SEED_LIMIT
    settings: dict[str, Any] = {"type": sampler.type, "seed": seed}
    for name in SAMPLER_ARGUMENTS[sampler.type]:
        value = getattr(sampler, name)
        if name == "n_startup_trials" and value is None:
            value = _DEFAULT_STARTUP[sampler.type]
        settings[name] = value
    return settings


def build_sampler(spec: SweepSpec, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler of `sampler_settings(spec)`, with every argument passed explicitly.

    >>> sampler = build_sampler(load_sweep("sweeps/demo.yaml"))                 # doctest: +SKIP
    """
    settings = sampler_settings(spec, seed_offset=seed_offset)
    arguments = {name: value for name, value in settings.items() if name != "type"}
    kind = settings["type"]
    if kind == "random":
        return optuna.samplers.RandomSampler(**arguments)
    if kind == "tpe":
        return optuna.samplers.TPESampler(**arguments)
    # The experimental samplers warn on construction; the warning says nothing the spec does not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "gp":
            return optuna.samplers.GPSampler(**arguments)
        if kind == "cmaes":
            return optuna.samplers.CmaEsSampler(**arguments)
        return optuna.samplers.QMCSampler(**arguments)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read `sweeps/<name>.yaml`, apply dotted overrides, and check every key against the base experiment.

    Overrides address the sweep file: `n_trials=2`, `sampler.seed=3`, `fixed.train.epochs=2`,
    `space.optim.lr_head.high=0.1` (an entry field) or `space.optim.lr_head=null` (drop the entry).
    `base` is relative to the directory octft runs from (the repo root). `$OCTFT_OPTUNA_STORAGE`, when set,
    replaces `storage`.

    >>> spec = load_sweep("sweeps/demo.yaml", ["n_trials=2"])                   # doctest: +SKIP
    """
    path = Path(path)
    tree = read_yaml(path, what="sweep file") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping (base, study_name, space, ...), got {type(tree).__name__}")
    tree = json.loads(json.dumps(tree))  # plain types, and a copy the overrides may change
    _apply_sweep_overrides(tree, list(overrides or []), source=str(path))

    tree["space"] = {name: entry.model_dump() for name, entry in parse_space(tree.get("space"), source=str(path)).items()}
    fixed = tree.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: fixed must map dotted config paths to values, got {type(fixed).__name__}")
    tree["fixed"] = {str(key): _numeric_string_as_number(value) for key, value in fixed.items()}
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as error:
        raise _explain(error, SweepSpec, str(path)) from None

    if os.environ.get(STORAGE_ENV):
        spec.storage = os.environ[STORAGE_ENV]
    # `base` is relative to where octft runs (the repo root); from elsewhere, the sweep file's repo root
    # (sweeps/<name>.yaml -> ..) is tried too, so `octft sweep launch /path/to/repo/sweeps/x.yaml` works anywhere.
    if not Path(spec.base).is_file() and (path.resolve().parent.parent / spec.base).is_file():
        spec.base = str(path.resolve().parent.parent / spec.base)
    _check_against_base(spec, path)
    return spec


def _numeric_string_as_number(value: Any) -> Any:
    # YAML reads `1e-3` as a string but the command line reads it as a number; a replay uses the command line.
    if isinstance(value, str):
        parsed = _read_back(value)[0]
        if isinstance(parsed, numbers.Real) and not isinstance(parsed, bool):
            return parsed
    return value


def _apply_sweep_overrides(tree: dict[str, Any], overrides: list[str], *, source: str) -> None:
    # `fixed` and `space` keys are themselves dotted paths, so the generic override walk cannot address them.
    for text in overrides:
        parts, value = parse_override(text)
        section = parts[0]
        if section == "fixed" and len(parts) > 1:
            tree.setdefault("fixed", {})[".".join(parts[1:])] = value
        elif section == "space" and len(parts) > 2 and parts[-1] in _ENTRY_FIELDS:
            entry = tree.setdefault("space", {}).setdefault(".".join(parts[1:-1]), {})
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: override {text!r}: space entry {'.'.join(parts[1:-1])!r} is not a mapping")
            entry[parts[-1]] = value
        elif section == "space" and len(parts) > 1:
            name = ".".join(parts[1:])
            if value is None:
                tree.setdefault("space", {}).pop(name, None)
            else:
                tree.setdefault("space", {})[name] = value
        else:
            node = tree
            for part in parts[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"{source}: override {text!r}: {part!r} is a value, not a section")
                node = child
            node[parts[-1]] = value


def _check_against_base(spec: SweepSpec, path: Path) -> None:
    base = Path(spec.base)
    if not base.is_file():
        raise ConfigError(
            f"{path}: base experiment {spec.base!r} not found from {Path.cwd()}; base is relative to the directory "
            "octft runs from (the repo root), e.g. base: experiments/demo.yaml"
        )
    fixed = spec.objective_overrides() + [f"{key}={format_value(value)}" for key, value in spec.fixed.items()]
    try:
        load_experiment(base, fixed)
    except ConfigError as error:
        raise ConfigError(f"{path}: fixed does not apply to {spec.base}: {error}") from None
    # Both ends (or every choice) of each entry, through the same text a trial's override will be.
    for name, entry in spec.space.items():
        for value in sample_values(entry):
            try:
                load_experiment(base, [*fixed, f"{name}={format_value(value)}"])
            except ConfigError as error:
                raise ConfigError(f"{path}: space entry {name!r} (value {value!r}) does not apply to {spec.base}: {error}") from None
