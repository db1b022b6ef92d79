"""The launch plan: resolved once from the sweep file and the command line, the only thing trials read config from."""

from __future__ import annotations

import json

import pytest

from octft.config import ConfigError, load_experiment
from octft.stores import STORAGE_ENV, with_password
from octft.sweep.plan import (
    PLAN_FORMAT,
    LaunchPlan,
    base_config,
    check_trial_layouts,
    fixed_micro_batch,
    load_launch_spec,
    resolve_plan,
    split_overrides,
)
from octft.sweep.space import check_batch_layouts, parse_space
from octft.train.devices import BatchLayoutError
from sweeps import LR_HEAD, write_spec


def test_command_line_overrides_split_into_sweep_and_experiment_keys():
    sweep, experiment = split_overrides(["n_trials=2", "fixed.train.epochs=3", "sampler.seed=1", "data.uri=/x", "output_dir=o"])
    assert sweep == ["n_trials=2", "fixed.train.epochs=3", "sampler.seed=1"]
    assert experiment == ["data.uri=/x", "output_dir=o"]


def test_an_override_of_a_searched_key_or_the_objective_is_refused(tmp_path):
    spec, _, _ = write_spec(tmp_path, study_name="s", n_trials=1, space=LR_HEAD)
    with pytest.raises(ConfigError, match=r"optim\.lr_head is a key of the search space"):
        load_launch_spec(spec, ["optim.lr_head=0.1"])
    with pytest.raises(ConfigError, match="unknown key 'optim.lr_hed'"):
        load_launch_spec(spec, ["optim.lr_hed=0.1"])
    with pytest.raises(ConfigError, match="another objective than the study's"):
        load_launch_spec(spec, ["train.objective.metric=val/loss"])


def test_a_trials_config_is_its_replay_commands_config(tmp_path):
    spec, _, _ = write_spec(tmp_path, study_name="replay", n_trials=1, space=LR_HEAD,
                            objective={"metric": "val/loss", "direction": "minimize"})
    plan, _ = resolve_plan(spec, overrides=["data.uri=/data/aireadi", "optim.lr_encoder=0.002"])
    overrides = plan.trial_overrides({"optim.lr_head": 0.0012345678901234})
    # The objective, fixed keys, the params, then the command line's: what `octft sweep show` prints.
    assert overrides[:2] == ["train.objective.metric=val/loss", "train.objective.direction=minimize"]
    assert overrides[-3:] == ["optim.lr_head=0.0012345678901234", "data.uri=/data/aireadi", "optim.lr_encoder=0.002"]
    replay = plan.replay_command(overrides).split()
    assert replay[:3] == ["octft", "train", plan.base]
    cfg = load_experiment(replay[2], replay[3:])
    assert cfg == plan.trial_config(overrides)
    assert (cfg.optim.lr_head, cfg.train.objective.metric, cfg.train.epochs) == (0.0012345678901234, "val/loss", 2)


def test_a_plan_round_trips_through_its_file_and_a_plan_of_another_format_is_refused(tmp_path):
    spec, _, _ = write_spec(tmp_path, study_name="disk", n_trials=3, space=LR_HEAD)
    plan, _ = resolve_plan(spec, overrides=[f"output_dir={tmp_path / 'runs'}"])
    path = plan.write()
    assert path.parent == tmp_path / "runs" / "sweeps" / "disk" / "plans" and path.suffix == ".json"
    again = LaunchPlan.read(path)
    assert again == plan and again.path == path and again.spec().n_trials == 3
    assert plan.write() == path  # named by its content: the same plan, the same file

    old = json.loads(path.read_text())
    old["format"] = PLAN_FORMAT + 99
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="launch plan of another octft version.*relaunch the study"):
        LaunchPlan.read(tmp_path / "old.json")


def test_a_plan_holds_no_password_and_gets_it_back_only_from_the_environment(tmp_path, monkeypatch):
    """Written to disk with the password redacted; a worker process gets it from the variable the launch set."""
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    secret_url = "postgresql://octft:Hunter2-s3cret@db.example:5432/optuna"
    spec, _, _ = write_spec(tmp_path, study_name="secret", n_trials=1, space=LR_HEAD)
    plan, resolved = resolve_plan(spec, storage=secret_url, overrides=[f"output_dir={tmp_path / 'runs'}"])
    text = plan.write().read_text()
    assert "Hunter2" not in text and plan.storage == "postgresql://octft:***@db.example:5432/optuna"
    assert resolved.storage == secret_url
    assert plan.storage_url() == secret_url  # this process was given it
    # Another process (a worker) gets it only from the environment the launch gives it.
    monkeypatch.setenv(STORAGE_ENV, secret_url)
    assert with_password(plan.storage, STORAGE_ENV) == secret_url
    monkeypatch.setenv(STORAGE_ENV, "postgresql://octft:other@elsewhere/optuna")
    with pytest.raises(Exception, match=f"set \\${STORAGE_ENV}"):
        with_password("postgresql://octft:***@db.example:5432/other", STORAGE_ENV)
    assert with_password("postgresql://octft@db/optuna", STORAGE_ENV) == "postgresql://octft@db/optuna"  # ~/.pgpass


def test_a_space_with_batches_the_trial_devices_cannot_split_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    space = {"train.accumulation_steps": {"type": "categorical", "choices": [1, 2, 3]}}  # demo batch 8: 8, 16, 24
    spec, _, _ = write_spec(tmp_path, study_name="layouts", n_trials=1, space=space)
    with pytest.raises(BatchLayoutError) as error:
        resolve_plan(spec, devices_per_trial=16)
    assert "2 of the space's effective batches" in str(error.value) and "8 x 1 = 8, 8 x 3 = 24" in str(error.value)
    assert not (tmp_path / "optuna.db").exists()  # refused before anything was created
    check_batch_layouts(parse_space(space), 8, 1, 8)  # on 8 devices every sampled batch splits evenly
    monkeypatch.delenv("PJRT_DEVICE")
    loaded, _ = load_launch_spec(spec)
    check_trial_layouts(loaded, base_config(loaded), 16)  # an eager runtime trains on one device: never refused


def test_launch_fixes_one_micro_batch_shape_for_every_trial_on_xla(tmp_path, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    space = {"train.accumulation_steps": {"type": "categorical", "choices": [1, 2, 4]}}  # demo batch 8: 8, 16, 32
    spec, _, _ = write_spec(tmp_path, study_name="micro", n_trials=1, space=space)
    loaded, _ = load_launch_spec(spec)
    # Rows per device 4, 8, 16 on 2 devices: micro-batches of 4 fit all; on 1 device at most train.batch_size.
    assert fixed_micro_batch(loaded, base_config(loaded), 2) == ["runtime.micro_batch_rows=4"]
    assert fixed_micro_batch(loaded, base_config(loaded), 1) == ["runtime.micro_batch_rows=8"]
    assert fixed_micro_batch(loaded, base_config(loaded, ["runtime.micro_batch_rows=2"]), 2) == []  # the user's
    assert fixed_micro_batch(loaded, base_config(loaded), 2, ["runtime.micro_batch_rows=null"]) == []  # null too
    one_batch, _ = load_launch_spec(spec, ["space.train.accumulation_steps=null"])
    assert fixed_micro_batch(one_batch, base_config(one_batch), 2) == []  # one effective batch: nothing to share
    plan, _ = resolve_plan(spec, devices_per_trial=2)
    assert plan.experiment_overrides == ["runtime.micro_batch_rows=4"]  # every trial and its replay carry it
    monkeypatch.delenv("PJRT_DEVICE")
    assert fixed_micro_batch(loaded, base_config(loaded), 2) == []  # eager: no graphs


def test_a_micro_batch_the_space_cannot_use_is_refused_naming_the_batches(tmp_path, monkeypatch):
    space = {"train.accumulation_steps": {"type": "categorical", "choices": [1, 3]}}  # demo batch 8: 8, 24
    spec, _, _ = write_spec(tmp_path, study_name="bad-micro", n_trials=1, space=space)
    for pjrt, shown in ((None, "8 x 1 = 8 (8 rows per device)"), ("CPU", "8 x 1 = 8 (4 rows per device)")):
        if pjrt:
            monkeypatch.setenv("PJRT_DEVICE", pjrt)
        else:
            monkeypatch.delenv("PJRT_DEVICE", raising=False)
        with pytest.raises(BatchLayoutError) as error:
            resolve_plan(spec, overrides=["runtime.micro_batch_rows=3"], devices_per_trial=2)
        assert str(error.value).startswith("runtime.micro_batch_rows=3 does not divide") and shown in str(error.value)
        assert "8 x 3" not in str(error.value)  # 24 rows (12 per device) divide by 3


def test_a_probe_study_runs_in_process_and_a_fine_tune_study_in_warm_processes(tmp_path):
    spec, _, _ = write_spec(tmp_path, study_name="probe", n_trials=1, space=LR_HEAD,
                            fixed={"train.unfreeze_epoch": None})
    probe, _ = resolve_plan(spec)
    assert probe.probe and probe.launch.runner == "in_process"
    fine, _ = resolve_plan(spec, overrides=["train.unfreeze_epoch=1"])
    assert not fine.probe and fine.launch.runner == "warm"
    assert resolve_plan(spec, overrides=["train.unfreeze_epoch=1"], fresh_process_per_trial=True)[0].launch.runner == "fresh"
