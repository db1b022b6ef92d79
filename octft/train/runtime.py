"""Where training runs: device, data parallelism, precision, host syncs and checkpoint writes.

All torch_xla code of octft lives in this module and is imported lazily, so octft imports (and
trains on CPU or CUDA) without torch_xla installed. The loop asks a `Runtime` for everything
device-specific and never tests the device type itself.

Two implementations share one set of methods (no inheritance): `XlaRuntime` (TPU, or XLA:CPU in
tests; data parallel by SPMD over a 1-D mesh axis "data") and `EagerRuntime` (one CPU or CUDA
device).

Example:
    >>> runtime = make_runtime("cpu")
    >>> model = runtime.to_device(torch.nn.Linear(4, 2))
    >>> for batch in runtime.device_loader([{"x": torch.zeros(8, 4)}]):
    ...     out = model(batch["x"])
    ...     runtime.sync()
    >>> runtime.to_host(out).shape
    (8, 2)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ContextManager, Iterable, Iterator, Literal, Protocol

import numpy as np
import torch

from octft.errors import OctftError
from octft.models.checkpoint import CheckpointError
from octft.io import atomic_file
from octft.train.devices import BatchLayout, auto_precision, compile_cache_note, plan_batches
from octft.train.devices import platform as device_platform

Kind = Literal["auto", "xla", "cpu", "cuda"]
Precision = Literal["auto", "bf16", "fp32"]

DATA_AXIS = "data"


class Runtime(Protocol):
    """What the loop and the step functions may ask of a device. See `make_runtime`."""

    name: str
    device: torch.device
    num_devices: int
    process_index: int
    process_count: int
    precision: str

    @property
    def is_main(self) -> bool: ...
    def to_device(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def device_loader(self, loader: Iterable[dict[str, torch.Tensor]]) -> Iterable[dict[str, torch.Tensor]]: ...
    def autocast(self) -> ContextManager: ...
    def small_steps(self) -> ContextManager: ...
    def put(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]: ...
    def manual_seed(self, seed: int) -> None: ...
    def step_closure(self, fn: Callable[..., Any], *args: Any) -> None: ...
    def to_host(self, tensor: torch.Tensor) -> np.ndarray: ...
    def compile_stats(self) -> dict[str, float]: ...
    def save(self, state: dict, path: str | os.PathLike) -> None: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def batch_layout(self, batch_size: int, accumulation_steps: int, micro_batch_rows: int | None = None) -> BatchLayout: ...


def make_runtime(
    kind: Kind = "auto",
    precision: Precision = "auto",
    num_devices: int | None = None,
    compile_cache_dir: str | None = None,
) -> Runtime:
    """Decide device, data parallelism and precision once, before the loop.

    `kind="auto"` picks XLA when torch_xla is installed and `PJRT_DEVICE` is set (or a TPU is
    present), else CUDA when available, else CPU. `precision="auto"` is bf16 autocast on TPU and
    fp32 everywhere else. `num_devices=None` uses every device; XLA accepts 1 (one device, no
    SPMD) or all of them (an SPMD mesh must span every device). `compile_cache_dir` turns on
    torch_xla's persistent compilation cache on TPU (see `devices.compile_cache_note`).

    Example:
        >>> runtime = make_runtime("cpu")
        >>> runtime.name, runtime.num_devices, runtime.precision
        ('cpu', 1, 'fp32')
    """
    if kind not in ("auto", "xla", "cpu", "cuda"):
        raise ValueError(f"runtime kind {kind!r} is unknown: use one of 'auto', 'xla', 'cpu', 'cuda'")
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision {precision!r} is unknown: use one of 'auto', 'bf16', 'fp32'")
    if num_devices is not None and num_devices < 1:
        raise ValueError(f"num_devices={num_devices} must be at least 1 (or None for every device)")
    if kind == "auto":
        kind = _detect_kind()
    if kind == "xla":
        if not _xla_installed():
            raise RuntimeUnavailableError(
                "runtime kind 'xla' needs torch_xla, which is not installed: install it or use kind='cpu'"
            )
        return XlaRuntime(precision=precision, num_devices=num_devices, compile_cache_dir=compile_cache_dir)
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeUnavailableError("runtime kind 'cuda' asked for, but torch sees no CUDA device: use kind='cpu' or 'auto'")
    return EagerRuntime(kind, precision=precision, num_devices=num_devices)


class RuntimeUnavailableError(OctftError, RuntimeError):
    """The runtime a config asks for (runtime.kind) is not available on this machine."""


def load_state(path: str | os.PathLike, *, required: Iterable[str] = ()) -> dict:
    """Read a checkpoint written by `Runtime.save`; tensors come back on the CPU.

    Checkpoints hold plain CPU state dicts, so one saved on N devices loads on any M: load it,
    `model.load_state_dict(...)`, then `runtime.to_device(model)`. A file that is missing, is not such a
    checkpoint (junk, another format, pickled code that weights_only refuses) or lacks a `required` entry is a
    `CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the run directory or start without resuming")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...: not a checkpoint of ours
        lines = str(error).strip().splitlines() or [type(error).__name__]
        # weights_only's refusal is a long how-to; the line naming the refused object is the useful one.
        reason = next((line.strip() for line in lines if "unsupported global" in line.lower()), lines[0].strip())
        raise CheckpointError(
            f"{path}: not an octft checkpoint ({type(error).__name__}: {reason[:300]}); it may be damaged or "
            "from elsewhere: train again, or point to a run's own checkpoint"
        ) from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not an octft checkpoint (no {', '.join(missing)} entry; found {found})")
    return state


def _xla_installed() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


@functools.cache
def _xla() -> SimpleNamespace:
    """torch_xla's modules, imported here once and only here: torch_xla is optional (TPU VMs; XLA:CPU in tests), and
    the native TPU backend that replaces it should need changes in this module alone."""
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met
    import torch_xla.distributed.parallel_loader as pl
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    return SimpleNamespace(torch_xla=torch_xla, xm=xm, met=met, pl=pl, xs=xs, xr=xr)


def xla_device_facts() -> tuple[int, int, int]:
    """(devices, hosts, this host's index) as the XLA runtime sees them; starts the runtime (it takes the chips)."""
    xr = _xla().xr
    return xr.global_runtime_device_count(), xr.process_count(), xr.process_index()


def _detect_kind() -> str:
    # PJRT_DEVICE, else TPU chips on the PCI bus (read without starting the XLA runtime).
    if _xla_installed() and device_platform():
        return "xla"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_atomically(state: Any, path: Path) -> None:
    """torch.save to a temporary beside `path`, synced, then renamed over it: a write killed half-way leaves the
    last good checkpoint at `path`."""
    with atomic_file(path, durable=True) as temp:
        torch.save(state, temp)


def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _require_distributed(process_count: int, what: str) -> None:
    if process_count > 1 and not _distributed_ready():
        raise RuntimeError(
            f"{what} across {process_count} hosts needs torch.distributed: call "
            "torch.distributed.init_process_group('gloo') on every host before training"
        )


def _broadcast_object(obj: Any, process_count: int) -> Any:
    if process_count == 1:
        return obj
    _require_distributed(process_count, "broadcast_object")
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def _check_batch(batch: Any) -> dict[str, torch.Tensor]:
    if not isinstance(batch, dict):
        raise TypeError(f"device_loader needs batches that are dicts of tensors, got {type(batch).__name__}")
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise TypeError(
                f"batch key {key!r} holds {type(value).__name__} {getattr(value, 'shape', '')}: every batch value "
                "must be a tensor with the batch as its first dimension; keep host-only values out of the batch"
            )
    return batch


class EagerRuntime:
    """One CPU or CUDA device, eager PyTorch. Syncs are no-ops; compile stats are zeros."""

    def __init__(self, kind: Literal["cpu", "cuda"], *, precision: Precision = "auto", num_devices: int | None = None):
        if num_devices not in (None, 1):
            raise ValueError(
                f"num_devices={num_devices} with runtime kind {kind!r}: the eager runtime trains on one device; "
                "use num_devices=None or 1, or kind='xla' for data parallelism"
            )
        self.name = kind
        self.device = torch.device(kind)
        self.num_devices = 1
        self.process_index = 0
        self.process_count = 1
        self.precision = "fp32" if precision == "auto" else precision

    def __repr__(self) -> str:
        return f"EagerRuntime(device={self.device}, precision={self.precision})"

    @property
    def is_main(self) -> bool:
        return True

    def to_device(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def device_loader(self, loader: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in loader:
            yield {key: value.to(self.device, non_blocking=True) for key, value in _check_batch(batch).items()}

    def autocast(self) -> ContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def small_steps(self) -> Iterator[None]:
        """Steps of a few small matrix products (a head on stored features): on the CPU, one torch thread while the
        block runs. Fanning such steps out over threads costs more than it saves, and on a busy host far more
        (measured: 0.8 ms a step on one thread, 6 ms on two busy cores); the results are the same within float
        tolerance."""
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def put(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors moved to the device."""
        return [tensor.to(self.device) for tensor in tensors]

    def manual_seed(self, seed: int) -> None:
        """Seed the RNG that dropout and other random ops on this device draw from."""
        torch.manual_seed(seed)  # seeds CUDA too

    def step_closure(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def sync(self) -> None:
        pass

    def to_host(self, tensor: torch.Tensor) -> np.ndarray:
        # A host-device sync point on CUDA: call it at logging points only.
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy()

    def compile_stats(self) -> dict[str, float]:
        return {"compiles": 0, "compile_seconds": 0.0, "transfers_from_device": 0, "fallback_ops": 0}

    def save(self, state: dict, path: str | os.PathLike) -> None:
        """Write `state` (tensors moved to the CPU) atomically to `path`."""
        cpu_state = _map_tensors(state, lambda tensor: tensor.detach().cpu())
        _write_atomically(cpu_state, Path(path))

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def batch_layout(self, batch_size: int, accumulation_steps: int, micro_batch_rows: int | None = None) -> BatchLayout:
        """The configured layout itself: one device, `accumulation_steps` micro-batches of `batch_size` (or of
        `micro_batch_rows` when set)."""
        return plan_batches(batch_size * accumulation_steps, max_micro_batch_per_device=batch_size, num_devices=1,
                            micro_batch_per_device=micro_batch_rows)


def _map_tensors(data: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {key: _map_tensors(value, fn) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_map_tensors(value, fn) for value in data)
    return data


# SPMD is a process-wide switch that must be set before the first XLA tensor exists, so the
# choice is made once per process and later runtimes must agree with it.
_XLA_PROCESS_MODE: str | None = None


def _set_xla_process_mode(spmd: bool) -> None:
    global _XLA_PROCESS_MODE
    xr = _xla().xr
    mode = "spmd" if spmd else "single"
    if _XLA_PROCESS_MODE is None:
        if spmd and not xr.is_spmd():
            xr.use_spmd()
        _XLA_PROCESS_MODE = mode
    elif _XLA_PROCESS_MODE != mode:
        raise RuntimeError(
            f"this process already runs XLA in {_XLA_PROCESS_MODE} mode and cannot switch to {mode}: "
            "SPMD is set once per process; start a new process for a different num_devices"
        )


class XlaRuntime:
    """XLA devices through torch_xla: one device, or SPMD data parallelism over all of them.

    Batches are sharded along their first dimension over the mesh axis "data"; parameters are
    replicated, so XLA inserts the gradient all-reduce itself.
    """

    def __init__(self, *, precision: Precision = "auto", num_devices: int | None = None,
                 compile_cache_dir: str | None = None):
        torch_xla, xr = _xla().torch_xla, _xla().xr
        # Before the first computation: the cache is fixed when torch_xla's computation cache starts. The
        # platform comes from PJRT_DEVICE or the PCI bus, as torch_xla's own default does, not from the runtime.
        self.compile_cache_dir, self.compile_cache_note = compile_cache_note(compile_cache_dir, device_platform())
        if self.compile_cache_dir is not None and not torch_xla._XLAC._xla_computation_cache_is_initialized():
            Path(self.compile_cache_dir).mkdir(parents=True, exist_ok=True)
            xr.initialize_cache(self.compile_cache_dir, readonly=False)
        total = xr.global_runtime_device_count()
        if num_devices not in (None, 1, total):
            raise ValueError(
                f"num_devices={num_devices}, but XLA sees {total} devices and an SPMD mesh must span all of "
                f"them: use num_devices=None (all {total}) or 1, or change CPU_NUM_DEVICES / TPU_VISIBLE_CHIPS"
            )
        self.num_devices = total if num_devices is None else num_devices
        self.process_index = xr.process_index()
        self.process_count = xr.process_count()
        if self.num_devices == 1 and self.process_count > 1:
            raise ValueError(f"num_devices=1 with {self.process_count} hosts: use num_devices=None")
        _set_xla_process_mode(spmd=self.num_devices > 1)
        if self.process_count > 1 and not _distributed_ready():
            # Saving and broadcasting the pruning decision need a host-level process group; torch_xla's
            # xla:// rendezvous makes one from the hosts the XLA runtime already knows (rank = host index).
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// rendezvous; multi-host only)

            torch.distributed.init_process_group("gloo", init_method="xla://")
        self.device_type = xr.device_type()
        self.name = "xla"
        self.device = torch_xla.device()
        self.precision = auto_precision(self.device_type) if precision == "auto" else precision
        self.mesh = None
        if self.num_devices > 1:
            self.mesh = _xla().xs.Mesh(np.arange(total), (total,), (DATA_AXIS,))

    def __repr__(self) -> str:
        return f"XlaRuntime(device_type={self.device_type}, num_devices={self.num_devices}, precision={self.precision})"

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def to_device(self, model: torch.nn.Module) -> torch.nn.Module:
        # Under SPMD, tensors without a sharding annotation are replicated: data parallelism needs nothing more
        # than sharded inputs. Said explicitly all the same: a tensor becomes `{replicated}` once a graph has
        # read it, and a graph traces differently before and after that (the first unfrozen step of a trial
        # whose encoder had built the feature store compiled under another hash than the next trial's).
        model = model.to(self.device)
        self.replicate(itertools.chain(model.parameters(), model.buffers()))
        return model

    def replicate(self, tensors: Iterable[torch.Tensor]) -> None:
        """Mark device tensors replicated over the mesh (without SPMD: nothing to do)."""
        if self.mesh is None:
            return
        xla = _xla()
        for tensor in tensors:
            if not xla.torch_xla._XLAC._get_xla_sharding_spec(tensor):
                xla.xs.mark_sharding(tensor, self.mesh, (None,) * tensor.dim())

    def device_loader(self, loader: Iterable[dict[str, torch.Tensor]]) -> Iterable[dict[str, torch.Tensor]]:
        """Batches on device, each tensor's first dim sharded over "data", prefetched in background threads.

        torch_xla's loader also cuts the graph (syncs) whenever the next batch is taken.
        """
        return _XlaDeviceLoader(loader, self)

    def autocast(self) -> ContextManager:
        if self.precision == "bf16":
            return torch.autocast("xla", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def small_steps(self) -> ContextManager:
        """Steps of a few small matrix products: the device runs them as any other graph."""
        return contextlib.nullcontext()

    def put(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors moved to the device as device data, 0-dim ones included: `.to()` makes a 0-dim tensor a
        constant of the graphs that read it (a graph to compile where it is only stored, and another graph for
        another value)."""
        return _xla().xm.send_cpu_data_to_device(list(tensors), self.device)

    def manual_seed(self, seed: int) -> None:
        """Seed the RNG that dropout and other random ops on the XLA device draw from."""
        # The XLA seed is graph input data, so reseeding every epoch compiles nothing new.
        _xla().torch_xla.manual_seed(seed)

    def step_closure(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` after the current graph has executed, so reading tensors adds no sync."""
        _xla().xm.add_step_closure(fn, args=args)

    def sync(self) -> None:
        _xla().torch_xla.sync()

    def to_host(self, tensor: torch.Tensor) -> np.ndarray:
        # A host-device sync point: it runs any pending graph. Call it inside step_closure
        # (the graph has already run) or at logging points only.
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy()

    def compile_stats(self) -> dict[str, float]:
        """Counts since process start: XLA compiles, their seconds, device-to-host transfers, aten fallbacks."""
        met = _xla().met
        compile_time = met.metric_data("CompileTime") or (0, 0.0, ())
        transfers = met.metric_data("TransferFromDeviceTime") or (0, 0.0, ())
        fallbacks = sum(met.counter_value(name) or 0 for name in met.counter_names() if name.startswith("aten::"))
        return {
            "compiles": int(compile_time[0]),
            "compile_seconds": float(compile_time[1]) / 1e9,
            "transfers_from_device": int(transfers[0]),
            "fallback_ops": int(fallbacks),
        }

    def save(self, state: dict, path: str | os.PathLike) -> None:
        """Host 0 writes `state` as plain CPU tensors, atomically; other hosts wait for it.

        Every host takes part in moving tensors off the device (they may be sharded), only
        host 0 writes. Parameters are replicated, so the file loads on any number of devices.
        """
        _require_distributed(self.process_count, "save")
        # The batched device-to-host transfer that xm.save uses (one sync for all tensors).
        cpu_state = _xla().xm._maybe_convert_to_cpu(state, convert=self.is_main)
        if self.is_main:
            _write_atomically(cpu_state, Path(path))
        if self.process_count > 1:
            torch.distributed.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        return _broadcast_object(obj, self.process_count)

    def batch_layout(self, batch_size: int, accumulation_steps: int, micro_batch_rows: int | None = None) -> BatchLayout:
        """Keep the effective batch `batch_size x accumulation_steps`; spread it over every device.

        Each device holds at most `batch_size` rows per micro-batch (exactly `micro_batch_rows` when set);
        raises `BatchLayoutError`, naming the effective batches that would work, when the devices cannot
        share the rows evenly.
        """
        return plan_batches(batch_size * accumulation_steps, max_micro_batch_per_device=batch_size,
                            num_devices=self.num_devices, num_hosts=self.process_count,
                            micro_batch_per_device=micro_batch_rows)


class _XlaDeviceLoader:
    """torch_xla's ParallelLoader with a per-key sharding spec built from the first batch's ranks."""

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]], runtime: XlaRuntime):
        self._loader = loader
        self._runtime = runtime
        self._parallel_loader = None

    def __len__(self) -> int:
        return len(self._loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._parallel_loader is not None:
            # An epoch left early (e.g. a pruned trial) leaves worker threads blocked on a full queue.
            self._parallel_loader.close()
            self._parallel_loader = None
        batches = iter(self._loader)
        first = next(batches, None)
        if first is None:
            return iter(())
        sharding = self._sharding(_check_batch(first))
        self._parallel_loader = _xla().pl.ParallelLoader(
            itertools.chain([first], batches), [self._runtime.device], input_sharding=sharding
        )
        return self._parallel_loader.per_device_loader(self._runtime.device)

    def _sharding(self, batch: dict[str, torch.Tensor]) -> dict | None:
        runtime = self._runtime
        if runtime.mesh is None:
            return None
        xs = _xla().xs
        for key, tensor in batch.items():
            if tensor.shape[0] % (runtime.num_devices // runtime.process_count):
                raise ValueError(
                    f"batch key {key!r} has {tensor.shape[0]} rows, not divisible by the "
                    f"{runtime.num_devices // runtime.process_count} devices of this host: "
                    "make the per-host batch size a multiple of the device count (pad with weight 0)"
                )
        # With several hosts each loader yields its own rows; minibatch=True assembles the global batch.
        return {
            key: xs.ShardingSpec(
                runtime.mesh, (DATA_AXIS,) + (None,) * (tensor.dim() - 1), minibatch=runtime.process_count > 1
            )
            for key, tensor in batch.items()
        }
