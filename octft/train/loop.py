"""`fit()`: the one training loop. Reads top to bottom; no callbacks.

It is handed a runtime (device, data parallelism, precision), a tracker (MLflow or nothing) and a
reporter (Optuna or nothing); it never imports optuna or mlflow and never tests the device type.

Per epoch: set the encoder frozen or trainable (progressive unfreezing), run the training steps
(graph-stable: fixed shapes, no host reads inside a step), evaluate once on the validation split
(logits placed on device; they and the training loss come back in one transfer), score at participant
level, log, report, checkpoint, and stop early. One objective (`objective_metric`, `objective_direction`)
picks the best epoch, writes `best.pt`, drives early stopping and is what the reporter receives. Stop
rules count only epochs with a trainable encoder: a late-unfreezing run is never stopped before its
encoder moved. Of the epochs on stored features (a frozen encoder, `frozen_features`) only the last is
checkpointed: the others replay exactly from (seed, epoch) in less time than a write takes.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from octft.data.pack import prefetch
from octft.train.losses import mean_loss, row_losses
from octft.train.metrics import (
    aggregate_by_participant,
    classification_metrics,
    confusion_matrix,
    confusion_matrix_figure,
    softmax,
)
from octft.models.checkpoint import CheckpointError
from octft.train.runtime import Runtime, load_state
from octft.train.step import backward_step, eval_step, optimizer_step
from octft.errors import OctftError


class TrainingError(OctftError, RuntimeError):
    """A run that cannot go on (non-finite loss, bad checkpoint); the message says why."""


class Reporter(Protocol):
    """Receives each epoch's objective and may ask the loop to stop (a pruned trial)."""

    def report(self, epoch: int, value: float, metrics: dict[str, float]) -> str | None:
        """Record the epoch; return a reason to stop now, or None to go on."""


class NullReporter:
    def report(self, epoch: int, value: float, metrics: dict[str, float]) -> str | None:
        return None


# How a run ended, as recorded in `last.pt`; a run in one of these states is not trained further by --resume.
ENDED = ("completed", "early_stopped", "pruned")


@dataclass
class FitResult:
    status: str  # "completed" | "early_stopped" | "pruned"
    best_epoch: int | None
    best_value: float
    best_metrics: dict[str, float]
    epochs_run: int
    stop_reason: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    compiles: int = 0  # XLA compiles during this fit (not the process's total)
    compile_seconds: float = 0.0
    epoch_seconds: float = 0.0  # summed over the epochs run, resumed ones included


def padded_batches(
    dataset, batch_size: int, *, order: Sequence[int], host_index: int = 0, host_count: int = 1, workers: int = 0,
    micro_batches: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """This host's rows of each global batch of exactly `batch_size` rows in `order`, in `micro_batches` pieces.

    The last global batch is padded with weight-0 copies. Fixed shapes keep XLA at one graph per step
    kind; the 0/1 weight `w` keeps padding out of the loss and the metrics; `row` is each row's index
    in `dataset`; `scale` is each row's weight over its global batch (`w / sum(w)`), what an optimizer step
    over the batch's micro-batches weighs its rows by. Each global batch is yielded as `micro_batches`
    consecutive micro-batches of `batch_size / micro_batches` rows (global); with several hosts, host `h`
    reads and yields only rows `[h * M/P, (h+1) * M/P)` of each global micro-batch of M rows (torch_xla's
    per-host input contract: the runtime assembles the hosts' rows, in host order, into the global batch),
    so no row is read or fed twice. `workers` background threads gather batches ahead (`train.num_workers`;
    0: each batch is gathered when it is asked for).
    """
    if batch_size % micro_batches or (batch_size // micro_batches) % host_count:
        raise ValueError(f"a global batch of {batch_size} rows cannot be split evenly over {host_count} hosts"
                         + (f" in {micro_batches} micro-batches" if micro_batches > 1 else ""))
    micro_rows = batch_size // micro_batches
    host_rows = micro_rows // host_count

    def plans():
        for start in range(0, len(order), batch_size):
            indices = list(order[start : start + batch_size])
            real = len(indices)
            indices += [indices[-1]] * (batch_size - real)
            weights = [1.0] * real + [0.0] * (batch_size - real)
            for micro in range(micro_batches):
                first = micro * micro_rows + host_index * host_rows
                mine = slice(first, first + host_rows)
                yield indices[mine], weights[mine], real

    def batch(plan: tuple[list[int], list[float], int]) -> dict[str, torch.Tensor]:
        indices, weights, real = plan
        if hasattr(dataset, "gather"):  # a packed dataset reads the whole batch in one gather
            x, y = dataset.gather(indices)
        else:
            rows = [dataset[i] for i in indices]
            x, y = torch.stack([row["x"] for row in rows]), torch.stack([row["y"] for row in rows])
        w = torch.tensor(weights)
        return {
            "x": x,
            "y": y,
            "w": w,
            "scale": w / max(real, 1),
            "row": torch.tensor(indices, dtype=torch.long),  # dataset index, to place eval logits
        }

    return prefetch(batch, plans(), workers=workers)


class _Batches:
    """A re-iterable, sized view of `padded_batches` (device loaders want both)."""

    def __init__(self, dataset, batch_size: int, order: Sequence[int], runtime: Runtime, workers: int = 1,
                 micro_batches: int = 1):
        self.dataset, self.batch_size, self.order, self.workers = dataset, batch_size, list(order), workers
        self.host_index, self.host_count = runtime.process_index, runtime.process_count
        self.micro_batches = micro_batches

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size) * self.micro_batches

    def __iter__(self):
        # Stored pooled features gather quicker than a hand-over between threads: no background worker for them.
        workers = 0 if getattr(self.dataset, "cheap_to_gather", False) else self.workers
        return padded_batches(self.dataset, self.batch_size, order=self.order, host_index=self.host_index,
                              host_count=self.host_count, workers=workers, micro_batches=self.micro_batches)


def place_rows(logits: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, total_rows: int) -> torch.Tensor:
    """(B, C) batch logits scattered into a (total_rows, C) zero tensor at `rows`; weight-0 rows add nothing.

    A sum over the batch dim, not a cat: under SPMD the batch dim is sharded, and fetching a sharded
    tensor makes torch_xla compile a new replication graph on every fetch (one more compile each
    epoch). A reduction over the sharded dim comes back replicated, from one graph. Exact in fp32:
    each output element is one logit plus zeros.
    """
    placement = F.one_hot(rows, total_rows).to(logits.dtype) * weights.to(logits.dtype)[:, None]  # (B, total_rows)
    return (placement[:, :, None] * logits[:, None, :]).sum(dim=0)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio` of the base learning rate."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, *, lr_head: float, lr_encoder: float, weight_decay: float, betas: tuple[float, float]):
    """AdamW with the head and encoder in separate groups; no weight decay on biases and norms.

    The learning rates and the weight decay enter the XLA graphs as device data (see `set_lr`), so a
    trial with other values compiles nothing new. Hence the decay is applied by a step pre-hook (the
    same decoupled decay as AdamW's, with device tensors) and on XLA and CUDA the optimizer is
    capturable: its step count and bias corrections stay on the device, so a step never syncs.
    """
    device_type = next(iter(model.parameters())).device.type
    capturable = device_type in ("xla", "cuda")  # torch has no capturable CPU Adam
    # On the host CPU one fused kernel per group: a head step on stored features 1.84 -> 1.4 ms (its step is
    # per-op overhead). XLA keeps the per-tensor path: torch_xla traces it into the step's graph either way.
    fused = True if device_type == "cpu" else None
    groups = []
    for name, parameters, lr in (("head", model.head_parameters(), lr_head), ("encoder", model.encoder_parameters(), lr_encoder)):
        parameters = list(parameters)
        decay = [p for p in parameters if p.ndim >= 2]
        no_decay = [p for p in parameters if p.ndim < 2]
        groups.append({"params": decay, "lr": lr, "base_lr": lr, "decoupled_decay": weight_decay, "name": name})
        groups.append({"params": no_decay, "lr": lr, "base_lr": lr, "decoupled_decay": None, "name": name})
    optimizer = torch.optim.AdamW(groups, betas=betas, weight_decay=0.0, foreach=False, capturable=capturable, fused=fused)
    optimizer.register_step_pre_hook(_decay_weights)
    return optimizer


@torch.no_grad()
def init_optimizer_state(optimizer, runtime) -> None:
    """AdamW's state (step 0, zero moments) on the device now for each trainable parameter that has none, as
    AdamW's first step would make it, and a zero gradient for each that has none, replicated and materialized;
    a frozen parameter's gradient is dropped.

    On XLA a first step that makes the state traces another graph than every later step, a second compile
    of the whole train step (forward, backward, update) per trial phase; with the state made here, the first
    step is the steady step. Gradients likewise: every micro-batch adds to gradients that already exist
    (`octft.train.step.optimizer_step` zeroes them, never frees them). The zeros are moved to the device,
    so making them compiles nothing.
    """
    # Zeros moved to the device (`Runtime.put`), not made there: zeros made on an XLA device are a graph, and
    # which parameters a phase starts (the head, the encoder, both) would make it another graph each time.
    made: dict[tuple[torch.nn.Parameter, str], torch.Tensor] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if not parameter.requires_grad:
                parameter.grad = None
                continue
            if parameter.grad is None:
                made[parameter, "grad"] = torch.zeros(parameter.shape, dtype=parameter.dtype)
            if not optimizer.state[parameter]:
                made[parameter, "step"] = torch.zeros((), dtype=torch.float32)
                made[parameter, "exp_avg"] = torch.zeros(parameter.shape, dtype=parameter.dtype)
                made[parameter, "exp_avg_sq"] = torch.zeros(parameter.shape, dtype=parameter.dtype)
    if not made:
        return
    placed = runtime.put(list(made.values()))
    for (parameter, name), tensor in zip(made, placed):
        if name == "grad":
            parameter.grad = tensor
        else:
            optimizer.state[parameter][name] = tensor
    runtime.replicate(placed)
    runtime.sync()


def set_lr(optimizer, factor: float, device: torch.device) -> None:
    """This step's learning rate of each group, `base_lr * factor`, and its decay `lr * decoupled_decay`.

    Each is a one-element tensor of its own, moved to the device: torch_xla turns Python numbers and
    0-dim tensors into cached scalars, shared between equal values and baked in as constants when
    0 or 1, so whether two rates happened to be equal would change the graph and a new trial would
    compile again. A (1,) tensor is always one more input of the same graph.
    """
    for group in optimizer.param_groups:
        lr = group["base_lr"] * factor
        group["lr"] = torch.tensor([lr], dtype=torch.float32).to(device)
        if group["decoupled_decay"] is not None:
            group["decay"] = torch.tensor([1.0 - lr * group["decoupled_decay"]], dtype=torch.float32).to(device)


@torch.no_grad()
def _decay_weights(optimizer, args, kwargs) -> None:
    """AdamW's decoupled weight decay, `p *= 1 - lr * weight_decay`, on the parameters this step updates."""
    for group in optimizer.param_groups:
        # Even a weight decay of 0 multiplies (by 1): whether it does must not depend on a trial's value.
        if group["decoupled_decay"] is None or "decay" not in group:
            continue
        for parameter in group["params"]:
            if parameter.grad is not None:  # as AdamW: a frozen parameter keeps its value
                parameter.mul_(group["decay"])


def set_encoder_trainable(model, trainable: bool) -> None:
    for parameter in model.encoder_parameters():
        parameter.requires_grad_(trainable)
    # A frozen encoder runs in eval mode: no dropout or drop-path noise in features it cannot adapt to.
    model.encoder.train(trainable)


def fit(
    model,
    train_set,
    val_set,
    *,
    runtime: Runtime,
    tracker,
    reporter: Reporter | None = None,
    class_names: Sequence[str],
    epochs: int,
    batch_size: int,
    accumulation_steps: int,
    micro_batch_rows: int | None = None,
    unfreeze_epoch: int | None,
    lr_head: float,
    lr_encoder: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_epochs: float = 1.0,
    min_lr_ratio: float = 0.01,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
    clip_norm: float | None = 1.0,
    early_stopping_patience: int | None = None,
    objective_metric: str = "val/balanced_accuracy",
    objective_direction: str = "maximize",
    seed: int = 0,
    run_dir: str | Path,
    resume: bool = False,
    frozen_features=None,
    num_workers: int = 1,
    confusion_figure: bool = True,
) -> FitResult:
    """Fine-tune `model` (a `Classifier`) and return the best epoch's validation scores.

    `train_set` / `val_set` yield `{"x", "y"}` samples; `val_set.participant_ids(indices)` maps rows to
    participants, whose averaged logits give the reported (participant-level) figures. Checkpoints
    go to `run_dir/last.pt` every epoch and `run_dir/checkpoint/best.pt` when `objective_metric` improves
    (in `objective_direction`), with `run_dir/best/` (the best epoch's predictions and metrics; its
    confusion-matrix image is drawn once, when the run ends); `resume=True` continues from `last.pt` and
    ends as an uninterrupted run would, or, when `last.pt` says the run already ended (completed,
    early-stopped, pruned), returns that outcome without training. `unfreeze_epoch=None` never unfreezes
    the encoder (a probe run); `early_stopping_patience` counts only epochs from `unfreeze_epoch` on (from
    0 for a probe run). `frozen_features` (`octft.features.frozen.FrozenFeatures`): while the encoder is
    frozen, the head trains and is evaluated on these stored encoder outputs (same rows, order and batches)
    with no encoder pass; of those epochs only the last (before unfreezing, or where the run ends) writes
    `last.pt`, and with it their best epoch's `best.pt` and `best/`.
    `confusion_figure=False` skips `best/confusion_matrix.png` (a probe study: nothing reads it there,
    and drawing it costs a fifth of a probe trial).
    `num_workers` threads gather batches ahead of the step (`padded_batches`). `micro_batch_rows`: rows per
    device per micro-batch (`runtime.micro_batch_rows`; None: the runtime's choice, `Runtime.batch_layout`).
    """
    if objective_direction not in ("maximize", "minimize"):
        raise ValueError(f"objective_direction must be maximize or minimize, got {objective_direction!r}")
    maximize = objective_direction == "maximize"
    # Epochs before this one never count towards early stopping: the encoder could not yet have moved.
    counted_from = 0 if unfreeze_epoch is None else unfreeze_epoch
    reporter = reporter or NullReporter()
    run_dir = Path(run_dir)
    (run_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
    num_classes = len(class_names)
    # Refused here, before anything compiles, when the devices cannot share the effective batch evenly.
    layout = runtime.batch_layout(batch_size, accumulation_steps, micro_batch_rows)
    step_rows = layout.effective_batch_size  # rows per optimizer step (global, all devices and hosts)

    # A warm trial runner runs many fits in one process: count only this one's compiles.
    compiles_before = runtime.compile_stats()
    model = runtime.to_device(model)
    optimizer = make_optimizer(model, lr_head=lr_head, lr_encoder=lr_encoder, weight_decay=weight_decay, betas=betas)
    # Values that vary between trials enter the graphs as device data, never as constants (and class
    # weights are always a tensor): a later trial with other values and the same shapes compiles nothing.
    weight = (class_weights if class_weights is not None else torch.ones(num_classes)).to(runtime.device)
    smoothing = torch.tensor([float(label_smoothing)]).to(runtime.device)  # (1,): see set_lr for why not 0-dim

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return row_losses(logits, targets, class_weights=weight, label_smoothing=smoothing)

    steps_per_epoch = math.ceil(len(train_set) / step_rows)
    total_steps = steps_per_epoch * epochs
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    val_participants = val_set.participant_ids(range(len(val_set)))
    val_targets = np.asarray([int(val_set[i]["y"]) for i in range(len(val_set))]) if len(val_set) else np.zeros(0, int)

    # The best epoch on stored features, not yet written: its head's weights (the encoder has not moved since).
    pending_best: dict | None = None

    def write_best(epoch: int, metrics: dict[str, float], logits: np.ndarray, head_state: dict | None = None) -> None:
        model_state = model.state_dict()
        if head_state is not None:
            model_state.update({f"head.{name}": value for name, value in head_state.items()})
        runtime.save({"model": model_state, "epoch": epoch, "metrics": json.dumps(metrics)},
                     run_dir / "checkpoint" / "best.pt")
        if runtime.is_main:
            write_best_artifacts(run_dir, logits, val_targets, val_participants, class_names, metrics, figure=False)

    state = {"epoch": -1, "best_value": -math.inf if maximize else math.inf, "best_epoch": None, "best_metrics": {},
             "bad_epochs": 0, "history": [], "status": "running", "stop_reason": None}
    if resume and (run_dir / "last.pt").is_file():
        saved = load_state(run_dir / "last.pt", required=("model", "optimizer", "loop_state"))
        try:
            state = json.loads(saved["loop_state"])
            state.setdefault("status", "running")  # last.pt written before runs recorded how they ended
            state.setdefault("stop_reason", None)
            if state["status"] in ENDED:
                print(f"{run_dir} already ended ({state['status']}"
                      + (f": {state['stop_reason']}" if state.get("stop_reason") else "")
                      + f") after epoch {state['epoch']}; best {objective_metric} {state['best_value']:.4f} at epoch "
                      f"{state['best_epoch']}; nothing to resume", flush=True)
                return _result(state)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, TypeError, KeyError) as error:  # shapes, groups, text of another run
            raise CheckpointError(
                f"{run_dir / 'last.pt'} does not fit this experiment ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no details'}); resume with the "
                "config that wrote it, or start without --resume"
            ) from None
        print(f"resumed from {run_dir / 'last.pt'} after epoch {state['epoch']}", flush=True)

    for epoch in range(state["epoch"] + 1, epochs):
        encoder_trainable = unfreeze_epoch is not None and epoch >= unfreeze_epoch
        started = time.perf_counter()
        set_encoder_trainable(model, encoder_trainable)
        if runtime.name == "xla":
            init_optimizer_state(optimizer, runtime)  # before seeding: its sync would move XLA's random state
        # Every random draw of an epoch derives from (seed, epoch): a resumed run replays it exactly.
        torch.manual_seed(seed * 100_003 + epoch)
        runtime.manual_seed(seed * 100_003 + epoch)
        model.head.train(True)
        # A frozen encoder's output is the stored feature row: the head alone steps on it, batch for batch.
        on_features = frozen_features is not None and not encoder_trainable
        step_model = model.head if on_features else model
        train_rows, val_rows = (frozen_features.train, frozen_features.val) if on_features else (train_set, val_set)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()

        # Sums start as zeros moved to the device (made there, each would be a graph of its own to compile).
        loss_sum, weight_sum = runtime.put([torch.zeros(()), torch.zeros(())])
        # One micro-batch per graph execution: one graph for a step's other micro-batches (backward only) and one
        # for its last (backward and update), whatever the accumulation count.
        micro_batches = layout.accumulation_steps
        batches = _Batches(train_rows, step_rows, order, runtime, num_workers, micro_batches=micro_batches)
        for index, batch in enumerate(runtime.device_loader(batches)):
            out = backward_step(step_model, batch, loss_fn=loss_fn, runtime=runtime)
            loss_sum = loss_sum + out["loss_sum"]
            weight_sum = weight_sum + out["weight_sum"]
            if (index + 1) % micro_batches == 0:
                factor = lr_factor(epoch * steps_per_epoch + index // micro_batches, total_steps=total_steps,
                                   warmup_steps=warmup_steps, min_ratio=min_lr_ratio)
                set_lr(optimizer, factor, runtime.device)
                optimizer_step(step_model, optimizer, clip_norm=clip_norm)
        train_seconds = time.perf_counter() - started

        # Evaluation: every row's logits placed on device, each row exactly once.
        val_logits = runtime.put([torch.zeros(len(val_set), num_classes)])[0]
        for batch in runtime.device_loader(_Batches(val_rows, layout.eval_batch_size, range(len(val_set)), runtime, num_workers)):
            out = eval_step(step_model, batch, num_classes=num_classes, runtime=runtime)
            val_logits = val_logits + place_rows(out["logits"], batch["row"], batch["w"], len(val_set))
        # The epoch's one host-device sync point: the logits and the training loss in one transfer (on a head
        # over stored features, a transfer costs more than the epoch's compute).
        fetched = runtime.to_host(torch.cat([val_logits.flatten(), (loss_sum / weight_sum.clamp_min(1.0)).reshape(1)]))
        train_loss, logits = float(fetched[-1]), fetched[:-1].reshape(len(val_set), num_classes)
        # The argmax of the very logits the device computed: the counts eval_step would have summed.
        volume_confusion = confusion_matrix(val_targets, logits.argmax(axis=1), num_classes)
        if not math.isfinite(train_loss):
            kept = (
                f"the last good checkpoint ({run_dir / 'last.pt'}) is kept" if (run_dir / "last.pt").is_file()
                else "no checkpoint was written before it"
            )
            raise TrainingError(
                f"training loss is {train_loss} at epoch {epoch}: lower optim.lr_head / optim.lr_encoder or check "
                f"the data; {kept}"
            )

        metrics = evaluate_logits(logits, val_targets, val_participants, volume_confusion, class_names,
                                  class_weights=class_weights, label_smoothing=label_smoothing)
        if objective_metric not in metrics:
            raise TrainingError(
                f"objective metric {objective_metric!r} is not a validation metric of this run; set "
                f"train.objective.metric to one of: {', '.join(sorted(k for k in metrics if k.startswith('val/')))}"
            )
        epoch_seconds = time.perf_counter() - started
        compile_stats = _compiles_since(compiles_before, runtime.compile_stats())
        metrics.update({
            "train/loss": train_loss,
            "lr/head": lr_head * factor,
            "lr/encoder": lr_encoder * factor,
            "train/encoder_trainable": float(encoder_trainable),
            "train/on_features": float(on_features),
            "perf/samples_per_second": steps_per_epoch * step_rows / max(train_seconds, 1e-9),
            "perf/epoch_seconds": epoch_seconds,
            "xla/compiles": compile_stats.get("compiles", 0),
            "xla/compile_seconds": compile_stats.get("compile_seconds", 0.0),
        })
        value = metrics[objective_metric]
        tracker.log_metrics(metrics, step=epoch)
        state["history"].append({"epoch": epoch, **{k: metrics[k] for k in ("train/loss", "val/loss", "val/balanced_accuracy",
                                                                            objective_metric, "perf/epoch_seconds")}})
        print(
            f"epoch {epoch:3d}  train/loss {train_loss:.4f}  val/loss {metrics['val/loss']:.4f}  "
            f"val/balanced_accuracy {metrics['val/balanced_accuracy']:.3f}  val/macro_f1 {metrics['val/macro_f1']:.3f}  "
            f"encoder {'trainable' if encoder_trainable else 'frozen (features)' if on_features else 'frozen'}  "
            f"{epoch_seconds:.1f}s",
            flush=True,
        )

        # NaN never improves (a validation class gone missing makes AUC NaN).
        improved = value > state["best_value"] if maximize else value < state["best_value"]
        if improved:
            state.update(best_value=value, best_epoch=epoch, best_metrics=metrics, bad_epochs=0)
            if on_features:  # written with the phase's last checkpoint; a later best replaces it unwritten
                pending_best = {"epoch": epoch, "metrics": metrics, "logits": logits,
                                # Copied to the host: a copy on an XLA device would be one more graph to compile.
                                "head_state": {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}}
            else:
                write_best(epoch, metrics, logits)
        elif epoch >= counted_from:
            state["bad_epochs"] += 1
        state["epoch"] = epoch

        # Decided before last.pt is written, so that last.pt records how the run ended. Host 0's decision
        # (pruned, early-stopped, completed or go on) is broadcast, so every host stops at the same epoch.
        ending = None
        reason = reporter.report(epoch, value, metrics)
        if reason is not None:
            ending = ("pruned", reason)
        elif early_stopping_patience is not None and state["bad_epochs"] >= early_stopping_patience:
            ending = ("early_stopped",
                      f"no improvement of {objective_metric} ({objective_direction}) for {early_stopping_patience} "
                      f"epochs with a trainable encoder"
                      + (f" (counted from the unfreeze epoch {unfreeze_epoch})" if counted_from else ""))
        elif epoch == epochs - 1:
            ending = ("completed", None)
        ending = runtime.broadcast_object(ending)
        if ending is not None:
            status, stop_reason = ending
            state["status"] = status
            if stop_reason is not None:
                state["stop_reason"] = stop_reason
        # On stored features, only the phase's last epoch is checkpointed (the run ends there, or the encoder
        # unfreezes next): a resumed run replays the others exactly, in less time than the writes would take.
        if not on_features or state["status"] in ENDED or epoch + 1 == unfreeze_epoch:
            if pending_best is not None:  # the encoder has not moved: best.pt gets the weights it had then
                write_best(**pending_best)
                pending_best = None
            runtime.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "loop_state": json.dumps(state)}, run_dir / "last.pt")
        if state["status"] in ENDED:
            break
    if state["status"] == "running":  # resumed after the last epoch had run but before the status existed
        state["status"] = "completed"
    if confusion_figure and runtime.is_main and (run_dir / "best" / "val_predictions.csv").is_file():
        write_confusion_figure(run_dir, class_names)  # drawn once: about a second of matplotlib per image
    return _result(state, _compiles_since(compiles_before, runtime.compile_stats()))


def _result(state: dict, compile_stats: dict[str, float] | None = None) -> FitResult:
    compile_stats = compile_stats or {"compiles": 0, "compile_seconds": 0.0}
    return FitResult(
        status=state["status"],
        best_epoch=state["best_epoch"],
        best_value=state["best_value"],
        best_metrics=state["best_metrics"],
        epochs_run=state["epoch"] + 1,
        stop_reason=state.get("stop_reason"),
        history=state["history"],
        compiles=int(compile_stats["compiles"]),
        compile_seconds=float(compile_stats["compile_seconds"]),
        epoch_seconds=sum(entry.get("perf/epoch_seconds", 0.0) for entry in state["history"]),
    )


def _compiles_since(before: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    return {key: now.get(key, 0) - before.get(key, 0) for key in ("compiles", "compile_seconds")}


def evaluate_logits(
    logits: np.ndarray,
    targets: np.ndarray,
    participant_ids: Sequence[str],
    volume_confusion: np.ndarray,
    class_names: Sequence[str],
    *,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """Validation scores: `val/*` at participant level (the reported figures), `val_volume/*` per volume.

    `val/loss` is the training loss (`octft.train.losses`, same class weights and smoothing) over the
    participants' averaged logits, like every other `val/` figure.
    """
    import warnings

    metrics: dict[str, float] = {}
    with warnings.catch_warnings():
        # An absent class makes AUC NaN by design; the NaN is logged, the warning would repeat every epoch.
        warnings.simplefilter("ignore")
        volume = classification_metrics(volume_confusion, probs=softmax(logits), targets=targets, class_names=class_names)
        ids, mean_logits, participant_targets = aggregate_by_participant(participant_ids, logits, targets)
        predictions = mean_logits.argmax(axis=1)
        participant_confusion = confusion_matrix(participant_targets, predictions, len(class_names))
        participant = classification_metrics(
            participant_confusion, probs=softmax(mean_logits), targets=participant_targets, class_names=class_names
        )
    metrics["val/loss"] = mean_loss(torch.from_numpy(mean_logits).float(), torch.from_numpy(participant_targets).long(),
                                    class_weights=class_weights, label_smoothing=label_smoothing)
    metrics.update({f"val/{k}": v for k, v in participant.items()})
    metrics["val/auc_macro"] = participant["auc_macro"]
    metrics.update({f"val_volume/{k}": v for k, v in volume.items()})
    metrics["val/participants"] = float(len(ids))
    # Said in the metrics themselves: a mean over fewer classes must not pass for one over all of them.
    metrics["val/classes_present"] = float(len(np.unique(participant_targets)))
    return metrics


def write_best_artifacts(
    run_dir: Path, logits, targets, participant_ids, class_names, metrics, *, figure: bool = True
) -> None:
    """`best/val_predictions.csv` (one row per participant) and `best/metrics.json` of the best epoch, and
    with `figure` its confusion-matrix image (`write_confusion_figure`)."""
    ids, mean_logits, participant_targets = aggregate_by_participant(participant_ids, logits, targets)
    probs = softmax(mean_logits)
    best = run_dir / "best"
    best.mkdir(exist_ok=True)
    with (best / "val_predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["participant_id", "true_class", "predicted_class", *[f"prob_{name}" for name in class_names]])
        for pid, target, row in zip(ids, participant_targets, probs):
            writer.writerow([pid, class_names[int(target)], class_names[int(row.argmax())], *[f"{p:.6f}" for p in row]])
    (best / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if figure:
        write_confusion_figure(run_dir, class_names)


def write_confusion_figure(run_dir: Path, class_names: Sequence[str]) -> None:
    """`best/confusion_matrix.png`, participant level, from the classes in `best/val_predictions.csv`.

    >>> write_confusion_figure(Path("demo/runs/demo"), CLASS_SHORT_NAMES)        # doctest: +SKIP
    """
    index = {name: i for i, name in enumerate(class_names)}
    with (run_dir / "best" / "val_predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    targets = np.asarray([index[row["true_class"]] for row in rows], dtype=np.int64)
    predictions = np.asarray([index[row["predicted_class"]] for row in rows], dtype=np.int64)
    confusion = confusion_matrix(targets, predictions, len(class_names))
    figure = confusion_matrix_figure(confusion, class_names, "validation, participant level (best epoch)")
    figure.savefig(run_dir / "best" / "confusion_matrix.png", dpi=100)
