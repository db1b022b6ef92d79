"""Shared by the reliability suite: a small synthetic release and the CLI as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from octft.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
SMALL = ("data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32")


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Path:
    """48 participants (2 per class in val and test), 4 B-scans of 32 x 32."""
    from octft.data.synth import synthesize

    root = tmp_path_factory.mktemp("reliability") / "data"
    synthesize(root, participants=48, seed=0, frames=4, height=32, width=32)
    return root


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    """Exit code and the CLI's own error lines; a traceback (a bug) propagates out of `main` and fails the test."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("octft:")]


def one_error_line(capsys, *args: str) -> str:
    """The command must fail with exit 2 and exactly one `octft: error:` line; returns that line."""
    code, lines = run_cli(capsys, *args)
    errors = [line for line in lines if line.startswith("octft: error:")]
    assert code == 2 and len(errors) == 1, (code, lines)
    return errors[0]


def run_subprocess(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`octft ARGS` in a fresh process (for probes that could hang or balloon the test process itself)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "octft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)
