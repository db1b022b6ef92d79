import inspect
import json
import math
import shlex
import warnings
from pathlib import Path

import optuna
import pytest
import yaml

from octft.config import ConfigError, load_experiment, parse_override
from octft.redaction import redact_url
from octft.stores import STORAGE_ENV
from octft.sweep.space import distributions, parse_space, suggest
from octft.sweep.spec import build_sampler, format_value, load_sweep, sampler_settings

ROOT = Path(__file__).resolve().parents[2]

SPACE = {
    "optim.lr_head": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
    "optim.lr_encoder": {"type": "float", "low": 1.0e-6, "high": 1.0e-4, "log": True},
    "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 2},  # below the fixed 3 epochs
    "loss.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
    "train.accumulation_steps": {"type": "categorical", "choices": [1, 2, 4]},
    "model.head": {"type": "categorical", "choices": ["mlp", "linear"]},
}


@pytest.fixture(autouse=True)
def _no_storage_env(monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_sweep(tmp_path, **changes):
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({"name": "tiny", "model": {"checkpoint": "scratch"}, "train": {"epochs": 4, "batch_size": 2, "unfreeze_epoch": 1}}))
    tree = {"base": str(base), "study_name": "tiny", "fixed": {"train.epochs": 3}, "space": SPACE}
    tree.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text("# a tiny sweep\n" + yaml.safe_dump(tree, sort_keys=False))
    return path


def error_of(path, overrides=None):
    with pytest.raises(ConfigError) as error:
        load_sweep(path, overrides)
    return str(error.value)


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # base paths are relative to the repo root
    text = path.read_text()
    assert text.lstrip().startswith("#") and "octft " in text.split("\nbase:", 1)[0], (
        f"{path.name} must open with a comment giving its purpose and the command that runs it"
    )
    spec = load_sweep(path)
    flat = load_experiment(spec.base).flat()
    assert set(spec.space) <= set(flat) and set(spec.fixed) <= set(flat)
    if spec.fixed.get("train.unfreeze_epoch", "sampled") is None:
        return  # a probe study: heads on stored features, no fine-tune knobs
    assert spec.space["train.accumulation_steps"].choices  # the effective-batch knob is swept
    batch_size = load_experiment(spec.base).train.batch_size
    effective = [batch_size * steps for steps in spec.space["train.accumulation_steps"].choices]
    # Scenario A searches effective batches 8..64; the CPU demo keeps the two that compile quickly on XLA:CPU.
    assert effective == ([8, 16, 32, 64] if path.name == "scenario_a.yaml" else [8, 16])


def test_demo_sweep_reaches_the_collapsing_head_learning_rates(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_sweep("sweeps/demo.yaml").space["optim.lr_head"].high >= 5e-2


def test_unknown_keys_name_the_key_and_the_valid_ones(tmp_path):
    message = error_of(write_sweep(tmp_path, n_trial=3))
    assert "sweep.yaml" in message and "'n_trial'" in message and "n_trials" in message and "study_name" in message

    message = error_of(write_sweep(tmp_path, sampler={"type": "tpe", "multivariat": True}))
    assert "'sampler.multivariat'" in message and "multivariate" in message and "constant_liar" in message

    message = error_of(write_sweep(tmp_path, space={"optim.lr_head": {"type": "float", "low": 1e-4, "hi": 1e-2}}))
    assert "'optim.lr_head'" in message and "'hi'" in message and "high" in message

    message = error_of(write_sweep(tmp_path, space={"optim.lr_head": {"type": "uniform", "low": 0, "high": 1}}))
    assert "'optim.lr_head'" in message and "'uniform'" in message and "categorical" in message


def test_a_misspelled_space_or_fixed_path_is_an_error_naming_it(tmp_path):
    message = error_of(write_sweep(tmp_path, space={"optim.lr_heads": {"type": "float", "low": 1e-4, "high": 1e-2}}))
    assert "sweep.yaml" in message and "'optim.lr_heads'" in message and "lr_head" in message and "lr_encoder" in message

    message = error_of(write_sweep(tmp_path, fixed={"train.epoch": 3}))
    assert "fixed" in message and "'train.epoch'" in message and "epochs" in message


def test_space_values_the_config_rejects_are_errors_at_load_time(tmp_path):
    # label_smoothing must be < 1: the high end would fail in a trial, so it fails at load.
    message = error_of(write_sweep(tmp_path, space={"loss.label_smoothing": {"type": "float", "low": 0.0, "high": 1.5}}))
    assert "'loss.label_smoothing'" in message and "1.5" in message

    message = error_of(write_sweep(tmp_path, space={"train.epochs": {"type": "categorical", "choices": [2, 0]}}, fixed={}))
    assert "'train.epochs'" in message and "value 0" in message

    message = error_of(write_sweep(tmp_path, space={"optim.lr_head": {"type": "float", "low": 1e-2, "high": 1e-4}}))
    assert "'optim.lr_head'" in message and "above high" in message

    message = error_of(write_sweep(tmp_path, space={"optim.lr_head": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}))
    assert "'optim.lr_head'" in message and "log" in message


def test_missing_base_and_missing_sweep_are_errors_naming_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_of(write_sweep(tmp_path, base="experiments/nope.yaml"))
    assert "'experiments/nope.yaml'" in message and "repo root" in message
    assert "no such sweep file" in error_of(tmp_path / "absent.yaml")
    assert "base: Input should be a valid string" in error_of(write_sweep(tmp_path, base=None))


def test_a_key_both_fixed_and_swept_is_an_error(tmp_path):
    message = error_of(write_sweep(tmp_path, fixed={"optim.lr_head": 1e-3}))
    assert "optim.lr_head" in message and "both fixed and in the space" in message


def test_replay_command_round_trips_exactly_through_the_cli_parser(tmp_path):
    spec = load_sweep(write_sweep(tmp_path))
    study = optuna.create_study(sampler=build_sampler(spec))
    awkward = {"optim.lr_head": 0.3 - 0.2, "optim.lr_encoder": 1.2345678901234567e-05, "train.unfreeze_epoch": 2,
               "loss.label_smoothing": 0.15, "train.accumulation_steps": 4, "model.head": "linear"}
    study.enqueue_trial(awkward)
    extra = ["data.uri=/data with space/aireadi"]
    for _ in range(12):
        trial = study.ask()
        params = suggest(trial, spec.space)
        argv = shlex.split(spec.replay_command(params, extra=extra))
        assert argv[:3] == ["octft", "train", spec.base]
        replayed = load_experiment(argv[2], argv[3:]).flat()
        for key, value in params.items():
            assert replayed[key] == value and type(replayed[key]) is type(value), key
        assert replayed["train.epochs"] == 3 and replayed["data.uri"] == "/data with space/aireadi"
        assert (replayed["train.objective.metric"], replayed["train.objective.direction"]) == (
            spec.objective.metric, spec.objective.direction)
        study.tell(trial, 0.5)
    assert study.trials[0].params["optim.lr_head"] == awkward["optim.lr_head"] != 0.1  # the enqueued float survived


def test_trial_overrides_put_the_objective_and_fixed_first_then_the_space_in_order(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, objective={"metric": "val/loss", "direction": "minimize"}))
    params = {"model.head": "mlp", "train.accumulation_steps": 2, "loss.label_smoothing": 0.05,
              "train.unfreeze_epoch": 1, "optim.lr_encoder": 1e-05, "optim.lr_head": 0.0012}
    assert spec.trial_overrides(params) == [
        "train.objective.metric=val/loss", "train.objective.direction=minimize", "train.epochs=3", "optim.lr_head=0.0012", "optim.lr_encoder=1e-05", "train.unfreeze_epoch=1",
        "loss.label_smoothing=0.05", "train.accumulation_steps=2", "model.head=mlp",
    ]
    with pytest.raises(ValueError, match="unknown \\['optim.lr'\\].*missing \\['optim.lr_head'\\]"):
        spec.trial_overrides({**{k: v for k, v in params.items() if k != "optim.lr_head"}, "optim.lr": 0.1})


def test_fixed_values_mean_what_they_mean_on_the_command_line(tmp_path):
    # YAML reads 1e-3 (no dot) as a string; the command line, and so a replay, reads a number.
    path = write_sweep(tmp_path)
    path.write_text(path.read_text().replace("train.epochs: 3", "train.epochs: 3\n  optim.weight_decay: 1e-3"))
    spec = load_sweep(path)
    assert spec.fixed["optim.weight_decay"] == 0.001
    lows = {"optim.lr_head": 1e-4, "optim.lr_encoder": 1e-6, "train.unfreeze_epoch": 0, "loss.label_smoothing": 0.0,
            "train.accumulation_steps": 1, "model.head": "mlp"}
    assert spec.trial_overrides(lows)[2:4] == ["train.epochs=3", "optim.weight_decay=0.001"]


def test_format_value_reads_back_exactly_or_refuses():
    for value in (0.1 + 0.2, 1e-05, 3.0, 7, True, None, "macula", "a: b", ["macula", "optic_disc"]):
        text = format_value(value)
        parsed = parse_override(f"key={text}")[1]  # exactly what the CLI does with the text
        assert parsed == value and type(parsed) is type(value), (value, text)
    with pytest.raises(ConfigError, match="'1e-3'"):
        format_value("1e-3")


def test_sweep_overrides_address_fixed_and_space_entries(tmp_path):
    spec = load_sweep(write_sweep(tmp_path), ["n_trials=2", "sampler.seed=7", "fixed.train.epochs=5",
                                              "space.optim.lr_head.high=0.5", "space.model.head=null"])
    assert spec.n_trials == 2 and spec.sampler.seed == 7 and spec.fixed == {"train.epochs": 5}
    assert spec.space["optim.lr_head"].high == 0.5 and "model.head" not in spec.space
    assert "'fixed.train.epochz'" not in error_of(write_sweep(tmp_path), ["fixed.train.epochz=2"])
    assert "'train.epochz'" in error_of(write_sweep(tmp_path), ["fixed.train.epochz=2"])


DEPRECATED_TPE_ARGUMENTS = {"consider_prior", "prior_weight", "consider_magic_clip", "consider_endpoints", "gamma",
                            "weights", "warn_independent_sampling", "constraints_func"}


def test_every_sampler_argument_is_explicit_and_recorded(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, sampler={"type": "tpe", "seed": 3, "multivariate": False,
                                                     "constant_liar": False, "n_startup_trials": 2}))
    settings = sampler_settings(spec)
    current = set(inspect.signature(optuna.samplers.TPESampler.__init__).parameters) - {"self"}
    # A new TPESampler argument fails here, so a future default change cannot slip in unrecorded.
    assert set(settings) - {"type"} == current - DEPRECATED_TPE_ARGUMENTS
    assert settings == {"type": "tpe", "seed": 3, "n_startup_trials": 2, "n_ei_candidates": 24,
                        "multivariate": False, "group": False, "constant_liar": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated argument is passed
        sampler = build_sampler(spec)
    assert (sampler._multivariate, sampler._constant_liar, sampler._n_startup_trials) == (False, False, 2)
    assert sampler_settings(spec, seed_offset=2)["seed"] == 5


def test_the_seed_makes_sampling_repeatable_and_workers_differ(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, sampler={"type": "random", "seed": 11}))
    assert sampler_settings(spec) == {"type": "random", "seed": 11}

    def draws(seed_offset):
        study = optuna.create_study(sampler=build_sampler(spec, seed_offset=seed_offset))
        return [suggest(study.ask(), spec.space) for _ in range(3)]

    assert draws(0) == draws(0) != draws(1)


def test_tpe_only_settings_with_the_random_sampler_are_an_error(tmp_path):
    message = error_of(write_sweep(tmp_path, sampler={"type": "random", "multivariate": True}))
    assert "multivariate" in message and "tpe" in message


def test_storage_env_overrides_and_the_password_never_shows(tmp_path, monkeypatch):
    assert load_sweep(write_sweep(tmp_path)).storage == "sqlite:///optuna.db"
    monkeypatch.setenv(STORAGE_ENV, "postgresql://octft:s3cret-pw@db.example:5432/optuna")
    spec = load_sweep(write_sweep(tmp_path))
    assert spec.storage == "postgresql://octft:s3cret-pw@db.example:5432/optuna"
    assert spec.storage_redacted == "postgresql://octft:***@db.example:5432/optuna"
    for shown in (repr(spec), str(spec), spec.storage_redacted, str(sampler_settings(spec))):
        assert "s3cret-pw" not in shown
    assert redact_url("sqlite:///optuna.db") == "sqlite:///optuna.db"


def test_suggest_draws_every_entry_within_its_distribution():
    space = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    expected = distributions(space)
    for _ in range(20):
        trial = study.ask()
        params = suggest(trial, space)
        assert params == trial.params and set(params) == set(SPACE)
        assert trial.distributions == expected
        assert 1e-4 <= params["optim.lr_head"] <= 1e-1 and isinstance(params["optim.lr_head"], float)
        assert isinstance(params["train.unfreeze_epoch"], int) and 0 <= params["train.unfreeze_epoch"] <= 4
        assert math.isclose(params["loss.label_smoothing"] / 0.05, round(params["loss.label_smoothing"] / 0.05))
        assert params["model.head"] in ("mlp", "linear")
        study.tell(trial, 0.0)
    # Fixed distributions give an ask() whose params match suggest()'s names and types.
    trial = study.ask(fixed_distributions=expected)
    assert set(trial.params) == set(SPACE) and suggest(trial, space) == trial.params


def test_the_objective_belongs_to_the_objective_section(tmp_path):
    message = error_of(write_sweep(tmp_path, fixed={"train.epochs": 3, "train.objective.metric": "val/loss"}))
    assert "train.objective.metric is set by the sweep's objective" in message
    assert "val/balanced_accuracy" in error_of(write_sweep(tmp_path, objective={"metric": "loss"}))


def test_an_unfreeze_epoch_the_trials_never_reach_is_refused_at_load(tmp_path):
    message = error_of(write_sweep(tmp_path), ["space.train.unfreeze_epoch.high=3"])
    assert "'train.unfreeze_epoch' (value 3)" in message and "must be below train.epochs (3)" in message


NUMERIC_ONLY = ["space.model.head=null", "space.train.accumulation_steps=null"]


@pytest.mark.parametrize("kind, cls, left_at_default", [
    ("gp", optuna.samplers.GPSampler, {"independent_sampler", "constraints_func", "warn_independent_sampling"}),
    ("cmaes", optuna.samplers.CmaEsSampler, {"x0", "independent_sampler", "warn_independent_sampling",
                                             "restart_strategy", "inc_popsize", "source_trials"}),
    ("qmc", optuna.samplers.QMCSampler, {"independent_sampler", "warn_asynchronous_seeding",
                                         "warn_independent_sampling"}),
])
def test_gp_cmaes_and_qmc_samplers_are_built_with_recorded_settings(tmp_path, kind, cls, left_at_default):
    spec = load_sweep(write_sweep(tmp_path, sampler={"type": kind, "seed": 5}), NUMERIC_ONLY)
    settings = sampler_settings(spec)
    current = set(inspect.signature(cls.__init__).parameters) - {"self"}
    # Every argument is either recorded or deliberately left at Optuna's default (callables, fallbacks).
    assert set(settings) - {"type"} == current - left_at_default
    assert settings["type"] == kind and settings["seed"] == 5
    if kind in ("gp", "cmaes"):
        assert settings["n_startup_trials"] == {"gp": 10, "cmaes": 1}[kind]
    sampler = build_sampler(spec)
    assert type(sampler) is cls

    def draws():
        study = optuna.create_study(sampler=build_sampler(spec))
        out = []
        for number in range(6):
            trial = study.ask()
            out.append(suggest(trial, spec.space))
            study.tell(trial, -abs(out[-1]["optim.lr_head"] - 0.003))
        return out

    first = draws()
    assert first == draws()  # seeded: repeatable
    for params in first:
        assert 1e-4 <= params["optim.lr_head"] <= 1e-1 and params["train.unfreeze_epoch"] in (0, 1, 2)


def test_cmaes_runs_its_evolution_on_the_study(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, sampler={"type": "cmaes", "seed": 1, "popsize": 4}), NUMERIC_ONLY)
    study = optuna.create_study(sampler=build_sampler(spec))
    for _ in range(10):
        trial = study.ask()
        params = suggest(trial, spec.space)
        study.tell(trial, -abs(params["optim.lr_head"] - 0.003))
    # CMA-ES keeps its generation in trial system attrs: it sampled, not the random fallback.
    assert any(key.startswith("cma:") for trial in study.trials for key in trial.system_attrs)


def test_qmc_workers_share_one_sequence(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, sampler={"type": "qmc", "seed": 3, "scramble": True}), NUMERIC_ONLY)
    assert sampler_settings(spec, seed_offset=1)["seed"] == 3  # no per-worker seed

    def run(studies):
        for number in range(8):
            study = studies[number % len(studies)]
            trial = study.ask()
            suggest(trial, spec.space)
            study.tell(trial, 0.0)
        return [t.params for t in studies[0].get_trials()]

    alone = run([optuna.create_study(sampler=build_sampler(spec), storage=f"sqlite:///{tmp_path / 'a.db'}", study_name="q")])
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    optuna.create_study(storage=storage, study_name="q")
    workers = [optuna.load_study(study_name="q", storage=storage, sampler=build_sampler(spec, seed_offset=index))
               for index in range(2)]
    # Two workers taking turns draw exactly the points one sampler would: one sequence, no repeats.
    assert run(workers) == alone
    assert len({json.dumps(p, sort_keys=True) for p in alone}) == 8


def test_sampler_settings_belong_to_their_type(tmp_path):
    assert "sigma0 applies to type: cmaes" in error_of(write_sweep(tmp_path, sampler={"type": "gp", "sigma0": 0.1}))
    assert "constant_liar applies to type: tpe" in error_of(write_sweep(tmp_path, sampler={"type": "qmc", "constant_liar": True}))
    assert "needs a seed" in error_of(write_sweep(tmp_path, sampler={"type": "qmc", "seed": None, "scramble": True}))


def test_space_docstring_examples_hold():
    import doctest

    from octft.sweep import space

    assert doctest.testmod(space).failed == 0


def test_heads_per_pass_is_a_count_or_auto_half_the_trials(tmp_path):
    assert load_sweep(write_sweep(tmp_path, heads_per_pass=4)).resolved_heads_per_pass() == 4
    for n_trials, auto in ((50, 25), (51, 26), (6, 8), (500, 64), (None, 32)):  # 8 to 64; 32 when bounded by time
        assert load_sweep(write_sweep(tmp_path, n_trials=n_trials)).resolved_heads_per_pass() == auto, n_trials
    for bad in (0, 65, "many"):
        with pytest.raises(ConfigError, match="heads_per_pass"):
            load_sweep(write_sweep(tmp_path, heads_per_pass=bad))
