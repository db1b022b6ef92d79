"""`fit_heads()`: many probe heads trained in one pass over stored features, each ending where `fit()` takes it alone.

A probe study's trials share the stored features, the batches (one seed: one order per epoch) and the class weights;
they differ in their heads and their own settings. Linear and MLP heads are stacked: each kind's weights become
(K, ...) tensors (MLP hidden layers zero-padded to the widest, which changes nothing: a zero unit outputs zero and
gets zero gradient), one batched product gives every head's logits for a batch, its gradients are taken in closed
form (no autograd graph), and each head's learning rate, schedule, weight decay, label smoothing, dropout (the masks
`fit()` draws), gradient clipping, epochs and stop rules apply to its own slice. A head that ends (its epochs done,
pruned, early-stopped, failed) leaves the stack at the end of that epoch; the others go on untouched.

    >>> runs = [HeadRun(model, lr_head=1e-3, weight_decay=0.05, label_smoothing=0.1, epochs=12, run_dir=d,
    ...                 tracker=t, reporter=r) for model, d, t, r in ...]                     # doctest: +SKIP
    >>> results = fit_heads(runs, features, runtime=runtime, class_names=names, batch_size=8, seed=0)  # doctest: +SKIP

`results[k]` is head k's `FitResult`, or the exception that failed it alone (its own non-finite loss, its tracker or
reporter); `tests/test_stacked_heads.py` checks that each head's metrics and weights equal `fit()`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from octft.console import epoch_line
from octft.data.batches import Batches
from octft.models.heads import LinearHead, MLPHead
from octft.train.loop import (BestCheckpoint, FitResult, LoopState, NullReporter, Reporter, check_finite,
                              check_objective, evaluate_logits, logged_metrics, lr_factor, make_optimizer, run_ending,
                              save_checkpoint)
from octft.train.metrics import evaluate_logits_many
from octft.train.runtime import Runtime

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient max_norm / (norm + 1e-6)
ADAM_EPS = 1e-8  # AdamW's default
CHECKPOINT_WRITERS = 4


def stackable(head: torch.nn.Module) -> bool:
    """Whether `fit_heads` can stack this head: a linear head without a norm, or an MLP head."""
    return isinstance(head, MLPHead) or (isinstance(head, LinearHead) and isinstance(head.norm, torch.nn.Identity))


@dataclass
class HeadRun:
    """One head of a pass: its `Classifier` (whose encoder is the shared frozen one), its own settings, and where
    its epochs go (its tracker, reporter, run folder and log)."""

    model: torch.nn.Module
    lr_head: float
    weight_decay: float
    label_smoothing: float
    epochs: int
    run_dir: Path
    tracker: object
    reporter: Reporter | None = None
    lr_encoder: float = 0.0  # logged as fit() logs it; the frozen encoder never steps
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    early_stopping_patience: int | None = None
    config_record: str = ""
    volume_metrics: bool = True  # val_volume/* logged each epoch (tracking.volume_metrics)
    log: Callable[[str], None] = print


@dataclass
class _Pass:
    """What every head of a pass shares: the validation rows and the objective."""

    val_targets: np.ndarray
    val_participants: list[str]
    class_names: Sequence[str]
    objective_metric: str
    objective: str  # "<metric> (<direction>)", as stop reasons name it
    maximize: bool
    betas: tuple[float, float]
    rows_per_epoch: int


class _Stack:
    """The heads of one kind, stacked: their parameters as one (K, P) tensor (each member's row holds its parameters,
    flattened in its `state_dict` order and padded) with AdamW's moments alike, and each member's own settings. One
    row per member makes AdamW, clipping and weight decay a few whole-tensor operations a step, not a few per
    parameter; `weights` views it as the head module's parameters.

    `names` are the head module's parameter names, in its `state_dict` order; `widths` each MLP member's hidden size.
    """

    def __init__(self, kind: str, members: list[int], heads: list[torch.nn.Module], runs: list[HeadRun],
                 steps_per_epoch: int) -> None:
        self.kind, self.members = kind, members
        if kind == "linear":
            self.names = ["linear.weight", "linear.bias"]
            self.widths = [0] * len(heads)
            self.dropout = [0.0] * len(heads)
        else:
            self.names = ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
            self.widths = [head.mlp.fc1.out_features for head in heads]
            self.dropout = [float(head.mlp.drop1.p) for head in heads]
        width = self.width = max(self.widths)  # the stack's (padded) hidden width, kept when its widest member ends
        # Matrices first: weight decay reaches them, not the biases (fit()'s optimizer groups), so it decays one slice.
        self.layout = sorted(self.names, key=lambda name: name.endswith(".bias"))
        padded = [[_pad(dict(head.named_parameters())[name].detach().float(), name, width) for name in self.layout]
                  for head in heads]
        self.shapes = [value.shape for value in padded[0]]
        self.sizes = [value.numel() for value in padded[0]]
        self.decayed = sum(size for size, name in zip(self.sizes, self.layout) if not name.endswith(".bias"))
        self.flat = torch.stack([torch.cat([value.reshape(-1) for value in values]) for values in padded])
        self.grad: torch.Tensor | None = None  # summed over a step's micro-batches
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.steps = 0
        # Each member's label smoothing, and its learning rate and weight-decay factor at every step of its epochs
        # (fit()'s schedule: the rate in float64, then float32, as fit()'s optimizer takes it).
        self.smoothing = torch.tensor([run.label_smoothing for run in runs])
        most = max(run.epochs for run in runs) * steps_per_epoch
        lr = torch.tensor([[run.lr_head * _factor(step, steps_per_epoch, run) if step < run.epochs * steps_per_epoch
                            else 0.0 for step in range(most)] for run in runs], dtype=torch.float64)
        self.lr = lr.float()
        self.decay = (1.0 - lr * torch.tensor([run.weight_decay for run in runs], dtype=torch.float64)[:, None]).float()
        self.params = self.weights(self.flat)  # views: the steps change `flat` in place

    def __len__(self) -> int:
        return len(self.members)

    def weights(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """`flat` (K, P) as the stacked parameters (K, ...), one view each, in `names` order."""
        views = {name: part.view(len(flat), *shape)
                 for name, part, shape in zip(self.layout, flat.split(self.sizes, dim=1), self.shapes)}
        return [views[name] for name in self.names]

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(K, B, C) logits of every member for pooled rows (B, D), as in evaluation (no dropout)."""
        return self._forward(pooled, None)[-1]

    def _forward(self, pooled: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The logits (K, B, C) last, after what their gradients need: for an MLP, the hidden layer before its
        activation and after its dropout (`noise` (K, B, H), or None)."""
        if self.kind == "linear":
            weight, bias = self.params
            return (pooled @ weight.transpose(1, 2) + bias[:, None, :],)
        fc1_w, fc1_b, fc2_w, fc2_b = self.params
        before = pooled @ fc1_w.transpose(1, 2) + fc1_b[:, None, :]
        hidden = F.gelu(before) if noise is None else F.gelu(before) * noise
        return before, hidden, hidden @ fc2_w.transpose(1, 2) + fc2_b[:, None, :]

    def begin_epoch(self, targets: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                    class_weight: torch.Tensor) -> None:
        """Each member's loss on the epoch's batches (targets, row weights `w` and `scale`: (N, B)), as the weights
        its logits are scored against, (K, N, B, C): `octft.train.losses.row_losses` is the cross-entropy against
        `(1 - s) * w[y] * onehot(y) + s / C * w` (class weights `w`, label smoothing `s`). Held per batch: the
        epoch's loss sum (weighed by `w`) and the gradient of the step's loss (weighed by `scale`)."""
        classes = class_weight.numel()
        s = self.smoothing[:, None, None, None]
        hard = F.one_hot(targets, classes).float() * class_weight[targets][..., None]
        weights = (1.0 - s) * hard[None] + (s / classes) * class_weight
        self.loss_weights = weights * w[None, :, :, None]
        self.grad_weights = weights * scale[None, :, :, None]
        self.grad_totals = self.grad_weights.sum(dim=-1, keepdim=True)
        self.loss_sum = torch.zeros(len(self))

    def train_batch(self, index: int, pooled: torch.Tensor, noise: torch.Tensor | None) -> None:
        """Batch `index` of the epoch (pooled rows (B, D)): every member's loss is added to `loss_sum` and the
        gradient of its step's loss to `grad`. The gradients are the closed forms autograd takes through `fit()`'s
        head and loss (no graph: a probe step is a few tiny products, and autograd's bookkeeping costs more than
        they do); a row's gradient on the logits is softmax times its loss weights' sum, less them. `noise`
        (K, B, H): each member's dropout after the activation."""
        *saved, logits = self._forward(pooled, noise)
        dlogits = self._dlogits(index, logits)
        if self.kind == "linear":
            grads = [dlogits.transpose(1, 2) @ pooled, dlogits.sum(dim=1)]
        else:
            before, hidden = saved
            fc2_w = self.params[2]
            dhidden = dlogits @ fc2_w if noise is None else (dlogits @ fc2_w) * noise
            dbefore = torch.ops.aten.gelu_backward(dhidden, before)
            # `layout` order: fc1.weight, fc2.weight, fc1.bias, fc2.bias
            grads = [dbefore.transpose(1, 2) @ pooled, dlogits.transpose(1, 2) @ hidden, dbefore.sum(dim=1),
                     dlogits.sum(dim=1)]
        flat = torch.cat([grad.reshape(len(self), -1) for grad in grads], dim=1)
        self.grad = flat if self.grad is None else self.grad.add_(flat)

    def _dlogits(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        """Batch `index`'s losses added to `loss_sum`; the gradient of its step's loss on `logits` (K, B, C)."""
        log_probs = F.log_softmax(logits, dim=-1)
        self.loss_sum.sub_((log_probs * self.loss_weights[:, index]).sum(dim=(1, 2)))
        return log_probs.exp_().mul_(self.grad_totals[:, index]).sub_(self.grad_weights[:, index])

    def epoch_noise(self, batches: int, rows: int, seed: int) -> torch.Tensor | None:
        """Each MLP member's dropout masks for an epoch of `batches` batches of `rows` rows, (K, batches, rows, width),
        padded with ones to the stack's width (a padded unit outputs zero whatever its mask); None when no member
        drops out.

        They are the masks `fit()` draws, batch after batch, after seeding torch's generator with `seed`:
        `bernoulli_(q)` keeps a unit where a float64 uniform of the generator's stream is below q, so one draw of
        the epoch's uniforms for a width gives every member of that width its masks, whatever its rate."""
        if self.kind == "linear" or not any(self.dropout):
            return None
        noise = torch.ones(len(self), batches, rows, self.width)
        dropping = [k for k, p in enumerate(self.dropout) if p > 0]  # fit() draws nothing for a rate of 0
        for width in sorted({self.widths[k] for k in dropping}):
            group = [k for k in dropping if self.widths[k] == width]
            stream = torch.Generator().manual_seed(seed)
            uniform = torch.rand(batches, rows, width, generator=stream, dtype=torch.float64)
            keep = torch.tensor([1.0 - self.dropout[k] for k in group], dtype=torch.float64)[:, None, None, None]
            noise[group, ..., :width] = (uniform < keep).float() / keep.float()
        return noise

    def step(self, step: int, clip_norm: float | None, betas: tuple[float, float]) -> None:
        """Clip each member's gradient by its own norm, decay its weights (`p *= 1 - lr * wd`), take AdamW's step with
        its own learning rate at `step`, and drop the gradients: `optimizer_step` of `fit()`, per member."""
        grad, self.grad = self.grad, None
        lr, decay = self.lr[:, step], self.decay[:, step]
        if clip_norm is not None:
            coef = (clip_norm / (torch.linalg.vector_norm(grad, dim=1) + CLIP_EPS)).clamp(max=1.0)
            grad.mul_(coef[:, None])
        self.steps += 1
        beta1, beta2 = betas
        correction1, correction2 = 1 - beta1**self.steps, math.sqrt(1 - beta2**self.steps)
        self.flat[:, :self.decayed].mul_(decay[:, None])
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / correction2).add_(ADAM_EPS)
        self.flat.sub_((lr / correction1)[:, None] * self.exp_avg / denom)

    def keep(self, positions: list[int]) -> None:
        """Keep only the members at `positions` (of this stack): the others ended."""
        index = torch.tensor(positions, dtype=torch.long)
        self.flat, self.exp_avg, self.exp_avg_sq = self.flat[index], self.exp_avg[index], self.exp_avg_sq[index]
        self.lr, self.decay, self.smoothing = self.lr[index], self.decay[index], self.smoothing[index]
        self.params = self.weights(self.flat)
        self.members = [self.members[i] for i in positions]
        self.widths = [self.widths[i] for i in positions]
        self.dropout = [self.dropout[i] for i in positions]

    def state_of(self, position: int) -> dict[str, torch.Tensor]:
        """Member `position`'s head weights as its own module's `state_dict` (unpadded)."""
        return self._unpadded(self.flat[position:position + 1], position)

    def optimizer_state_of(self, position: int) -> dict[str, dict[str, torch.Tensor]]:
        """Member `position`'s AdamW state by parameter name, as `fit()`'s optimizer holds it."""
        moments = [self._unpadded(tensor[position:position + 1], position) for tensor in (self.exp_avg, self.exp_avg_sq)]
        return {name: {"step": torch.tensor(float(self.steps)), "exp_avg": moments[0][name],
                       "exp_avg_sq": moments[1][name]} for name in self.names}

    def _unpadded(self, row: torch.Tensor, position: int) -> dict[str, torch.Tensor]:
        width = self.widths[position]
        return {name: _unpad(value[0], name, width).clone() for name, value in zip(self.names, self.weights(row))}


def fit_heads(
    runs: Sequence[HeadRun],
    features,
    *,
    runtime: Runtime,
    class_names: Sequence[str],
    batch_size: int,
    accumulation_steps: int = 1,
    betas: tuple[float, float] = (0.9, 0.999),
    class_weights: torch.Tensor | None = None,
    clip_norm: float | None = 1.0,
    objective_metric: str = "val/balanced_accuracy",
    objective_direction: str = "maximize",
    seed: int = 0,
) -> list[FitResult | Exception]:
    """Train every head of `runs` on `features` (`FrozenFeatures`, pooled rows) in one pass per epoch; each head's
    result as `fit(model, ..., unfreeze_epoch=None, frozen_features=features)` would return it, or what failed it.

    Every head writes what `fit()` writes (epoch metrics to its tracker, its reporter's verdicts, `best.pt`, `best/`,
    `last.pt` in its run folder). The host CPU runs the pass (`runtime.kind: cpu`): a probe's steps are small.
    """
    on_host = runtime.device.type == "cpu" and runtime.precision == "fp32"
    if not on_host or features is None or features.train.kind != "pooled":
        raise ValueError("fit_heads trains heads on stored pooled features on the host CPU in float32 "
                         "(runtime.kind: cpu, runtime.precision: auto or fp32)")
    heads = [run.model.head for run in runs]
    if not all(stackable(head) for head in heads):
        raise ValueError("fit_heads stacks linear heads (without a norm) and MLP heads; train other heads with fit()")
    maximize = objective_direction == "maximize"
    num_classes = len(class_names)
    layout = runtime.batch_layout(batch_size, accumulation_steps)
    step_rows = layout.effective_batch_size
    train_rows, val_rows = features.train, features.val
    steps_per_epoch = math.ceil(len(train_rows) / step_rows)
    val_targets = np.asarray(val_rows.labels)
    val_participants = val_rows.participant_ids(range(len(val_rows)))
    val_x = val_rows.gather(range(len(val_rows)))[0].mean(dim=1)
    weight = class_weights if class_weights is not None else torch.ones(num_classes)

    shared = _Pass(val_targets, val_participants, class_names, objective_metric,
                   f"{objective_metric} ({objective_direction})", maximize, betas, steps_per_epoch * step_rows)
    stacks = [_Stack(kind, members, [heads[k] for k in members], [runs[k] for k in members], steps_per_epoch)
              for kind, members in _by_kind(heads).items()]
    states = [LoopState(best_value=-math.inf if maximize else math.inf) for _ in runs]
    bests = [BestCheckpoint(Path(run.run_dir), run.model, runtime, val_targets, val_participants, class_names,
                            run.config_record) for run in runs]
    results: list[FitResult | Exception | None] = [None] * len(runs)
    for run in runs:
        (Path(run.run_dir) / "checkpoint").mkdir(parents=True, exist_ok=True)

    # Ended heads' checkpoints are written by these threads while the pass goes on (a write is mostly waiting on fsync).
    with ThreadPoolExecutor(max_workers=CHECKPOINT_WRITERS, thread_name_prefix="head-checkpoint") as writer:
        writes: dict[int, Future] = {}
        epoch = 0
        while any(len(stack) for stack in stacks):
            started = time.perf_counter()
            shuffle = torch.Generator().manual_seed(seed * 7919 + epoch)
            order = torch.randperm(len(train_rows), generator=shuffle).tolist()
            with runtime.small_steps():
                # The epoch's batches, as fit() gets them (fixed shape, padded rows weigh 0), gathered up front.
                micro = layout.accumulation_steps
                epoch_rows = list(Batches(train_rows, step_rows, order, (0, 1), 0, micro_batches=micro))
                pooled = torch.stack([batch["x"] for batch in epoch_rows]).mean(dim=2)
                w = torch.stack([batch["w"] for batch in epoch_rows])
                scale = torch.stack([batch["scale"] for batch in epoch_rows])
                y = torch.where(w > 0, torch.stack([batch["y"] for batch in epoch_rows]), 0)
                stacks_now = [stack for stack in stacks if len(stack)]
                # fit() seeds torch's generator with this at each epoch; its dropout draws from it.
                noises = [stack.epoch_noise(len(epoch_rows), w.shape[1], seed * 100_003 + epoch)
                          for stack in stacks_now]
                for stack in stacks_now:
                    stack.begin_epoch(y, w, scale, weight)
                for index in range(len(epoch_rows)):
                    for stack, noise in zip(stacks_now, noises):
                        stack.train_batch(index, pooled[index], None if noise is None else noise[:, index])
                    if (index + 1) % micro == 0:
                        step = epoch * steps_per_epoch + index // micro
                        for stack in stacks_now:
                            stack.step(step, clip_norm, betas)
                train_seconds = time.perf_counter() - started
                val_logits, train_losses = {}, {}
                for stack in stacks_now:
                    val_logits.update(zip(stack.members, stack.logits(val_x).numpy()))
                    train_losses.update(zip(stack.members, (stack.loss_sum / w.sum().clamp_min(1.0)).tolist()))
                # Every head's scores in one vectorised call; a head whose loss or logits are not finite is scored (and
                # failed) alone, as fit() would.
                finite = [k for k, logits in val_logits.items()
                          if math.isfinite(train_losses[k]) and np.isfinite(logits).all()]
                scored = dict(zip(finite, evaluate_logits_many(np.stack([val_logits[k] for k in finite]), val_targets,
                                                               val_participants, class_names))) if finite else {}
                timing = {"train_seconds": train_seconds, "epoch_seconds": time.perf_counter() - started,
                          "heads_in_pass": sum(len(stack) for stack in stacks)}
                # Still on one thread: each head's val/loss is torch on a few rows (see fit()).
                for stack in stacks:
                    kept = []
                    for position, k in enumerate(stack.members):
                        try:
                            factor = _factor((epoch + 1) * steps_per_epoch - 1, steps_per_epoch, runs[k])
                            ended = _epoch_of(runs[k], stack, position, states[k], bests[k], shared, epoch,
                                              val_logits[k], scored.get(k), train_losses[k], factor, timing)
                        except Exception as error:  # this head's own failure: the others go on
                            results[k] = error
                            continue
                        if ended:  # its checkpoints are written on a thread (mostly fsync): taken from the stack now
                            writes[k] = writer.submit(_write_last, runs[k], stack.state_of(position),
                                                      stack.optimizer_state_of(position), states[k], bests[k], betas)
                        else:
                            kept.append(position)
                    if len(kept) < len(stack):
                        stack.keep(kept)
            epoch += 1
        for k, write in writes.items():
            try:
                write.result()
                results[k] = states[k].result()
            except Exception as error:  # its checkpoint could not be written: this run failed
                results[k] = error
    return results


def _epoch_of(run: HeadRun, stack: _Stack, position: int, state: LoopState, best: BestCheckpoint, shared: _Pass,
              epoch: int, logits: np.ndarray, scores: dict[str, float] | None, train_loss: float, factor: float,
              timing: dict[str, float]) -> bool:
    """A head's epoch after the pass: log its scores (`evaluate_logits`'s, computed for the pass: `scores`, or here),
    report, keep its best, decide whether it ends (then checkpoint)."""
    check_finite(train_loss, epoch, Path(run.run_dir))
    metrics = scores if scores is not None else evaluate_logits(logits, shared.val_targets, shared.val_participants,
                                                                shared.class_names)
    check_objective(shared.objective_metric, metrics)
    metrics.update({
        "train/loss": train_loss,
        "lr/head": run.lr_head * factor,
        "lr/encoder": run.lr_encoder * factor,  # fit()'s encoder schedule: the head's, when it never unfreezes
        "train/encoder_trainable": 0.0,
        "train/on_features": 1.0,
        # The pass's time: every head of the pass trained in it.
        "perf/samples_per_second": shared.rows_per_epoch / max(timing["train_seconds"], 1e-9),
        "perf/epoch_seconds": timing["epoch_seconds"],
        "perf/heads_in_pass": float(timing["heads_in_pass"]),
        "xla/compiles": 0.0,
        "xla/compile_seconds": 0.0,
    })
    value = metrics[shared.objective_metric]
    run.tracker.log_metrics(logged_metrics(metrics, run.volume_metrics), step=epoch)
    state.history.append({"epoch": epoch, **{key: metrics[key] for key in (
        "train/loss", "val/loss", "val/balanced_accuracy", shared.objective_metric, "perf/epoch_seconds")}})
    run.log(epoch_line(epoch, metrics, "frozen (features)"))
    if value > state.best_value if shared.maximize else value < state.best_value:
        state.best_value, state.best_epoch, state.best_metrics, state.bad_epochs = value, epoch, metrics, 0
        best.improved(epoch, metrics, logits, hold=True, head=stack.state_of(position))
    else:
        state.bad_epochs += 1
    state.epoch = epoch
    reporter = run.reporter or NullReporter()
    ending = run_ending(reporter.report(epoch, value, metrics), state, epoch, run.epochs, run.early_stopping_patience,
                        shared.objective, None)
    if ending is None:
        return False
    state.status, state.stop_reason = ending
    return True


def _write_last(run: HeadRun, head: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]],
                state: LoopState, best: BestCheckpoint, betas: tuple[float, float]) -> None:
    """`best.pt` (held since its epoch) and `last.pt` as `fit()` leaves them when a probe run ends: the model with
    this head's weights (`head`), an AdamW state in `fit()`'s own layout (`moments`), and the loop state. Touches
    only this run's own model and files: the pass runs it on a thread while the other heads' writes go on."""
    model = run.model
    model.head.load_state_dict(head)
    best.write_held()
    optimizer = make_optimizer(model, lr_head=run.lr_head, lr_encoder=0.0, weight_decay=run.weight_decay, betas=betas)
    by_name = dict(model.head.named_parameters())
    for name, moment in moments.items():
        optimizer.state[by_name[name]] = moment
    save_checkpoint(best.runtime, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "loop_state": state.to_json()}, Path(run.run_dir) / "last.pt")


def _by_kind(heads: Sequence[torch.nn.Module]) -> dict[str, list[int]]:
    kinds: dict[str, list[int]] = {}
    for k, head in enumerate(heads):
        kinds.setdefault("mlp" if isinstance(head, MLPHead) else "linear", []).append(k)
    return kinds


def _factor(step: int, steps_per_epoch: int, run: HeadRun) -> float:
    """`fit()`'s head learning-rate factor at `step` for this run's epochs, warm-up and floor."""
    return lr_factor(step, total_steps=steps_per_epoch * run.epochs,
                     warmup_steps=int(round(run.warmup_epochs * steps_per_epoch)), min_ratio=run.min_lr_ratio)


def _pad(value: torch.Tensor, name: str, width: int) -> torch.Tensor:
    """An MLP parameter zero-padded to a hidden width of `width` (fc1's rows and bias, fc2's columns)."""
    if name == "mlp.fc1.weight":
        return F.pad(value, (0, 0, 0, width - value.shape[0]))
    if name == "mlp.fc1.bias":
        return F.pad(value, (0, width - value.shape[0]))
    if name == "mlp.fc2.weight":
        return F.pad(value, (0, width - value.shape[1]))
    return value


def _unpad(value: torch.Tensor, name: str, width: int) -> torch.Tensor:
    if name in ("mlp.fc1.weight", "mlp.fc1.bias"):
        return value[:width]
    if name == "mlp.fc2.weight":
        return value[:, :width]
    return value
