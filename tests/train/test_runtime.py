"""Runtimes: eager unit tests, and XLA:CPU checks run in subprocesses.

SPMD is a once-per-process switch, so XLA checks run this file as a script
(`python tests/train/test_runtime.py <task> <folder>`), which prints its findings as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from octft.models.checkpoint import CheckpointError
from octft.train.runtime import load_state, make_runtime


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, kernel_size=2, stride=2), nn.Flatten(), nn.Linear(4 * 2 * 4 * 4, 4))


def make_batches(count: int, rows: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "x": torch.randn(rows, 1, 4, 8, 8, generator=generator),
            "y": torch.randint(0, 4, (rows,), generator=generator),
            "w": torch.ones(rows),
        }
        for _ in range(count)
    ]


def train_a_little(runtime, model, optimizer, steps: int = 2) -> None:
    for batch in runtime.device_loader(make_batches(steps, rows=8)):
        loss = nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    runtime.sync()


def run_script(*args: str, env: dict | None = None) -> dict:
    completed = subprocess.run(
        [sys.executable, *args], env=env or dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def xla_env() -> dict:
    return dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")


# ---------------------------------------------------------------- eager


def test_cpu_runtime_describes_one_device():
    runtime = make_runtime("cpu")
    assert (runtime.name, runtime.device.type, runtime.num_devices, runtime.precision) == ("cpu", "cpu", 1, "fp32")
    assert runtime.is_main and runtime.process_index == 0 and runtime.process_count == 1
    layout = runtime.batch_layout(4, 3)
    assert (layout.effective_batch_size, layout.micro_batch_per_device, layout.accumulation_steps) == (12, 4, 3)
    assert runtime.broadcast_object({"seed": 3}) == {"seed": 3}
    assert runtime.compile_stats() == {"compiles": 0, "compile_seconds": 0.0, "transfers_from_device": 0,
                                       "fallback_ops": 0}
    calls = []
    runtime.step_closure(calls.append, 7)
    assert calls == [7]  # eager: runs at once


def test_auto_picks_cpu_without_pjrt_device_or_cuda(monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    runtime = make_runtime()
    assert runtime.name == ("cuda" if torch.cuda.is_available() else "cpu")


def test_manual_seed_makes_device_randomness_repeat():
    runtime = make_runtime("cpu")
    draws = []
    for seed in (5, 5, 6):
        runtime.manual_seed(seed)
        draws.append(nn.functional.dropout(torch.ones(64, device=runtime.device), p=0.5))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_bf16_precision_autocasts_matmuls():
    runtime = make_runtime("cpu", precision="bf16")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with runtime.autocast():
        assert (a @ b).dtype == torch.bfloat16
    with make_runtime("cpu").autocast():
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"kind": "tpu"}, "runtime kind 'tpu' is unknown"),
        ({"precision": "fp16"}, "precision 'fp16' is unknown"),
        ({"kind": "cpu", "num_devices": 2}, "num_devices=2 with runtime kind 'cpu'"),
        ({"kind": "cpu", "num_devices": 0}, "num_devices=0 must be at least 1"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        make_runtime(**arguments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(RuntimeError, match="kind 'cuda' asked for"):
        make_runtime("cuda")


def test_eager_device_loader_moves_dict_batches_and_names_bad_keys():
    runtime = make_runtime("cpu")
    batches = list(runtime.device_loader(make_batches(2, rows=4)))
    assert len(batches) == 2 and set(batches[0]) == {"x", "y", "w"}
    assert batches[0]["x"].device == runtime.device and batches[0]["x"].shape == (4, 1, 4, 8, 8)
    with pytest.raises(TypeError, match="batch key 'participant_id' holds list"):
        list(runtime.device_loader([{"x": torch.zeros(2, 3), "participant_id": ["1001", "1002"]}]))
    with pytest.raises(TypeError, match="dicts of tensors, got tuple"):
        list(runtime.device_loader([(torch.zeros(2),)]))


def test_to_host_returns_numpy_even_for_bf16():
    runtime = make_runtime("cpu")
    host = runtime.to_host(torch.tensor([1.5, 2.0], dtype=torch.bfloat16, requires_grad=False))
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_array_equal(host, [1.5, 2.0])


def test_checkpoint_round_trip_keeps_model_and_optimizer(tmp_path):
    runtime = make_runtime("cpu")
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_a_little(runtime, model, optimizer)
    path = tmp_path / "run" / "last.pt"
    runtime.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    state = load_state(path)
    assert state["epoch"] == 3
    restored = tiny_model(seed=1)
    restored.load_state_dict(state["model"])
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    restored_optimizer.load_state_dict(state["optimizer"])
    restored_moment = restored_optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(restored_moment, optimizer.state_dict()["state"][0]["exp_avg"])
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_killed_or_failed_write_never_replaces_the_last_good_checkpoint(tmp_path):
    runtime = make_runtime("cpu")
    path = tmp_path / "last.pt"
    runtime.save({"step": torch.tensor(1)}, path)
    # A write killed half-way leaves its temp file; the checkpoint itself is untouched.
    (tmp_path / ".last.pt.killed.partial").write_bytes(b"\x80half a pickle")
    assert int(load_state(path)["step"]) == 1
    # A write that fails (unpicklable state) cleans up its temp file and keeps the old checkpoint.
    with pytest.raises(Exception):
        runtime.save({"step": torch.tensor(2), "callback": lambda: None}, path)
    assert int(load_state(path)["step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.pt.killed.partial", "last.pt"]
    runtime.save({"step": torch.tensor(3)}, path)
    assert int(load_state(path)["step"]) == 3


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint .*nowhere.pt does not exist"):
        load_state(tmp_path / "nowhere.pt")


def test_junk_or_incomplete_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk, not a pickle")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not an octft checkpoint"):
        load_state(tmp_path / "junk.pt")
    torch.save({"step": torch.tensor(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"no model entry; found \['step'\]"):
        load_state(tmp_path / "other.pt", required=("model",))


def test_runtime_and_step_import_without_torch_xla():
    script = textwrap.dedent(
        """
        import json, sys
        import octft.train.runtime, octft.train.step
        imported_lazily = "torch_xla" not in sys.modules
        sys.modules["torch_xla"] = None  # as if torch_xla were not installed
        from octft.train.runtime import make_runtime
        try:
            make_runtime("xla")
            refused = ""
        except RuntimeError as error:
            refused = str(error)
        print(json.dumps({"lazy": imported_lazily, "auto": make_runtime("auto").name, "refused": refused}))
        """
    )
    found = run_script("-c", script, env=xla_env())  # PJRT_DEVICE is set, yet no torch_xla
    assert found["lazy"]
    assert found["auto"] in ("cpu", "cuda")
    assert "needs torch_xla, which is not installed" in found["refused"]


# ---------------------------------------------------------------- XLA:CPU, in subprocesses


def xla_spmd_checks(folder: Path) -> dict:
    """Runtime on 4 XLA:CPU devices: attributes, loader sharding, closures, compile counts, save."""
    import torch_xla

    found: dict = {}
    try:
        make_runtime("xla", num_devices=2)
    except ValueError as error:
        found["two_devices"] = str(error)
    runtime = make_runtime("xla")
    found["attributes"] = [runtime.name, runtime.num_devices, runtime.precision,
                           runtime.batch_layout(4, 4).micro_batch_per_device]
    found["bf16"] = make_runtime("xla", precision="bf16").precision
    with make_runtime("xla", precision="bf16").autocast():
        ones = torch.ones(4, 4, device=runtime.device)
        found["bf16_matmul"] = str((ones @ ones).dtype)
    try:
        make_runtime("xla", num_devices=1)
    except RuntimeError as error:
        found["switch"] = str(error)

    batch = next(iter(runtime.device_loader(make_batches(1, rows=8))))
    found["x_sharding"] = torch_xla._XLAC._get_xla_sharding_spec(batch["x"])
    found["y_sharding"] = torch_xla._XLAC._get_xla_sharding_spec(batch["y"])
    try:
        list(runtime.device_loader(make_batches(1, rows=6)))
    except ValueError as error:
        found["indivisible"] = str(error)

    # The same graph twice compiles once, even reseeded; a closure sees values only after the graph ran.
    seen, masks = [], []
    before = runtime.compile_stats()
    for value, seed in ((2.0, 1), (3.0, 1), (4.0, 2)):
        runtime.manual_seed(seed)
        keep = nn.functional.dropout(torch.ones_like(batch["x"]), p=0.5)
        runtime.step_closure(lambda tensor: masks.append(runtime.to_host(tensor)), keep)
        total = (batch["x"] * value).sum()
        runtime.step_closure(lambda tensor: seen.append(float(runtime.to_host(tensor))), total)
        found.setdefault("closure_waits", seen == [])
        runtime.sync()
    after = runtime.compile_stats()
    found["closure_values"] = seen
    found["same_seed_same_mask"] = bool(
        np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2]) and 0 < masks[0].mean() < 2
    )
    found["expected_values"] = [float(make_batches(1, rows=8)[0]["x"].sum() * v) for v in (2.0, 3.0, 4.0)]
    found["new_compiles"] = after["compiles"] - before["compiles"]
    found["new_transfers"] = after["transfers_from_device"] - before["transfers_from_device"]

    model = runtime.to_device(tiny_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_a_little(runtime, model, optimizer)
    runtime.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, folder / "ckpt.pt")
    np.savez(folder / "spmd.npz", **{name: runtime.to_host(value) for name, value in model.state_dict().items()})
    found["stats"] = runtime.compile_stats()
    return found


def xla_single_load(folder: Path) -> dict:
    """Load the 4-device checkpoint on 1 XLA device and take one more step."""
    runtime = make_runtime("xla", num_devices=1)
    state = load_state(folder / "ckpt.pt")
    model = tiny_model(seed=1)
    model.load_state_dict(state["model"])
    model = runtime.to_device(model)
    np.savez(folder / "single.npz", **{name: runtime.to_host(value) for name, value in model.state_dict().items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(state["optimizer"])
    train_a_little(runtime, model, optimizer, steps=1)
    return {"num_devices": runtime.num_devices, "step": float(optimizer.state_dict()["state"][0]["step"])}


@pytest.mark.integration
def test_xla_runtime_on_four_devices_and_its_checkpoint_on_any_device(tmp_path):
    found = run_script(__file__, "spmd", str(tmp_path), env=xla_env())
    print("XLA runtime stats:", found["stats"])
    assert "XLA sees 4 devices" in found["two_devices"]
    assert found["attributes"] == ["xla", 4, "fp32", 4]
    assert found["bf16"] == "bf16" and found["bf16_matmul"] == "torch.bfloat16"
    assert "cannot switch to single" in found["switch"]
    assert "devices=[4,1,1,1,1]" in found["x_sharding"] and "devices=[4]" in found["y_sharding"]
    assert "6 rows, not divisible by the 4 devices" in found["indivisible"]
    assert found["closure_waits"] is True
    np.testing.assert_allclose(found["closure_values"], found["expected_values"], rtol=1e-5)
    assert found["same_seed_same_mask"] is True
    assert found["new_compiles"] == 1 and found["new_transfers"] == 6
    assert found["stats"]["fallback_ops"] == 0

    state = load_state(tmp_path / "ckpt.pt")
    reference = np.load(tmp_path / "spmd.npz")
    for name, value in state["model"].items():
        assert value.device.type == "cpu"
        np.testing.assert_array_equal(value.numpy(), reference[name])
    eager = tiny_model(seed=1)
    eager.load_state_dict(state["model"])  # loads on the eager CPU runtime unchanged
    assert all(torch.equal(eager.state_dict()[name], value) for name, value in state["model"].items())

    single = run_script(__file__, "single", str(tmp_path), env=xla_env())
    assert single == {"num_devices": 1, "step": 3.0}
    on_one_device = np.load(tmp_path / "single.npz")
    for name in reference.files:
        np.testing.assert_array_equal(on_one_device[name], reference[name])


if __name__ == "__main__":
    task, folder = sys.argv[1], Path(sys.argv[2])
    result = xla_spmd_checks(folder) if task == "spmd" else xla_single_load(folder)
    print(json.dumps(result))
