"""The `octft` command line. Each subcommand imports what it needs when it runs, so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

EXIT_GUARD_FAILED = 1
EXIT_USAGE = 2
VERBOSE_HELP = ("also each trial's start and, when it ends, its epochs; library logs (Optuna, MLflow) and warnings on "
                "the console too (they are always in the log file)")


def _print_json(payload, path: str | None) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if path in (None, "-"):
        print(text)
    else:
        from octft.errors import UsageError

        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        except OSError as error:
            raise UsageError(f"--json {path}: cannot write it ({error.strerror or error}); give a writable path") from None
        print(f"wrote {path}", file=sys.stderr)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _experiment(args, *, required: bool = False):
    from octft.config import load_experiment, load_experiment_dict

    overrides = list(getattr(args, "overrides", []) or [])
    config_path = getattr(args, "config", None)
    if config_path:
        return load_experiment(config_path, overrides)
    if required:
        raise SystemExit("octft: error: an experiment YAML is required (see experiments/)")
    return load_experiment_dict({}, overrides)


def _data_settings(cfg, args) -> dict:
    """The audit arguments of the config, with --data, --labels and --verify applied."""
    settings = cfg.data.audit_kwargs()
    settings["uri"] = getattr(args, "data", None) or settings["uri"]
    settings["labels"] = getattr(args, "labels", None) or settings["labels"]
    settings["verify"] = getattr(args, "verify", False) or settings["verify"]
    return settings


# ---------------------------------------------------------------- synth / data
def cmd_synth(args) -> int:
    from octft.data.synth import synthesize

    report = synthesize(
        args.dir,
        participants=args.participants,
        seed=args.seed,
        messy=args.messy,
        frames=args.frames,
        height=args.height,
        width=args.width,
        progress=True,
    )
    summary = report.to_dict()
    print(f"wrote a synthetic AI-READI release to {args.dir}: {summary.get('counts', summary)}")
    return 0


def cmd_data_audit(args) -> int:
    from octft.data.audit import audit_dataset, format_report

    cfg = _experiment(args)
    report = audit_dataset(**_data_settings(cfg, args), progress=True)
    print(format_report(report))
    if args.json:
        _print_json(report.to_dict(), args.json)
    allowed = set(args.allow or []) | set(cfg.data.allow_failed_guards)
    failed = report.failed_guards(allowed)
    for guard in failed:
        print(f"octft: guard {guard.name} failed: {guard.detail}", file=sys.stderr)
    return EXIT_GUARD_FAILED if failed else 0


def cmd_data_inspect(args) -> int:
    from octft.data.readers import describe_volume, read_volume

    description = describe_volume(read_volume(args.file))
    if args.json:
        _print_json(description, "-")
    else:
        for key, value in description.items():
            if key == "meta":
                for meta_key, meta_value in value.items():
                    print(f"  {meta_key}: {meta_value}")
            else:
                print(f"{key}: {value}")
    return 0


def cmd_data_cache(args) -> int:
    from octft.data.audit import audit_dataset
    from octft.data.dataset import prepare_volumes

    cfg = _experiment(args)
    settings = _data_settings(cfg, args)
    report = audit_dataset(**settings)
    allowed = set(args.allow or []) | set(cfg.data.allow_failed_guards)
    failed = report.failed_guards(allowed)
    if failed:
        for guard in failed:
            print(f"octft: guard {guard.name} failed: {guard.detail} (override with --allow {guard.name})", file=sys.stderr)
        return EXIT_GUARD_FAILED
    from octft.data.prepare import parse_share

    prepare_settings = cfg.data.prepare_kwargs() | {"uri": settings["uri"]}
    if args.workers is not None:
        prepare_settings["workers"] = args.workers
    share = parse_share(args.share) if args.share else None
    result = prepare_volumes(volumes=report.volumes, share=share, progress=True, **prepare_settings).report
    print(f"cache {cfg.data.cache_dir}: built {result.built}, reused {result.reused}, failed {len(result.failed)}")
    for source, reason in result.failed:
        print(f"octft: could not cache {source}: {reason}", file=sys.stderr)
    # A volume that failed here is missing from training: not a success, even if the rest was built.
    return EXIT_GUARD_FAILED if result.failed else 0


# ---------------------------------------------------------------- train / checkpoint
def cmd_train(args) -> int:
    from octft.config import load_experiment
    from octft.train.recipe import train

    cfg = load_experiment(args.config, args.overrides)
    if args.tracking_uri:
        cfg.tracking.tracking_uri = args.tracking_uri
    result = train(cfg, resume=args.resume, run_dir=args.run_dir)
    print(
        f"{result.status}: best {cfg.train.objective.metric} {result.best_value:.4f} at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs run){'; ' + result.stop_reason if result.stop_reason else ''}"
    )
    print(f"run directory: {result.run_dir}   MLflow run: {result.run_id}")
    return 0


def cmd_checkpoint_inspect(args) -> int:
    from octft.config import SCRATCH, load_experiment
    from octft.models.checkpoint import inspect_checkpoint
    from octft.train.setup import build_model

    cfg = load_experiment(args.config, args.overrides)
    cfg.model.checkpoint = SCRATCH  # build the bare encoder; inspect compares without loading
    model, _ = build_model(cfg, num_classes=4)
    report = inspect_checkpoint(args.path, model.encoder, key=args.key or cfg.model.checkpoint_key)
    if args.json:
        _print_json(report.to_dict(), "-")
    else:
        print(report.summary())
    return 0 if report.ok else EXIT_GUARD_FAILED


# ---------------------------------------------------------------- doctor / smoke
def cmd_doctor(args) -> int:
    from octft.doctor import diagnose

    report = diagnose(storage=args.storage, tracking_uri=args.tracking_uri, data=args.data)
    print("\n".join(report.lines()))
    if args.json:
        _print_json(report.to_dict(), args.json)
    return 0 if report.ok else EXIT_GUARD_FAILED


def cmd_smoke(args) -> int:
    from octft.smoke import run_smoke

    result = run_smoke(args.devices, overrides=args.overrides)
    layout = ", ".join(f"{key} {value}" for key, value in sorted(result.params.items()))
    print(f"smoke: {result.status} after {result.epochs_run} epochs ({layout})")
    print(f"smoke: last epoch {result.samples_per_second:.1f} samples/s; {result.compiles} XLA compiles, "
          f"{result.compile_seconds:.1f} s compiling")
    return 0


# ---------------------------------------------------------------- promote / predict / report
def cmd_promote(args) -> int:
    from octft.registry.promote import format_promotion, promote
    from octft.sweep.spec import load_sweep

    spec = load_sweep(args.spec, args.overrides)
    _log_beside_study(spec, args.storage, "promote.log", args.out)  # MLflow's model-logging warnings go there
    print(format_promotion(promote(spec, trial_number=args.trial, storage=args.storage, tracking_uri=args.tracking_uri,
                                   allow_test_reuse=args.allow_test_reuse, soup=args.soup)))
    return 0


def _log_beside_study(spec, storage: str | None, name: str, out: str | None) -> None:
    """Library logs of this command into `name` under `out`, else in the study's folder where it is this machine's
    (`octft.sweep.records.local_study_folder`; `octft.console.log_to`); elsewhere (a study whose hosts are gone) none
    are kept unless `--out` asks: a log is no output to leave in whatever folder the command ran from."""
    from octft.console import log_to
    from octft.errors import UsageError
    from octft.sweep.records import local_study_folder
    from octft.sweep.storage import open_existing_study

    folder = Path(out) if out else local_study_folder(open_existing_study(spec.study_name, storage or spec.storage).user_attrs)
    if folder is None:
        return
    path = folder / name
    try:
        log_to(path)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}; give --out a writable folder") from None


def cmd_predict(args) -> int:
    from octft.registry.predict import format_prediction, predict, summary, write_prediction_csv

    result = predict(args.model, args.inputs, tracking_uri=args.tracking_uri, batch_size=args.batch_size,
                     all_volumes=args.all_volumes, progress=not args.quiet and sys.stderr.isatty())
    if args.out:
        print(f"wrote {write_prediction_csv(result, args.out)}", file=sys.stderr)
    if args.json:
        _print_json(result.to_dict(), "-")
        print(summary(result), file=sys.stderr)
    else:
        print(format_prediction(result, volumes=not args.out))
    for file, reason in result.failed:
        print(f"octft: could not read {file}: {reason}", file=sys.stderr)
    return EXIT_GUARD_FAILED if result.failed else 0


def cmd_report(args) -> int:
    from octft.report.study import render_report
    from octft.sweep.spec import load_sweep

    spec = load_sweep(args.spec, args.overrides)
    path = render_report(spec, out=args.out, storage=args.storage, tracking_uri=args.tracking_uri)
    print(f"wrote {path}")
    return 0


def cmd_ui(args) -> int:
    from octft.report.ui import serve
    from octft.sweep.spec import load_sweep

    spec = load_sweep(args.spec, args.overrides)
    return serve(spec, storage=args.storage, tracking_uri=args.tracking_uri, host=args.host, port=args.port)


# ---------------------------------------------------------------- sweep
def _sweep_study(args):
    """The spec and the loaded study of `octft sweep status|show` (read-only: a mistyped SQLite path must not leave
    an empty database behind)."""
    from octft.sweep.plan import load_launch_spec
    from octft.sweep.storage import open_existing_study

    spec, _ = load_launch_spec(args.spec, args.overrides, args.storage)
    return spec, open_existing_study(spec.study_name, spec.storage)


def cmd_sweep_launch(args) -> int:
    from octft.sweep.plan import resolve_plan
    from octft.sweep.runners import make_runner

    plan, _ = resolve_plan(
        args.spec, storage=args.storage, overrides=args.overrides,
        n_trials=args.n_trials, workers=args.workers, devices_per_trial=args.devices_per_trial,
        heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
        fresh_process_per_trial=args.fresh_process_per_trial,
    )
    # Worker 0's runner starts before this process imports the launch (MLflow, the study's modules): the runner's own
    # start (torch, MLflow: 3-4 s) is the longest step before the first trial. The same steps as `launch()`.
    runner = make_runner(plan, 0)
    from octft.console import log_to
    from octft.sweep.launch import next_command, run_launch

    log = log_to(Path(plan.study_dir) / "launch.log")
    result = run_launch(plan, runner, enqueue_from=args.enqueue_from, enqueue_top=args.enqueue_top,
                        verbose=args.verbose)
    print(result.summary())
    print(f"  trial folders under {result.study_dir}; MLflow parent run {result.parent_run_id}; library logs {log}")
    print(f"  next: {next_command(result, args.spec, args.overrides, args.storage)}")
    if result.counts["FAIL"] and not (result.counts["COMPLETE"] or result.counts["PRUNED"]):
        print(f"octft: error: every trial of study {result.study_name} failed; `octft sweep status {args.spec}` gives "
              "each one's reason, its trial.log the details", file=sys.stderr)
        return 1
    return 0 if all(code == 0 for code in result.worker_exit_codes) else 1


def cmd_sweep_status(args) -> int:
    from octft.sweep.status import format_status

    spec, study = _sweep_study(args)
    print(format_status(study, spec.objective.metric))
    return 0


def cmd_sweep_stop_rules(args) -> int:
    from octft.sweep.status import format_stop_rules

    spec, study = _sweep_study(args)
    print(format_stop_rules(study, spec))
    return 0


def cmd_sweep_show(args) -> int:
    from octft.sweep.status import replay_here

    spec, study = _sweep_study(args)
    command, notes = replay_here(study, args.trial, spec.base)
    print(command)
    for note in notes:  # on stderr: the command alone on stdout, to copy or pipe
        print(f"note: {note}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from octft.demo import run_demo

    return run_demo(Path(args.dir), participants=args.participants, trials=args.trials, workers=args.workers,
                    probe_trials=args.probe_trials, verbose=args.verbose)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octft", description="Sweeps of V-JEPA 2 OCT encoder fine-tunes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_demo_and_data_commands, _train_commands, _sweep_commands, _champion_commands, _study_view_commands):
        add(commands)
    return parser


def _demo_and_data_commands(commands) -> None:
    demo = commands.add_parser("demo", help="the whole job on synthetic AI-READI data (README's first command)")
    demo.add_argument("--dir", default="demo", help="where the demo writes everything (default: demo)")
    demo.add_argument("--participants", type=int, default=128)
    demo.add_argument("--trials", type=int, default=6)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--probe-trials", type=int, default=50, help="trials of the probe study (heads on stored features)")
    demo.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    demo.set_defaults(func=cmd_demo)

    synth = commands.add_parser("synth", help="write a synthetic AI-READI-shaped dataset")
    synth.add_argument("dir")
    synth.add_argument("--participants", type=int, default=120)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--messy", action="store_true", help="plant the faults real releases have")
    synth.add_argument("--frames", type=int, default=8)
    synth.add_argument("--height", type=int, default=64)
    synth.add_argument("--width", type=int, default=64)
    synth.set_defaults(func=cmd_synth)

    data = commands.add_parser("data", help="audit, inspect and cache OCT data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    def data_source_arguments(sub):
        sub.add_argument("--data", help="a path, file:// or b2://bucket/prefix (default: data.uri of --config)")
        sub.add_argument("--labels", help="participants.tsv (default: participants.tsv under --data)")
        sub.add_argument("--config", help="an experiment YAML whose data section sets selection and guards")
        sub.add_argument("--verify", action="store_true", help="decode every selected file (finds truncated files)")
        sub.add_argument("--allow", action="append", metavar="GUARD", help="accept a failed guard by name")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.selection.regions=[macula]")

    audit = data_commands.add_parser("audit", help="account for every file and label; non-zero exit on a failed guard")
    data_source_arguments(audit)
    audit.add_argument("--json", metavar="FILE", help="also write the full report as JSON ('-' for stdout)")
    audit.set_defaults(func=cmd_data_audit)

    inspect = data_commands.add_parser("inspect", help="shape, dtype, value range and metadata of one file")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_data_inspect)

    cache = data_commands.add_parser("cache", help="preprocess every audited volume into the local cache")
    data_source_arguments(cache)
    cache.add_argument("--workers", type=int,
                       help="downloads and decodes at once (default: data.download.workers, else one per core)")
    cache.add_argument("--share", metavar="I/N",
                       help="prepare only share I of N (0-based): hosts filling one shared cache together")
    cache.set_defaults(func=cmd_data_cache)


def _train_commands(commands) -> None:
    train = commands.add_parser("train", help="one fine-tune: octft train CONFIG [key=value ...]")
    train.add_argument("config", help="an experiment YAML, e.g. experiments/demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr_head=1e-3")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    train.add_argument("--run-dir", help="where checkpoints go (default: <output_dir>/<run name>)")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    train.add_argument("--verbose", action="store_true", help="library logs (MLflow, Optuna) and warnings on the console too")
    train.set_defaults(func=cmd_train)

    checkpoint = commands.add_parser("checkpoint", help="check a pretraining checkpoint against an experiment's encoder")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True, metavar="CHECKPOINT_COMMAND")
    inspect_ckpt = checkpoint_commands.add_parser("inspect", help="loaded / missing / unexpected / mismatched keys")
    inspect_ckpt.add_argument("path")
    inspect_ckpt.add_argument("--config", required=True, help="the experiment whose model section builds the encoder")
    inspect_ckpt.add_argument("--key", help="checkpoint entry (default: target_encoder, else encoder)")
    inspect_ckpt.add_argument("--json", action="store_true")
    inspect_ckpt.add_argument("overrides", nargs="*", metavar="key=value")
    inspect_ckpt.set_defaults(func=cmd_checkpoint_inspect)

    doctor = commands.add_parser("doctor", help="what octft sees here (platform, devices, hosts, versions) and whether the stores answer")
    doctor.add_argument("--json", metavar="FILE", help="also write the facts and checks as JSON ('-' for stdout)")
    doctor.add_argument("--storage", help="Optuna storage URL to check (default: $OCTFT_OPTUNA_STORAGE, else sqlite:///optuna.db)")
    doctor.add_argument("--tracking-uri", help="MLflow tracking URI to check (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    doctor.add_argument("--data", help="a data URI to list (a path, file:// or b2://bucket/prefix)")
    doctor.set_defaults(func=cmd_doctor)

    smoke = commands.add_parser("smoke", help="train a micro model for two epochs on tiny synthetic data in a temporary folder")
    smoke.add_argument("--devices", type=int, help="train on this many devices (XLA:CPU devices, or TPU chips); default: all")
    smoke.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of experiments/smoke.yaml")
    smoke.set_defaults(func=cmd_smoke)


def _sweep_commands(commands) -> None:
    sweep = commands.add_parser("sweep", help="Optuna sweeps: launch workers, see the trials, replay one")
    sweep_commands = sweep.add_subparsers(dest="sweep_command", required=True, metavar="SWEEP_COMMAND")

    def sweep_arguments(sub):
        sub.add_argument("spec", help="a sweep YAML, e.g. sweeps/demo.yaml")
        sub.add_argument("--storage", help="Optuna storage URL (default: the spec's, or $OCTFT_OPTUNA_STORAGE)")
        sub.add_argument("overrides", nargs="*", metavar="key=value",
                         help="sweep keys (n_trials=2, fixed.train.epochs=3) or base-experiment keys (data.uri=...)")

    launch = sweep_commands.add_parser(
        "launch", help="create or resume the study and run trials; run it on every host to add its workers")
    sweep_arguments(launch)
    launch.add_argument("--n-trials", type=int, help="trials in the whole study, all workers and hosts together")
    launch.add_argument("--workers", type=int, default=1,
                        help="worker processes on this host (default 1); a probe study: processes running its heads")
    launch.add_argument("--enqueue-from", metavar="SOURCE",
                        help="warm start: an earlier sweep file (its best trials) or models:/NAME@champion (its params)")
    launch.add_argument("--enqueue-top", type=int, default=3, metavar="K",
                        help="with a sweep file as SOURCE: how many of its best trials (default 3)")
    launch.add_argument("--devices-per-trial", type=int,
                        help="devices each worker's trial trains on (default: on a TPU host its chips / --workers, else 1)")
    launch.add_argument("--heartbeat-interval", type=int, default=10,
                        help="seconds between a running trial's heartbeats (default 10)")
    launch.add_argument("--grace-period", type=int,
                        help="seconds without heartbeat before a trial counts as dead (default: twice the interval)")
    launch.add_argument("--fresh-process-per-trial", action="store_true",
                        help="start a new trial runner for every trial (slower: imports and compiles each time; for debugging)")
    launch.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    launch.set_defaults(func=cmd_sweep_launch)

    status = sweep_commands.add_parser("status", help="the study's trials and its best trial")
    sweep_arguments(status)
    status.set_defaults(func=cmd_sweep_status)

    show = sweep_commands.add_parser("show", help="the octft train command that replays one trial")
    sweep_arguments(show)
    show.add_argument("--trial", type=int, required=True, help="the trial number (see octft sweep status)")
    show.set_defaults(func=cmd_sweep_show)

    stop_rules = sweep_commands.add_parser(
        "stop-rules", help="the study's trials replayed under other grace, patience and warm-up settings: epochs and best")
    sweep_arguments(stop_rules)
    stop_rules.set_defaults(func=cmd_sweep_stop_rules)


def _champion_commands(commands) -> None:
    promote = commands.add_parser("promote", help="test the best healthy trial once and register it as the champion")
    promote.add_argument("spec", help="the sweep YAML, e.g. sweeps/demo.yaml")
    promote.add_argument("overrides", nargs="*", metavar="key=value", help="sweep overrides, e.g. promote.min_class_f1=0.1")
    promote.add_argument("--trial", type=int, help="promote this trial number instead of the best one")
    promote.add_argument("--storage", help="Optuna storage URL (default: the spec's storage)")
    promote.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's mlflow.tracking_uri)")
    promote.add_argument("--allow-test-reuse", action="store_true",
                         help="score this trial on the test split although the split was scored for another model, of this study or any "
                              "other (tags the version octft.test_reuse=true)")
    promote.add_argument("--soup", type=int, metavar="K",
                         help="also build a greedy soup of the K best trials that share the best one's data, encoder and "
                              "architecture, log it as its own run and model, and register it instead when it validates better")
    promote.add_argument("--out", metavar="FOLDER", help="folder for promote.log, the library logs (default: the study's "
                         "folder on the host that launched it; elsewhere none is kept)")
    promote.add_argument("--verbose", action="store_true", help="library logs (MLflow, Optuna) and warnings on the console too")
    promote.set_defaults(func=cmd_promote)

    predict = commands.add_parser("predict", help="classify OCT files with a registered model or a checkpoint folder")
    predict.add_argument("--model", required=True, help="models:/<name>@champion, models:/<name>/<version> or a checkpoint folder")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM, NIfTI or .npy files, or folders of them")
    predict.add_argument("--tracking-uri", help="MLflow tracking and registry URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--json", action="store_true", help="print the predictions as JSON")
    predict.add_argument("--out", metavar="FILE.csv", help="write the per-volume table (the served model's columns) "
                         "to this CSV file; the text output then lists participants only")
    predict.add_argument("--all-volumes", action="store_true", help="classify volumes outside the model's training "
                         "selection (data.selection: regions, devices, lateralities) too; by default they are skipped "
                         "and counted")
    predict.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    predict.set_defaults(func=cmd_predict)


def _study_view_commands(commands) -> None:
    ui = commands.add_parser("ui", help="serve the study's MLflow store and print its runs and compare pages")
    ui.add_argument("spec", help="the sweep YAML, e.g. sweeps/demo.yaml")
    ui.add_argument("overrides", nargs="*", metavar="key=value", help="sweep overrides")
    ui.add_argument("--storage", help="Optuna storage URL (default: the spec's storage)")
    ui.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's mlflow.tracking_uri)")
    ui.add_argument("--port", type=int, default=5000, help="port of MLflow's server (default: 5000)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    ui.set_defaults(func=cmd_ui)

    report = commands.add_parser("report", help="one self-contained HTML report of a study")
    report.add_argument("spec", help="the sweep YAML, e.g. sweeps/demo.yaml")
    report.add_argument("overrides", nargs="*", metavar="key=value", help="sweep overrides")
    report.add_argument("--out", help="the HTML file to write (default: <study dir>/report.html on the host that "
                        "launched the study, else ./<study name>/report.html)")
    report.add_argument("--storage", help="Optuna storage URL (default: the spec's storage)")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's mlflow.tracking_uri)")
    report.set_defaults(func=cmd_report)


def _run(args) -> int:
    """The command, with library logs and MLflow's download bars off the console (`octft.console`; `--verbose`, where
    a command has it, shows them). `octft ui` is left alone: it runs MLflow's server, which logs for itself."""
    if args.func is cmd_ui:
        return int(args.func(args) or 0)
    from octft.console import quiet_console

    with quiet_console(verbose=getattr(args, "verbose", False)):
        return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    from octft.errors import OctftError

    parser = build_parser()
    # `key=value` overrides may follow options too (`octft sweep launch SPEC --workers 2 data.uri=x`):
    # argparse stops collecting positionals at the first option, so gather the stragglers here.
    args, rest = parser.parse_known_args(argv)
    stragglers = [token for token in rest if "=" in token and not token.startswith("-")]
    if len(stragglers) != len(rest) or (stragglers and not hasattr(args, "overrides")):
        parser.parse_args(argv)  # let argparse report the unknown arguments as usual
    if stragglers:
        args.overrides = list(args.overrides or []) + stragglers
    try:
        return _run(args)
    # Only octft's own errors are the user's to fix; anything else is a bug and keeps its traceback.
    except OctftError as error:
        print(f"octft: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # a full disk is the user's to fix too, whichever library's write found it
        from octft.io import disk_full_message

        message = disk_full_message(error)
        if message is None:
            raise
        print(f"octft: error: {_one_line(message)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("octft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
