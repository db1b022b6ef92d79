"""Heads trained in one stacked pass (`fit_heads`) equal the same heads trained one at a time by `fit()`: every
epoch's metrics, the final weights, the checkpoints; a head that is pruned or fails leaves the others as they were."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from octft.config import load_experiment
from octft.data.audit import audit_dataset
from octft.data.dataset import prepare_volumes
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.synth import synthesize
from octft.features.frozen import frozen_features
from octft.features.store import FeatureKey, FeatureStore
from octft.train.loop import TrainingError, fit
from octft.train.losses import balanced_class_weights
from octft.train.recipe import pass_key
from octft.train.runtime import load_state, make_runtime
from octft.train.setup import build_model
from octft.train.stacked import HeadRun, fit_heads

REPO = Path(__file__).resolve().parents[2]
SMALL = {"frames": 4, "height": 32, "width": 32}
# The stated tolerance: float32 matrix products in another order (an einsum over the stack, not one addmm per head).
TOLERANCE = 1e-5

# Linear and MLP heads of several widths, with and without dropout, with their own rates, decay, smoothing and epochs.
HEADS = [
    {"model.head": "linear", "optim.lr_head": 1e-2, "optim.weight_decay": 0.05, "loss.label_smoothing": 0.1, "train.epochs": 5},
    {"model.head": "mlp", "model.head_hidden_features": 32, "model.head_dropout": 0.0, "optim.lr_head": 3e-3,
     "optim.weight_decay": 0.01, "loss.label_smoothing": 0.0, "train.epochs": 4},
    {"model.head": "mlp", "model.head_hidden_features": 64, "model.head_dropout": 0.3, "optim.lr_head": 1e-3,
     "optim.weight_decay": 0.2, "loss.label_smoothing": 0.15, "train.epochs": 6},
    {"model.head": "linear", "optim.lr_head": 5e-2, "optim.weight_decay": 1e-4, "loss.label_smoothing": 0.0, "train.epochs": 3},
    # The widest MLP ends first: the others keep the stack's padded width (and their dropout) without it.
    {"model.head": "mlp", "model.head_hidden_features": 128, "model.head_dropout": 0.1, "optim.lr_head": 2e-3,
     "optim.weight_decay": 0.05, "loss.label_smoothing": 0.05, "train.epochs": 2},
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("stacked")
    synthesize(root / "data", participants=48, seed=0, **SMALL)
    report = audit_dataset(str(root / "data"))
    prepared = prepare_volumes(str(root / "data"), report.volumes, cache_dir=str(root / "cache"), progress=False, **SMALL)
    base = [f"data.uri={root / 'data'}", *[f"data.preprocess.{k}={v}" for k, v in SMALL.items()],
            "train.batch_size=8", "train.unfreeze_epoch=null", "train.early_stopping_patience=null"]
    cfgs = [load_experiment(REPO / "experiments" / "demo.yaml", base + [f"{k}={v}" for k, v in head.items()])
            for head in HEADS]
    train_set, val_set = prepared.dataset("train"), prepared.dataset("val")
    runtime = make_runtime("cpu")
    encoder_model = model_of(cfgs[0])
    key = FeatureKey(encoder="scratch:seed=0", model=cfgs[0].model.model_dump(mode="json", exclude={"head"}),
                     precision="fp32", preprocessing=cfgs[0].data.preprocess.model_dump(mode="json"), kind="pooled",
                     sources={"train": list(train_set.volumes.source_id), "val": list(val_set.volumes.source_id)})
    features = frozen_features(FeatureStore(root / "features"), key, encoder_model.encoder, train_set, val_set,
                               runtime=runtime, batch_size=8)
    weights = balanced_class_weights(train_set.labels.tolist(), len(CLASS_SHORT_NAMES))
    return cfgs, train_set, val_set, features, weights, root


def model_of(cfg):
    torch.manual_seed(cfg.train.seed)  # as RunCache.model: the head drawn right after the encoder
    return build_model(cfg, len(CLASS_SHORT_NAMES))[0]


class Record:
    """A tracker and reporter in one: every epoch's metrics; `prune_at` asks to stop at that epoch."""

    def __init__(self, prune_at: int | None = None) -> None:
        self.metrics: list[dict[str, float]] = []
        self.prune_at = prune_at

    def log_metrics(self, metrics, step):
        self.metrics.append(dict(metrics))

    def report(self, epoch, value, metrics):
        return "pruned (test)" if epoch == self.prune_at else None


def alone(cfg, small, run_dir: Path, record: Record, accumulation_steps: int = 1):
    _, train_set, val_set, features, weights, _ = small
    model = model_of(cfg)
    result = fit(model, train_set, val_set, runtime=make_runtime("cpu"), tracker=record, reporter=record,
                 class_names=CLASS_SHORT_NAMES, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                 accumulation_steps=accumulation_steps, unfreeze_epoch=None, lr_head=cfg.optim.lr_head, lr_encoder=cfg.optim.lr_encoder,
                 weight_decay=cfg.optim.weight_decay, label_smoothing=cfg.loss.label_smoothing, class_weights=weights,
                 seed=cfg.train.seed, run_dir=run_dir, frozen_features=features)
    return model, result


def stacked(cfgs, small, run_dirs, records, *, lines=None, accumulation_steps=1):
    _, _, _, features, weights, _ = small
    models = [model_of(cfg) for cfg in cfgs]
    runs = [HeadRun(model, lr_head=cfg.optim.lr_head, weight_decay=cfg.optim.weight_decay,
                    label_smoothing=cfg.loss.label_smoothing, epochs=cfg.train.epochs, run_dir=run_dir, tracker=record,
                    reporter=record, lr_encoder=cfg.optim.lr_encoder, log=(lines.append if lines is not None else print))
            for cfg, model, run_dir, record in zip(cfgs, models, run_dirs, records)]
    results = fit_heads(runs, features, runtime=make_runtime("cpu"), class_names=CLASS_SHORT_NAMES,
                        batch_size=cfgs[0].train.batch_size, accumulation_steps=accumulation_steps,
                        class_weights=weights, seed=cfgs[0].train.seed)
    return models, results


def assert_same_run(one: Record, many: Record, model_one, model_many, dir_one: Path, dir_many: Path) -> None:
    assert len(one.metrics) == len(many.metrics)
    for epoch, (a, b) in enumerate(zip(one.metrics, many.metrics)):
        for key in a:
            if key.startswith("perf/") or key.startswith("xla/"):
                continue
            assert key in b, key
            if math.isnan(a[key]):
                assert math.isnan(b[key]), (epoch, key)
            else:
                assert b[key] == pytest.approx(a[key], abs=TOLERANCE), (epoch, key, a[key], b[key])
    for (name, a), (_, b) in zip(model_one.head.state_dict().items(), model_many.head.state_dict().items()):
        torch.testing.assert_close(b, a, atol=TOLERANCE, rtol=TOLERANCE, msg=name)
    best_one, best_many = load_state(dir_one / "checkpoint" / "best.pt"), load_state(dir_many / "checkpoint" / "best.pt")
    assert best_one["epoch"] == best_many["epoch"]
    for name in best_one["model"]:
        torch.testing.assert_close(best_many["model"][name], best_one["model"][name], atol=TOLERANCE, rtol=TOLERANCE)
    last_one, last_many = load_state(dir_one / "last.pt"), load_state(dir_many / "last.pt")
    assert last_one["loop_state"] and last_many["loop_state"]
    assert (dir_many / "best" / "val_predictions.csv").read_text().splitlines()[0] == \
        (dir_one / "best" / "val_predictions.csv").read_text().splitlines()[0]


def test_stacked_heads_equal_heads_trained_one_at_a_time(small, tmp_path):
    cfgs = small[0]
    singles = []
    for k, cfg in enumerate(cfgs):
        record = Record()
        model, result = alone(cfg, small, tmp_path / f"alone-{k}", record)
        singles.append((record, model, result))
    records = [Record() for _ in cfgs]
    lines: list[str] = []
    models, results = stacked(cfgs, small, [tmp_path / f"stacked-{k}" for k in range(len(cfgs))], records, lines=lines)
    for k, (record, model, result) in enumerate(singles):
        assert results[k].status == result.status == "completed"
        assert results[k].epochs_run == cfgs[k].train.epochs
        assert results[k].best_epoch == result.best_epoch
        assert results[k].best_value == pytest.approx(result.best_value, abs=TOLERANCE)
        assert_same_run(record, records[k], model, models[k], tmp_path / f"alone-{k}", tmp_path / f"stacked-{k}")
    # Every head's epochs went to its own log; the pass got smaller as heads finished.
    assert len(lines) == sum(cfg.train.epochs for cfg in cfgs)
    assert [m["perf/heads_in_pass"] for m in records[2].metrics] == [5, 5, 4, 3, 2, 1]


def test_stacked_heads_accumulate_micro_batches_as_fit_does(small, tmp_path):
    # Two micro-batches of 4 rows a step: each head's gradient is summed over them before its one step.
    cfgs = [small[0][0], small[0][2]]
    records = [Record() for _ in cfgs]
    models, results = stacked(cfgs, small, [tmp_path / f"stacked-{k}" for k in range(2)], records, accumulation_steps=2)
    for k, cfg in enumerate(cfgs):
        record = Record()
        model, result = alone(cfg, small, tmp_path / f"alone-{k}", record, accumulation_steps=2)
        assert results[k].best_value == pytest.approx(result.best_value, abs=TOLERANCE)
        assert_same_run(record, records[k], model, models[k], tmp_path / f"alone-{k}", tmp_path / f"stacked-{k}")


def test_a_pruned_head_leaves_the_stack_and_the_others_as_they_were(small, tmp_path):
    cfgs = small[0][:3]
    records = [Record(prune_at=1 if k == 0 else None) for k in range(len(cfgs))]
    models, results = stacked(cfgs, small, [tmp_path / f"s-{k}" for k in range(len(cfgs))], records)
    assert results[0].status == "pruned" and results[0].epochs_run == 2
    assert "pruned (test)" in results[0].stop_reason
    for k in (1, 2):
        record = Record()
        model, result = alone(cfgs[k], small, tmp_path / f"a-{k}", record)
        assert results[k].status == "completed"
        assert_same_run(record, records[k], model, models[k], tmp_path / f"a-{k}", tmp_path / f"s-{k}")


def test_a_failed_head_fails_only_its_own_run(small, tmp_path):
    cfgs = list(small[0][:2])
    bad = cfgs[0].model_copy(deep=True)
    bad.optim.lr_head = 1e12  # its loss goes non-finite
    records = [Record(), Record()]
    _, results = stacked([bad, cfgs[1]], small, [tmp_path / "bad", tmp_path / "good"], records)
    assert isinstance(results[0], TrainingError) and "training loss is" in str(results[0])
    record = Record()
    model, result = alone(cfgs[1], small, tmp_path / "alone", record)
    assert results[1].status == "completed" and results[1].best_value == pytest.approx(result.best_value, abs=TOLERANCE)


def test_a_bfloat16_run_trains_alone(small, tmp_path):
    # The pass takes its gradients in float32 closed form: a bf16 run is left to fit(), which autocasts.
    cfg = small[0][0].model_copy(deep=True)
    cfg.runtime.kind = "cpu"
    assert pass_key(cfg) is not None
    cfg.runtime.precision = "bf16"
    assert pass_key(cfg) is None
    _, _, _, features, _, _ = small
    run = HeadRun(model_of(cfg), lr_head=1e-3, weight_decay=0.0, label_smoothing=0.0, epochs=1, run_dir=tmp_path,
                  tracker=Record())
    with pytest.raises(ValueError, match="float32"):
        fit_heads([run], features, runtime=make_runtime("cpu", "bf16"), class_names=CLASS_SHORT_NAMES, batch_size=8)


def test_volume_metrics_off_leaves_val_volume_out_of_both_paths(small, tmp_path):
    cfg = small[0][1]
    one, many = Record(), Record()
    _, train_set, val_set, features, weights, _ = small
    fit(model_of(cfg), train_set, val_set, runtime=make_runtime("cpu"), tracker=one, class_names=CLASS_SHORT_NAMES,
        epochs=2, batch_size=8, accumulation_steps=1, unfreeze_epoch=None, lr_head=1e-3, lr_encoder=0.0,
        class_weights=weights, run_dir=tmp_path / "alone", frozen_features=features, volume_metrics=False)
    run = HeadRun(model_of(cfg), lr_head=1e-3, weight_decay=0.05, label_smoothing=0.0, epochs=2,
                  run_dir=tmp_path / "stacked", tracker=many, volume_metrics=False, log=lambda line: None)
    fit_heads([run], features, runtime=make_runtime("cpu"), class_names=CLASS_SHORT_NAMES, batch_size=8,
              class_weights=weights)
    for record in (one, many):
        assert len(record.metrics) == 2
        assert all("val/balanced_accuracy" in m and not any(k.startswith("val_volume/") for k in m)
                   for m in record.metrics)
    assert set(many.metrics[0]) - set(one.metrics[0]) == {"perf/heads_in_pass"}
