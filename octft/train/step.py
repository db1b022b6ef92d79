"""Pure train and eval steps: no `.item()`, no Python branch on tensor values, fixed shapes.

A batch is a dict of device tensors: `x` (B, C, T, H, W), `y` (B,) class indices and `w` (B,)
sample weights, 1 for real rows and 0 for the padding that keeps the last batch full-sized.
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
    """One optimizer step on `batch`, split into `accumulation_steps` micro-batches.

    `loss_fn(logits, y)` returns one loss per row (reduction="none"). The objective is
    sum(w * loss) / sum(w) over the whole batch, so accumulating k micro-batches gives the same
    gradient as one pass over the batch, and padded rows (w=0) change nothing.
    Returns device tensors `loss_sum` (sum of w * loss), `weight_sum` (sum of w) and
    `grad_norm` (global gradient norm before clipping; 0 when `clip_norm` is None).
    The model's train/eval mode is the caller's choice (e.g. a frozen encoder kept in eval).
    """
    x, y, w = batch["x"], batch["y"], batch["w"]
    rows = x.shape[0]
    if accumulation_steps < 1 or rows % (accumulation_steps * runtime.num_devices):
        raise ValueError(
            f"batch of {rows} rows cannot be split into accumulation_steps={accumulation_steps} micro-batches "
            f"over {runtime.num_devices} devices: make the batch size a multiple of "
            f"accumulation_steps * num_devices = {max(accumulation_steps, 1) * runtime.num_devices}"
        )
    # Padded rows may carry any label; give them class 0 so the loss never indexes out of range.
    y = torch.where(w > 0, y, torch.zeros_like(y))
    weight_sum = w.sum()
    # Guards the all-padding batch: its numerator is 0 too, so the objective is 0, not NaN.
    denominator = weight_sum.clamp_min(torch.finfo(weight_sum.dtype).tiny)

    def micro_objective(micro_x: torch.Tensor, micro_y: torch.Tensor, micro_w: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            logits = model(micro_x)
        losses = loss_fn(logits.float(), micro_y)
        return (losses * micro_w).sum() / denominator

    # Grads start as None every step, so each step traces the same graph (no zeros-vs-data variants).
    optimizer.zero_grad(set_to_none=True)
    if accumulation_steps == 1:
        objective = micro_objective(x, y, w)
        objective.backward()
        objective = objective.detach()
    else:
        objective = runtime.accumulate_gradients(
            micro_objective, tuple(_micro_batches(t, accumulation_steps) for t in (x, y, w)), model
        )
    if clip_norm is not None:
        # No foreach: torch_xla's patched clip_grad_norm_ refuses it; it never syncs with the host either way.
        grad_norm = torch.nn.utils.clip_grad_norm_(_trainable(model), clip_norm)
    else:
        grad_norm = torch.zeros((), device=x.device)
    optimizer.step()
    # Frees the gradients between steps instead of keeping a zeroed copy of every one alive.
    optimizer.zero_grad(set_to_none=True)
    return {"loss_sum": objective * weight_sum, "weight_sum": weight_sum, "grad_norm": grad_norm.detach()}


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
