"""Optuna sweeps over experiment configs: the sweep spec, its search space and the collapse-aware pruner."""

from octft.sweep.pruners import CollapsePruner, build_pruner, epoch_attr, record_epoch
from octft.sweep.space import CategoricalParam, FloatParam, IntParam, Param, distributions, parse_space, suggest
from octft.sweep.spec import (
    STORAGE_ENV,
    SweepSpec,
    build_sampler,
    format_value,
    load_sweep,
    redact_url,
    sampler_settings,
)

__all__ = [
    "STORAGE_ENV",
    "CategoricalParam",
    "CollapsePruner",
    "FloatParam",
    "IntParam",
    "Param",
    "SweepSpec",
    "build_pruner",
    "build_sampler",
    "distributions",
    "epoch_attr",
    "format_value",
    "load_sweep",
    "parse_space",
    "record_epoch",
    "redact_url",
    "sampler_settings",
    "suggest",
]
