"""Fixtures shared by the sweep tests: quiet Optuna logs and one tiny synthetic release per module."""

import optuna
import pytest


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """`<root>/data`: 48 participants, 4 B-scans of 32 x 32; trials cache into `<root>/cache`."""
    from octft.data.synth import synthesize

    root = tmp_path_factory.mktemp("aireadi")
    synthesize(root / "data", participants=48, seed=0, frames=4, height=32, width=32)
    return root
