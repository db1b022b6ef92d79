from pathlib import Path

import pytest
import yaml

from octft.config import ConfigError, ExperimentConfig, load_experiment, load_experiment_dict

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        load_experiment_dict({"optim": {"lr_heads": 1e-3}}, source="exp.yaml")
    message = str(error.value)
    assert "exp.yaml" in message and "'optim.lr_heads'" in message and "lr_head" in message and "lr_encoder" in message


def test_overrides_by_dotted_path_and_types():
    cfg = load_experiment_dict({}, ["optim.lr_head=1e-3", "train.epochs=7", "data.uri=b2://bucket/aireadi",
                                    "data.selection.regions=[macula, optic_disc]", "loss.label_smoothing=0"])
    assert cfg.optim.lr_head == pytest.approx(1e-3)
    assert cfg.train.epochs == 7
    assert cfg.data.labels_uri == "b2://bucket/aireadi/participants.tsv"
    assert cfg.data.selection.regions == ["macula", "optic_disc"]
    assert cfg.loss.label_smoothing == 0


def test_bad_value_and_bad_override_are_errors():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_experiment_dict({}, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_experiment_dict({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_experiment_dict({}, ["train.nope=1"])


def test_flat_has_every_knob_the_sweeps_use():
    flat = ExperimentConfig().flat()
    for key in ("data.uri", "data.labels", "train.epochs", "train.unfreeze_epoch", "train.accumulation_steps",
                "optim.lr_head", "optim.lr_encoder", "loss.label_smoothing"):
        assert key in flat


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_validates(path):
    text = path.read_text()
    assert text.lstrip().startswith("#"), f"{path.name} must open with a comment giving its purpose and command"
    assert "octft " in text.split("\n\n", 1)[0], f"{path.name}: the opening comment must give the command that runs it"
    cfg = load_experiment(path)
    assert cfg.model_dump(mode="json") == load_experiment_dict(yaml.safe_load(text)).model_dump(mode="json")


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_experiment(path)


@pytest.mark.parametrize("override, key, says", [
    ("train.clip_norm=-1", "train.clip_norm", "greater than 0"),
    ("train.clip_norm=0", "train.clip_norm", "greater than 0"),
    ("train.early_stopping_patience=0", "train.early_stopping_patience", "greater than or equal to 1"),
    ("train.unfreeze_epoch=16", "train.unfreeze_epoch (16) must be below train.epochs (16)", "unfreeze_epoch=null"),
    ("train.epochs=true", "train.epochs", "boolean true"),
    ("optim.lr_head=false", "optim.lr_head", "boolean false"),
    ("optim.betas=[2,3]", "optim.betas.0", "less than 1"),
    ("optim.betas=[0.9,-0.1]", "optim.betas.1", "greater than or equal to 0"),
    ("optim.lr_encoder=.nan", "optim.lr_encoder", "finite"),
    ("model.head_dropout=1", "model.head_dropout", "less than 1"),
    ("data.split.val_fraction=0.9", "val_fraction + data.split.test_fraction", "below 1"),
    ("data.split.test_fraction=0.85", "val_fraction + data.split.test_fraction", "below 1"),
    ("train.objective.metric=balanced_accuracy", "train.objective.metric", "val/balanced_accuracy"),
    ("train.objective.direction=max", "train.objective.direction", "maximize"),
])
def test_values_that_make_no_sense_are_refused_naming_the_key(override, key, says):
    with pytest.raises(ConfigError) as error:
        load_experiment(ROOT / "experiments" / "demo.yaml", [override])
    message = str(error.value)
    assert "\n" not in message and key in message and says in message, message


def test_null_disables_what_may_be_disabled():
    cfg = load_experiment(ROOT / "experiments" / "demo.yaml", [
        "train.unfreeze_epoch=null", "train.clip_norm=null", "train.early_stopping_patience=null"])
    assert (cfg.train.unfreeze_epoch, cfg.train.clip_norm, cfg.train.early_stopping_patience) == (None, None, None)
    assert (cfg.train.objective.metric, cfg.train.objective.direction) == ("val/balanced_accuracy", "maximize")


@pytest.mark.parametrize("line", ["", "model:\n  size: vit_micro\n", "model:\n  checkpoint: null\n", "model:\n  checkpoint: '  '\n"],
                         ids=["no model section", "key missing", "null", "blank"])
def test_an_experiment_file_must_name_its_checkpoint_or_say_scratch(tmp_path, line):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 6\n" + line)
    with pytest.raises(ConfigError, match=r"exp\.yaml.*model\.checkpoint") as error:
        load_experiment(path)
    assert "scratch" in str(error.value)


def test_scratch_builds_no_checkpoint_and_a_path_is_the_one_loaded(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  checkpoint: scratch\n")
    assert load_experiment(path).model.pretrained is None
    assert load_experiment(path, ["model.checkpoint=/ckpt/enc.pt"]).model.pretrained == "/ckpt/enc.pt"
    with pytest.raises(ConfigError, match="model.checkpoint is not set"):
        load_experiment(path, ["model.checkpoint=null"])
