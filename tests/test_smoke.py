"""`octft smoke`: the first command on a new VM trains the micro model and says how the devices were used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from octft.smoke import select_devices



def test_devices_are_chosen_before_xla_starts():
    environ = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    select_devices(8, environ)
    assert environ == {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "8"}
    plain: dict[str, str] = {}
    select_devices(2, plain)  # no accelerator: XLA:CPU devices
    assert plain == {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2"}
    untouched = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    select_devices(None, untouched)
    assert untouched == {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    with pytest.raises(ValueError, match="only TPU and XLA:CPU"):
        select_devices(2, {"PJRT_DEVICE": "CUDA"})


@pytest.mark.integration
def test_smoke_command_trains_two_epochs_and_prints_the_layout(tmp_path, tmp_path_factory):
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    cwd = tmp_path_factory.mktemp("smoke-cwd")  # where a user runs it: nothing may be left there
    completed = subprocess.run([sys.executable, "-m", "octft.cli", "smoke", "--devices", "2"], env=env,
                               capture_output=True, text=True, timeout=900, cwd=cwd)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "effective batch 16 = 2 devices x 4 rows x 2 accumulation steps" in out
    assert "smoke: completed after 2 epochs" in out and "runtime.num_devices 2" in out
    assert "runtime.accumulation_steps_used 2" in out and "samples/s" in out and "XLA compiles" in out
    assert "XLA compile cache: off on CPU" in out
    assert list(tmp_path.iterdir()) == []  # the temporary release, cache and stores are gone
    assert list(cwd.iterdir()) == []  # the feature store too (it went to ./.octft-features)
