"""System metrics of a run: CPU, memory, disk, network and GPU through MLflow's own monitor, TPU through `tpu-info`.

MLflow's `SystemMetricsMonitor` samples in a background thread and logs `system/...` metrics to the run
while it is RUNNING. On a TPU VM with `tpu-info` installed (the `tpu` extra), each chip's HBM use and duty
cycle are added as `system/tpu_<chip>_memory_usage_megabytes` and `system/tpu_<chip>_duty_cycle_percentage`;
elsewhere the TPU part is skipped without a word.

    >>> monitor = start_system_metrics(run_id, "sqlite:///mlflow.db")   # doctest: +SKIP
    >>> monitor.finish()                                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_SAMPLING_INTERVAL_S = 10.0


def tpu_monitor() -> Any | None:
    """A monitor of this host's TPU chips, or None where `tpu-info` is absent or sees no chip."""
    try:
        from tpu_info import device, metrics
    except ImportError:
        return None
    try:
        chip_type, count = device.get_local_chips()
    except Exception as error:  # libtpu missing or no TPU driver: a machine without TPUs
        logger.debug("tpu-info sees no TPU chips: %s", error)
        return None
    if chip_type is None or not count:
        return None
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

    class TpuMonitor(BaseMetricsMonitor):
        def collect_metrics(self) -> None:
            for usage in metrics.get_chip_usage(chip_type):
                self._metrics[f"tpu_{usage.device_id}_memory_usage_megabytes"].append(usage.memory_usage / 1e6)
                self._metrics[f"tpu_{usage.device_id}_memory_total_megabytes"].append(usage.total_memory / 1e6)
                self._metrics[f"tpu_{usage.device_id}_duty_cycle_percentage"].append(usage.duty_cycle_pct)

        def aggregate_metrics(self) -> dict[str, float]:
            return {name: round(sum(values) / len(values), 1) for name, values in self._metrics.items() if values}

    return TpuMonitor()


def start_system_metrics(run_id: str, tracking_uri: str, *,
                         sampling_interval_s: float = DEFAULT_SAMPLING_INTERVAL_S) -> Any:
    """Start sampling this machine into run `run_id`; call `.finish()` on the result before ending the run."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, tracking_uri=tracking_uri)
    tpu = tpu_monitor()
    if tpu is not None:
        monitor.monitors.append(tpu)
    monitor.start()
    return monitor
