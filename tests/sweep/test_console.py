"""What `octft sweep launch` prints: one line per trial end with its value and the study's best so far, a study end
naming the best trial and the next command, epochs only with --verbose, and no library log line (Optuna's, MLflow's,
warnings) on the console: they are in the launch's log file.

A real probe study (heads on stored features, trials in the launch's own process) through the CLI, on the synthetic
release of `conftest.py`, with real SQLite stores in the test's folder.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from optuna.trial import TrialState

from octft.cli import main
from octft.console import epoch_lines
from octft.sweep.records import trial_record
from sweeps import experiment_overrides, load

REPO = Path(__file__).resolve().parents[2]
TRIAL_END = re.compile(r"trial (\d+) (COMPLETE|PRUNED|FAIL)\b(.*)")
EPOCH = re.compile(r"epoch +\d+  train/loss ")
NOISE = ("WARNING", "INFO", "A new study created", "Using an existing study", "Downloading artifacts", "Traceback")


def probe_spec(directory: Path, study_name: str) -> tuple[Path, str]:
    """The shipped probe study, 5 trials of 6 or 7 epochs, in `directory`: (sweep file, storage)."""
    storage = f"sqlite:///{directory / 'optuna.db'}"
    tree = yaml.safe_load((REPO / "sweeps" / "probe.yaml").read_text())
    tree.update(base=str(REPO / "experiments" / "demo.yaml"), storage=storage, study_name=study_name, n_trials=5,
                mlflow={"tracking_uri": f"sqlite:///{directory / 'mlflow.db'}", "experiment": study_name})
    tree["space"]["train.epochs"] = {"type": "int", "low": 6, "high": 7}
    tree["sampler"]["n_startup_trials"] = 3
    path = directory / f"{study_name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, storage


def launch_cli(capfd, spec: Path, storage: str, overrides: list[str], *flags: str) -> tuple[list[str], list[str]]:
    """`octft sweep launch SPEC --storage STORAGE [flags] [overrides]` in this process: its (stdout, stderr) lines."""
    assert main(["sweep", "launch", str(spec), "--storage", storage, *flags, *overrides]) == 0
    captured = capfd.readouterr()
    print(captured.out, captured.err)  # shown when the test fails
    return captured.out.splitlines(), captured.err.splitlines()


def test_the_console_has_one_line_per_trial_end_and_the_study_end_names_the_best_and_what_next(data_dir, tmp_path,
                                                                                                  capfd):
    spec, storage = probe_spec(tmp_path, "console")
    lines, errors = launch_cli(capfd, spec, storage, experiment_overrides(data_dir, tmp_path))
    study = load(storage, "console")
    assert len(study.trials) == 5

    ends = [TRIAL_END.fullmatch(line) for line in lines]
    ends = [match for match in ends if match]
    assert sorted(int(match[1]) for match in ends) == list(range(5))  # exactly one line per trial end
    best = None
    for match in ends:  # one worker: the lines come in the order the trials ended
        trial = study.trials[int(match[1])]
        assert match[2] == trial.state.name
        if trial.state == TrialState.COMPLETE:
            assert f"val/balanced_accuracy={trial.value:.3f} at epoch " in match[3]
            best = trial if best is None or trial.value > best.value else best
        elif trial.state == TrialState.PRUNED:
            outcome = trial_record(trial).outcome
            assert match[3].startswith(f" ({outcome.prune_reason}) at epoch {outcome.prune_epoch} "
                                       "val/balanced_accuracy=")
            assert outcome.prune_detail.split(";")[0].split(" at epoch")[0] in match[3]  # the reason, not only its name
        standing = ("no trial complete yet" if best is None else "new best" if best.number == trial.number
                    else f"best: trial {best.number}, {best.value:.3f}")
        assert match[3].endswith(f"({standing})"), match[0]

    assert study.best_trial.number == best.number
    assert "study console: " in lines[-3] and lines[-3].endswith(
        f"best: trial {best.number}, val/balanced_accuracy={best.value:.3f}")
    # A probe study feeds LP-FT: promoting it would spend the test split on a head.
    assert lines[-1] == f"  next: an LP-FT study with init.head_from: {spec} (as sweeps/demo_lpft.yaml has), then promote " \
                        "that study; promoting this probe study would spend the test split on a head"

    assert not [line for line in lines + errors if EPOCH.match(line.strip()) or " starts " in line]
    assert not [line for line in lines + errors if any(noise in line for noise in NOISE)]
    # Silenced on the console, not lost: in the launch's log file.
    log = (tmp_path / "runs" / "sweeps" / "console" / "launch.log").read_text()
    assert "A new study created in RDB with name: console" in log
    # Each trial's epochs stay in its trial.log.
    assert all(epoch_lines(Path(trial_record(trial).run_dir) / "trial.log") for trial in study.trials)


def test_verbose_adds_each_trials_start_and_epochs(data_dir, tmp_path, capfd):
    spec, storage = probe_spec(tmp_path, "console-verbose")
    lines, errors = launch_cli(capfd, spec, storage, experiment_overrides(data_dir, tmp_path), "--verbose")
    study = load(storage, "console-verbose")
    for trial in study.trials:
        record = trial_record(trial)
        assert f"trial {trial.number} starts on worker 0 ({record.run_dir})" in lines
        epochs = [line for line in lines if line.startswith(f"  trial {trial.number} epoch ")]
        assert len(epochs) == record.outcome.epochs_run > 0
        # Its epochs come before its end line.
        end = next(index for index, line in enumerate(lines) if TRIAL_END.fullmatch(line) and
                   TRIAL_END.fullmatch(line)[1] == str(trial.number))
        assert lines.index(epochs[-1]) < end
    # Library logs too, with --verbose.
    assert any("A new study created in RDB" in line for line in errors)


def test_the_next_command_promotes_a_fine_tune_study_with_its_overrides_and_redacted_storage():
    from octft.sweep.launch import LaunchResult, next_command

    ended = LaunchResult("lpft", Path("runs"), "0" * 32, [0], {"COMPLETE": 2}, [], metric="val/balanced_accuracy",
                         best=(1, 0.7))
    storage = "postgresql://octft:Sup3rS3cret@db/optuna"
    line = next_command(ended, "sweeps/demo_lpft.yaml", ["n_trials=9", "sampler.seed=3", "data.uri=/data"], storage)
    assert shlex.split(line)[:4] == ["octft", "promote", "sweeps/demo_lpft.yaml", "sampler.seed=3"]
    assert "Sup3rS3cret" not in line and "n_trials" not in line and line.split()[-2] == "--storage"
    nothing = LaunchResult("lpft", Path("runs"), "0" * 32, [0], {"FAIL": 2}, [])
    assert shlex.split(next_command(nothing, "sweeps/demo_lpft.yaml"))[:3] == ["octft", "sweep", "status"]
