"""Training throughput of the demo config on 1, 4, 8 and 16 XLA:CPU devices and eager CPU, and the
samples/s a TPU host would need.

Synthesizes a small AI-READI stand-in, builds its cache once, then runs
`octft train experiments/demo.yaml` for each runtime in its own process (SPMD is a once-per-process
switch) and prints, per runtime: steady samples/second (median over the epochs after the encoder
is unfrozen, so no compile is inside), XLA compile count and seconds, wall seconds, and the peak
resident memory of the training process (ru_maxrss). Last, the forward FLOPs per sample of a
ViT-B on 16x224x224 as `octft.models.encoder_flops_per_sample` counts them, with how to turn a
measured TPU samples/second into a model FLOPs utilisation, and the samples/s a v4-8, v5e-8 and v5p-8
host must be fed to stay at 50% utilisation (compare with the input side's samples/s per host).

Every run uses Scenario A's batch layout (train.batch_size 4 x train.accumulation_steps 4 = 16 rows per
optimizer step), which every device count here divides; the runtime picks micro-batches per device
and accumulation steps, so the runs differ only in layout.

XLA on CPU says whether the graphs are stable and how long they take to compile, not how fast a
TPU is: compare samples/second between runtimes of one machine only.

    .venv/bin/python benchmarks/bench_train.py                 # defaults: about 10 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py --participants 96 --epochs 6 --runtimes xla4 xla16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from octft.train.devices import TPU_CHIPS

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
# name -> (runtime.kind, extra environment)
RUNTIMES = {
    **{f"xla{n}": ("xla", {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(n)}) for n in (1, 4, 8, 16)},
    "eager": ("cpu", {}),
}
LAYOUT = ["train.batch_size=4", "train.accumulation_steps=4"]  # Scenario A: 16 rows per optimizer step
# TPU hosts a user rents: name -> (chip, chips per host). The -8 suffix counts TensorCores: v4 and v5p
# chips hold two, v5e chips one.
TPU_HOSTS = {"v4-8": ("v4", 4), "v5e-8": ("v5e", 8), "v5p-8": ("v5p", 4)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=48, help="synthetic participants (default 48)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run; the demo unfreezes at 2 (default 5)")
    parser.add_argument("--runtimes", nargs="+", choices=sorted(RUNTIMES), default=["eager", "xla1", "xla4", "xla8", "xla16"])
    parser.add_argument("--dir", type=Path, default=None, help="where data, cache and runs go (default: a temp dir)")
    parser.add_argument("--skip-flops", action="store_true", help="do not count ViT-B FLOPs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for every run")
    return parser.parse_args()


def prepare(root: Path, participants: int) -> tuple[Path, Path]:
    """Synthetic data in the demo's shape and its cache, so the timed runs only train."""
    from octft.config import load_experiment
    from octft.data.audit import audit_dataset
    from octft.data.dataset import prepare_volumes
    from octft.data.synth import synthesize

    pre = load_experiment(DEMO).data.preprocess
    data_dir, cache_dir = root / "data", root / "cache"
    synthesize(data_dir, participants=participants, seed=0, frames=pre.frames, height=pre.height, width=pre.width)
    report = audit_dataset(str(data_dir))
    prepare_volumes(str(data_dir), report.volumes, cache_dir=str(cache_dir), frames=pre.frames, height=pre.height,
                    width=pre.width, intensity=pre.intensity, progress=False)
    return data_dir, cache_dir


def run_training(name: str, root: Path, data_dir: Path, cache_dir: Path, epochs: int, overrides: list[str]) -> dict:
    """One `octft train` process; its figures read back from MLflow, its peak memory from wait4."""
    kind, env = RUNTIMES[name]
    run_dir, db = root / "runs" / name, root / f"{name}.db"
    command = [sys.executable, "-m", "octft.cli", "train", str(DEMO), f"data.uri={data_dir}",
               f"data.cache_dir={cache_dir}", f"runtime.kind={kind}", f"output_dir={run_dir.parent}",
               f"train.epochs={epochs}", "train.early_stopping_patience=null", *LAYOUT, *overrides,
               "--run-dir", str(run_dir), "--tracking-uri", f"sqlite:///{db}"]
    log = root / f"{name}.log"
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over all children).
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} run failed; see {log}:\n" + log.read_text()[-3000:])

    from mlflow.tracking import MlflowClient

    from octft.config import load_experiment

    client = MlflowClient(f"sqlite:///{db}")
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    unfreeze = load_experiment(DEMO, overrides).train.unfreeze_epoch
    speeds = history("perf/samples_per_second")
    steady = speeds[unfreeze + 1 :] or speeds[-1:]  # epochs that compile nothing new
    return {
        "runtime": name,
        "devices": env.get("CPU_NUM_DEVICES", "1"),
        "samples_per_second": statistics.median(steady),
        "compiles": int(history("xla/compiles")[-1]),
        "compile_seconds": history("xla/compile_seconds")[-1],
        "wall_seconds": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
    }


def vit_b_flops() -> int:
    import torch

    from octft.models import build_encoder, encoder_flops_per_sample

    with torch.device("meta"):  # shapes only: nothing is allocated
        encoder = build_encoder("vit_base", img_size=224, num_frames=16)
    return encoder_flops_per_sample(encoder, 16, 224, 224)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as temp:
        root = args.dir or Path(temp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data_dir, cache_dir = prepare(root, args.participants)
        print(f"data and cache: {time.perf_counter() - started:.1f} s ({args.participants} participants)")
        rows = [run_training(name, root, data_dir, cache_dir, args.epochs, args.overrides) for name in args.runtimes]

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; demo config, {' '.join(LAYOUT)}, {args.epochs} epochs, "
          f"{' '.join(args.overrides)}")
    header = f"{'runtime':<8}{'devices':>8}{'samples/s':>11}{'compiles':>10}{'compile s':>11}{'wall s':>9}{'peak RSS MiB':>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['runtime']:<8}{row['devices']:>8}{row['samples_per_second']:>11.1f}{row['compiles']:>10d}"
              f"{row['compile_seconds']:>11.1f}{row['wall_seconds']:>9.1f}{row['peak_rss_mib']:>14.0f}")

    if not args.skip_flops:
        flops = vit_b_flops()
        print(f"\nViT-B, 16x224x224: {flops / 1e9:.1f} GFLOP forward per sample, ~{3 * flops / 1e9:.0f} GFLOP "
              "per training sample (forward + backward ~ 3x forward)")
        print("MFU = samples/s per chip x training FLOPs per sample / chip peak. Samples/s per chip at 50% MFU:")
        for chip in TPU_CHIPS.values():
            print(f"  TPU {chip.kind:<4} (bf16 peak {chip.peak_bf16_tflops:5.0f} TFLOP/s): "
                  f"{0.5 * chip.peak_bf16_tflops * 1e12 / (3 * flops):7.1f}")
        print("\nWhat one host must be fed to stay at 50% MFU (ViT-B 16x224x224 training samples):")
        print(f"{'host':<8}{'chips':>6}{'HBM GiB/chip':>14}{'samples/s needed':>18}{'s per 1,000 samples':>22}")
        for host, (kind, chips) in TPU_HOSTS.items():
            chip = next(c for c in TPU_CHIPS.values() if c.kind == kind)
            needed = chips * 0.5 * chip.peak_bf16_tflops * 1e12 / (3 * flops)
            print(f"{host:<8}{chips:>6}{chip.hbm_gib:>14}{needed:>18.0f}{1000 / needed:>22.1f}")


if __name__ == "__main__":
    main()
