"""`octft demo` / `make demo`: the whole job on embedded defaults.

Synthetic AI-READI -> audit -> preprocessing cache -> a probe study (heads on the frozen encoder's stored
features, many per pass, one process) -> an LP-FT fine-tune study warm-started from the best probe's head, two workers
on XLA:CPU devices -> promotion of the best healthy trial -> the study report. Everything lands under one
folder (default `demo/`): its own Optuna sqlite and MLflow sqlite, never the same file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import optuna

from octft.console import log_to, quiet_console
from octft.data.audit import audit_dataset, format_report
from octft.data.dataset import prepare_volumes
from octft.data.synth import synthesize
from octft.registry.promote import format_promotion, promote
from octft.report.study import render_report
from octft.report.ui import ui_command
from octft.sweep.launch import launch, next_command
from octft.sweep.records import TRIAL_ATTR, TrialRecord
from octft.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
SOUP_SIZE = 3  # promotion tries a greedy soup of the 3 best trials (octft.registry.soup)
FRAMES, HEIGHT, WIDTH = 8, 64, 64
# The top of the demo space's head and encoder learning rates, encoder trainable from the start: the
# classifier collapses onto one class. The demo enqueues it as its first trial so that CollapsePruner is
# seen at work on every run, not only when the sampler happens to land there.
COLLAPSING_TRIAL = {
    "optim.lr_head": 0.1,
    "optim.lr_encoder": 3e-3,
    "train.unfreeze_epoch": 0,
    "loss.label_smoothing": 0.0,
    "train.accumulation_steps": 1,
}


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(root: Path, *, participants: int = 96, trials: int = 6, workers: int = 2, probe_trials: int = 50,
             verbose: bool = False) -> int:
    """The demo into `root`; its console is one line per trial end (`verbose`: trial starts, epochs and library logs
    too), library logs and warnings go to `root/demo.log`."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    with quiet_console(verbose=verbose):
        log_to(root / "demo.log")
        return _run_steps(root, participants=participants, trials=trials, workers=workers, probe_trials=probe_trials,
                          verbose=verbose)


def _run_steps(root: Path, *, participants: int, trials: int, workers: int, probe_trials: int, verbose: bool) -> int:
    data_dir = root / "data"
    started = _step(f"1/7 synthetic AI-READI release -> {data_dir}")
    if (data_dir / "synth_report.json").is_file():
        print(f"reusing {data_dir} (delete it to regenerate)")
    else:
        synthesize(data_dir, participants=participants, seed=0, frames=FRAMES, height=HEIGHT, width=WIDTH, progress=True)
    truth = json.loads((data_dir / "synth_report.json").read_text())
    print(f"{truth['participants']} participants, {truth['files']} files ({time.perf_counter() - started:.1f} s)")

    started = _step("2/7 data audit")
    report = audit_dataset(str(data_dir), verify=True, progress=True)
    print(format_report(report))
    (root / "audit.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if not report.passed:
        print("the audit failed: see the guards above")
        return 1

    started = _step("3/7 preprocessing cache")
    cache_dir = root / "cache"
    result = prepare_volumes(str(data_dir), report.volumes, cache_dir=str(cache_dir), frames=FRAMES, height=HEIGHT,
                             width=WIDTH, workers=1).report
    print(f"{cache_dir}: built {result.built}, reused {result.reused}, failed {len(result.failed)} "
          f"({time.perf_counter() - started:.1f} s)")

    # The study: its own Optuna database and its own MLflow database, both under `root`.
    storage = f"sqlite:///{root / 'optuna.db'}"
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    spec_path = REPO / "sweeps" / "demo_lpft.yaml"
    sweep_overrides = [f"n_trials={trials}", f"mlflow.tracking_uri={tracking_uri}"]
    experiment_overrides = [f"data.uri={data_dir}", f"data.cache_dir={cache_dir}", f"output_dir={root / 'runs'}",
                            f"features.dir={root / 'features'}"]

    probe_path = REPO / "sweeps" / "probe.yaml"
    # One process: it trains up to heads_per_pass heads at once in one stacked pass over the features, faster than two
    # processes splitting the passes (docs/figures.md, "Probe study against one fine-tune").
    per_pass = load_sweep(probe_path, [f"n_trials={probe_trials}"]).resolved_heads_per_pass()
    _step(f"4/7 probe study: {probe_trials} heads on the frozen encoder's stored features, {per_pass} at a time in one "
          "stacked pass (one process on one CPU thread; a helper process writes their MLflow runs and Optuna epochs)")
    probed = launch(probe_path, n_trials=probe_trials, workers=1, storage=storage,
                    overrides=[f"mlflow.tracking_uri={tracking_uri}", *experiment_overrides], verbose=verbose)
    probe_study = load_sweep(probe_path)
    print(probed.summary())
    print(f"  next: its best head warm-starts every trial of {spec_path.relative_to(REPO)} (init.head_from: "
          f"{probe_path.relative_to(REPO)})")

    spec = load_sweep(spec_path, sweep_overrides)
    study = optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.objective.direction,
                                load_if_exists=True)
    if not study.trials:
        study.enqueue_trial(COLLAPSING_TRIAL, user_attrs={
            TRIAL_ATTR: TrialRecord(enqueued_from="the demo: the collapsing region").to_dict()})
    devices = int(os.environ.get("CPU_NUM_DEVICES", "4")) if os.environ.get("PJRT_DEVICE") else workers
    _step(f"5/7 LP-FT fine-tune study: {trials} trials, {workers} workers, {max(1, devices // workers)} XLA "
          "devices each, every head starting from the best probe")
    launched = launch(spec_path, n_trials=trials, workers=workers, devices_per_trial=max(1, devices // workers),
                      storage=storage, overrides=sweep_overrides + experiment_overrides, verbose=verbose)
    print(launched.summary())
    print(f"  next: {next_command(launched, spec_path.relative_to(REPO), sweep_overrides, storage)}  (step 6 runs it)")

    _step("6/7 promote the best healthy trial, or the greedy soup of the best 3 when it validates better (test split, "
          "once)")
    try:
        promotion = promote(spec, storage=storage, tracking_uri=tracking_uri, n_resamples=500, soup=SOUP_SIZE)
        print(format_promotion(promotion))
    except ValueError as error:  # no trial fit to promote: say so, the report still shows why
        print(f"nothing promoted: {error}")
        promotion = None

    _step("7/7 study report")
    html = render_report(spec, storage=storage, tracking_uri=tracking_uri)
    print(f"wrote {html}")

    print("\nwhere to look:")
    print(f"  audit report:    {root / 'audit.json'}")
    print(f"  study report:    {html}")
    print(f"  probe trials:    octft sweep status {probe_path.relative_to(REPO)} --storage {storage}  "
          f"(study {probe_study.study_name!r})")
    print(f"  trials:          octft sweep status {spec_path.relative_to(REPO)} --storage {storage}")
    print(f"  replay a trial:  octft sweep show {spec_path.relative_to(REPO)} --storage {storage} --trial 1  "
          "(the same probe head: init.head_from=runs:/...)")
    print(f"  MLflow store:    {tracking_uri} (artifacts in {root / 'mlartifacts'})")
    print(f"  logs:            trial-*/trial.log under {root / 'runs' / 'sweeps'}/<study>; library logs in "
          f"{root / 'demo.log'} (worker processes: <study>/launch.log)")
    if promotion is not None:
        print(f"  champion:        octft predict --model {promotion.model_uri} --tracking-uri {tracking_uri} "
              f"{data_dir / 'retinal_oct'}")
    print("\ncompare the trials in MLflow's UI (its model-training view and its compare page; Ctrl-C stops it):")
    print(f"  {ui_command(spec_path.relative_to(REPO), storage=storage, tracking_uri=tracking_uri)}")
    return 0
