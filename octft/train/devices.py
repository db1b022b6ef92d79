"""Device facts that need no torch: batch layouts over devices and hosts, and what a TPU host holds.

The runtime (`octft.train.runtime`) asks this module how to lay a batch out; a sweep worker asks it
which chips a trial process gets. Neither torch nor torch_xla is imported here, so a worker that only
starts trial processes stays light.

    >>> layout = plan_batches(16, max_micro_batch_per_device=4, num_devices=8)
    >>> layout.micro_batch_per_device, layout.accumulation_steps
    (2, 1)
    >>> plan_batches(16, max_micro_batch_per_device=4, num_devices=1).accumulation_steps
    4
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from octft.errors import OctftError, UsageError


class BatchLayoutError(OctftError, ValueError):
    """An effective batch that cannot be spread evenly over the devices; the message lists ones that can."""


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's rows sit on devices, hosts and accumulation steps.

    `effective_batch_size` (rows per optimizer step, `train.batch_size x train.accumulation_steps`) is
    what the config asks for and is kept exactly; the rest is the runtime's choice for this machine.
    """

    effective_batch_size: int
    num_devices: int
    num_hosts: int
    micro_batch_per_device: int
    accumulation_steps: int
    eval_batch_per_device: int

    @property
    def host_batch_size(self) -> int:
        """Rows of each optimizer step that one host reads and feeds."""
        return self.effective_batch_size // self.num_hosts

    @property
    def eval_batch_size(self) -> int:
        """Rows of one evaluation batch, all hosts together (padded with weight 0 where the split ends)."""
        return self.eval_batch_per_device * self.num_devices

    def params(self) -> dict[str, int]:
        """The layout as MLflow params: facts of the run, named apart from the config keys."""
        return {
            "runtime.num_devices": self.num_devices,
            "runtime.num_hosts": self.num_hosts,
            "train.effective_batch_size": self.effective_batch_size,
            "runtime.micro_batch_per_device": self.micro_batch_per_device,
            "runtime.accumulation_steps_used": self.accumulation_steps,
        }

    def describe(self) -> str:
        return (
            f"effective batch {self.effective_batch_size} = {self.num_devices} devices x "
            f"{self.micro_batch_per_device} rows x {self.accumulation_steps} accumulation steps"
            f" ({self.num_hosts} host{'s' if self.num_hosts > 1 else ''}, {self.host_batch_size} rows per host); "
            f"evaluation batches of {self.eval_batch_size}"
        )


def plan_batches(
    effective_batch_size: int, *, max_micro_batch_per_device: int, num_devices: int, num_hosts: int = 1,
    micro_batch_per_device: int | None = None,
) -> BatchLayout:
    """Spread `effective_batch_size` rows evenly over `num_devices`, in as few accumulation steps as fit.

    `max_micro_batch_per_device` bounds the rows one device holds in one forward/backward pass (the
    config's `train.batch_size`, which was sized for one device's memory). The gradient is the same
    for every layout (the objective is normalised over the whole effective batch), so the layout only
    changes speed and memory, never the science. Evaluation holds no activations for a backward
    pass, so each device takes `max_micro_batch_per_device` rows per evaluation batch.
    `micro_batch_per_device` (`runtime.micro_batch_rows`, which a sweep launch fixes for all its trials) sets
    the rows per device instead; it must divide each device's share of the effective batch.
    """
    if effective_batch_size < 1 or max_micro_batch_per_device < 1:
        raise BatchLayoutError(
            f"effective batch {effective_batch_size} with at most {max_micro_batch_per_device} rows per device: "
            "train.batch_size and train.accumulation_steps must be at least 1"
        )
    if num_devices < 1 or num_hosts < 1 or num_devices % num_hosts:
        raise BatchLayoutError(f"{num_devices} devices on {num_hosts} hosts: every host must hold the same number of devices")
    if effective_batch_size % num_devices:
        raise BatchLayoutError(
            f"effective batch {effective_batch_size} (train.batch_size x train.accumulation_steps) cannot be split "
            f"evenly over {num_devices} devices: use an effective batch that is a multiple of {num_devices} "
            f"({', '.join(str(n) for n in workable_effective_batches(num_devices, effective_batch_size))}), "
            f"or run on {_divisor_text(effective_batch_size)} devices"
        )
    rows_per_device = effective_batch_size // num_devices
    if micro_batch_per_device is not None:
        if micro_batch_per_device < 1 or rows_per_device % micro_batch_per_device:
            raise BatchLayoutError(
                f"runtime.micro_batch_rows={micro_batch_per_device} does not divide the {rows_per_device} rows "
                + (f"each of {num_devices} devices holds" if num_devices > 1 else "the device holds")
                + f" of effective batch {effective_batch_size}: use one of "
                f"{_divisor_text(rows_per_device)}, or null (the most that fit)"
            )
        micro = micro_batch_per_device
    else:
        micro = max(d for d in range(1, min(rows_per_device, max_micro_batch_per_device) + 1) if rows_per_device % d == 0)
    return BatchLayout(
        effective_batch_size=effective_batch_size,
        num_devices=num_devices,
        num_hosts=num_hosts,
        micro_batch_per_device=micro,
        accumulation_steps=rows_per_device // micro,
        eval_batch_per_device=max_micro_batch_per_device,
    )


def workable_effective_batches(num_devices: int, near: int, count: int = 4) -> list[int]:
    """The `count` multiples of `num_devices` closest to `near` (at least `num_devices`).

    >>> workable_effective_batches(8, 12)
    [8, 16, 24, 32]
    """
    below = max(1, near // num_devices)
    first = max(1, below - count // 2 + 1)
    return [num_devices * k for k in range(first, first + count)]


def _divisor_text(number: int) -> str:
    divisors = [str(d) for d in range(1, number + 1) if number % d == 0]
    return ", ".join(divisors[:-1]) + " or " + divisors[-1] if len(divisors) > 1 else divisors[0]


# ---------------------------------------------------------------- TPU hosts

@dataclass(frozen=True)
class TpuChip:
    """What one TPU generation offers per chip (public Cloud TPU figures)."""

    kind: str
    hbm_gib: int
    peak_bf16_tflops: float


# PCI device ids of Google TPU chips (vendor 0x1ae0), as torch_xla and libtpu recognise them.
_TPU_PCI_VENDOR = "0x1ae0"
TPU_CHIPS = {
    "0x005e": TpuChip("v4", 32, 275.0),
    "0x0063": TpuChip("v5e", 16, 197.0),
    "0x0062": TpuChip("v5p", 95, 459.0),
    "0x006f": TpuChip("v6e", 32, 918.0),
}
# Chips per process, as the bounds libtpu wants when one host's chips are split between processes.
TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
# Each process that owns part of a host's chips talks to libtpu on its own port.
TPU_BASE_PORT = 8476


def local_tpu_chips(pci_root: str | os.PathLike = "/sys/bus/pci/devices") -> list[TpuChip]:
    """The TPU chips attached to this host, read from PCI ids (starts no runtime, takes no chip)."""
    chips = []
    for vendor_path in sorted(glob.glob(os.path.join(pci_root, "*", "vendor"))):
        try:
            if Path(vendor_path).read_text().strip() != _TPU_PCI_VENDOR:
                continue
            device_id = (Path(vendor_path).parent / "device").read_text().strip()
        except OSError:
            continue
        if device_id in TPU_CHIPS:
            chips.append(TPU_CHIPS[device_id])
    return chips


def platform(environ: dict[str, str] | None = None) -> str:
    """'TPU', 'CPU' (XLA:CPU), 'CUDA' ... from PJRT_DEVICE, else 'TPU' when chips are attached, else ''."""
    environ = os.environ if environ is None else environ
    pjrt = environ.get("PJRT_DEVICE", "").upper()
    if pjrt:
        return pjrt.split("_")[0]
    return "TPU" if local_tpu_chips() else ""


def default_devices_per_trial(workers: int, environ: dict[str, str] | None = None) -> int:
    """Devices each sweep worker's trial trains on when the user does not say: on a TPU host, its chips
    divided among the workers (rounded down to a chip count libtpu accepts); elsewhere 1.

    >>> default_devices_per_trial(2, {"PJRT_DEVICE": "CPU"})
    1
    """
    environ = os.environ if environ is None else environ
    if platform(environ) != "TPU":
        return 1
    share = max(1, len(local_tpu_chips()) // max(1, workers))
    return max(n for n in TPU_CHIP_BOUNDS if n <= share)


def trial_device_env(worker_index: int, devices_per_trial: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that give the trial process of worker `worker_index` its own devices.

      - XLA:CPU (PJRT_DEVICE=CPU): CPU_NUM_DEVICES=<devices_per_trial>.
      - TPU (PJRT_DEVICE=TPU): TPU_VISIBLE_CHIPS=<this worker's chips>, TPU_CHIPS_PER_PROCESS_BOUNDS,
        TPU_PROCESS_BOUNDS=1,1,1 and a TPU_PROCESS_PORT per worker, so K workers share one host's chips.
      - CUDA: CUDA_VISIBLE_DEVICES=<this worker's GPUs>.

    >>> trial_device_env(1, 2, {"PJRT_DEVICE": "CPU"})
    {'CPU_NUM_DEVICES': '2'}
    >>> trial_device_env(1, 2, {"PJRT_DEVICE": "TPU"})["TPU_VISIBLE_CHIPS"]
    '2,3'
    """
    environ = os.environ if environ is None else environ
    first = worker_index * devices_per_trial
    devices = ",".join(str(index) for index in range(first, first + devices_per_trial))
    pjrt = platform(environ)  # a TPU host without PJRT_DEVICE set is still a TPU host
    if pjrt == "CPU":
        return {"CPU_NUM_DEVICES": str(devices_per_trial)}
    if pjrt == "TPU":
        if devices_per_trial not in TPU_CHIP_BOUNDS:
            raise UsageError(f"--devices-per-trial {devices_per_trial} on TPU must be one of {sorted(TPU_CHIP_BOUNDS)}")
        port = TPU_BASE_PORT + worker_index
        return {
            "TPU_VISIBLE_CHIPS": devices,
            "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_CHIP_BOUNDS[devices_per_trial],
            "TPU_PROCESS_BOUNDS": "1,1,1",
            "TPU_PROCESS_PORT": str(port),
            "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
            "CLOUD_TPU_TASK_ID": "0",
        }
    return {"CUDA_VISIBLE_DEVICES": devices}


def auto_precision(platform_name: str) -> str:
    """What `runtime.precision=auto` means: bf16 autocast on TPU (its matrix units are bf16), fp32 elsewhere."""
    return "bf16" if platform_name == "TPU" else "fp32"


def compile_cache_note(compile_cache_dir: str | None, platform_name: str) -> tuple[str | None, str]:
    """(the folder to use, or None) and one line saying so, for `runtime.compile_cache_dir`.

    torch_xla's persistent cache is written on XLA:CPU but never loaded back, so it is only turned on
    for TPU, where a ViT-B step takes minutes to compile and every trial on a host compiles the same graphs.

    >>> compile_cache_note("/tmp/xla", "CPU")[0] is None
    True
    """
    if not compile_cache_dir:
        return None, "XLA compile cache: off (runtime.compile_cache_dir is null)"
    if platform_name != "TPU":
        return None, f"XLA compile cache: off on {platform_name or 'this platform'} (torch_xla loads it on TPU only)"
    folder = os.path.expanduser(compile_cache_dir)
    return folder, f"XLA compile cache: {folder} (shared by every process on this host)"
