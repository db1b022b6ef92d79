"""The frozen-feature store on the demo config: frozen vs unfrozen epochs, a 50-trial probe study vs one
fine-tune, and the demo sweep with and without the store.

1. Epoch seconds: `octft train experiments/demo.yaml train.unfreeze_epoch=3 train.epochs=6`, with
   `features.enabled=false` and `true`, each in its own process; per epoch seconds as the run logs them
   (`perf/epoch_seconds`). Goal: a frozen epoch after the first costs at most 25% of an unfrozen one.
   Plus the same ratio from FLOPs for ViT-B on 16 x 224 x 224 (forward = F, training step = 3F; a frozen
   epoch without the store costs F per sample, with it only the head).
2. A probe study (`octft sweep launch sweeps/probe.yaml`, N trials, with 1 and with 2 processes) against
   one demo fine-tune run (`octft train experiments/demo.yaml`, store off, data-parallel over 2 XLA:CPU
   devices), each its own command timed from start to exit, same data; each probe study builds its store.
3. The demo sweep (`sweeps/demo.yaml`, K trials of E epochs, 2 warm workers) with the store off and on:
   wall time of the launch, best value. Defaults K=4, E=6 (about 5 minutes on a quiet 2-core machine).

    .venv/bin/python benchmarks/bench_features.py                         # all three
    .venv/bin/python benchmarks/bench_features.py --parts epochs probe --probe-trials 50
    .venv/bin/python benchmarks/bench_features.py --parts sweep --sweep-trials 4 --sweep-epochs 6
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_sweep import cache_bytecode  # noqa: E402  (a sibling script)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=96, help="synthetic participants (default 96, as the demo)")
    parser.add_argument("--parts", nargs="+", choices=["epochs", "probe", "heads", "sweep"],
                        default=["epochs", "probe", "heads", "sweep"])
    parser.add_argument("--probe-trials", type=int, default=50)
    parser.add_argument("--sweep-trials", type=int, default=4)
    parser.add_argument("--sweep-epochs", type=int, default=6, help="epochs per sweep trial (above the unfreeze range 0..4)")
    parser.add_argument("--devices", type=int, default=2, help="XLA:CPU devices per run (the demo's per trial)")
    parser.add_argument("--dir", type=Path, default=None, help="where data, cache and runs go (default: a temp dir)")
    return parser.parse_args()


def prepare(root: Path, participants: int) -> list[str]:
    """Synthetic data in the demo's shape and its cache; returns the overrides that point a run at them."""
    from octft.config import load_experiment
    from octft.data.audit import audit_dataset
    from octft.data.dataset import prepare_volumes
    from octft.data.synth import synthesize

    pre = load_experiment(DEMO).data.preprocess
    if not (root / "data" / "synth_report.json").is_file():
        synthesize(root / "data", participants=participants, seed=0, frames=pre.frames, height=pre.height,
                   width=pre.width, progress=False)
    report = audit_dataset(str(root / "data"))
    prepare_volumes(str(root / "data"), report.volumes, cache_dir=str(root / "cache"), frames=pre.frames,
                    height=pre.height, width=pre.width, progress=False)
    return [f"data.uri={root / 'data'}", f"data.cache_dir={root / 'cache'}", f"features.dir={root / 'features'}"]


def env(devices: int, root: Path) -> dict[str, str]:
    return dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), PYTHONPATH=str(REPO),
                MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")


def octft(args: list[str], devices: int, root: Path) -> float:
    """`octft <args>` in its own process, output kept out of the tables; its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "octft.cli", *args], env=env(devices, root), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"octft {' '.join(args[:2])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def train_run(root: Path, name: str, overrides: list[str], devices: int) -> tuple[float, list[dict]]:
    """`octft train` in its own process; (wall seconds, per-epoch metrics read back from MLflow)."""
    from mlflow.tracking import MlflowClient

    run_dir = root / "runs" / name
    wall = octft(["train", str(DEMO), *overrides, f"output_dir={root / 'runs'}", f"tracking.run_name={name}"],
                 devices, root)
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    series = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
              for key in ("perf/epoch_seconds", "train/encoder_trainable", "train/on_features", "val/balanced_accuracy")}
    epochs = sorted(series["perf/epoch_seconds"])
    return wall, [{key: series[key].get(epoch) for key in series} | {"epoch": epoch} for epoch in epochs]


def part_epochs(root: Path, base: list[str], devices: int) -> None:
    print("\n## 1. Epoch seconds (demo config, unfreeze_epoch=3, 6 epochs, XLA:CPU x"
          f"{devices})\n\n| store | epoch | encoder | on features | seconds |\n| --- | --- | --- | --- | --- |")
    summary = {}
    for store in ("false", "true"):
        _, epochs = train_run(root, f"epochs-store-{store}",
                              [*base, "train.unfreeze_epoch=3", "train.epochs=6", "train.early_stopping_patience=null",
                               f"features.enabled={store}"], devices)
        for row in epochs:
            print(f"| {'on' if store == 'true' else 'off'} | {row['epoch']} | "
                  f"{'trainable' if row['train/encoder_trainable'] else 'frozen'} | "
                  f"{'yes' if row['train/on_features'] else 'no'} | {row['perf/epoch_seconds']:.2f} |")
        frozen_later = [r["perf/epoch_seconds"] for r in epochs if not r["train/encoder_trainable"] and r["epoch"] > 0]
        unfrozen_later = [r["perf/epoch_seconds"] for r in epochs if r["train/encoder_trainable"] and r["epoch"] > 3]
        summary[store] = (statistics.median(frozen_later), statistics.median(unfrozen_later))
    print("\n| store | frozen epoch s (median, after the first) | unfrozen epoch s (median, after the first) | ratio |")
    print("| --- | --- | --- | --- |")
    for store, (frozen, unfrozen) in summary.items():
        print(f"| {'on' if store == 'true' else 'off'} | {frozen:.2f} | {unfrozen:.2f} | {frozen / unfrozen:.1%} |")

    from octft.models import build_encoder, encoder_flops_per_sample
    from octft.models.heads import build_head

    encoder = build_encoder("vit_base", img_size=224, num_frames=16)
    forward = encoder_flops_per_sample(encoder, 16, 224, 224)
    head = build_head("mlp", 768, 4, hidden_features=256)
    head_flops = 3 * 2 * sum(p.numel() for p in head.parameters() if p.ndim == 2)  # train step, one sample
    print(f"\nViT-B 16x224x224 from FLOPs: unfrozen step 3F = {3 * forward / 1e9:.0f} GFLOP/sample; frozen without the "
          f"store F = {forward / 1e9:.0f} ({1 / 3:.0%}); frozen on stored pooled features (MLP head) "
          f"{head_flops / 1e6:.2f} MFLOP/sample ({head_flops / (3 * forward):.1e} of unfrozen)")


def part_probe(root: Path, base: list[str], trials: int, devices: int) -> None:
    import optuna

    wall_finetune, epochs = train_run(root, "finetune-reference", [*base, "features.enabled=false"], devices)
    best_finetune = max(r["val/balanced_accuracy"] for r in epochs)
    rows = []
    for workers in (1, 2):
        # A study left by an earlier run in the same --dir would be resumed (nothing left to do): start afresh.
        for old in (root / f"probe-optuna-{workers}.db", root / f"probe-features-{workers}", root / f"runs-probe-{workers}"):
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        storage = f"sqlite:///{root / f'probe-optuna-{workers}.db'}"
        probe_features = f"features.dir={root / f'probe-features-{workers}'}"  # its own store: the study builds it
        wall_probe = octft(["sweep", "launch", str(REPO / "sweeps" / "probe.yaml"), "--storage", storage,
                            "--workers", str(workers), f"n_trials={trials}", *base, probe_features,
                            f"output_dir={root / f'runs-probe-{workers}'}",
                            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"], devices, root)
        study = optuna.load_study(study_name="demo-probe", storage=storage)
        states = [t.state.name for t in study.trials]
        rows.append((workers, wall_probe, study.best_value, states.count("COMPLETE"), states.count("PRUNED")))
    print(f"\n## 2. Probe study vs one fine-tune ({trials} probe trials, same data, each command its own process)\n")
    print("| what | wall s | best val balanced accuracy | trials (complete / pruned) |\n| --- | --- | --- | --- |")
    print(f"| one demo fine-tune run (`octft train experiments/demo.yaml`, store off, {devices} XLA:CPU devices) | "
          f"{wall_finetune:.1f} | {best_finetune:.3f} | 1 |")
    for workers, wall_probe, best, complete, pruned in rows:
        print(f"| `octft sweep launch sweeps/probe.yaml --workers {workers} n_trials={trials}` (incl. building the "
              f"store; {workers} process{'es' if workers > 1 else ''}) | {wall_probe:.1f} | {best:.3f} | "
              f"{complete} / {pruned} |")


def part_heads(root: Path, base: list[str], heads: int) -> None:
    """The heads-only phase of a probe study: `heads` configs drawn from sweeps/probe.yaml's space, trained on the
    demo encoder's stored features one at a time by `fit()` and in stacked passes by `fit_heads()`, in this process,
    with no tracker or reporter (what the phase itself costs; the study's bookkeeping is in part 2)."""
    import optuna
    import torch

    from octft.config import load_experiment
    from octft.data.layout import CLASS_SHORT_NAMES
    from octft.sweep.space import suggest
    from octft.sweep.spec import load_sweep
    from octft.track import NullTracker
    from octft.train.loop import fit
    from octft.train.recipe import pass_key
    from octft.train.runtime import make_runtime
    from octft.train.setup import RunCache, class_weights_for
    from octft.train.stacked import HeadRun, fit_heads

    spec = load_sweep(REPO / "sweeps" / "probe.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cfgs = [load_experiment(spec.base, [*spec.trial_overrides(suggest(study.ask(), spec.space)), *base,
                                        f"features.dir={root / 'heads-features'}"]) for _ in range(heads)]
    assert len({pass_key(cfg) for cfg in cfgs}) == 1
    cache, runtime = RunCache(), make_runtime("cpu")
    setup = cache.data(cfgs[0].data, progress=False)
    train_set, val_set = setup.prepared.run_datasets(cfgs[0].data.inner_val_fraction, cfgs[0].data.split.seed)
    features = cache.features(cfgs[0], cache.model(cfgs[0], trains_encoder=False)[0], train_set, val_set, runtime)
    weights = class_weights_for(cfgs[0], train_set)
    epochs = sum(cfg.train.epochs for cfg in cfgs)

    def models():
        return [cache.model(cfg, trains_encoder=False)[0] for cfg in cfgs]

    def one_at_a_time(folder: Path) -> list[float]:
        values = []
        for k, (cfg, model) in enumerate(zip(cfgs, models())):
            result = fit(model, train_set, val_set, runtime=runtime, tracker=NullTracker(), class_names=CLASS_SHORT_NAMES,
                         epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                         accumulation_steps=cfg.train.accumulation_steps, unfreeze_epoch=None, lr_head=cfg.optim.lr_head,
                         lr_encoder=cfg.optim.lr_encoder, weight_decay=cfg.optim.weight_decay,
                         label_smoothing=cfg.loss.label_smoothing, class_weights=weights, seed=cfg.train.seed,
                         early_stopping_patience=None, run_dir=folder / f"head-{k}", frozen_features=features)
            values.append(result.best_value)
        return values

    def stacked(folder: Path, per_pass: int) -> list[float]:
        values = []
        built = models()
        for start in range(0, len(cfgs), per_pass):
            runs = [HeadRun(model, lr_head=cfg.optim.lr_head, weight_decay=cfg.optim.weight_decay,
                            label_smoothing=cfg.loss.label_smoothing, epochs=cfg.train.epochs,
                            run_dir=folder / f"head-{start + k}", tracker=NullTracker(), log=lambda line: None)
                    for k, (cfg, model) in enumerate(zip(cfgs[start:start + per_pass], built[start:start + per_pass]))]
            results = fit_heads(runs, features, runtime=runtime, class_names=CLASS_SHORT_NAMES,
                                batch_size=cfgs[0].train.batch_size, accumulation_steps=cfgs[0].train.accumulation_steps,
                                class_weights=weights, seed=cfgs[0].train.seed)
            values += [result.best_value for result in results]
        return values

    torch.manual_seed(0)
    rows = []
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # fit()'s epoch lines (807 of them) stay out of the tables
        alone = one_at_a_time(root / "heads-alone")
    rows.append(("one at a time (`fit()`)", time.perf_counter() - started, alone))
    for per_pass in (spec.resolved_heads_per_pass(), heads):
        started = time.perf_counter()
        values = stacked(root / f"heads-stacked-{per_pass}", per_pass)
        rows.append((f"stacked, {per_pass} heads per pass (`fit_heads()`)", time.perf_counter() - started, values))
    print(f"\n## 4. Heads-only phase: {heads} heads of sweeps/probe.yaml's space ({epochs} epochs in all), stored "
          "features, this process, no tracker or reporter\n")
    print("| how | seconds | vs one at a time | max difference of best value from one at a time |\n| --- | --- | --- | --- |")
    for name, seconds, values in rows:
        gap = max(abs(a - b) for a, b in zip(values, alone))
        print(f"| {name} | {seconds:.2f} | {rows[0][1] / seconds:.1f}x | {gap:.1e} |")


def part_sweep(root: Path, base: list[str], trials: int, epochs: int, devices: int) -> None:
    import optuna

    print(f"\n## 3. Demo sweep (`sweeps/demo.yaml`, {trials} trials of {epochs} epochs, 2 warm workers, "
          f"{max(1, devices // 2)} XLA:CPU devices each)\n")
    print("| store | wall s | best value | complete / pruned |\n| --- | --- | --- | --- |")
    for store in ("false", "true"):
        storage = f"sqlite:///{root / f'sweep-{store}.db'}"
        tracking = f"sqlite:///{root / f'sweep-{store}-mlflow.db'}"
        wall = octft(["sweep", "launch", str(REPO / "sweeps" / "demo.yaml"), "--storage", storage, "--workers", "2",
                      "--devices-per-trial", str(max(1, devices // 2)), f"n_trials={trials}",
                      f"fixed.train.epochs={epochs}", *base, f"features.dir={root / f'sweep-features-{store}'}",
                      f"features.enabled={store}", f"mlflow.tracking_uri={tracking}", f"output_dir={root / f'runs-{store}'}"],
                     devices, root)
        study = optuna.load_study(study_name="demo", storage=storage)
        states = [t.state.name for t in study.trials]
        best = study.best_value if states.count("COMPLETE") else float("nan")
        print(f"| {'on' if store == 'true' else 'off'} | {wall:.0f} | {best:.3f} | "
              f"{states.count('COMPLETE')} / {states.count('PRUNED')} |")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as temp:
        root = (args.dir or Path(temp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        # Every timed process reads cached bytecode, as on a user's machine (see bench_sweep.cache_bytecode).
        cache_bytecode(argparse.Namespace(runtime="xla"))
        base = prepare(root, args.participants)
        if "epochs" in args.parts:
            part_epochs(root, base, args.devices)
        if "probe" in args.parts:
            part_probe(root, base, args.probe_trials, args.devices)
        if "heads" in args.parts:
            part_heads(root, base, args.probe_trials)
        if "sweep" in args.parts:
            part_sweep(root, base, args.sweep_trials, args.sweep_epochs, args.devices * 2)
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
