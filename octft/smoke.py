"""`octft smoke [--devices N]`: train a micro model for two short epochs on a tiny synthetic release.

The first command to run on a new VM, after `octft doctor`: it goes through every layer a real run
uses (synthetic DICOMs -> audit -> cache -> model -> runtime -> fit -> MLflow) in a temporary folder
and prints the device layout, samples/s and compile seconds. It leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from octft.config import load_experiment
from octft.data.synth import synthesize
from octft.errors import UsageError
from octft.track.mlflow_store import MlflowStore
from octft.train import devices
from octft.train.recipe import train

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "experiments" / "smoke.yaml"
PARTICIPANTS = 48


@dataclass
class SmokeResult:
    status: str
    epochs_run: int
    samples_per_second: float
    compiles: int
    compile_seconds: float
    params: dict[str, str]  # the run's layout params (runtime.num_devices, ...)


def select_devices(count: int | None, environ: dict[str, str] | None = None) -> None:
    """Limit this process to `count` devices; must run before torch_xla starts.

    XLA:CPU (PJRT_DEVICE=CPU, or no accelerator at all): `count` CPU devices. TPU: the first `count`
    chips, as a sweep worker would give them to one trial.
    """
    environ = os.environ if environ is None else environ
    if count is None:
        return
    platform = devices.platform(environ)
    if platform == "TPU":
        if count < len(devices.local_tpu_chips()):
            environ.update(devices.trial_device_env(0, count, {"PJRT_DEVICE": "TPU"}))
        return
    if platform in ("", "CPU"):
        environ["PJRT_DEVICE"] = "CPU"
        environ["CPU_NUM_DEVICES"] = str(count)
        return
    raise UsageError(f"--devices with PJRT_DEVICE={environ.get('PJRT_DEVICE')}: only TPU and XLA:CPU are supported")


def run_smoke(devices: int | None = None, *, overrides: list[str] | None = None) -> SmokeResult:
    select_devices(devices)
    with tempfile.TemporaryDirectory(prefix="octft-smoke-") as folder:
        root = Path(folder)
        config = load_experiment(SMOKE_CONFIG, overrides or [])
        pre = config.data.preprocess
        synthesize(root / "data", participants=PARTICIPANTS, seed=0, frames=pre.frames, height=pre.height, width=pre.width)
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        config = load_experiment(SMOKE_CONFIG, [
            f"data.uri={root / 'data'}", f"data.cache_dir={root / 'cache'}", f"output_dir={root / 'runs'}",
            f"features.dir={root / 'features'}", f"tracking.tracking_uri={tracking_uri}", *(overrides or []),
        ])
        result = train(config, run_dir=root / "runs" / "smoke", progress=False)
        store = MlflowStore(tracking_uri)

        def last(key: str) -> float:
            history = store.metric_history(result.run_id, key)
            return history[-1][1] if history else float("nan")

        params = store.run(result.run_id).params
        return SmokeResult(
            status=result.status, epochs_run=result.epochs_run,
            samples_per_second=last("perf/samples_per_second"), compiles=int(last("xla/compiles")),
            compile_seconds=last("xla/compile_seconds"),
            params={key: value for key, value in params.items() if key.startswith("runtime.num")
                    or key in ("train.effective_batch_size", "runtime.micro_batch_per_device",
                               "runtime.accumulation_steps_used")},
        )
