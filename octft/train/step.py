"""Pure train and eval steps: no `.item()`, no Python branch on tensor values, fixed shapes.

A batch is a dict of device tensors: `x` (B, C, T, H, W), `y` (B,) class indices and `w` (B,) sample weights,
1 for real rows and 0 for the padding that keeps the last batch full-sized; a training micro-batch also carries
`scale` (B,), each row's weight over its whole optimizer step. An optimizer step is `backward_step` on each of
its micro-batches, then `optimizer_step`. Steps return device tensors; the loop reads them on the host once per
epoch.

Example:
    >>> for micro_batch in step_micro_batches:                                            # doctest: +SKIP
    ...     out = backward_step(model, micro_batch, loss_fn=loss_fn, runtime=runtime)
    >>> optimizer_step(model, optimizer, clip_norm=1.0)                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from octft.train.runtime import Runtime

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def backward_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    loss_fn: LossFn,
    runtime: Runtime,
) -> dict[str, torch.Tensor]:
    """Add one micro-batch's share of its optimizer step's gradient to each trainable parameter's `.grad`.

    `batch["scale"]` (B,) is each row's weight over its whole optimizer step, `w / sum(w over the
    step's micro-batches)` (0 on padding), so the micro-batches of a step together backpropagate
    sum(w * loss) / sum(w) over the step's rows, whatever their number. Returns device tensors `loss_sum`
    (sum of w * loss) and `weight_sum` (sum of w) of this micro-batch.
    """
    x, y, w = batch["x"], batch["y"], batch["w"]
    if x.shape[0] % runtime.num_devices:
        raise ValueError(
            f"micro-batch of {x.shape[0]} rows cannot be split over {runtime.num_devices} devices: make it a multiple "
            f"of {runtime.num_devices}"
        )
    # Padded rows may carry any label; give them class 0 so the loss never indexes out of range.
    y = torch.where(w > 0, y, torch.zeros_like(y))
    with runtime.autocast():
        logits = model(x)
    losses = loss_fn(logits.float(), y)
    (losses * batch["scale"]).sum().backward()
    return {"loss_sum": (losses.detach() * w).sum(), "weight_sum": w.sum()}


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, clip_norm: float | None) -> torch.Tensor:
    """Clip the gradient the step's micro-batches accumulated, take the optimizer step, and zero the gradient.

    The gradient is zeroed, not freed: every micro-batch then adds to gradients that exist as device
    data, so on XLA one graph serves every micro-batch of a step but its last (backward only) and one its
    last (backward and update), whatever the number of micro-batches: trials with other accumulation
    counts compile nothing new. Returns the global gradient norm before clipping (0 when `clip_norm` is None).
    """
    trainable = _trainable(model)
    if clip_norm is not None:
        # No foreach: torch_xla's patched clip_grad_norm_ refuses it; it never syncs with the host either way.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
    else:
        grad_norm = torch.zeros((), device=trainable[0].device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return grad_norm.detach()


@torch.no_grad()
def eval_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    runtime: Runtime | None = None,
) -> dict[str, torch.Tensor]:
    """`logits` (B, classes) float32 in eval mode, without gradients, for every row including padding (the caller
    drops rows with w=0)."""
    # Restore each submodule's own mode afterwards: a frozen encoder may be kept in eval mode.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    with runtime.autocast() if runtime is not None else contextlib.nullcontext():
        logits = model(batch["x"]).float()
    for module, training in modes:
        module.training = training
    return {"logits": logits}


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]
