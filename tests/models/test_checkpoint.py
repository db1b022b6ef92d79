"""Loading V-JEPA pretraining checkpoints: entry choice, prefixes, strictness, reports, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from octft.models.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    inspect_checkpoint,
    load_encoder_checkpoint,
    read_encoder_state,
    strip_prefixes,
)
from octft.models.encoder import build_encoder

REFERENCE = Path(__file__).parents[2].parent / "shared" / "reference" / "vjepa2"


def micro(seed: int, **overrides):
    torch.manual_seed(seed)
    return build_encoder("vit_micro", **({"img_size": 32, "num_frames": 4, "in_chans": 1} | overrides))


def vjepa_format(state: dict[str, torch.Tensor], prefix: str = "module.backbone.") -> dict[str, torch.Tensor]:
    return {prefix + name: tensor.clone() for name, tensor in state.items()}


def save_pretraining_checkpoint(path: Path, online: torch.nn.Module, target: torch.nn.Module | None) -> Path:
    """A checkpoint shaped like V-JEPA's `save_checkpoint` output."""
    checkpoint = {
        "encoder": vjepa_format(online.state_dict()),
        "predictor": {"module.backbone.predictor_embed.weight": torch.zeros(4, 48)},
        "opt": {"state": {}, "param_groups": []},
        "scaler": None,
        "epoch": 3,
        "loss": 0.4,
        "batch_size": 2,
        "world_size": 1,
        "lr": 1e-4,
    }
    if target is not None:
        checkpoint["target_encoder"] = vjepa_format(target.state_dict())
    torch.save(checkpoint, path)
    return path


def assert_same_weights(model: torch.nn.Module, source: torch.nn.Module) -> None:
    for (name, tensor), (_, expected) in zip(model.state_dict().items(), source.state_dict().items(), strict=True):
        torch.testing.assert_close(tensor, expected, msg=name)


def test_target_encoder_is_loaded_by_default(tmp_path):
    online, target = micro(1), micro(2)
    path = save_pretraining_checkpoint(tmp_path / "vjepa.pt", online, target)
    model = micro(3)
    report = load_encoder_checkpoint(path, model)
    assert_same_weights(model, target)
    assert report.source_key == "target_encoder"
    assert report.ok and sorted(report.loaded) == sorted(model.state_dict())


def test_key_picks_the_online_encoder(tmp_path):
    online, target = micro(1), micro(2)
    path = save_pretraining_checkpoint(tmp_path / "vjepa.pt", online, target)
    model = micro(3)
    assert load_encoder_checkpoint(path, model, key="encoder").source_key == "encoder"
    assert_same_weights(model, online)


def test_falls_back_to_encoder_without_target(tmp_path):
    online = micro(1)
    path = save_pretraining_checkpoint(tmp_path / "vjepa.pt", online, target=None)
    model = micro(3)
    assert load_encoder_checkpoint(path, model).source_key == "encoder"
    assert_same_weights(model, online)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.backbone."])
def test_plain_state_dict_with_wrapper_prefixes_loads(tmp_path, prefix):
    source = micro(1)
    torch.save(vjepa_format(source.state_dict(), prefix), tmp_path / "plain.pt")
    model = micro(3)
    report = load_encoder_checkpoint(tmp_path / "plain.pt", model)
    assert report.source_key is None
    assert_same_weights(model, source)


def test_strip_prefixes_keeps_inner_names():
    assert strip_prefixes("module.backbone.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert strip_prefixes("_orig_mod.module.norm.bias") == "norm.bias"
    assert strip_prefixes("blocks.1.mlp.fc1.weight") == "blocks.1.mlp.fc1.weight"


def test_shape_mismatch_raises_with_report_and_loads_nothing(tmp_path):
    path = save_pretraining_checkpoint(tmp_path / "rgb.pt", micro(1, in_chans=3), micro(2, in_chans=3))
    model = micro(3, in_chans=1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as caught:
        load_encoder_checkpoint(path, model)
    report = caught.value.report
    assert report.mismatched == [("patch_embed.proj.weight", (48, 3, 2, 16, 16), (48, 1, 2, 16, 16))]
    assert "patch_embed.proj.weight checkpoint [48, 3, 2, 16, 16] vs model [48, 1, 2, 16, 16]" in str(caught.value)
    assert str(path) in str(caught.value)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], msg=name)


def _checkpoint_with_extra_and_missing(tmp_path: Path, source: torch.nn.Module) -> Path:
    state = vjepa_format(source.state_dict())
    del state["module.backbone.norm.weight"], state["module.backbone.norm.bias"]
    state["module.backbone.mask_token"] = torch.zeros(1, 1, 48)
    torch.save({"target_encoder": state, "encoder": state}, tmp_path / "odd.pt")
    return tmp_path / "odd.pt"


def test_missing_and_unexpected_keys_raise_and_are_listed(tmp_path):
    path = _checkpoint_with_extra_and_missing(tmp_path, micro(1))
    with pytest.raises(CheckpointMismatchError) as caught:
        load_encoder_checkpoint(path, micro(3))
    report = caught.value.report
    assert report.missing == ["norm.weight", "norm.bias"]
    assert report.unexpected == ["mask_token"]
    message = str(caught.value)
    assert "missing (model only): norm.weight" in message
    assert "unexpected (checkpoint only): mask_token" in message
    assert "allow_missing" in message


def test_allow_lists_let_named_keys_through(tmp_path):
    source = micro(1)
    path = _checkpoint_with_extra_and_missing(tmp_path, source)
    model = micro(3)
    own_norm = model.norm.weight.detach().clone()
    report = load_encoder_checkpoint(path, model, allow_missing=["norm.*"], allow_unexpected=["mask_*"])
    assert report.missing == ["norm.weight", "norm.bias"] and report.unexpected == ["mask_token"]
    torch.testing.assert_close(model.norm.weight.detach(), own_norm)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    # Allowing only one kind still fails on the other.
    with pytest.raises(CheckpointMismatchError, match="mask_token"):
        load_encoder_checkpoint(path, micro(3), allow_missing=["norm.*"])


def test_allow_missing_covers_a_resized_sincos_table(tmp_path):
    source = micro(1, use_rope=False, img_size=32)
    path = save_pretraining_checkpoint(tmp_path / "v1.pt", source, source)
    model = micro(3, use_rope=False, img_size=48)
    with pytest.raises(CheckpointMismatchError, match="pos_embed"):
        load_encoder_checkpoint(path, model)
    report = load_encoder_checkpoint(path, model, allow_missing=["pos_embed"])
    assert [key for key, _, _ in report.mismatched] == ["pos_embed"]
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_inspect_reports_without_raising_or_loading(tmp_path):
    path = save_pretraining_checkpoint(tmp_path / "deep.pt", micro(1, depth=3), micro(2, depth=3))
    model = micro(3, depth=2)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    report = inspect_checkpoint(path, model)
    assert not report.ok
    assert report.unexpected and all(key.startswith("blocks.2.") for key in report.unexpected)
    assert report.missing == [] and report.mismatched == []
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.detach(), before)
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["ok"] is False and as_json["source_key"] == "target_encoder"
    assert as_json["unexpected"] == report.unexpected


def test_report_to_dict_lists_shapes(tmp_path):
    path = save_pretraining_checkpoint(tmp_path / "wide.pt", micro(1, in_chans=2), micro(2, in_chans=2))
    data = inspect_checkpoint(path, micro(3)).to_dict()
    assert data["mismatched"] == [
        {"key": "patch_embed.proj.weight", "checkpoint_shape": [48, 2, 2, 16, 16], "model_shape": [48, 1, 2, 16, 16]}
    ]


def test_bfloat16_checkpoint_loads_into_float32_model(tmp_path):
    source = micro(1).to(torch.bfloat16)
    path = save_pretraining_checkpoint(tmp_path / "bf16.pt", source, source)
    model = micro(3)
    load_encoder_checkpoint(path, model)
    assert model.norm.weight.dtype == torch.float32
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight.float())


def test_legacy_serialization_format_loads(tmp_path):
    source = micro(1)
    torch.save({"target_encoder": vjepa_format(source.state_dict())}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False)  # fmt: skip
    model = micro(3)
    load_encoder_checkpoint(tmp_path / "old.pt", model)
    assert_same_weights(model, source)


class NotAllowed:
    """Not on weights_only's allow-list, so unpickling it is refused."""


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path: path.write_text("not a checkpoint"), "not a PyTorch checkpoint"),
        (lambda path: torch.save(NotAllowed(), path), "not a PyTorch checkpoint"),
        (lambda path: torch.save([torch.zeros(1)], path), "holds a list"),
        (lambda path: torch.save({"epoch": 3, "lr": 0.1}, path), "entries: epoch, lr"),
        (lambda path: torch.save({"target_encoder": {}, "epoch": 3}, path), "'target_encoder' is not a state dict"),
    ],
)
def test_files_that_are_not_checkpoints_get_one_clear_error(tmp_path, write, message):
    path = tmp_path / "weights.pt"
    write(path)
    with pytest.raises(CheckpointError, match=message) as caught:
        inspect_checkpoint(path, micro(1))
    assert str(path) in str(caught.value)


def test_missing_file_and_unknown_key_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_encoder_state(tmp_path / "absent.pt")
    path = save_pretraining_checkpoint(tmp_path / "vjepa.pt", micro(1), micro(2))
    with pytest.raises(CheckpointError, match="no entry 'ema'; its entries are: encoder, predictor"):
        read_encoder_state(path, key="ema")


@pytest.mark.skipif(not (REFERENCE / "vjepa2_rope_tiny.pt").is_file(), reason=f"reference not found at {REFERENCE}")
def test_reference_checkpoint_is_read_as_vjepa_writes_it():
    state, source_key = read_encoder_state(REFERENCE / "vjepa2_rope_tiny.pt")
    assert source_key == "target_encoder"
    assert "patch_embed.proj.weight" in state and not any(key.startswith("module.") for key in state)
    # A wrong width is reported, not half-loaded.
    report = inspect_checkpoint(REFERENCE / "vjepa2_rope_tiny.pt", micro(1, img_size=(32, 48)))
    assert ("norm.weight", (96,), (48,)) in report.mismatched


def test_error_message_caps_long_lists_but_report_keeps_all(tmp_path):
    path = save_pretraining_checkpoint(tmp_path / "deep.pt", micro(1, depth=4), micro(2, depth=4))
    with pytest.raises(CheckpointMismatchError) as caught:
        load_encoder_checkpoint(path, micro(3, depth=2))
    assert len(caught.value.report.unexpected) == 24  # blocks 2 and 3, 12 tensors each
    assert "... and 4 more" in str(caught.value)
    assert str(caught.value).startswith(f"{path} [target_encoder]: 28 loaded, 0 missing, 24 unexpected")


def test_cli_checkpoint_inspect_reports_fit_and_misfit(tmp_path, capsys):
    """`octft checkpoint inspect PATH --config EXP --json`: exit 0 for a fitting checkpoint, 1 with the misfit listed."""
    import json as _json

    from octft.cli import main
    from octft.config import load_experiment
    from octft.train.setup import build_model

    root = Path(__file__).resolve().parents[2]
    overrides = ["data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32"]
    cfg = load_experiment(root / "experiments" / "demo.yaml", overrides)
    encoder = build_model(cfg, num_classes=4)[0].encoder
    state = {f"module.backbone.{k}": v for k, v in encoder.state_dict().items()}
    good = tmp_path / "good.pt"
    torch.save({"encoder": state, "target_encoder": state, "epoch": 3}, good)
    assert main(["checkpoint", "inspect", str(good), "--config", str(root / "experiments" / "demo.yaml"), "--json", *overrides]) == 0
    report = _json.loads(capsys.readouterr().out)
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    assert len(report["loaded"]) == len(state)

    wider = build_model(load_experiment(root / "experiments" / "demo.yaml", overrides + ["model.size=vit_tiny"]), 4)[0].encoder
    bad = tmp_path / "bad.pt"
    torch.save({"target_encoder": {f"module.backbone.{k}": v for k, v in wider.state_dict().items()}}, bad)
    assert main(["checkpoint", "inspect", str(bad), "--config", str(root / "experiments" / "demo.yaml"), *overrides]) == 1
    out = capsys.readouterr().out
    assert "patch_embed.proj.weight" in out and "mismatch" in out.lower()
