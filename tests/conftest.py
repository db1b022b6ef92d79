"""The test suite's shared helpers (`tests/steps.py`, `tests/sweeps.py`) are importable from every test module."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
