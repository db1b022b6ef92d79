"""How long the command line takes to answer: `octft --help`, `octft sweep status`, `octft data audit`.

Each command runs `--repeats` times in a fresh Python process against a small prepared input (a sqlite study
with 8 finished trials, a synthetic release of 24 participants). Prints, per command, the median wall time, the
median CPU time (user + system of the child: less sensitive to a busy machine than wall time) and which heavy
packages the command imported (from `python -X importtime`). Goal: each under 2 s on an idle machine, and
torch, torch_xla and mlflow imported by none of them.

`--source DIR` times another checkout's code (PYTHONPATH=DIR), e.g. the one before a change:

    .venv/bin/python benchmarks/bench_cli.py                      # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_cli.py --source /path/to/older/checkout --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torch_xla", "mlflow", "pandas", "optuna", "sqlalchemy")
_PYCACHE = Path(tempfile.gettempdir()) / "octft-bench-cli-pycache"


def prepare(folder: Path, source: Path) -> dict[str, list[str]]:
    """The inputs the commands read, and each command's argv (after `python -m octft.cli`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    study = optuna.create_study(study_name="demo", storage=storage, direction="maximize")
    for number in range(8):
        trial = study.ask({"optim.lr_head": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        study.tell(trial, 0.25 + number / 100)
    subprocess.run([sys.executable, "-m", "octft.cli", "synth", str(folder / "release"), "--participants", "24",
                    "--frames", "4", "--height", "32", "--width", "32"],
                   check=True, capture_output=True, env=_env(source))
    return {
        "octft --help": ["--help"],
        "octft sweep status": ["sweep", "status", str(REPO / "sweeps" / "demo.yaml"), "--storage", storage],
        "octft data audit (24 participants)": ["data", "audit", "--data", str(folder / "release")],
    }


def _env(source: Path) -> dict[str, str]:
    # Bytecode cached as in any installed environment (pip and uv write it; the first run does otherwise):
    # without it every start compiles sqlalchemy, optuna and pandas from source, seconds that users never pay.
    env = dict(os.environ, PYTHONPATH=str(source), PJRT_DEVICE="CPU", PYTHONPYCACHEPREFIX=str(_PYCACHE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_once(argv: list[str], source: Path, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, "-m", "octft.cli", *argv], capture_output=True, env=_env(source),
                              cwd=cwd)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if finished.returncode not in (0, 1):  # 1: an audit guard failed, still an answer
        raise SystemExit(f"{argv} failed ({finished.returncode}): {finished.stderr.decode()[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_imports(argv: list[str], source: Path, cwd: Path) -> list[str]:
    finished = subprocess.run([sys.executable, "-X", "importtime", "-m", "octft.cli", *argv], capture_output=True,
                              text=True, env=_env(source), cwd=cwd)
    imported = {line.rsplit("|", 1)[1].strip() for line in finished.stderr.splitlines() if line.startswith("import time:")}
    return [name for name in HEAVY if name in imported]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", type=Path, default=REPO, help="the checkout whose octft is timed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="octft-bench-cli-") as tmp:
        folder = Path(tmp)
        commands = prepare(folder, args.source)
        print(f"octft from {args.source}; {platform.platform()}, {os.cpu_count()} CPUs, "
              f"load average {', '.join(f'{load:.1f}' for load in os.getloadavg())}")
        print("| command | wall s (median) | CPU s (median) | heavy imports |")
        print("| --- | --- | --- | --- |")
        for name, argv in commands.items():
            run_once(argv, args.source, folder)  # warm the page cache and the bytecode cache
            runs = [run_once(argv, args.source, folder) for _ in range(args.repeats)]
            wall = statistics.median(run[0] for run in runs)
            cpu = statistics.median(run[1] for run in runs)
            imported = ", ".join(heavy_imports(argv, args.source, folder)) or "none"
            print(f"| `{name}` | {wall:.2f} | {cpu:.2f} | {imported} |")


if __name__ == "__main__":
    main()
