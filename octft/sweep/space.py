"""A sweep's search space: one typed entry per dotted config path, drawn through Optuna's suggest API.

Entry fields equal the arguments of `trial.suggest_float`, `trial.suggest_int` and
`trial.suggest_categorical`, so a YAML entry reads like the call it becomes:

    >>> import optuna
    >>> space = parse_space({"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    ...                      "train.accumulation_steps": {"type": "categorical", "choices": [2, 4, 8]}})
    >>> trial = optuna.create_study().ask()
    >>> sorted(suggest(trial, space))
    ['optim.lr_head', 'train.accumulation_steps']
"""

from __future__ import annotations

from typing import Any, Literal, Union

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import Trial
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from octft.config import ConfigError, _explain
from octft.train.devices import BatchLayoutError

CategoricalChoice = Union[None, bool, int, float, str]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParam(_Entry):
    """`trial.suggest_float(name, low, high, step=step, log=log)`."""

    type: Literal["float"] = "float"
    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> "FloatParam":
        _check_range(self.low, self.high, self.step, self.log)
        return self


class IntParam(_Entry):
    """`trial.suggest_int(name, low, high, step=step, log=log)`."""

    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> "IntParam":
        _check_range(self.low, self.high, None if self.step == 1 else self.step, self.log)
        return self


class CategoricalParam(_Entry):
    """`trial.suggest_categorical(name, choices)`."""

    type: Literal["categorical"] = "categorical"
    choices: list[CategoricalChoice]

    @model_validator(mode="after")
    def _check(self) -> "CategoricalParam":
        if not self.choices:
            raise ValueError("choices is empty; list at least one value")
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise ValueError(f"choices {self.choices} repeat a value")
        return self


Param = FloatParam | IntParam | CategoricalParam
_PARAM_TYPES: dict[str, type[BaseModel]] = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}


def _check_range(low: float, high: float, step: float | None, log: bool) -> None:
    # The same rules Optuna enforces, raised at load time instead of in the first trial.
    if low > high:
        raise ValueError(f"low {low} is above high {high}")
    if log and low <= 0:
        raise ValueError(f"log=true needs low > 0, got low {low}")
    if log and step is not None:
        raise ValueError("step and log=true cannot be combined (Optuna's suggest API forbids it)")
    if step is not None and step <= 0:
        raise ValueError(f"step must be > 0, got {step}")


def parse_space(tree: Any, *, source: str = "<sweep>") -> dict[str, Param]:
    """Validate a YAML `space:` mapping into typed entries; errors name the source, the entry and the field."""
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: space must map dotted config paths to entries, got {type(tree).__name__}")
    space: dict[str, Param] = {}
    for name, entry in tree.items():
        where = f"{source}: space entry {name!r}"
        if isinstance(entry, BaseModel):
            entry = entry.model_dump()
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping like {{type: float, low: 0.0, high: 1.0}}, got {entry!r}")
        kind = entry.get("type")
        if kind not in _PARAM_TYPES:
            raise ConfigError(f"{where}: type {kind!r} is not one of {', '.join(_PARAM_TYPES)}")
        model = _PARAM_TYPES[kind]
        try:
            space[str(name)] = model.model_validate(entry)
        except ValidationError as error:
            raise _explain_entry(error, model, where) from None
    return space


def _explain_entry(error: ValidationError, model: type[BaseModel], where: str) -> ConfigError:
    # A whole-entry rule (low above high, ...) has no field to name; say the rule itself.
    rules = [item for item in error.errors() if not item["loc"] and item["type"] == "value_error"]
    if rules and len(rules) == len(error.errors()):
        return ConfigError(f"{where}: " + "; ".join(str(item["ctx"]["error"]) for item in rules))
    return _explain(error, model, where)


def suggest(trial: Trial, space: dict[str, Param]) -> dict[str, Any]:
    """Draw every entry of `space` on `trial`; parameter names are the dotted config paths."""
    params: dict[str, Any] = {}
    for name, entry in space.items():
        if isinstance(entry, FloatParam):
            params[name] = trial.suggest_float(name, entry.low, entry.high, step=entry.step, log=entry.log)
        elif isinstance(entry, IntParam):
            params[name] = trial.suggest_int(name, entry.low, entry.high, step=entry.step, log=entry.log)
        else:
            params[name] = trial.suggest_categorical(name, entry.choices)
    return params


def distributions(space: dict[str, Param]) -> dict[str, BaseDistribution]:
    """The Optuna distribution of each entry, for `study.ask(fixed_distributions=...)` and `enqueue_trial`."""
    out: dict[str, BaseDistribution] = {}
    for name, entry in space.items():
        if isinstance(entry, FloatParam):
            out[name] = FloatDistribution(entry.low, entry.high, log=entry.log, step=entry.step)
        elif isinstance(entry, IntParam):
            out[name] = IntDistribution(entry.low, entry.high, log=entry.log, step=entry.step)
        else:
            out[name] = CategoricalDistribution(entry.choices)
    return out


def sample_values(entry: Param) -> list[Any]:
    """Values that span an entry (its ends, or every choice): what load-time validation applies to the config."""
    if isinstance(entry, CategoricalParam):
        return list(entry.choices)
    return [entry.low, entry.high] if entry.low != entry.high else [entry.low]


def possible_values(key: str, space: dict[str, Param], fixed_value: Any, *, limit: int = 256) -> list[Any] | None:
    """Every value `key` can take in a trial: the space's choices or integer range, else the fixed value.

    None for a float range or an integer range wider than `limit` (too many to list).

    >>> possible_values("train.accumulation_steps", {"train.accumulation_steps": IntParam(low=1, high=4)}, 2)
    [1, 2, 3, 4]
    """
    entry = space.get(key)
    if entry is None:
        return [fixed_value]
    if isinstance(entry, CategoricalParam):
        return list(entry.choices)
    if isinstance(entry, IntParam) and not entry.log and (entry.high - entry.low) // entry.step < limit:
        return list(range(entry.low, entry.high + 1, entry.step))
    if isinstance(entry, IntParam) and entry.log and entry.high - entry.low < limit:
        return list(range(entry.low, entry.high + 1))
    return None


def check_batch_layouts(space: dict[str, Param], batch_size: int, accumulation_steps: int, num_devices: int,
                        micro_batch_rows: int | None = None) -> None:
    """Refuse, before any trial runs, a space in which some trial's effective batch
    (`train.batch_size x train.accumulation_steps`) cannot be spread evenly over `num_devices`, or, with
    `micro_batch_rows` (`runtime.micro_batch_rows`) set, cannot be cut into micro-batches of that many rows
    per device.

    Raises `BatchLayoutError` naming the values that fail; a trial would otherwise fail at its own start.
    """
    sizes = possible_values("train.batch_size", space, batch_size)
    steps = possible_values("train.accumulation_steps", space, accumulation_steps)
    if sizes is None or steps is None:
        return
    pairs = sorted({(size, step) for size in sizes for step in steps})
    failing = [(size, step) for size, step in pairs if (size * step) % num_devices]
    if failing:
        shown = ", ".join(f"{size} x {step} = {size * step}" for size, step in failing[:6])
        raise BatchLayoutError(
            f"{len(failing)} of the space's effective batches (train.batch_size x train.accumulation_steps) cannot be "
            f"split evenly over the {num_devices} devices each trial gets: {shown}"
            + (" ..." if len(failing) > 6 else "")
            + f". Keep the space to effective batches that are multiples of {num_devices}, or change --devices-per-trial"
        )
    if micro_batch_rows is None:
        return
    failing = [(size, step) for size, step in pairs if (size * step // num_devices) % micro_batch_rows]
    if failing:
        shown = ", ".join(f"{size} x {step} = {size * step} ({size * step // num_devices} rows per device)"
                          for size, step in failing[:6])
        raise BatchLayoutError(
            f"runtime.micro_batch_rows={micro_batch_rows} does not divide the rows per device of {len(failing)} of the "
            f"space's effective batches on {num_devices} device{'s' if num_devices > 1 else ''}: {shown}"
            + (" ..." if len(failing) > 6 else "")
            + ". Set it to a divisor of every one, or leave it out (null) and the launch picks one"
        )


def shared_micro_batch_rows(space: dict[str, Param], batch_size: int, accumulation_steps: int, num_devices: int) -> int | None:
    """The most rows per device per micro-batch that every trial's effective batch can be cut into, at most each
    trial's `train.batch_size`: fixed for all of a study's trials (`runtime.micro_batch_rows`), trials with other
    accumulation counts then run the same micro-batch shapes and share every compiled graph.

    None when the space samples one effective batch only (nothing to share) or too many values to list.

    >>> shared_micro_batch_rows({"train.accumulation_steps": CategoricalParam(choices=[1, 2])}, 8, 1, 2)
    4
    """
    sizes = possible_values("train.batch_size", space, batch_size)
    steps = possible_values("train.accumulation_steps", space, accumulation_steps)
    if sizes is None or steps is None:
        return None
    per_device = {size * step // num_devices for size in sizes for step in steps if (size * step) % num_devices == 0}
    if len(per_device) < 2:
        return None
    return max(d for d in range(1, min(sizes) + 1) if all(rows % d == 0 for rows in per_device))
