"""Pure train and eval steps: no `.item()`, no Python branch on tensor values, fixed shapes.

A batch is a dict of device tensors: `x` (B, C, T, H, W), `y` (B,) class indices and `w` (B,)
sample weights, 1 for real rows and 0 for the padding that keeps the last batch full-sized; the training
loop's micro-batches also carry `scale` (B,), each row's weight over its whole optimizer step.
Steps return device tensors; the loop reads them on the host inside `runtime.step_closure`.

Example:
    >>> out = train_step(model, batch, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
    ...                  optimizer=optimizer, accumulation_steps=2, clip_norm=1.0, runtime=runtime)
    >>> runtime.step_closure(lambda loss_sum, weight_sum: print(runtime.to_host(loss_sum / weight_sum)),
    ...                      out["loss_sum"], out["weight_sum"])
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

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


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    accumulation_steps: int = 1,
    clip_norm: float | None = None,
    runtime: Runtime,
) -> dict[str, torch.Tensor]:
    """One optimizer step on a whole batch held at once, split into `accumulation_steps` micro-batches.

    `loss_fn(logits, y)` returns one loss per row (reduction="none"). The objective is
    sum(w * loss) / sum(w) over the whole batch, so accumulating k micro-batches gives the same
    gradient as one pass over the batch, and padded rows (w=0) change nothing.
    Returns device tensors `loss_sum` (sum of w * loss), `weight_sum` (sum of w) and
    `grad_norm` (global gradient norm before clipping; 0 when `clip_norm` is None).
    The model's train/eval mode is the caller's choice (e.g. a frozen encoder kept in eval).
    The training loop feeds its micro-batches one by one instead (`backward_step`, then `optimizer_step`
    after a step's last), so that its graphs do not depend on the accumulation count.
    """
    rows = batch["x"].shape[0]
    if accumulation_steps < 1 or rows % (accumulation_steps * runtime.num_devices):
        raise ValueError(
            f"batch of {rows} rows cannot be split into accumulation_steps={accumulation_steps} micro-batches "
            f"over {runtime.num_devices} devices: make the batch size a multiple of "
            f"accumulation_steps * num_devices = {max(accumulation_steps, 1) * runtime.num_devices}"
        )
    w = batch["w"]
    # Guards the all-padding batch: its numerator is 0 too, so the objective is 0, not NaN.
    scale = w / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
    parts = {key: _micro_batches(batch[key], accumulation_steps) for key in ("x", "y", "w")}
    parts["scale"] = _micro_batches(scale, accumulation_steps)
    loss_sum = torch.zeros((), device=w.device)
    for index in range(accumulation_steps):
        out = backward_step(model, {key: value[index] for key, value in parts.items()}, loss_fn=loss_fn, runtime=runtime)
        loss_sum = loss_sum + out["loss_sum"]
    grad_norm = optimizer_step(model, optimizer, clip_norm=clip_norm)
    return {"loss_sum": loss_sum, "weight_sum": w.sum(), "grad_norm": grad_norm}


@torch.no_grad()
def eval_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    num_classes: int,
    runtime: Runtime | None = None,
) -> dict[str, torch.Tensor]:
    """Logits and this batch's confusion counts, in eval mode, without gradients.

    Returns `logits` (B, num_classes) float32, for every row including padding (the caller drops
    rows with w=0), and `confusion` (num_classes, num_classes) float32 with rows = true class,
    columns = predicted class, counting each row with its weight w.
    """
    # Restore each submodule's own mode afterwards: a frozen encoder may be kept in eval mode.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    with runtime.autocast() if runtime is not None else contextlib.nullcontext():
        logits = model(batch["x"]).float()
    for module, training in modes:
        module.training = training
    w = batch["w"].float()
    y = torch.where(w > 0, batch["y"], torch.zeros_like(batch["y"]))
    # One-hot products instead of bincount: bincount's output size depends on the data.
    truth = F.one_hot(y, num_classes).float()
    predicted = F.one_hot(logits.argmax(dim=1), num_classes).float()
    confusion = truth.transpose(0, 1) @ (predicted * w[:, None])
    return {"logits": logits, "confusion": confusion}


def _micro_batches(tensor: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, ...) -> (steps, B // steps, ...), micro-batch k holding rows k, k + steps, k + 2 * steps, ...

    Strided, not contiguous: each device's contiguous shard of the batch then feeds every
    micro-batch equally, so the micro-batch dim stays sharded over "data" and no rows move
    between devices.
    """
    return tensor.reshape(tensor.shape[0] // steps, steps, *tensor.shape[1:]).transpose(0, 1)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]
