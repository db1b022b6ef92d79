"""Losses against torch's cross-entropy on the unpadded batch, class weights against scikit-learn."""

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
from octft.train.losses import balanced_class_weights, weighted_cross_entropy, weighted_cross_entropy_terms

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


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("use_class_weights", [False, True])
def test_loss_and_gradient_equal_torch_on_the_unpadded_batch(label_smoothing, use_class_weights):
    logits, targets, weights, real = _padded_batch(seed=0)
    class_weights = torch.tensor([0.5, 3.0, 1.0, 2.0]) if use_class_weights else None

    loss = weighted_cross_entropy(logits, targets, weights, class_weights, label_smoothing)
    loss.backward()

    reference_logits = logits.detach()[:real].clone().requires_grad_()
    reference = F.cross_entropy(
        reference_logits, targets[:real], weight=class_weights, label_smoothing=label_smoothing
    )
    reference.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(logits.grad[:real], reference_logits.grad)
    assert torch.equal(logits.grad[real:], torch.zeros_like(logits.grad[real:]))  # padding gets no gradient


def test_weighted_mean_divides_by_the_summed_target_class_weights():
    logits, targets, weights, real = _padded_batch(seed=1)
    class_weights = torch.tensor([0.5, 3.0, 1.0, 2.0])
    per_sample = F.cross_entropy(logits[:real], targets[:real], weight=class_weights, reduction="none")

    loss = weighted_cross_entropy(logits, targets, weights, class_weights)

    torch.testing.assert_close(loss, per_sample.sum() / class_weights[targets[:real]].sum())
    assert not torch.isclose(loss, per_sample.sum() / real)  # not a plain mean over the rows


def test_terms_split_into_micro_batches_reproduce_the_whole_batch_loss():
    logits, targets, weights, _ = _padded_batch(seed=6)
    class_weights = torch.tensor([0.5, 3.0, 1.0, 2.0])
    whole = weighted_cross_entropy(logits, targets, weights, class_weights, 0.1)
    _, row_weights = weighted_cross_entropy_terms(logits, targets, weights, class_weights, 0.1)

    parts = [
        weighted_cross_entropy_terms(logits[rows], targets[rows], weights[rows], class_weights, 0.1)[0].sum()
        for rows in (slice(0, 8), slice(8, 16))
    ]
    torch.testing.assert_close(sum(parts) / row_weights.sum(), whole)
    part_means = [
        weighted_cross_entropy(logits[rows], targets[rows], weights[rows], class_weights, 0.1)
        for rows in (slice(0, 8), slice(8, 16))
    ]
    assert not torch.isclose(sum(part_means) / 2, whole)  # averaging per-part means would be wrong


def test_all_padding_batch_gives_zero_loss_and_gradient():
    logits, targets, _, _ = _padded_batch(seed=2)
    loss = weighted_cross_entropy(logits, targets, torch.zeros(len(targets)), label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits.grad))


def test_bfloat16_logits_are_scored_in_float32():
    logits, targets, weights, real = _padded_batch(seed=3)
    low_precision = logits.detach().to(torch.bfloat16)
    loss = weighted_cross_entropy(low_precision, targets, weights, label_smoothing=0.1)
    reference = F.cross_entropy(low_precision[:real].float(), targets[:real], label_smoothing=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)


def test_bad_arguments_are_named():
    logits, targets, weights, _ = _padded_batch(seed=4)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        weighted_cross_entropy(logits, targets, weights, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"class_weights must have shape \(4,\)"):
        weighted_cross_entropy(logits, targets, weights, torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        weighted_cross_entropy(logits, targets, weights[:-1])


# Run in a fresh interpreter: once any CPU backward has run in a process, torch's autograd engine has no
# queue for an XLA device registered later, and an XLA backward fails an internal assert (torch 2.9).
_XLA_SCRIPT = """
import json, sys
import torch, torch_xla
import torch_xla.debug.metrics as xla_metrics
from octft.train.losses import weighted_cross_entropy

logits, targets, weights, class_weights = torch.load(sys.argv[1])
device = torch_xla.device()
xla_metrics.clear_all()
xla_logits = logits.to(device).requires_grad_()
loss = weighted_cross_entropy(xla_logits, targets.to(device), weights.to(device), class_weights.to(device), 0.1)
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
    class_weights = torch.tensor([0.5, 3.0, 1.0, 2.0])
    cpu_loss = weighted_cross_entropy(logits, targets, weights, class_weights, 0.1)
    cpu_loss.backward()
    torch.save((logits.detach(), targets, weights, class_weights), tmp_path / "batch.pt")

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
