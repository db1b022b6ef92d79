"""Search efficiency on the demo sweep: epochs each search strategy spends to reach random search's best.

Every strategy searches the demo sweep's space (sweeps/demo.yaml) on the same synthetic data, with the same
budget of epochs, for each seed (sampler.seed). A strategy is a list of sweep overrides:

  random           RandomSampler, nothing pruned: the reference
  optuna-defaults  TPESampler() and MedianPruner() with Optuna's default arguments (Optuna 5: TPE's 10 random
                   startup trials, multivariate, constant liar), no collapse rule
  asha             RandomSampler with successive halving (min_resource 1, reduction_factor 3), no collapse rule
  hyperband        the demo's TPE with Hyperband (min_resource 1, reduction_factor 3, max_resource = epochs)
  octft-default    the demo sweep as shipped: its TPE, CollapsePruner around MedianPruner

The budget is a total of epochs (sum of the trials' epochs_run). A study is launched through
`octft.sweep.launch.launch` with as many trials as the epochs left could pay for at full length, and launched
again (the same study, more trials) while epochs are left, so a strategy that prunes runs more trials. Trials
that end past the budget are left out. Training is seeded (train.seed), so the same params give the same value
in every strategy; random and the TPE strategies draw the same first trials for one seed.

Per strategy and seed it records, in completion order, the epochs spent, the trials' own training seconds (the
launches' overhead left out) and the best value so far; then prints the epochs and seconds until each strategy
reaches that seed's random final best, that as a share of random's epochs (the goal for octft-default: at most
1/3), and the final best. `--plot` draws the best value against epochs spent.

    .venv/bin/python benchmarks/bench_search.py --json runs.json --plot search.png   # 5 strategies x 3 seeds x 80 epochs
    .venv/bin/python benchmarks/bench_search.py --quick            # random and octft-default, seed 0, 32 epochs each
    .venv/bin/python benchmarks/bench_search.py --epochs 12 --budget-epochs 96       # the demo sweep's own trial length
    .venv/bin/python benchmarks/bench_search.py --from-json runs.json --plot search.png   # print and redraw a saved run

A trial epoch costs about 3 CPU seconds at 64 participants (eager CPU), so the default run (1200 epochs) takes
about 35-45 min on 2 idle cores and --quick (64 epochs) about 3-5 min; a loaded machine stretches both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_pruning import COLLAPSE_PRONE_OVERRIDES, COLLAPSE_PRONE_SHARE, copy_specs, empty_root, prepare  # noqa: E402  (a sibling)

# strategy -> sweep overrides; {epochs} is the trials' epochs. A whole section (sampler={...}) drops the demo's
# arguments of that section, which another type would refuse; what is left out takes octft's default, which for
# these keys is Optuna's.
STRATEGIES = {
    "random": ["sampler={type: random}", "pruner.collapse.enabled=false", "pruner.wrapped.type=none"],
    "optuna-defaults": ["sampler={type: tpe}", "pruner.collapse.enabled=false", "pruner.wrapped={type: median}"],
    "asha": ["sampler={type: random}", "pruner.collapse.enabled=false",
             "pruner.wrapped={type: successive_halving, min_resource: 1, reduction_factor: 3}"],
    "hyperband": ["pruner.collapse.enabled=false",
                  "pruner.wrapped={type: hyperband, min_resource: 1, reduction_factor: 3, max_resource: {epochs}}"],
    "octft-default": [],
}
REFERENCE = "random"
GOAL_SHARE = 1 / 3  # issue 23: octft's default reaches random's final best with at most a third of its epochs
QUICK = {"strategies": [REFERENCE, "octft-default"], "seeds": [0], "epochs": 8, "budget_epochs": 32, "participants": 64}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES),
                        help=f"strategies to run (default: all; {REFERENCE} is always run: it sets the target)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampler seeds (default 0 1 2)")
    # The demo's stop rules start late (unfreeze epoch 0..4, then 3 grace or 4 warm-up epochs): shorter trials leave
    # its pruner nothing to stop. 10 epochs is the least that does; the demo sweep itself runs 12.
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial, fixed.train.epochs (default 10)")
    parser.add_argument("--budget-epochs", type=int, default=80,
                        help="epochs each strategy may spend per seed, all its trials together (default 80: 8 "
                             "unpruned trials, the demo's n_trials)")
    # Fewer participants leave a validation split of a handful: balanced accuracy then takes a few values, and ties.
    parser.add_argument("--participants", type=int, default=64, help="synthetic participants (default 64)")
    parser.add_argument("--collapse-prone", action="store_true",
                        help=f"the training split {COLLAPSE_PRONE_SHARE * 100:.0f}%% one class and loss.class_weights=none "
                             "(benchmarks/bench_pruning.py)")
    parser.add_argument("--runner", choices=["in_process", "warm"], default="in_process",
                        help="where trials train: in this process (default; no runner start per launch) or a warm "
                             "runner process per launch, as `octft sweep launch` does")
    parser.add_argument("--quick", action="store_true",
                        help="random and octft-default, seed 0, 8 epochs, budget 32, 64 participants (~5 min)")
    parser.add_argument("--plot", type=Path, default=None, help="write the best value against epochs spent here (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="save every trajectory here, for --from-json")
    parser.add_argument("--from-json", type=Path, default=None, help="print and plot a saved run instead of running")
    parser.add_argument("--dir", type=Path, default=None, help="where data, databases and runs go (default: a temp dir)")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)  # the quick run's sizes, where no flag says otherwise
    args = parser.parse_args()
    if REFERENCE not in args.strategies:
        args.strategies = [REFERENCE, *args.strategies]
    if args.epochs < 1 or args.budget_epochs < args.epochs:
        parser.error(f"--epochs ({args.epochs}) must be at least 1 and --budget-epochs ({args.budget_epochs}) at least "
                     "--epochs")
    return args


@dataclass
class Point:
    """The search after one more trial ended, in completion order."""

    trial: int
    state: str  # COMPLETE, PRUNED, FAIL
    epochs: int  # epochs spent so far, this trial's included
    seconds: float  # the trials' own seconds so far (octft's TrialOutcome.seconds)
    best: float | None  # best value of the COMPLETE trials so far (what Optuna's best_trial says)


@dataclass
class Run:
    strategy: str
    seed: int
    points: list[Point]  # the trials that ended within the budget
    past_budget: int  # trials that ended past the budget: run, but not counted
    launches: int
    wall_s: float  # the whole run: launches, runner starts and data checks included
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return self.points[-1].epochs if self.points else 0

    @property
    def best(self) -> float | None:
        return self.points[-1].best if self.points else None

    def reached(self, target: float) -> Point | None:
        """The first point whose best reaches `target`, or None."""
        return next((point for point in self.points if point.best is not None and point.best >= target), None)


def run_strategy(name: str, seed: int, root: Path, spec_path: Path, args: argparse.Namespace, data_dir: Path,
                 cache_dir: Path) -> Run:
    """One study: launched, then relaunched with more trials, until its trials have spent `--budget-epochs`."""
    import optuna

    from octft.sweep.launch import launch

    directory = root / f"{name}-seed{seed}"
    directory.mkdir(parents=True)
    storage = f"sqlite:///{directory / 'optuna.db'}"
    study_name = f"bench-search-{name}-{seed}"
    overrides = [
        f"study_name={study_name}", f"mlflow.tracking_uri=sqlite:///{directory / 'mlflow.db'}",
        f"fixed.train.epochs={args.epochs}", *(text.replace("{epochs}", str(args.epochs)) for text in STRATEGIES[name]),
        f"sampler.seed={seed}", *(COLLAPSE_PRONE_OVERRIDES if args.collapse_prone else []),
        f"data.uri={data_dir}", f"data.cache_dir={cache_dir}", "runtime.kind=cpu",
        f"output_dir={directory / 'runs'}", f"features.dir={directory / 'features'}",
    ]
    print(f"\n== {name}, seed {seed}: budget {args.budget_epochs} epochs, trials of {args.epochs} epochs; "
          f"overrides {STRATEGIES[name] or '(the demo sweep as shipped)'}", flush=True)
    started, launches, trials = time.perf_counter(), 0, []
    while True:
        spent = sum(_epochs_run(trial) for trial in trials)
        left = args.budget_epochs - spent
        if left <= 0:
            break
        # As many trials as the epochs left pay for at full length: a launch never starts a trial it cannot afford
        # unpruned, except the last one, which may end past the budget (and is then not counted).
        result = launch(spec_path, n_trials=len(trials) + math.ceil(left / args.epochs), workers=1, storage=storage,
                        overrides=overrides, runner=args.runner)
        launches += 1
        if any(result.worker_exit_codes):
            raise SystemExit(f"{name} seed {seed}: worker exited with {result.worker_exit_codes}; see {result.study_dir}")
        before, trials = len(trials), optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
        if sum(_epochs_run(trial) for trial in trials) == spent:
            raise SystemExit(f"{name} seed {seed}: trials {before}..{len(trials) - 1} spent no epochs (failed?); "
                             f"see {result.study_dir}")
    return trajectory(name, seed, trials, args.budget_epochs, launches, time.perf_counter() - started)


def trajectory(name: str, seed: int, trials: list, budget: int, launches: int, wall_s: float) -> Run:
    from optuna.trial import TrialState

    from octft.sweep.records import trial_record

    ended = sorted((trial for trial in trials if trial.datetime_complete is not None),
                   key=lambda trial: (trial.datetime_complete, trial.number))
    points, epochs, seconds, best = [], 0, 0.0, None
    for trial in ended:
        outcome = trial_record(trial).outcome
        epochs += _epochs_run(trial)
        seconds += outcome.seconds if outcome else 0.0
        if epochs > budget:
            break
        if trial.state == TrialState.COMPLETE and (best is None or trial.value > best):
            best = float(trial.value)
        points.append(Point(trial.number, trial.state.name, epochs, seconds, best))
    counts = Counter(point.state for point in points)
    return Run(name, seed, points, len(ended) - len(points), launches, wall_s, dict(counts))


def _epochs_run(trial) -> int:
    from octft.sweep.records import trial_record

    outcome = trial_record(trial).outcome
    return (outcome.epochs_run or 0) if outcome else 0


def print_report(runs: list[Run], settings: dict) -> None:
    load = settings.get("load")
    print(f"\nmachine: {settings['machine']}" + (f"; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end"
                                                 if load else ""))
    print(f"demo sweep, {settings['participants']} participants{' (collapse-prone)' if settings['collapse_prone'] else ''}, "
          f"trials of {settings['epochs']} epochs, budget {settings['budget_epochs']} epochs per strategy and seed, "
          f"runtime.kind=cpu, 1 worker, {settings['runner']} runner; seconds are the trials' own (launch overhead "
          "left out)")
    targets = {run.seed: run.best for run in runs if run.strategy == REFERENCE}
    reference_epochs = {run.seed: run.epochs for run in runs if run.strategy == REFERENCE}
    print(f"target per seed: {REFERENCE}'s final best: "
          + ", ".join(f"seed {seed} {_value(best)} ({reference_epochs[seed]} epochs)" for seed, best in targets.items()))
    header = (f"{'strategy':<17}{'seed':>5}{'trials c/p/f':>14}{'past':>5}{'epochs':>7}{'train s':>8}{'best':>7}"
              f"{'reached at epochs':>19}{'at s':>7}{'share':>7}")
    print(header)
    print("-" * len(header))
    for run in runs:
        point = run.reached(targets[run.seed]) if targets.get(run.seed) is not None else None
        share = point.epochs / reference_epochs[run.seed] if point else None
        trials = f"{run.counts.get('COMPLETE', 0)}/{run.counts.get('PRUNED', 0)}/{run.counts.get('FAIL', 0)}"
        print(f"{run.strategy:<17}{run.seed:>5}{trials:>14}{run.past_budget:>5}{run.epochs:>7}"
              f"{run.points[-1].seconds if run.points else 0:>8.0f}{_value(run.best):>7}"
              f"{point.epochs if point else 'not reached':>19}{f'{point.seconds:.0f}' if point else '-':>7}"
              f"{f'{share:.0%}' if share is not None else '-':>7}")

    print(f"\nover seeds: share = epochs to reach {REFERENCE}'s final best / {REFERENCE}'s epochs (a seed not reached "
          f"counts as never); goal for octft-default: <= {GOAL_SHARE:.0%} on every seed")
    header = f"{'strategy':<17}{'reached':>8}{'median share':>13}{'mean share':>11}{'final best mean':>16}{'sd':>7}{'<=1/3':>6}"
    print(header)
    print("-" * len(header))
    ranking = []
    for name in dict.fromkeys(run.strategy for run in runs):
        mine = [run for run in runs if run.strategy == name]
        shares = []
        for run in mine:
            point = run.reached(targets[run.seed]) if targets.get(run.seed) is not None else None
            shares.append(point.epochs / reference_epochs[run.seed] if point else math.inf)
        bests = [run.best for run in mine if run.best is not None]
        reached = [share for share in shares if share != math.inf]
        median = statistics.median(shares)
        mean = statistics.mean(reached) if len(reached) == len(shares) else math.inf
        goal = all(share <= GOAL_SHARE for share in shares)
        ranking.append((median, -statistics.mean(bests) if bests else 0.0, name))
        print(f"{name:<17}{f'{len(reached)}/{len(shares)}':>8}{_share(median):>13}{_share(mean):>11}"
              f"{_value(statistics.mean(bests) if bests else None):>16}"
              f"{statistics.stdev(bests) if len(bests) > 1 else 0:>7.3f}{'yes' if goal else 'no':>6}")
    ranking.sort()
    print("fewest epochs to the target (median share; ties by final best): "
          + ", ".join(f"{name} {_share(median)}" for median, _, name in ranking))


def plot(runs: list[Run], settings: dict, path: Path) -> None:
    """Best value against epochs spent: a thin step line per seed, a thick one for the mean over seeds (drawn from the
    epoch where every seed has a COMPLETE trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    grid = list(range(settings["budget_epochs"] + 1))
    styles = ["-", "--", "-.", ":", (0, (5, 1))]  # strategies often share stretches: a dashed line shows through
    for index, name in enumerate(dict.fromkeys(run.strategy for run in runs)):
        color, style = f"C{index}", styles[index % len(styles)]
        curves = []
        for run in (run for run in runs if run.strategy == name):
            xs = [0] + [point.epochs for point in run.points if point.best is not None]
            ys = [math.nan] + [point.best for point in run.points if point.best is not None]
            axes.step(xs, ys, where="post", color=color, alpha=0.3, linewidth=0.8)
            curves.append([_best_at(run, epochs) for epochs in grid])
        mean = [statistics.mean(column) if all(v is not None for v in column) else math.nan for column in zip(*curves)]
        axes.step(grid, mean, where="post", color=color, linestyle=style, linewidth=2.2,
                  label=f"{name} (mean of {len(curves)} seed{'s' if len(curves) > 1 else ''})")
    reference = [run.best for run in runs if run.strategy == REFERENCE and run.best is not None]
    if reference:
        axes.axhline(statistics.mean(reference), color="grey", linestyle=":", linewidth=1,
                     label=f"{REFERENCE}'s final best (mean)")
    axes.axvline(settings["budget_epochs"] * GOAL_SHARE, color="grey", linestyle="--", linewidth=1,
                 label="1/3 of the budget")
    axes.set_xlim(0, settings["budget_epochs"])
    axes.set_xlabel("epochs spent (all trials)")
    axes.set_ylabel("best val/balanced_accuracy so far")
    axes.set_title(f"demo sweep: {settings['participants']} participants, trials of {settings['epochs']} epochs, "
                   f"seed{'s' if len(settings['seeds']) > 1 else ''} {', '.join(map(str, settings['seeds']))}", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def _best_at(run: Run, epochs: int) -> float | None:
    best = None
    for point in run.points:
        if point.epochs > epochs:
            break
        best = point.best
    return best


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _share(share: float) -> str:
    return "never" if share == math.inf else f"{share:.0%}"


def main() -> None:
    args = parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        runs = [Run(**{**run, "points": [Point(**point) for point in run["points"]]}) for run in saved["runs"]]
        print_report(runs, saved["settings"])
        if args.plot:
            plot(runs, saved["settings"], args.plot)
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = {"strategies": args.strategies, "seeds": args.seeds, "epochs": args.epochs,
                "budget_epochs": args.budget_epochs, "participants": args.participants,
                "collapse_prone": args.collapse_prone, "runner": args.runner,
                "machine": f"{platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}"}
    load_before = os.getloadavg()[0]  # a shared machine's load makes the seconds noisy; the epochs are not
    with tempfile.TemporaryDirectory(prefix="bench-search-") as temp:
        root = empty_root(args.dir, temp)
        started = time.perf_counter()
        spec_path = copy_specs(root)
        data_dir, cache_dir = prepare(root, args.participants, COLLAPSE_PRONE_SHARE if args.collapse_prone else None)
        print(f"data and cache: {time.perf_counter() - started:.1f} s ({args.participants} participants)", flush=True)
        runs = []
        for seed in args.seeds:
            for name in args.strategies:
                runs.append(run_strategy(name, seed, root, spec_path, args, data_dir, cache_dir))
                print(f"{name} seed {seed}: {runs[-1].epochs} epochs, best {_value(runs[-1].best)}, "
                      f"{runs[-1].launches} launches, {runs[-1].wall_s:.0f} s", flush=True)
    settings["wall_s"] = time.perf_counter() - started
    settings["load"] = (load_before, os.getloadavg()[0])
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "runs": [asdict(run) for run in runs]}, indent=1))
    print_report(runs, settings)
    print(f"whole benchmark: {settings['wall_s']:.0f} s")
    if args.plot:
        plot(runs, settings, args.plot)


if __name__ == "__main__":
    main()
