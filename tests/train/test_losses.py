"""The one loss: per-row values against the formula, the batch value an optimizer step trains on against the
mean over real rows, `val/loss` against the same loss over participants; class weights against scikit-learn."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from octft.train import losses
from octft.train.loop import evaluate_logits
from octft.train.losses import balanced_class_weights, mean_loss, row_losses
from octft.train.runtime import make_runtime
from steps import train_step

NUM_CLASSES = 4


def _padded_batch(seed: int, real: int = 10, pad: int = 6):
    """A fixed-size batch whose last `pad` rows are padding full of values that would poison the loss."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(real + pad, NUM_CLASSES, generator=generator)
    logits[real:] = torch.tensor([float("nan"), 50.0, -50.0, 0.0])
    targets = torch.randint(0, NUM_CLASSES, (real + pad,), generator=generator)
    targets[real:] = -1
    weights = torch.cat([torch.ones(real), torch.zeros(pad)])
    return logits.requires_grad_(), targets, weights, real


def test_docstring_examples_hold():
    assert doctest.testmod(losses).failed == 0


def test_balanced_class_weights_equal_sklearn():
    labels = [0] * 50 + [1] * 7 + [2] * 20 + [3] * 3
    expected = compute_class_weight("balanced", classes=np.arange(NUM_CLASSES), y=np.array(labels))
    weights = balanced_class_weights(labels, NUM_CLASSES)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, torch.tensor(expected, dtype=torch.float32))


def test_balanced_class_weights_name_a_class_missing_from_the_training_split():
    with pytest.raises(ValueError, match=r"class index \[2\] has no samples: the training split lacks it"):
        balanced_class_weights([0, 1, 1, 3], NUM_CLASSES)
    with pytest.raises(ValueError, match=r"labels \[4\] are outside 0..3"):
        balanced_class_weights([0, 1, 2, 3, 4], NUM_CLASSES)


def _formula(logits, targets, class_weights, label_smoothing):
    """The documented per-row loss, written out."""
    log_probs = torch.log_softmax(logits.float(), dim=1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1) * class_weights[targets]
    smooth = -(log_probs * class_weights[None, :]).sum(dim=1)
    return (1 - label_smoothing) * nll + label_smoothing / logits.shape[1] * smooth


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_row_losses_follow_the_documented_formula(label_smoothing):
    logits, targets, _, real = _padded_batch(seed=0)
    class_weights = torch.tensor([0.5, 3.0, 1.0, 2.0])
    rows = row_losses(logits[:real], targets[:real], class_weights=class_weights, label_smoothing=label_smoothing)
    torch.testing.assert_close(rows, _formula(logits[:real], targets[:real], class_weights, label_smoothing))
    unweighted = row_losses(logits[:real], targets[:real], label_smoothing=label_smoothing)
    torch.testing.assert_close(unweighted, _formula(logits[:real], targets[:real], torch.ones(4), label_smoothing))


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        return self.layer(x)


def _step(model, batch, class_weights, label_smoothing, accumulation_steps=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_step(
        model, batch, optimizer=optimizer, accumulation_steps=accumulation_steps, runtime=make_runtime("cpu"),
        loss_fn=lambda logits, y: row_losses(logits, y, class_weights=class_weights, label_smoothing=label_smoothing),
    )


def test_the_step_trains_on_the_mean_over_real_rows_not_torchs_weighted_mean():
    torch.manual_seed(0)
    model = _Linear()
    x = torch.randn(16, 6)
    y = torch.randint(0, NUM_CLASSES, (16,))
    w = torch.cat([torch.ones(10), torch.zeros(6)])
    y[10:] = 3
    class_weights = torch.tensor([0.5, 3.0, 1.0, 2.0])
    with torch.no_grad():
        logits = model(x[:10])
    expected = _formula(logits, y[:10], class_weights, 0.1).mean()

    out = _step(model, {"x": x, "y": y, "w": w}, class_weights, 0.1)

    torch.testing.assert_close(out["loss_sum"] / out["weight_sum"], expected)
    torchs_mean = F.cross_entropy(logits, y[:10], weight=class_weights, label_smoothing=0.1)
    assert not torch.isclose(expected, torchs_mean)  # the documented difference is real


def test_accumulated_micro_batches_and_padding_train_as_one_batch():
    torch.manual_seed(1)
    x, y = torch.randn(8, 6), torch.randint(0, NUM_CLASSES, (8,))
    class_weights = torch.tensor([0.5, 3.0, 1.0, 2.0])
    whole, split = _Linear(), _Linear()
    split.load_state_dict(whole.state_dict())
    _step(whole, {"x": x, "y": y, "w": torch.ones(8)}, class_weights, 0.1)
    # The same rows as two micro-batches plus 8 padding rows full of garbage.
    padded = {"x": torch.cat([x, torch.full((8, 6), 1e6)]), "y": torch.cat([y, torch.zeros(8, dtype=torch.long)]),
              "w": torch.cat([torch.ones(8), torch.zeros(8)])}
    _step(split, padded, class_weights, 0.1, accumulation_steps=2)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b)


def test_val_loss_is_plain_cross_entropy_over_participants():
    """One scale for every trial: no class weights, no smoothing, whatever a trial trains with."""
    rng = np.random.default_rng(0)
    participants = ["1", "1", "2", "3", "3", "4", "5", "6"]
    targets = np.array([0, 0, 1, 2, 2, 3, 0, 1])
    logits = rng.normal(size=(8, NUM_CLASSES)).astype(np.float32)

    metrics = evaluate_logits(logits, targets, participants, ["a", "b", "c", "d"])

    mean_logits = np.stack([logits[[0, 1]].mean(0), logits[2], logits[[3, 4]].mean(0), logits[5], logits[6], logits[7]])
    expected = F.cross_entropy(torch.from_numpy(mean_logits), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert metrics["val/loss"] == pytest.approx(float(expected), rel=1e-6)
    assert metrics["val/participants"] == 6



def test_bfloat16_logits_are_scored_in_float32():
    logits, targets, _, real = _padded_batch(seed=3)
    low_precision = logits.detach()[:real].to(torch.bfloat16)
    rows = row_losses(low_precision, targets[:real], label_smoothing=0.1)
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, _formula(low_precision.float(), targets[:real], torch.ones(4), 0.1))
    assert mean_loss(low_precision, targets[:real], label_smoothing=0.1) == pytest.approx(float(rows.mean()))


def test_bad_arguments_are_named():
    logits, targets, _, real = _padded_batch(seed=4)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        row_losses(logits[:real], targets[:real], label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"class_weights must have shape \(4,\)"):
        row_losses(logits[:real], targets[:real], class_weights=torch.ones(3))
    with pytest.raises(ValueError, match="targets"):
        row_losses(logits, targets[:-1])


# Run in a fresh interpreter: once any CPU backward has run in a process, torch's autograd engine has no
# queue for an XLA device registered later, and an XLA backward fails an internal assert (torch 2.9).
_XLA_SCRIPT = """
import json, sys
import torch, torch_xla
import torch_xla.debug.metrics as xla_metrics
from octft.train.losses import row_losses

logits, targets, weights, class_weights = torch.load(sys.argv[1])
device = torch_xla.device()
xla_metrics.clear_all()
xla_logits = logits.to(device).requires_grad_()
rows = row_losses(xla_logits, targets.to(device), class_weights=class_weights.to(device), label_smoothing=0.1)
loss = (rows * weights.to(device)).sum() / weights.to(device).sum()
loss.backward()
torch_xla.sync()
# Read the counters before the host reads below (.item() itself counts as aten::_local_scalar_dense).
fallbacks = xla_metrics.executed_fallback_ops()
aten_counters = [name for name in xla_metrics.counter_names() if name.startswith("aten::")]
print(json.dumps({"loss": loss.cpu().tolist(), "grad": xla_logits.grad.cpu().tolist(),
                  "fallbacks": fallbacks, "aten_counters": aten_counters}))
"""


@pytest.mark.integration
def test_loss_on_xla_equals_cpu_without_aten_fallback(tmp_path):
    pytest.importorskip("torch_xla")
    logits, targets, weights, _ = _padded_batch(seed=5)
    # Padding rows are copies of real rows in training (padded_batches), never NaN.
    logits = torch.nan_to_num(logits.detach()).requires_grad_()
    class_weights = torch.tensor([0.5, 3.0, 1.0, 2.0])
    safe_targets = torch.where(weights > 0, targets, torch.zeros_like(targets))  # as backward_step gives padding class 0
    cpu_loss = (row_losses(logits, safe_targets, class_weights=class_weights, label_smoothing=0.1) * weights).sum() / weights.sum()
    cpu_loss.backward()
    torch.save((logits.detach(), safe_targets, weights, class_weights), tmp_path / "batch.pt")

    env = {**os.environ, "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "CPU")}
    env.setdefault("CPU_NUM_DEVICES", "4")
    result = subprocess.run(
        [sys.executable, "-c", _XLA_SCRIPT, str(tmp_path / "batch.pt")],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    xla = json.loads(result.stdout.strip().splitlines()[-1])

    assert xla["loss"] == pytest.approx(cpu_loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(xla["grad"]), logits.grad)
    assert xla["fallbacks"] == [] and xla["aten_counters"] == []
