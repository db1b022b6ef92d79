"""A whole batch as one optimizer step, for tests that hold a batch at once: cut into `accumulation_steps`
micro-batches, each through `backward_step`, then `optimizer_step` (what the training loop does micro-batch by
micro-batch). Tests import it with `sys.path` pointing here; it is no test module itself."""

from __future__ import annotations

import torch

from octft.train.step import backward_step, optimizer_step


def train_step(model, batch, *, loss_fn, optimizer, accumulation_steps: int = 1, clip_norm=None, runtime):
    """One optimizer step on `batch`; device tensors `loss_sum` (sum of w * loss), `weight_sum`, `grad_norm`."""
    rows = batch["x"].shape[0]
    if accumulation_steps < 1 or rows % (accumulation_steps * runtime.num_devices):
        raise ValueError(f"batch of {rows} rows cannot be split into accumulation_steps={accumulation_steps} "
                         f"micro-batches over {runtime.num_devices} devices")
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


def _micro_batches(tensor: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, ...) -> (steps, B // steps, ...), micro-batch k holding rows k, k + steps, ...: each device's contiguous
    shard feeds every micro-batch equally, so the micro-batch dim stays sharded and no rows move between devices."""
    return tensor.reshape(tensor.shape[0] // steps, steps, *tensor.shape[1:]).transpose(0, 1)
