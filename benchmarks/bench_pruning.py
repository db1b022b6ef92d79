"""What pruning saves on the demo sweep: CollapsePruner around median, median alone, and no pruning.

The demo sweep's space (sweeps/demo.yaml) reaches lr_head 1e-1, where the head collapses onto one class.
This draws `--trials` param sets once with a seeded RandomSampler and enqueues the same list, in the
same order, in three studies that differ only in their pruner:

  collapse+median  the demo's pruner (CollapsePruner wrapping MedianPruner)
  median           pruner.collapse.enabled=false: MedianPruner alone
  none             pruner.collapse.enabled=false pruner.wrapped.type=none: nothing is pruned

Each study runs through `octft.sweep.launch.launch` with one worker, its own Optuna and MLflow sqlite files, and
synthetic data (and preprocessing cache) shared by all three. The sweep and experiment YAMLs are copied
first: every trial process rereads them, so an edit of the repo's files mid-run would change the settings. Training is seeded (train.seed), so a
trial's epochs are the same in every setting until it is pruned. Per setting it prints trials by state,
epochs spent (sum of epochs_run), wall time, the best value and how long after the launch its trial
completed, and why trials were pruned; then each trial's outcome side by side. The demo's early stopping
(patience 6) stays on in every setting. Last, the no-pruning trials are replayed (`replay`) under the sweep's
pruner: first the settings that ran, as a check that the replay spends the epochs they spent, then a grid of the
collapse rule's grace and patience against the wrapped pruner's warm-up.

`--pretrained-encoder` fine-tunes from a pretrained encoder, as the original pipeline did, instead of the demo's
randomly initialised one. The micro encoder is first trained once on a separate synthetic release (another seed,
class-weighted loss, the encoder trainable from epoch 0); its weights at the best validation epoch are written as
a checkpoint that `model.checkpoint` loads, and every trial of every setting starts from it. The space's encoder
learning rates become a pretrained encoder's (PRETRAINED_SPACE), and the collapse rule takes the settings of the
shipped sweep for a pretrained encoder (sweeps/scenario_a.yaml).

    .venv/bin/python benchmarks/bench_pruning.py                    # defaults: ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_pruning.py --trials 4 --epochs 6 --participants 48  # ~5 min
    .venv/bin/python benchmarks/bench_pruning.py --runtime xla      # XLA:CPU, one device per trial
    .venv/bin/python benchmarks/bench_pruning.py --pretrained-encoder --collapse-prone --participants 96  # ~2 min
    .venv/bin/python benchmarks/bench_pruning.py --pretrained-encoder --collapse-prone --class-signal 0.5 --settings none
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "sweeps" / "demo.yaml"
EXPERIMENT = REPO / "experiments" / "demo.yaml"
# setting -> sweep overrides that choose its pruner
SETTINGS = {
    "collapse+median": [],
    "median": ["pruner.collapse.enabled=false"],
    "none": ["pruner.collapse.enabled=false", "pruner.wrapped.type=none"],
}
# --collapse-prone: the original pipeline lost most participants of some classes to its ID regex and trained an
# unweighted loss, so its head learnt to predict the class that dominated training.
COLLAPSE_PRONE_SHARE = 0.7
COLLAPSE_PRONE_OVERRIDES = ["fixed.loss.class_weights=none"]
# --pretrained-encoder: the pretraining release and run. Its data seed differs from the benchmark's (0), so its
# images are drawn anew (participant IDs are numbered the same way in every synthetic release).
PRETRAIN_PARTICIPANTS = 160
PRETRAIN_EPOCHS = 24
PRETRAIN_SEED = 1
# A pretrained encoder is moved with small learning rates; the head's range (the demo's, 1e-4..1e-1) keeps the
# rates at which it collapses.
PRETRAINED_SPACE = ["space.optim.lr_encoder.low=1e-6", "space.optim.lr_encoder.high=1e-3"]
PRETRAINED_PRUNER_SWEEP = REPO / "sweeps" / "scenario_a.yaml"
SHOWN_PARAMS = {"optim.lr_head": "lr_head", "optim.lr_encoder": "lr_enc", "train.unfreeze_epoch": "unfreeze"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per setting (default 8)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per trial, fixed.train.epochs (default: the demo sweep's)")
    parser.add_argument("--participants", type=int, default=64, help="synthetic participants (default 64)")
    parser.add_argument("--collapse-prone", action="store_true",
                        help=f"data and loss that collapse the way the original pipeline did: the training split "
                             f"{COLLAPSE_PRONE_SHARE * 100:.0f}%% one class (--majority-share) and loss.class_weights=none")
    parser.add_argument("--majority-share", type=float, default=COLLAPSE_PRONE_SHARE,
                        help=f"with --collapse-prone: the first class's share of the training split (default "
                             f"{COLLAPSE_PRONE_SHARE})")
    parser.add_argument("--class-signal", type=float, default=1.0,
                        help="how far the classes' retinas sit apart in the benchmark's data, 0..1 (synthesize's "
                             "class_signal; default 1: as the demo draws them); the pretraining release keeps 1")
    parser.add_argument("--pretrained-encoder", action="store_true",
                        help=f"first pretrain the micro encoder ({PRETRAIN_PARTICIPANTS} other participants, "
                             f"{PRETRAIN_EPOCHS} epochs) and fine-tune every trial from it, with a pretrained encoder's "
                             f"learning rates and the collapse settings of {PRETRAINED_PRUNER_SWEEP.name}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the RandomSampler that draws the params (default 0)")
    parser.add_argument("--runtime", choices=["cpu", "xla"], default="cpu",
                        help="runtime.kind of every trial: cpu (eager, default) or xla (XLA:CPU, PJRT_DEVICE=CPU)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="which pruning settings to run (default: all three)")
    parser.add_argument("--dir", type=Path, default=None, help="where data, databases and runs go (default: a temp dir)")
    args = parser.parse_args()
    if args.trials < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error(f"--trials ({args.trials}) and --epochs ({args.epochs}) must be at least 1")
    if not 0.0 <= args.class_signal <= 1.0:
        parser.error(f"--class-signal {args.class_signal} must be in 0..1")
    if args.majority_share != COLLAPSE_PRONE_SHARE and not args.collapse_prone:
        parser.error("--majority-share shapes the collapse-prone data: pass --collapse-prone with it")
    return args


def prepare(root: Path, experiment: Path, participants: int, train_majority_share: float | None,
            seed: int = 0, class_signal: float = 1.0) -> tuple[Path, Path]:
    """Synthetic data in the experiment's shape and its cache under `root`, built once so that no setting pays for it."""
    from octft.config import load_experiment
    from octft.data.audit import audit_dataset
    from octft.data.dataset import prepare_volumes
    from octft.data.synth import synthesize

    pre = load_experiment(experiment).data.preprocess
    data_dir, cache_dir = root / "data", root / "cache"
    synthesize(data_dir, participants=participants, seed=seed, frames=pre.frames, height=pre.height, width=pre.width,
               train_majority_share=train_majority_share, class_signal=class_signal)
    report = audit_dataset(str(data_dir))
    prepare_volumes(str(data_dir), report.volumes, cache_dir=str(cache_dir), frames=pre.frames, height=pre.height,
                    width=pre.width, intensity=pre.intensity, progress=False)
    return data_dir, cache_dir


@dataclass
class Pretraining:
    checkpoint: Path
    best_epoch: int | None
    best_value: float
    epochs: int
    seconds: float


def pretrain_encoder(root: Path, experiment: Path, participants: int = PRETRAIN_PARTICIPANTS,
                     epochs: int = PRETRAIN_EPOCHS, seed: int = PRETRAIN_SEED) -> Pretraining:
    """Train the experiment's encoder (from scratch) and a head on a synthetic release of its own under `root`, with
    balanced class weights and the encoder trainable from epoch 0, and write the encoder's weights at the best
    validation epoch to `root/encoder.pt` under the entry name a V-JEPA checkpoint uses ({"encoder": state dict}),
    which `model.checkpoint` finds without a `model.checkpoint_key`.

        >>> pretrain_encoder(Path("/tmp/pretrain"), EXPERIMENT).checkpoint        # doctest: +SKIP
        PosixPath('/tmp/pretrain/encoder.pt')
    """
    import torch

    from octft.config import load_experiment
    from octft.track import NullTracker
    from octft.train.recipe import train

    started = time.perf_counter()
    data_dir, cache_dir = prepare(root, experiment, participants, None, seed=seed)
    cfg = load_experiment(experiment, [
        f"data.uri={data_dir}", f"data.cache_dir={cache_dir}", "model.checkpoint=scratch", f"train.epochs={epochs}",
        "train.unfreeze_epoch=0", "train.early_stopping_patience=null", f"train.seed={seed}",
        "loss.class_weights=balanced", "runtime.kind=cpu", f"output_dir={root / 'runs'}",
        f"features.dir={root / 'features'}",
    ])
    result = train(cfg, tracker=NullTracker(), progress=False)
    model_state = torch.load(result.run_dir / "checkpoint" / "best.pt", map_location="cpu", weights_only=True)["model"]
    encoder_state = {name.removeprefix("encoder."): tensor for name, tensor in model_state.items()
                     if name.startswith("encoder.")}
    checkpoint = root / "encoder.pt"
    torch.save({"encoder": encoder_state, "epoch": result.best_epoch}, checkpoint)
    return Pretraining(checkpoint=checkpoint, best_epoch=result.best_epoch, best_value=result.best_value,
                       epochs=result.epochs_run, seconds=time.perf_counter() - started)


def pretrained_overrides(checkpoint: Path) -> list[str]:
    """Sweep overrides of `--pretrained-encoder`: the checkpoint, a pretrained encoder's learning rates, and the
    collapse settings of the shipped sweep for a pretrained encoder."""
    import yaml

    collapse = yaml.safe_load(PRETRAINED_PRUNER_SWEEP.read_text())["pruner"]["collapse"]
    return [f"fixed.model.checkpoint={checkpoint}", *PRETRAINED_SPACE,
            *(f"pruner.collapse.{key}={value}" for key, value in collapse.items())]


def empty_root(given: Path | None, temp: str) -> Path:
    """Where a benchmark writes: `--dir` (made if missing, refused unless empty) or the temp folder."""
    root = (given or Path(temp)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise SystemExit(f"--dir {root} is not empty (an earlier run?); pass an empty folder or leave --dir out")
    return root


def copy_specs(root: Path) -> Path:
    """The demo sweep and experiment under `root`, the sweep pointing at the copy; returns the sweep's path."""
    import yaml

    (root / "experiments").mkdir()
    (root / "sweeps").mkdir()
    shutil.copyfile(EXPERIMENT, root / "experiments" / "demo.yaml")
    tree = yaml.safe_load(SPEC.read_text())
    tree["base"] = str(root / "experiments" / "demo.yaml")
    spec = root / "sweeps" / "demo.yaml"
    spec.write_text(yaml.safe_dump(tree, sort_keys=False))
    return spec


def draw_params(spec_path: Path, trials: int, seed: int, overrides: list[str]) -> list[dict[str, Any]]:
    """`trials` param sets of the demo space (after `overrides`) from a seeded RandomSampler: the list every setting
    runs."""
    import optuna

    from octft.sweep.space import suggest
    from octft.sweep.spec import load_sweep

    space = load_sweep(spec_path, overrides).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [suggest(study.ask(), space) for _ in range(trials)]


@dataclass
class SettingResult:
    name: str
    counts: Counter
    epochs: int
    wall_s: float
    best_value: float | None
    best_trial: int | None
    best_after_s: float | None
    prune_reasons: Counter  # "collapse@3" -> count
    outcomes: dict[int, str]  # trial number -> short outcome
    load: tuple[float, float]  # 1-minute load average before and after
    trials: list  # the study's FrozenTrials
    study_name: str
    storage: str


def run_setting(name: str, root: Path, spec_path: Path, params: list[dict[str, Any]], args: argparse.Namespace,
                data_dir: Path, cache_dir: Path, mode_overrides: list[str]) -> SettingResult:
    """One study with its own databases: enqueue `params`, launch one worker, read the trials back."""
    import optuna
    from optuna.trial import TrialState

    from octft.sweep.launch import launch
    from octft.sweep.records import trial_record

    directory = root / name.replace("+", "_")
    directory.mkdir(parents=True)
    storage = f"sqlite:///{directory / 'optuna.db'}"
    study_name = f"bench-pruning-{name}"
    # Created and filled before launch: launch loads it (load_if_exists) and the worker takes waiting trials first.
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
    for trial_params in params:
        study.enqueue_trial(trial_params)
    overrides = [
        f"study_name={study_name}", f"mlflow.tracking_uri=sqlite:///{directory / 'mlflow.db'}",
        f"fixed.train.epochs={args.epochs}", *mode_overrides, *SETTINGS[name],
        f"data.uri={data_dir}", f"data.cache_dir={cache_dir}", f"runtime.kind={args.runtime}",
        f"output_dir={directory / 'runs'}", f"features.dir={directory / 'features'}",
    ]
    load_before = os.getloadavg()[0]
    shown = SETTINGS[name] or "none (the sweep's pruner)"
    print(f"\n== {name}: {len(params)} trials, {args.epochs} epochs, pruner overrides {shown}", flush=True)
    started = time.time()
    result = launch(spec_path, n_trials=len(params), workers=1, storage=storage, overrides=overrides)
    wall = time.time() - started
    if any(result.worker_exit_codes):
        raise SystemExit(f"{name}: worker exited with {result.worker_exit_codes}; see {result.study_dir}")

    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    counts = Counter(trial.state.name for trial in trials)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    best = max(complete, key=lambda trial: trial.value) if complete else None
    prune_reasons: Counter = Counter()
    outcomes = {}
    for trial in trials:
        outcome = trial_record(trial).outcome
        epochs_run = outcome.epochs_run if outcome else None
        if trial.state == TrialState.PRUNED:
            prune_reasons[f"{outcome.prune_reason}@{outcome.prune_epoch}"] += 1
            outcomes[trial.number] = f"P {outcome.prune_reason} ({epochs_run})"
        elif trial.state == TrialState.COMPLETE:
            outcomes[trial.number] = f"{trial.value:.3f} ({epochs_run})"
        else:
            outcomes[trial.number] = trial.state.name
    best_after = None
    if best is not None:
        # Optuna stores naive local datetimes, which .timestamp() reads as local time.
        best_after = best.datetime_complete.timestamp() - started
    return SettingResult(
        name=name, counts=counts, wall_s=wall,
        epochs=sum(record.outcome.epochs_run or 0 for record in map(trial_record, trials) if record.outcome),
        best_value=None if best is None else best.value, best_trial=None if best is None else best.number,
        best_after_s=best_after, prune_reasons=prune_reasons, outcomes=outcomes,
        load=(load_before, os.getloadavg()[0]), trials=trials, study_name=study_name, storage=storage,
    )


def print_report(results: list[SettingResult], params: list[dict[str, Any]], args: argparse.Namespace,
                 pruner: dict[str, Any], pretraining: Pretraining | None) -> None:
    print(f"\nmachine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    data = (f"collapse-prone data (training split {args.majority_share:.0%} one class, {' '.join(COLLAPSE_PRONE_OVERRIDES)})"
            if args.collapse_prone else "the demo's data")
    encoder = "the demo's randomly initialised micro encoder"
    if pretraining is not None:
        encoder = (f"a micro encoder pretrained on {PRETRAIN_PARTICIPANTS} other synthetic participants (data and train "
                   f"seed {PRETRAIN_SEED}, balanced class weights, {pretraining.epochs} epochs, its best epoch "
                   f"{pretraining.best_epoch} at validation balanced accuracy {pretraining.best_value:.3f}, "
                   f"{pretraining.seconds:.0f} s), space {' '.join(PRETRAINED_SPACE)}")
    if args.class_signal != 1.0:
        data += f", class signal {args.class_signal}"
    print(f"demo sweep on {data}, from {encoder}; {len(params)} trials x {args.epochs} epochs, {args.participants} "
          f"participants, runtime.kind={args.runtime}, 1 worker; params from RandomSampler(seed={args.seed}), the same "
          "in every setting")
    print("pruner: " + "; ".join(f"{section} " + ", ".join(f"{k}={v}" for k, v in values.items())
                                 for section, values in pruner.items()))
    header = (f"{'setting':<16}{'complete':>9}{'pruned':>7}{'fail':>5}{'epochs':>7}{'wall s':>8}{'best':>7}"
              f"{'trial':>6}{'best at s':>10}{'load':>11}  pruned (reason@epoch)")
    print(header)
    print("-" * len(header))
    full = max((result.epochs for result in results if result.name == "none"), default=None)
    for r in results:
        best = "-" if r.best_value is None else f"{r.best_value:.3f}"
        best_at = "-" if r.best_after_s is None else f"{r.best_after_s:.0f}"
        reasons = ", ".join(f"{reason} x{count}" for reason, count in sorted(r.prune_reasons.items())) or "-"
        epochs = f"{r.epochs}"
        print(f"{r.name:<16}{r.counts['COMPLETE']:>9}{r.counts['PRUNED']:>7}{r.counts['FAIL']:>5}{epochs:>7}"
              f"{r.wall_s:>8.0f}{best:>7}{'-' if r.best_trial is None else r.best_trial:>6}{best_at:>10}"
              f"{r.load[0]:>5.1f}->{r.load[1]:<4.1f}  {reasons}")
    if full:
        print("epochs relative to no pruning: " + ", ".join(f"{r.name} {r.epochs / full:.0%}" for r in results))

    print("\nper trial: value at best epoch (epochs run), or P <reason> (epochs run)")
    names = [r.name for r in results]
    head = f"{'trial':<6}" + "".join(f"{label:>10}" for label in SHOWN_PARAMS.values()) + "".join(f"  {n:<18}" for n in names)
    print(head)
    for number, trial_params in enumerate(params):
        cells = "".join(f"{_short(trial_params[key]):>10}" for key in SHOWN_PARAMS)
        print(f"{number:<6}{cells}" + "".join(f"  {r.outcomes.get(number, '-'):<18}" for r in results))


def replay_stop_rules(results: list[SettingResult], spec_path: Path, overrides: list[str]) -> None:
    """The no-pruning trials replayed (`octft.sweep.pruners.replay`): first under the settings that ran, as a check that
    the replay spends the epochs they spent and reaches their best; then `octft sweep stop-rules`'s grid of the sweep's
    collapse rule and wrapped pruner at other grace, patience and warm-up settings."""
    import optuna

    from octft.sweep.pruners import build_pruner, replay
    from octft.sweep.spec import load_sweep
    from octft.sweep.status import format_stop_rules

    print("\nthe no-pruning trials replayed under each setting that ran (check): epochs, best value replayed / run")
    unpruned = next(result for result in results if result.name == "none")
    for result in results:
        again = replay(unpruned.trials, build_pruner(load_sweep(spec_path, [*overrides, *SETTINGS[result.name]])))
        shown = [("-" if value is None else f"{value:.3f}") for value in (again.best_value, result.best_value)]
        same = again.epochs == result.epochs and again.best_value == result.best_value
        print(f"  {result.name:<16}{again.epochs:>5} {shown[0]:>6} / {result.epochs:>5} {shown[1]:>6}"
              f"  {'same' if same else 'DIFFERENT'}")
    print("\noctft sweep stop-rules on the no-pruning study:")
    study = optuna.load_study(study_name=unpruned.study_name, storage=unpruned.storage)
    print(format_stop_rules(study, load_sweep(spec_path, overrides)))


def _short(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def main() -> None:
    args = parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.runtime == "xla":
        os.environ.setdefault("PJRT_DEVICE", "CPU")  # the trial processes inherit it
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as temp:
        root = empty_root(args.dir, temp)
        spec_path = copy_specs(root)
        experiment = root / "experiments" / "demo.yaml"
        mode_overrides = list(COLLAPSE_PRONE_OVERRIDES) if args.collapse_prone else []
        pretraining = None
        if args.pretrained_encoder:
            pretraining = pretrain_encoder(root / "pretrain", experiment)
            print(f"pretrained encoder: {pretraining.checkpoint}, best epoch {pretraining.best_epoch} of "
                  f"{pretraining.epochs} at validation balanced accuracy {pretraining.best_value:.3f}, "
                  f"{pretraining.seconds:.0f} s with its data", flush=True)
            mode_overrides += pretrained_overrides(pretraining.checkpoint)
        from octft.sweep.spec import load_sweep

        sweep = load_sweep(spec_path, mode_overrides)
        args.epochs = args.epochs or int(sweep.fixed["train.epochs"])
        started = time.perf_counter()
        data_dir, cache_dir = prepare(root, experiment, args.participants,
                                      args.majority_share if args.collapse_prone else None,
                                      class_signal=args.class_signal)
        print(f"data and cache: {time.perf_counter() - started:.1f} s ({args.participants} participants)", flush=True)
        params = draw_params(spec_path, args.trials, args.seed, mode_overrides)
        results = [run_setting(name, root, spec_path, params, args, data_dir, cache_dir, mode_overrides)
                   for name in args.settings]
        print_report(results, params, args, sweep.pruner.model_dump(), pretraining)
        if "none" in args.settings:
            replay_stop_rules(results, spec_path, mode_overrides)


if __name__ == "__main__":
    main()
