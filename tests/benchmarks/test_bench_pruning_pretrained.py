"""benchmarks/bench_pruning.py --pretrained-encoder: the encoder it pretrains is what every trial starts from.

One real (one-epoch) pretraining run on a tiny synthetic release writes the checkpoint; `model.checkpoint` must load it
strictly, weight for weight, and the mode's sweep overrides must apply to the demo sweep.
"""

from __future__ import annotations

import torch

from octft.config import load_experiment
from octft.sweep.spec import load_sweep
from octft.train.setup import build_encoder_for


def test_pretrained_encoder_loads_through_model_checkpoint(tmp_path, bench):
    pretraining = bench.pretrain_encoder(tmp_path / "pretrain", bench.EXPERIMENT, participants=24, epochs=1)

    encoder, report = build_encoder_for(load_experiment(bench.EXPERIMENT, [f"model.checkpoint={pretraining.checkpoint}"]))

    assert report.ok, report.summary()
    assert report.source_key == "encoder"
    saved = torch.load(pretraining.checkpoint, map_location="cpu", weights_only=True)["encoder"]
    assert saved.keys() == encoder.state_dict().keys()
    assert all(torch.equal(saved[name], value) for name, value in encoder.state_dict().items())


def test_pretrained_overrides_apply_to_the_demo_sweep(tmp_path, bench):
    checkpoint = tmp_path / "encoder.pt"

    sweep = load_sweep(bench.SPEC, bench.pretrained_overrides(checkpoint))

    assert sweep.fixed["model.checkpoint"] == str(checkpoint)
    assert (sweep.space["optim.lr_encoder"].low, sweep.space["optim.lr_encoder"].high) == (1e-6, 1e-3)
    shipped = load_sweep(bench.PRETRAINED_PRUNER_SWEEP).pruner.collapse
    assert sweep.pruner.collapse == shipped
