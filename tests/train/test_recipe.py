"""`octft train`: what one run leaves in MLflow, metrics equal to scikit-learn's, and bad input
stopped with one clear message.

Every run goes through `octft.cli.main` on eager CPU, on synthetic data made here, logging to an
MLflow sqlite store in the test's temp dir.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from octft.cli import EXIT_USAGE, main
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.synth import synthesize
from octft.models import build_encoder
from octft.track.mlflow_store import END_REASON_TAG
from octft.train.runtime import load_state

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
SMALL = ("data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32")
EPOCH_METRICS = ("train/loss", "val/loss", "val/balanced_accuracy", "val/macro_f1", "val/auc_macro", "lr/head",
                 "lr/encoder", "perf/samples_per_second", "perf/epoch_seconds",
                 *(f"val/f1_{name}" for name in CLASS_SHORT_NAMES),
                 *(f"val/pred_frac_{name}" for name in CLASS_SHORT_NAMES))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """48 participants of 4 frames at 32x32 and a shared cache folder: (data dir, cache dir)."""
    root = tmp_path_factory.mktemp("recipe")
    synthesize(root / "data", participants=48, seed=0, frames=4, height=32, width=32)
    return root / "data", root / "cache"


def train_args(data: tuple[Path, Path], run_dir: Path, *overrides: str) -> list[str]:
    data_dir, cache_dir = data
    return ["train", str(DEMO), f"data.uri={data_dir}", f"data.cache_dir={cache_dir}", *SMALL, "runtime.kind=cpu",
            f"output_dir={run_dir.parent}", *overrides, "--run-dir", str(run_dir),
            "--tracking-uri", f"sqlite:///{run_dir.parent / 'mlflow.db'}"]


def error_lines(captured: str) -> list[str]:
    """The CLI's own stderr lines (MLflow logs its database setup there too)."""
    return [line for line in captured.splitlines() if line.startswith("octft:")]


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    return client, client.get_run(run_id)


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    """A 3-epoch run (encoder unfrozen at epoch 1) that ran to the end; its run dir."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(data, run_dir, "train.epochs=3", "train.unfreeze_epoch=1",
                           "train.early_stopping_patience=null")) == 0
    return run_dir


def test_reported_metrics_equal_scikit_learn_on_the_saved_predictions(finished_run):
    client, run = mlflow_run(finished_run)
    best_epoch = int(run.data.tags["octft.best_epoch"])
    with (finished_run / "best" / "val_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len({row["participant_id"] for row in rows}) == len(rows) == 8  # participant level: 2 per class
    truth = np.array([CLASS_SHORT_NAMES.index(row["true_class"]) for row in rows])
    predicted = np.array([CLASS_SHORT_NAMES.index(row["predicted_class"]) for row in rows])
    probs = np.array([[float(row[f"prob_{name}"]) for name in CLASS_SHORT_NAMES] for row in rows])
    np.testing.assert_array_equal(probs.argmax(axis=1), predicted)

    def logged(key: str) -> float:
        values = [m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == best_epoch]
        assert len(values) == 1, (key, values)
        return values[0]

    labels = list(range(len(CLASS_SHORT_NAMES)))
    assert logged("val/balanced_accuracy") == pytest.approx(balanced_accuracy_score(truth, predicted), abs=1e-9)
    assert logged("val/macro_f1") == pytest.approx(
        f1_score(truth, predicted, labels=labels, average="macro", zero_division=0), abs=1e-9)
    per_class = f1_score(truth, predicted, labels=labels, average=None, zero_division=0)
    for index, name in enumerate(CLASS_SHORT_NAMES):
        assert logged(f"val/f1_{name}") == pytest.approx(per_class[index], abs=1e-9), name
        assert logged(f"val/pred_frac_{name}") == pytest.approx(np.mean(predicted == index), abs=1e-9), name
    # The CSV holds probabilities to 6 decimals.
    probs = probs / probs.sum(axis=1, keepdims=True)
    assert logged("val/auc_macro") == pytest.approx(
        roc_auc_score(truth, probs, multi_class="ovr", average="macro", labels=labels), abs=1e-3)
    # The predictions are the best epoch's: the one best.pt was saved at.
    assert load_state(finished_run / "checkpoint" / "best.pt")["epoch"] == best_epoch


def test_mlflow_run_holds_config_tags_epoch_metrics_and_artifacts(finished_run):
    from octft.config import load_experiment

    client, run = mlflow_run(finished_run)
    assert run.info.status == "FINISHED"
    resolved = load_experiment(finished_run / "config.yaml").flat()
    params = run.data.params
    assert set(resolved) <= set(params), set(resolved) - set(params)
    assert params["optim.lr_head"] == str(resolved["optim.lr_head"])
    assert params["train.epochs"] == "3" and params["runtime.kind"] == "cpu"
    effective = resolved["train.batch_size"] * resolved["train.accumulation_steps"]
    assert (params["runtime.num_devices"], params["runtime.num_hosts"]) == ("1", "1")
    assert params["train.effective_batch_size"] == str(effective)
    assert params["runtime.micro_batch_per_device"] == str(resolved["train.batch_size"])
    assert params["runtime.accumulation_steps_used"] == str(resolved["train.accumulation_steps"])

    tags = run.data.tags
    assert len(tags["octft.git_commit"]) in (40, len("unknown"))
    assert tags["octft.runtime"] == "cpu" and tags["octft.device_count"] == "1"
    assert len(tags["octft.data_manifest_hash"]) == 16
    assert tags["octft.status"] == "completed"

    for key in EPOCH_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [0, 1, 2], (key, steps)
    lr_head = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr/head"), key=lambda m: m.step)]
    assert max(lr_head) <= float(params["optim.lr_head"]) and lr_head[-1] < lr_head[0] * 2  # the schedule's values

    top = {entry.path for entry in client.list_artifacts(run.info.run_id)}
    assert {"val_predictions.csv", "confusion_matrix.png", "checkpoint", "config.yaml"} <= top, top
    checkpoint = {entry.path for entry in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/best.pt", "checkpoint/config.yaml"} <= checkpoint, checkpoint
    local = Path(client.download_artifacts(run.info.run_id, "checkpoint/best.pt", str(finished_run.parent)))
    assert torch.equal(load_state(local)["model"]["head.mlp.fc2.bias"],
                       load_state(finished_run / "checkpoint" / "best.pt")["model"]["head.mlp.fc2.bias"])


# ---------------------------------------------------------------------------------------------- bad input


def test_failed_audit_stops_training_naming_the_guard(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_args(data, run_dir, "data.guards.min_per_class=3")) == EXIT_USAGE
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("octft: error: data audit of"), lines
    error = lines[0]
    assert "classes_in_val: val: healthy=2" in error and "data.allow_failed_guards=[" in error
    assert "match_rate" not in error and "duplicate_files" not in error  # only the failed guards
    _, run = mlflow_run(run_dir)
    assert run.info.status == "FAILED"
    assert run.data.tags[END_REASON_TAG].startswith("AuditFailedError: data audit of")
    assert not (run_dir / "last.pt").exists()


def test_checkpoint_of_another_size_fails_with_the_mismatch_report(data, tmp_path, capsys):
    narrower = build_encoder("vit_micro", img_size=32, num_frames=4, embed_dim=24)
    torch.save({"encoder": narrower.state_dict()}, tmp_path / "other.pt")
    run_dir = tmp_path / "run"
    assert main(train_args(data, run_dir, f"model.checkpoint={tmp_path / 'other.pt'}")) == EXIT_USAGE
    error = capsys.readouterr().err
    error = error[error.index("octft: error: "):]  # the report spans lines: one per mismatched key
    assert str(tmp_path / "other.pt") in error
    assert "shape-mismatched" in error and "patch_embed.proj.weight" in error
    assert "checkpoint does not match the encoder" in error
    _, run = mlflow_run(run_dir)
    assert run.info.status == "FAILED" and "CheckpointMismatchError" in run.data.tags[END_REASON_TAG]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    # Epoch 0 trains the head only and is fine; unfrozen at epoch 1 with an absurd encoder LR, the
    # weights overflow and the loss turns NaN/inf.
    run_dir = tmp_path / "run"
    args = train_args(data, run_dir, "train.epochs=3", "train.unfreeze_epoch=1", "optim.lr_encoder=1e30",
                      "train.early_stopping_patience=null")
    assert main(args) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "training loss is" in error and "at epoch 1" in error and "optim.lr_encoder" in error
    saved = load_state(run_dir / "last.pt")
    assert json.loads(saved["loop_state"])["epoch"] == 0
    assert all(torch.isfinite(value).all() for value in saved["model"].values())
    _, run = mlflow_run(run_dir)
    assert run.info.status == "FAILED" and run.data.tags[END_REASON_TAG].startswith("TrainingError: training loss is")


def test_unknown_config_key_is_named(data, tmp_path, capsys):
    assert main(train_args(data, tmp_path / "run", "train.epochz=3")) == EXIT_USAGE
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    error = lines[0]
    assert "unknown key 'train.epochz'" in error and "epochs" in error
    assert str(DEMO) in error
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_resume_of_a_finished_run_prints_its_outcome_and_leaves_it_alone(finished_run, data, capsys):
    client, before = mlflow_run(finished_run)
    last = finished_run / "last.pt"
    modified = last.stat().st_mtime_ns
    capsys.readouterr()

    # Asked for more epochs: a resumable run would train on.
    assert main(train_args(data, finished_run, "train.epochs=6", "train.unfreeze_epoch=1",
                           "train.early_stopping_patience=null", "--resume")) == 0

    out = capsys.readouterr().out
    assert "already ended: completed after 3 epochs" in out and "not training further" in out
    assert "epoch   3" not in out
    _, after = mlflow_run(finished_run)
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert last.stat().st_mtime_ns == modified
