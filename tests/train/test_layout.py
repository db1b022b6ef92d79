"""Batch layout over devices and hosts: the effective batch is kept on 1, 8 and 16 XLA:CPU devices,
each host feeds only its rows, and evaluation assembles the same logits whatever the number of hosts.

A real multi-host run is impossible here, so hosts are simulated on the input side: `padded_batches`
is given each host's index and the host count, and the hosts' rows are assembled in host order, as
torch_xla's per-host input contract (`minibatch=True` sharding) assembles them on a pod slice.
XLA checks run this file as a script in their own process (`CPU_NUM_DEVICES` is read once per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from octft.data.synth import synthesize
from octft.data.batches import padded_batches, place_rows

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
SMALL = {"frames": 4, "height": 32, "width": 32}


def toy_dataset(rows: int = 23) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(1, 4, 8, 8, generator=generator), "y": torch.tensor(i % 4)} for i in range(rows)]


def assembled_batches(dataset, batch_size: int, order, host_count: int, micro_batches: int = 1) -> list[dict[str, torch.Tensor]]:
    """Every host's batches, concatenated step by step in host order (what the runtime assembles)."""
    per_host = [list(padded_batches(dataset, batch_size, order=order, host_index=h, host_count=host_count,
                                    micro_batches=micro_batches))
                for h in range(host_count)]
    assert len({len(batches) for batches in per_host}) == 1  # every host takes the same number of steps
    return [{key: torch.cat([host[step][key] for host in per_host]) for key in per_host[0][step]}
            for step in range(len(per_host[0]))]


@pytest.mark.parametrize("host_count", [2, 4])
def test_hosts_cover_each_global_batch_with_no_row_twice(host_count):
    dataset = toy_dataset(23)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1)).tolist()
    one_host = list(padded_batches(dataset, 8, order=order))
    assembled = assembled_batches(dataset, 8, order, host_count)
    assert len(assembled) == len(one_host) == 3
    for single, joined in zip(one_host, assembled):
        for key in single:
            assert torch.equal(single[key], joined[key]), key
    for host in range(host_count):
        for batch in padded_batches(dataset, 8, order=order, host_index=host, host_count=host_count):
            assert batch["x"].shape[0] == 8 // host_count  # each host reads only its share
    real_rows = torch.cat([batch["row"][batch["w"] > 0] for batch in assembled]).tolist()
    assert sorted(real_rows) == list(range(23))  # every row once, padding weighted 0


@pytest.mark.parametrize("host_count", [1, 2])
def test_micro_batches_cut_each_global_batch_and_weigh_rows_over_the_whole_step(host_count):
    dataset = toy_dataset(23)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(2)).tolist()
    whole = list(padded_batches(dataset, 8, order=order))
    micro = assembled_batches(dataset, 8, order, host_count, micro_batches=2)
    assert len(micro) == 2 * len(whole) == 6
    for step, batch in enumerate(whole):
        parts = micro[2 * step : 2 * step + 2]
        assert all(part["x"].shape[0] == 4 for part in parts)
        # Assembled over hosts, a step's micro-batches hold its rows; the step's rows weigh 1 in all.
        joined = {key: torch.cat([part[key] for part in parts]) for key in batch}
        assert sorted(joined["row"].tolist()) == sorted(batch["row"].tolist())
        assert float(sum(part["scale"].sum() for part in parts)) == pytest.approx(1.0)
        torch.testing.assert_close(joined["scale"], joined["w"] / batch["w"].sum())
    last = torch.cat([part["scale"] for part in micro[4:]])
    assert sorted(set(last.tolist())) == [0.0, pytest.approx(1 / 7)]  # 23 rows: the last step holds 7, 1 padded


def test_a_global_batch_the_hosts_cannot_share_is_named():
    with pytest.raises(ValueError, match="global batch of 6 rows cannot be split evenly over 4 hosts"):
        list(padded_batches(toy_dataset(8), 6, order=range(8), host_index=0, host_count=4))


def eval_on_xla(folder: Path) -> dict:
    """Validation logits placed by row on 8 XLA:CPU devices, with the input fed as 1, 2 or 4 hosts."""
    from octft.train.runtime import make_runtime
    from octft.train.step import eval_step

    runtime = make_runtime("xla")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, kernel_size=2, stride=2), nn.Flatten(), nn.Linear(4 * 2 * 4 * 4, 4))
    dataset = toy_dataset(23)
    reference = model(torch.stack([row["x"] for row in dataset])).detach().numpy()
    model = runtime.to_device(model)
    layout = runtime.batch_layout(4, 4)
    found = {"num_devices": runtime.num_devices, "eval_batch_size": layout.eval_batch_size}
    for host_count in (1, 2, 4):
        logits = torch.zeros(len(dataset), 4, device=runtime.device)
        batches = assembled_batches(dataset, layout.eval_batch_size, range(len(dataset)), host_count)
        for batch in runtime.device_loader(batches):
            out = eval_step(model, batch, runtime=runtime)
            logits = logits + place_rows(out["logits"], batch["row"], batch["w"], len(dataset))
        np.save(folder / f"logits_{host_count}.npy", runtime.to_host(logits))
    np.save(folder / "reference.npy", reference)
    return found


@pytest.mark.integration
def test_evaluation_assembles_the_same_logits_from_one_two_or_four_hosts(tmp_path):
    found = run_script(__file__, "eval", str(tmp_path), devices=8)
    assert found == {"num_devices": 8, "eval_batch_size": 32}
    reference = np.load(tmp_path / "reference.npy")
    one_host = np.load(tmp_path / "logits_1.npy")
    np.testing.assert_allclose(one_host, reference, rtol=1e-5, atol=1e-6)  # each row once, not summed twice
    for host_count in (2, 4):
        np.testing.assert_array_equal(np.load(tmp_path / f"logits_{host_count}.npy"), one_host)


def run_script(*args: str, devices: int) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), OMP_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- octft train


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layout")
    synthesize(root / "data", participants=48, seed=0, **SMALL)
    return root / "data", root / "cache"


# Scenario A's layout (batch 4 x accumulation 4 = 16 rows per step), deterministic: no dropout, unfrozen
# from epoch 0 so every parameter moves.
SCENARIO_A = ("runtime.kind=xla", "train.epochs=2", "train.unfreeze_epoch=0", "train.batch_size=4",
              "train.accumulation_steps=4", "model.head_dropout=0.0", "model.drop_path_rate=0.0",
              "train.early_stopping_patience=null")


def start_train(small_data, run_dir: Path, devices: int, *overrides: str) -> subprocess.Popen:
    """`octft train` on `devices` XLA:CPU devices, started (its own process: XLA's device count is per process)."""
    data_dir, cache_dir = small_data
    sizes = [f"data.preprocess.{key}={value}" for key, value in SMALL.items()]
    command = [sys.executable, "-m", "octft.cli", "train", str(DEMO), f"data.uri={data_dir}",
               f"data.cache_dir={cache_dir}", *sizes, f"output_dir={run_dir.parent}", *overrides,
               "--run-dir", str(run_dir), "--tracking-uri", f"sqlite:///{run_dir.parent / 'mlflow.db'}"]
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=900)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_record(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    history = {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
               for key in ("train/loss", "val/loss")}
    return client.get_run(run_id).data.params, history


@pytest.mark.integration
def test_scenario_a_trains_the_same_on_one_eight_and_sixteen_devices(small_data, tmp_path):
    runs = {}
    # "8x1": 8 devices with the micro-batch a sweep may fix (runtime.micro_batch_rows=1): 2 micro-batches per step.
    # The four runs train at once (each compiles and imports on one thread most of the time).
    started = {name: start_train(small_data, tmp_path / f"d{name}" / "run", devices, *SCENARIO_A, *extra)
               for name, devices, extra in ((1, 1, ()), (8, 8, ()), (16, 16, ()),
                                            ("8x1", 8, ("runtime.micro_batch_rows=1",)))}
    for name, process in started.items():
        completed = finished(process)
        assert completed.returncode == 0, completed.stderr[-3000:]
        runs[name] = run_record(tmp_path / f"d{name}" / "run")
    expected = {1: ("4", "4"), 8: ("2", "1"), 16: ("1", "1"), "8x1": ("1", "2")}
    for devices, (params, _) in runs.items():
        assert params["runtime.num_devices"] == str(devices).split("x")[0] and params["runtime.num_hosts"] == "1"
        assert params["train.effective_batch_size"] == "16"
        assert (params["runtime.micro_batch_per_device"], params["runtime.accumulation_steps_used"]) == expected[devices]
    # The same effective batch gives the same optimizer steps; only the order of sums differs.
    for devices in (8, 16, "8x1"):
        for key in ("train/loss", "val/loss"):
            np.testing.assert_allclose(runs[devices][1][key], runs[1][1][key], rtol=1e-5, err_msg=f"{key} on {devices}")


@pytest.mark.integration
def test_an_effective_batch_the_devices_cannot_share_is_refused_before_training(small_data, tmp_path):
    run_dir = tmp_path / "run"
    completed = finished(start_train(small_data, run_dir, 8, *SCENARIO_A, "train.accumulation_steps=1"))
    assert completed.returncode == 2
    message = completed.stderr.strip().splitlines()[-1]
    assert message.startswith("octft: error: effective batch 4") and "over 8 devices" in message
    assert "(8, 16, 24, 32)" in message, message
    assert not (run_dir / "run.json").exists() and not (run_dir / "last.pt").exists()  # no run was started


if __name__ == "__main__":
    task, folder = sys.argv[1], Path(sys.argv[2])
    print(json.dumps(eval_on_xla(folder)))
