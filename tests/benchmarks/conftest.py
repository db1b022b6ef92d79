"""benchmarks/bench_pruning.py as a module for its tests (benchmarks/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pruning.py"


@pytest.fixture
def bench():
    """The benchmark script, loaded once; registered in sys.modules first, as its dataclasses need."""
    if "bench_pruning" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_pruning", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_pruning"]
