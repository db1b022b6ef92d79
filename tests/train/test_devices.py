"""Device facts without torch: batch layouts over any device count, TPU chips from PCI ids, trial devices."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from octft.errors import OctftError
from octft.train import devices
from octft.train.devices import BatchLayoutError, plan_batches


def test_docstring_examples_hold():
    assert doctest.testmod(devices).failed == 0


@pytest.mark.parametrize(
    ("num_devices", "micro", "accumulation"),
    [(1, 4, 4), (2, 4, 2), (4, 4, 1), (8, 2, 1), (16, 1, 1)],
)
def test_scenario_a_keeps_its_effective_batch_on_every_device_count(num_devices, micro, accumulation):
    # Scenario A: train.batch_size 4 x train.accumulation_steps 4 = 16 rows per optimizer step.
    layout = plan_batches(16, max_micro_batch_per_device=4, num_devices=num_devices)
    assert (layout.micro_batch_per_device, layout.accumulation_steps) == (micro, accumulation)
    assert layout.num_devices * layout.micro_batch_per_device * layout.accumulation_steps == 16
    assert layout.eval_batch_size % num_devices == 0 and layout.eval_batch_size >= 4
    assert layout.params() == {
        "runtime.num_devices": num_devices, "runtime.num_hosts": 1, "train.effective_batch_size": 16,
        "runtime.micro_batch_per_device": micro, "runtime.accumulation_steps_used": accumulation,
    }


def test_micro_batch_never_exceeds_the_configured_batch_and_divides_the_rows():
    for effective in range(1, 97):
        for cap in (1, 2, 3, 4, 8):
            for count in (1, 2, 4, 8, 16):
                if effective % count:
                    continue
                layout = plan_batches(effective, max_micro_batch_per_device=cap, num_devices=count)
                assert layout.micro_batch_per_device <= cap
                assert count * layout.micro_batch_per_device * layout.accumulation_steps == effective


def test_hosts_each_feed_their_share():
    layout = plan_batches(32, max_micro_batch_per_device=4, num_devices=16, num_hosts=4)
    assert (layout.host_batch_size, layout.micro_batch_per_device, layout.accumulation_steps) == (8, 2, 1)
    assert layout.params()["runtime.num_hosts"] == 4
    with pytest.raises(BatchLayoutError, match="same number of devices"):
        plan_batches(32, max_micro_batch_per_device=4, num_devices=6, num_hosts=4)


@pytest.mark.parametrize(
    ("effective", "num_devices", "expected"),
    [
        (4, 8, "effective batch 4 (train.batch_size x train.accumulation_steps) cannot be split evenly over 8 devices: "
               "use an effective batch that is a multiple of 8 (8, 16, 24, 32), or run on 1, 2 or 4 devices"),
        (12, 8, "multiple of 8 (8, 16, 24, 32), or run on 1, 2, 3, 4, 6 or 12 devices"),
        (40, 16, "multiple of 16 (16, 32, 48, 64)"),
    ],
)
def test_impossible_layouts_are_refused_naming_what_would_work(effective, num_devices, expected):
    with pytest.raises(BatchLayoutError) as raised:
        plan_batches(effective, max_micro_batch_per_device=4, num_devices=num_devices)
    assert expected in str(raised.value)
    assert isinstance(raised.value, OctftError)  # the CLI prints it as one line, exit 2


def test_a_fixed_micro_batch_sets_the_rows_per_device_or_is_refused_naming_the_key():
    layout = plan_batches(32, max_micro_batch_per_device=8, num_devices=2, micro_batch_per_device=4)
    assert (layout.micro_batch_per_device, layout.accumulation_steps) == (4, 4)
    with pytest.raises(BatchLayoutError, match=r"runtime.micro_batch_rows=3 does not divide the 16 rows .* 1, 2, 4, 8 or 16"):
        plan_batches(32, max_micro_batch_per_device=8, num_devices=2, micro_batch_per_device=3)


def test_tpu_chips_are_read_from_pci_ids(tmp_path):
    def pci_device(name: str, vendor: str, device: str) -> None:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "vendor").write_text(vendor + "\n")
        (folder / "device").write_text(device + "\n")

    for index in range(4):
        pci_device(f"0000:00:0{index}.0", "0x1ae0", "0x005e")  # TPU v4
    pci_device("0000:00:10.0", "0x1ae0", "0x0001")  # a Google device that is not a TPU
    pci_device("0000:00:11.0", "0x8086", "0x005e")  # another vendor's device with the same id
    chips = devices.local_tpu_chips(tmp_path)
    assert [chip.kind for chip in chips] == ["v4"] * 4 and chips[0].hbm_gib == 32
    assert devices.local_tpu_chips(tmp_path / "absent") == []


def test_trial_devices_default_to_one_off_tpu():
    assert devices.default_devices_per_trial(3, {"PJRT_DEVICE": "CPU"}) == 1
    assert devices.default_devices_per_trial(1, {"PJRT_DEVICE": "CUDA"}) == 1


def test_trial_device_env_gives_each_worker_its_chips_and_port():
    tpu = [devices.trial_device_env(index, 4, {"PJRT_DEVICE": "TPU"}) for index in range(2)]
    assert [env["TPU_VISIBLE_CHIPS"] for env in tpu] == ["0,1,2,3", "4,5,6,7"]
    assert {env["TPU_CHIPS_PER_PROCESS_BOUNDS"] for env in tpu} == {"2,2,1"}
    assert tpu[0]["TPU_PROCESS_PORT"] != tpu[1]["TPU_PROCESS_PORT"]
    with pytest.raises(ValueError, match="must be one of"):
        devices.trial_device_env(0, 3, {"PJRT_DEVICE": "TPU"})


def test_compile_cache_is_on_for_tpu_only():
    folder, note = devices.compile_cache_note("~/.cache/octft/xla", "TPU")
    assert folder == os.path.expanduser("~/.cache/octft/xla") and folder in note
    assert devices.compile_cache_note("~/.cache/octft/xla", "CPU") == (
        None, "XLA compile cache: off on CPU (torch_xla loads it on TPU only)")
    assert devices.compile_cache_note(None, "TPU")[0] is None


def test_devices_module_imports_without_torch():
    script = (
        "import json, sys; import octft.train.devices, octft.sweep.worker; "
        "print(json.dumps(sorted(m for m in ('torch', 'torch_xla') if m in sys.modules)))"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[2])
    assert json.loads(found.stdout) == []
