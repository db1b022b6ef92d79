"""Frozen epochs on stored features equal frozen epochs through the encoder; a probe run never touches it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from octft.config import load_experiment
from octft.data.audit import audit_dataset
from octft.data.dataset import prepare_volumes
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.synth import synthesize
from octft.features.frozen import encode_split, frozen_features
from octft.features.store import FeatureKey, FeatureStore
from octft.track import NullTracker
from octft.train.loop import fit
from octft.train.losses import balanced_class_weights
from octft.train.setup import build_model
from octft.train.runtime import load_state, make_runtime

REPO = Path(__file__).resolve().parents[2]
SMALL = {"frames": 4, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    synthesize(root / "data", participants=48, seed=0, **SMALL)
    report = audit_dataset(str(root / "data"))
    prepared = prepare_volumes(str(root / "data"), report.volumes, cache_dir=str(root / "cache"), progress=False, **SMALL)
    cfg = load_experiment(REPO / "experiments" / "demo.yaml", [
        f"data.uri={root / 'data'}", *[f"data.preprocess.{k}={v}" for k, v in SMALL.items()],
        "train.epochs=3", "train.unfreeze_epoch=2", "train.batch_size=8",
    ])
    return cfg, prepared.dataset("train"), prepared.dataset("val"), root


class Record:
    """Reporter keeping the head's parameters, the whole model's, the metrics and the run folder's
    checkpoints (whether `last.pt` exists, the epoch `best.pt` holds) after every epoch."""

    def __init__(self, model, run_dir):
        self.model, self.run_dir, self.heads, self.models, self.metrics = model, run_dir, [], [], []
        self.last_written, self.best_written = [], []

    def report(self, epoch, value, metrics):
        self.heads.append({k: v.detach().clone() for k, v in self.model.head.state_dict().items()})
        self.models.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        self.metrics.append(dict(metrics))
        self.last_written.append((self.run_dir / "last.pt").is_file())
        best = self.run_dir / "checkpoint" / "best.pt"
        self.best_written.append(load_state(best)["epoch"] if best.is_file() else None)
        return None


def key_for(cfg, train_set, val_set, kind="pooled") -> FeatureKey:
    return FeatureKey(encoder=f"scratch:seed={cfg.train.seed}", model=cfg.model.model_dump(mode="json"),
                      precision="fp32", preprocessing=cfg.data.preprocess.model_dump(mode="json"), kind=kind,
                      sources={"train": list(train_set.volumes.source_id), "val": list(val_set.volumes.source_id)})


def run(cfg, train_set, val_set, run_dir, *, features_root=None, unfreeze_epoch=2, kind="pooled", **fit_kwargs):
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, len(CLASS_SHORT_NAMES))[0]
    runtime = make_runtime("cpu")
    features = None
    if features_root is not None:
        features = frozen_features(FeatureStore(features_root), key_for(cfg, train_set, val_set, kind), model.encoder,
                                   train_set, val_set, runtime=runtime, batch_size=8)
    record = Record(model, run_dir)
    result = fit(
        model, train_set, val_set, runtime=runtime, tracker=NullTracker(), reporter=record,
        class_names=CLASS_SHORT_NAMES, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
        accumulation_steps=cfg.train.accumulation_steps, unfreeze_epoch=unfreeze_epoch, lr_head=cfg.optim.lr_head,
        lr_encoder=cfg.optim.lr_encoder, class_weights=balanced_class_weights(train_set.labels.tolist(), 4),
        seed=cfg.train.seed, run_dir=run_dir, frozen_features=features, **fit_kwargs,
    )
    return result, record, features


COMPARED = ("val/loss", "val/balanced_accuracy", "val/macro_f1", "val_volume/balanced_accuracy", "train/loss")


def test_frozen_epochs_on_features_equal_frozen_epochs_through_the_encoder(small, tmp_path):
    cfg, train_set, val_set, _ = small
    _, plain, _ = run(cfg, train_set, val_set, tmp_path / "plain")
    _, stored, features = run(cfg, train_set, val_set, tmp_path / "stored", features_root=tmp_path / "features")
    assert features.built
    assert [m["train/on_features"] for m in stored.metrics] == [1.0, 1.0, 0.0]
    assert [m["train/on_features"] for m in plain.metrics] == [0.0, 0.0, 0.0]
    for epoch in (0, 1):  # frozen: head weights and metrics
        for name, value in plain.heads[epoch].items():
            torch.testing.assert_close(stored.heads[epoch][name], value, rtol=1e-5, atol=1e-6)
        for metric in COMPARED:
            assert stored.metrics[epoch][metric] == pytest.approx(plain.metrics[epoch][metric], rel=1e-5, abs=1e-6)
    # The first unfrozen epoch continues from that head: the whole model still agrees after it.
    for name, value in plain.models[2].items():
        torch.testing.assert_close(stored.models[2][name], value, rtol=1e-4, atol=1e-5)
    assert stored.metrics[2]["val/loss"] == pytest.approx(plain.metrics[2]["val/loss"], rel=1e-4)


def test_a_probe_run_trains_only_the_head_on_features_and_reuses_the_store(small, tmp_path):
    cfg, train_set, val_set, _ = small
    _, first, features = run(cfg, train_set, val_set, tmp_path / "a", features_root=tmp_path / "f", unfreeze_epoch=None)
    _, second, reused = run(cfg, train_set, val_set, tmp_path / "b", features_root=tmp_path / "f", unfreeze_epoch=None)
    assert features.built and not reused.built
    assert reused.metrics()["features/reused"] == 1.0
    assert all(m["train/on_features"] == 1.0 and m["train/encoder_trainable"] == 0.0 for m in first.metrics)
    encoder_before = {k: v for k, v in first.models[0].items() if k.startswith("encoder.")}
    encoder_after = {k: v for k, v in first.models[-1].items() if k.startswith("encoder.")}
    assert all(torch.equal(encoder_before[k], encoder_after[k]) for k in encoder_before)
    assert any(not torch.equal(first.heads[0][k], first.heads[-1][k]) for k in first.heads[0])
    for name, value in first.heads[-1].items():  # the same run again, from the reused entry: the same head
        torch.testing.assert_close(second.heads[-1][name], value, rtol=0, atol=0)


def test_token_features_feed_the_attentive_probe(small, tmp_path):
    cfg, train_set, val_set, _ = small
    cfg = cfg.model_copy(deep=True)
    cfg.model.head = "attentive"
    _, plain, _ = run(cfg, train_set, val_set, tmp_path / "plain")
    _, stored, features = run(cfg, train_set, val_set, tmp_path / "stored", features_root=tmp_path / "f", kind="tokens")
    assert features.train.features.dtype == np.float16 and features.train.features.shape[1:] == (8, 48)
    for name, value in plain.heads[1].items():  # float16 storage: close, not equal
        torch.testing.assert_close(stored.heads[1][name], value, rtol=2e-2, atol=2e-3)


def test_encode_split_matches_the_encoder_row_by_row(small):
    cfg, train_set, _, _ = small
    torch.manual_seed(0)
    encoder = build_model(cfg, 4)[0].encoder.eval()
    pooled = encode_split(encoder, train_set, runtime=make_runtime("cpu"), batch_size=8, kind="pooled")
    assert pooled.shape == (len(train_set), 48)
    with torch.no_grad():
        for index in (0, len(train_set) - 1):  # the last row sits in a padded batch
            expected = encoder.forward_features(train_set[index]["x"][None]).mean(dim=1)[0].numpy()
            np.testing.assert_allclose(pooled[index], expected, rtol=1e-5, atol=1e-6)


def test_only_the_last_epoch_on_features_writes_last_pt_and_their_best(small, tmp_path):
    cfg, train_set, val_set, _ = small
    _, plain, _ = run(cfg, train_set, val_set, tmp_path / "plain")
    _, stored, _ = run(cfg, train_set, val_set, tmp_path / "stored", features_root=tmp_path / "features")
    assert plain.last_written == [False, True, True]  # every epoch's last.pt (seen at the next report)
    assert stored.last_written == [False, False, True]  # epoch 0: none; epoch 1, the last before unfreezing: one
    values = [m["val/balanced_accuracy"] for m in stored.metrics]
    best_frozen = max(range(2), key=lambda e: (values[e], -e))  # the first of equal values is the best
    # Written after epoch 1, before the encoder moved: the frozen phase's best head on the untouched encoder.
    assert stored.best_written[:2] == [None, None]
    assert stored.best_written[2] in (best_frozen, 2)
    if stored.best_written[2] == best_frozen:
        saved = load_state(tmp_path / "stored" / "checkpoint" / "best.pt")["model"]
        for name, value in stored.models[best_frozen].items():
            torch.testing.assert_close(saved[name], value, rtol=0, atol=0)


def test_a_probe_run_writes_its_best_head_and_last_pt_once_at_the_end(small, tmp_path):
    cfg, train_set, val_set, _ = small
    result, record, _ = run(cfg, train_set, val_set, tmp_path / "probe", features_root=tmp_path / "f",
                            unfreeze_epoch=None)
    assert record.last_written == [False, False, False] and record.best_written == [None, None, None]
    last = load_state(tmp_path / "probe" / "last.pt")
    assert '"status": "completed"' in last["loop_state"]
    best = load_state(tmp_path / "probe" / "checkpoint" / "best.pt")
    assert best["epoch"] == result.best_epoch
    for name, value in record.models[result.best_epoch].items():  # the best epoch's head, not the last one's
        torch.testing.assert_close(best["model"][name], value, rtol=0, atol=0)
    assert (tmp_path / "probe" / "best" / "val_predictions.csv").is_file()
