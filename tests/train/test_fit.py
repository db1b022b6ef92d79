"""fit(): it learns, unfreezes on schedule, matches across device counts, compiles a bounded
number of graphs and resumes exactly.

In-process tests run fit() on eager CPU over real synthetic data (synthesize -> audit -> cache).
XLA configurations and the killed run go through `python -m octft.cli train` in their own
process (SPMD is a once-per-process switch) and are compared through what they leave behind:
the MLflow store and the checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from octft.config import load_experiment
from octft.data.audit import audit_dataset
from octft.data.dataset import prepare_volumes
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.synth import synthesize
from octft.train.loop import TrainingError, ended_state, fit
from octft.train.losses import balanced_class_weights
from octft.train.setup import build_model
from octft.train.runtime import load_state, make_runtime
from octft.track import NullTracker

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
SMALL = {"frames": 4, "height": 32, "width": 32}  # 2x2x2 tokens with the demo's patches


def datasets(data_dir: Path, cache_dir: Path, *, frames: int, height: int, width: int):
    report = audit_dataset(str(data_dir))
    assert report.passed, report.failed_guards(())
    prepared = prepare_volumes(str(data_dir), report.volumes, cache_dir=str(cache_dir), frames=frames,
                               height=height, width=width, progress=False)
    return prepared.dataset("train"), prepared.dataset("val")


def demo_config(data_dir: Path, cache_dir: Path, shape: dict, *overrides: str):
    sizes = [f"data.preprocess.{key}={value}" for key, value in shape.items()]
    return load_experiment(DEMO, [f"data.uri={data_dir}", f"data.cache_dir={cache_dir}", *sizes, *overrides])


class Snapshots:
    """A reporter that keeps a copy of the model's parameters after every epoch."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.after_epoch: list[dict[str, torch.Tensor]] = []

    def report(self, epoch: int, value: float, metrics: dict[str, float]) -> None:
        self.after_epoch.append({name: p.detach().cpu().clone() for name, p in self.model.named_parameters()})
        return None


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """48 participants of 4 frames at 32x32, and a cache already built for that shape."""
    root = tmp_path_factory.mktemp("small")
    synthesize(root / "data", participants=48, seed=0, **SMALL)
    datasets(root / "data", root / "cache", **SMALL)  # builds the cache once for every test here
    return root / "data", root / "cache"


def run_fit(cfg, train_set, val_set, run_dir: Path, reporter=None, model=None, resume=False):
    """fit() with the arguments the recipe derives from `cfg`, on eager CPU, logging nowhere."""
    torch.manual_seed(cfg.train.seed)
    model = model if model is not None else build_model(cfg, len(CLASS_SHORT_NAMES))[0]
    class_weights = balanced_class_weights(train_set.labels.tolist(), len(CLASS_SHORT_NAMES))
    return fit(
        model, train_set, val_set, runtime=make_runtime("cpu"), tracker=NullTracker(), reporter=reporter,
        class_names=CLASS_SHORT_NAMES, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
        accumulation_steps=cfg.train.accumulation_steps, unfreeze_epoch=cfg.train.unfreeze_epoch,
        lr_head=cfg.optim.lr_head, lr_encoder=cfg.optim.lr_encoder, weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas), warmup_epochs=cfg.optim.warmup_epochs, min_lr_ratio=cfg.optim.min_lr_ratio,
        label_smoothing=cfg.loss.label_smoothing, class_weights=class_weights, clip_norm=cfg.train.clip_norm,
        early_stopping_patience=cfg.train.early_stopping_patience, objective_metric=cfg.train.objective.metric,
        objective_direction=cfg.train.objective.direction, seed=cfg.train.seed, run_dir=run_dir, resume=resume,
    )


# ---------------------------------------------------------------------------------------------- eager


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_model_learns_the_synthetic_signal(tmp_path, seed):
    # 96 participants (15 in val), 8 frames of 64x64: the class signal (retinal thickness, bright
    # foci) needs these sizes. The last epochs' mean, not the luckiest epoch, must beat chance.
    shape = {"frames": 8, "height": 64, "width": 64}
    synthesize(tmp_path / "data", participants=96, seed=seed, **shape)
    cfg = demo_config(tmp_path / "data", tmp_path / "cache", shape, "train.epochs=16", "train.unfreeze_epoch=0",
                      "train.batch_size=8", "train.accumulation_steps=1", "optim.lr_head=3e-3",
                      "optim.lr_encoder=1e-3", "loss.label_smoothing=0", "train.early_stopping_patience=null",
                      f"train.seed={seed}")
    train_set, val_set = datasets(tmp_path / "data", tmp_path / "cache", **shape)

    result = run_fit(cfg, train_set, val_set, tmp_path / "run")

    history = result.history
    last = history[-4:]
    assert np.mean([h["val/balanced_accuracy"] for h in last]) >= 0.5, history
    assert np.mean([h["val/loss"] for h in last]) < 0.85 * history[0]["val/loss"], history
    assert history[-1]["train/loss"] < 0.8 * history[0]["train/loss"], history


def test_encoder_moves_only_from_the_unfreeze_epoch(small_data, tmp_path):
    data_dir, cache_dir = small_data
    cfg = demo_config(data_dir, cache_dir, SMALL, "train.epochs=4", "train.unfreeze_epoch=2",
                      "train.early_stopping_patience=null")
    train_set, val_set = datasets(data_dir, cache_dir, **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg, len(CLASS_SHORT_NAMES))[0]
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    snapshots = Snapshots(model)

    run_fit(cfg, train_set, val_set, tmp_path / "run", reporter=snapshots, model=model)

    assert len(snapshots.after_epoch) == 4
    encoder = [name for name in initial if name.startswith("encoder.")]
    head = [name for name in initial if name.startswith("head.")]
    assert encoder and head and len(encoder) + len(head) == len(initial)
    for epoch, params in enumerate(snapshots.after_epoch):
        previous = snapshots.after_epoch[epoch - 1] if epoch else initial
        encoder_moved = [name for name in encoder if not torch.equal(params[name], previous[name])]
        head_moved = [name for name in head if not torch.equal(params[name], previous[name])]
        if epoch < 2:
            assert encoder_moved == [], f"epoch {epoch}: frozen encoder changed: {encoder_moved}"
        else:
            assert set(encoder_moved) == set(encoder), f"epoch {epoch}: not moved: {set(encoder) - set(encoder_moved)}"
        assert set(head_moved) == set(head), f"epoch {epoch}: head not moved: {set(head) - set(head_moved)}"


# Learning rates this small leave every prediction as it was: the validation score is flat from epoch 0.
FLAT = ("optim.lr_head=1e-9", "optim.lr_encoder=1e-9", "optim.weight_decay=0", "train.epochs=10")


def test_early_stopping_counts_only_epochs_with_a_trainable_encoder(small_data, tmp_path):
    data_dir, cache_dir = small_data
    train_set, val_set = datasets(data_dir, cache_dir, **SMALL)
    cfg = demo_config(data_dir, cache_dir, SMALL, *FLAT, "train.unfreeze_epoch=5", "train.early_stopping_patience=2")

    result = run_fit(cfg, train_set, val_set, tmp_path / "late")

    scores = [h["val/balanced_accuracy"] for h in result.history]
    assert len(set(scores)) == 1, scores  # flat, so only the patience rule ends it
    # Epoch 0 is the best; epochs 1-4 (frozen) do not count; 5 and 6 exhaust a patience of 2.
    assert (result.status, result.epochs_run, result.best_epoch) == ("early_stopped", 7, 0)
    assert "counted from the unfreeze epoch 5" in result.stop_reason


def test_a_probe_run_never_unfreezes_and_counts_from_epoch_0(small_data, tmp_path):
    data_dir, cache_dir = small_data
    train_set, val_set = datasets(data_dir, cache_dir, **SMALL)
    cfg = demo_config(data_dir, cache_dir, SMALL, *FLAT, "train.unfreeze_epoch=null", "train.early_stopping_patience=2")
    torch.manual_seed(0)
    model = build_model(cfg, len(CLASS_SHORT_NAMES))[0]
    encoder_before = {name: p.detach().clone() for name, p in model.encoder.named_parameters()}

    result = run_fit(cfg, train_set, val_set, tmp_path / "probe", model=model)

    assert (result.status, result.epochs_run) == ("early_stopped", 3)
    assert result.best_metrics["train/encoder_trainable"] == 0.0
    for name, value in model.encoder.named_parameters():
        assert torch.equal(value.detach().cpu(), encoder_before[name]), name


def test_the_objective_picks_the_best_epoch_and_best_pt(small_data, tmp_path):
    data_dir, cache_dir = small_data
    train_set, val_set = datasets(data_dir, cache_dir, **SMALL)
    cfg = demo_config(data_dir, cache_dir, SMALL, "train.epochs=5", "train.unfreeze_epoch=0",
                      "train.early_stopping_patience=null", "train.objective.metric=val/loss",
                      "train.objective.direction=minimize")

    result = run_fit(cfg, train_set, val_set, tmp_path / "run")

    losses = [h["val/loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(losses)) and result.best_value == min(losses), losses
    assert load_state(tmp_path / "run" / "checkpoint" / "best.pt")["epoch"] == result.best_epoch
    assert json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())["val/loss"] == min(losses)


def test_an_objective_the_run_does_not_compute_is_named(small_data, tmp_path):
    data_dir, cache_dir = small_data
    train_set, val_set = datasets(data_dir, cache_dir, **SMALL)
    cfg = demo_config(data_dir, cache_dir, SMALL, "train.epochs=2", "train.objective.metric=val/accuracy_typo")
    with pytest.raises(TrainingError, match=r"'val/accuracy_typo' is not a validation metric.*val/balanced_accuracy"):
        run_fit(cfg, train_set, val_set, tmp_path / "run")


def test_resume_of_an_ended_run_reports_its_outcome_and_trains_nothing(small_data, tmp_path, capsys):
    data_dir, cache_dir = small_data
    train_set, val_set = datasets(data_dir, cache_dir, **SMALL)
    cfg = demo_config(data_dir, cache_dir, SMALL, *FLAT, "train.unfreeze_epoch=1", "train.early_stopping_patience=1")
    first = run_fit(cfg, train_set, val_set, tmp_path / "run")
    assert first.status == "early_stopped"
    saved = load_state(tmp_path / "run" / "last.pt")
    assert json.loads(saved["loop_state"])["status"] == "early_stopped"
    modified = (tmp_path / "run" / "last.pt").stat().st_mtime_ns, (tmp_path / "run" / "checkpoint" / "best.pt").stat().st_mtime_ns

    # More epochs and patience would let it train on, were it resumable.
    longer = demo_config(data_dir, cache_dir, SMALL, *FLAT, "train.unfreeze_epoch=1", "train.early_stopping_patience=null")
    again = run_fit(longer, train_set, val_set, tmp_path / "run", resume=True)

    assert (again.status, again.epochs_run, again.best_epoch) == (first.status, first.epochs_run, first.best_epoch)
    assert "already ended (early_stopped" in capsys.readouterr().out
    assert ((tmp_path / "run" / "last.pt").stat().st_mtime_ns,
            (tmp_path / "run" / "checkpoint" / "best.pt").stat().st_mtime_ns) == modified
    assert ended_state(tmp_path / "run").status == "early_stopped"
    assert ended_state(tmp_path / "nothing-here") is None


# ---------------------------------------------------------------------------------------------- subprocesses


def cli_command(data_dir: Path, cache_dir: Path, run_dir: Path, db: Path, *overrides: str) -> list[str]:
    sizes = [f"data.preprocess.{key}={value}" for key, value in SMALL.items()]
    return [sys.executable, "-m", "octft.cli", "train", str(DEMO), f"data.uri={data_dir}",
            f"data.cache_dir={cache_dir}", *sizes, f"output_dir={run_dir.parent}", "train.early_stopping_patience=null",
            *overrides, "--run-dir", str(run_dir), "--tracking-uri", f"sqlite:///{db}"]


def start_cli(command: list[str], *, devices: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if devices is not None:
        env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices))
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def run_cli(command: list[str] | subprocess.Popen, *, devices: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command` (or wait for one started with `start_cli`); it must succeed."""
    process = command if isinstance(command, subprocess.Popen) else start_cli(command, devices=devices)
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def metric_history(db: Path, run_dir: Path, key: str) -> list[float]:
    """Values of `key` by epoch (the last value logged at each step)."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    by_step = {m.step: m.value for m in sorted(MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, key),
                                                  key=lambda m: (m.step, m.timestamp))}
    return [by_step[step] for step in sorted(by_step)]


# Deterministic and data parallel: no dropout (its masks differ with the device count), one
# micro-batch, 8 rows (2 per device on 4 devices), unfrozen at epoch 1.
XLA_RUN = ("runtime.kind=xla", "train.epochs=6", "train.unfreeze_epoch=1", "train.batch_size=8",
           "train.accumulation_steps=1", "model.head_dropout=0.0", "model.drop_path_rate=0.0")


@pytest.fixture(scope="module")
def spmd_runs(small_data, tmp_path_factory) -> dict[int, tuple[Path, Path]]:
    """The demo model for 6 epochs on XLA:CPU SPMD over 4 devices and on 1 device, trained at once:
    {devices: (run dir, MLflow db)}."""
    root = tmp_path_factory.mktemp("spmd")
    runs = {devices: (root / f"run-{devices}", root / f"mlflow-{devices}.db") for devices in (4, 1)}
    started = [start_cli(cli_command(*small_data, run_dir, db, *XLA_RUN), devices=devices)
               for devices, (run_dir, db) in runs.items()]
    for process in started:
        run_cli(process)
    return runs


@pytest.fixture(scope="module")
def spmd_run(spmd_runs) -> tuple[Path, Path]:
    return spmd_runs[4]


@pytest.mark.integration
def test_spmd_over_four_devices_matches_one_device(spmd_runs):
    spmd_run, (one_dir, one_db) = spmd_runs[4], spmd_runs[1]
    four = metric_history(spmd_run[1], spmd_run[0], "train/loss")
    one = metric_history(one_db, one_dir, "train/loss")
    assert len(four) == len(one) == 6
    # Only the order of the gradient all-reduce differs. Measured: epoch losses agree to ~1e-7
    # (relative) and weights to ~7e-6 after 6 epochs of AdamW, which divides by sqrt(v) and so
    # lets rounding of tiny gradients grow; the bounds leave 10x room.
    np.testing.assert_allclose(four, one, rtol=1e-6, atol=0)
    assert four[0] != four[-1]  # it trained: the losses are not one repeated number
    val_four = metric_history(spmd_run[1], spmd_run[0], "val/loss")
    val_one = metric_history(one_db, one_dir, "val/loss")
    np.testing.assert_allclose(val_four, val_one, rtol=1e-6, atol=0)
    weights_four = load_state(spmd_run[0] / "last.pt")["model"]
    weights_one = load_state(one_dir / "last.pt")["model"]
    for name, value in weights_four.items():
        np.testing.assert_allclose(value.numpy(), weights_one[name].numpy(), rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.integration
def test_xla_compiles_a_bounded_number_of_graphs(spmd_run):
    compiles = metric_history(spmd_run[1], spmd_run[0], "xla/compiles")
    # Epoch 0 compiles the frozen step and eval, epoch 1 the unfrozen step; nothing after that,
    # whatever the learning rate, the epoch or the padded last batch.
    assert compiles[1] == compiles[5], compiles
    assert 0 < compiles[5] <= 10, compiles
    assert compiles[0] < compiles[1], compiles  # unfreezing is a new graph, counted


@pytest.mark.integration
def test_resume_after_a_kill_equals_an_uninterrupted_run(small_data, tmp_path):
    # Unfrozen at 1: epoch 0, on stored features, is the frozen phase's last, so it writes last.pt.
    epochs = ("train.epochs=5", "train.unfreeze_epoch=1", "runtime.kind=cpu")
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = start_cli(cli_command(*small_data, straight_dir, tmp_path / "straight.db", *epochs))  # meanwhile

    command = cli_command(*small_data, resumed_dir, tmp_path / "resumed.db", *epochs)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"))
        for line in process.stdout:
            if line.startswith("epoch   1"):
                process.send_signal(signal.SIGKILL)  # mid-run, possibly mid-checkpoint
                break
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    interrupted = json.loads(load_state(resumed_dir / "last.pt")["loop_state"])
    assert interrupted["epoch"] in (0, 1) and interrupted["status"] == "running"  # killed: resumable

    resumed = run_cli(command + ["--resume"])
    assert f"after epoch {interrupted['epoch']}" in resumed.stdout
    run_cli(straight)

    straight_state, resumed_state = load_state(straight_dir / "last.pt"), load_state(resumed_dir / "last.pt")
    straight_loop, resumed_loop = json.loads(straight_state["loop_state"]), json.loads(resumed_state["loop_state"])
    assert resumed_loop["epoch"] == straight_loop["epoch"] == 4
    assert resumed_loop["best_epoch"] == straight_loop["best_epoch"]
    assert resumed_loop["best_value"] == pytest.approx(straight_loop["best_value"], abs=1e-6)
    for key in ("train/loss", "val/loss", "val/balanced_accuracy"):
        np.testing.assert_allclose([h[key] for h in resumed_loop["history"]],
                                   [h[key] for h in straight_loop["history"]], atol=1e-6, err_msg=key)
    for name, value in straight_state["model"].items():
        np.testing.assert_allclose(resumed_state["model"][name].numpy(), value.numpy(), atol=1e-6, err_msg=name)
    # One MLflow run across the kill, finished by the resumed process.
    from mlflow.tracking import MlflowClient

    run_id = json.loads((resumed_dir / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path / 'resumed.db'}").get_run(run_id).info.status == "FINISHED"


def test_the_encoder_warms_up_from_its_unfreeze_epoch(small_data, tmp_path):
    """A trial that unfreezes at epoch 2 gets the encoder's whole warm-up from there (no rate before it); the head's
    schedule runs from the start. The rates logged are each epoch's last step's."""
    data_dir, cache_dir = small_data
    cfg = demo_config(data_dir, cache_dir, SMALL, "train.epochs=5", "train.unfreeze_epoch=2", "optim.warmup_epochs=2",
                      "train.early_stopping_patience=null", "optim.lr_head=1e-3", "optim.lr_encoder=1e-4")
    train_set, val_set = datasets(data_dir, cache_dir, **SMALL)
    rates = []

    class Rates:
        def report(self, epoch, value, metrics):
            rates.append((metrics["lr/head"], metrics["lr/encoder"]))

    run_fit(cfg, train_set, val_set, tmp_path / "run", reporter=Rates())
    head, encoder = (list(column) for column in zip(*rates))
    assert encoder[:2] == [0.0, 0.0]
    # Two warm-up epochs of k steps end at factor 1 (epoch 1 for the head, epoch 3 for the encoder); at the end
    # of its first epoch each is half-way (k/2k).
    assert head[0] == pytest.approx(0.5e-3) and head[1] == pytest.approx(1e-3)
    assert encoder[2] == pytest.approx(0.5e-4) and encoder[3] == pytest.approx(1e-4)
    assert encoder[4] < 1e-4 and head[4] < head[3] < head[2] < 1e-3  # then both decay
