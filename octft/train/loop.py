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

import contextlib
import csv
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch

from octft.console import epoch_line
from octft.data.batches import Batches, place_rows
from octft.train.losses import mean_loss, row_losses
from octft.train.metrics import aggregate_by_participant, classification_metrics, confusion_matrix, softmax
from octft.models.checkpoint import CheckpointError
from octft.train.runtime import Runtime, load_state
from octft.train.step import backward_step, eval_step, optimizer_step
from octft.errors import OctftError
from octft.io import DiskFullError


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


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float, start_step: int = 0) -> float:
    """0 before `start_step`, then a linear warm-up over `warmup_steps`, then cosine decay to `min_ratio` of the base
    learning rate at `total_steps`. The encoder's schedule starts at its unfreeze step: it gets its warm-up whenever
    it starts to train, and the unfreeze epoch is what it says."""
    if step < start_step:
        return 0.0
    step, total_steps = step - start_step, total_steps - start_step
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


def set_lr(optimizer, factor: float | Mapping[str, float], device: torch.device) -> None:
    """This step's learning rate of each group, `base_lr * factor` (one factor, or one per group name: head,
    encoder), and its decay `lr * decoupled_decay`.

    Each is a one-element tensor of its own, moved to the device: torch_xla turns Python numbers and
    0-dim tensors into cached scalars, shared between equal values and baked in as constants when
    0 or 1, so whether two rates happened to be equal would change the graph and a new trial would
    compile again. A (1,) tensor is always one more input of the same graph.
    """
    for group in optimizer.param_groups:
        lr = group["base_lr"] * (factor if isinstance(factor, (int, float)) else factor[group["name"]])
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


@dataclass
class LoopState:
    """Where a run stands after an epoch, as `last.pt` records it (JSON): a resumed run continues from it."""

    best_value: float
    epoch: int = -1
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0  # epochs without a better objective, counted only from the unfreeze epoch on
    history: list[dict[str, float]] = field(default_factory=list)
    status: str = "running"  # or one of ENDED
    stop_reason: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LoopState":
        return cls(**json.loads(text))

    def result(self, compiles: dict[str, float] | None = None) -> FitResult:
        compiles = compiles or {"compiles": 0, "compile_seconds": 0.0}
        return FitResult(status=self.status, best_epoch=self.best_epoch, best_value=self.best_value,
                         best_metrics=self.best_metrics, epochs_run=self.epoch + 1, stop_reason=self.stop_reason,
                         history=self.history, compiles=int(compiles["compiles"]),
                         compile_seconds=float(compiles["compile_seconds"]),
                         epoch_seconds=sum(entry.get("perf/epoch_seconds", 0.0) for entry in self.history))


def ended_state(run_dir: Path) -> LoopState | None:
    """The state recorded in `run_dir/last.pt` when that run already ended (completed, early-stopped or pruned);
    None when there is no such file or the run can go on (it failed or was killed)."""
    if not (run_dir / "last.pt").is_file():
        return None
    try:
        state = LoopState.from_json(load_state(run_dir / "last.pt", required=("loop_state",))["loop_state"])
    except (ValueError, TypeError):  # not this format: fit() refuses the file with a CheckpointError naming it
        return None
    return state if state.status in ENDED else None


def logged_metrics(metrics: dict[str, float], volume_metrics: bool) -> dict[str, float]:
    """An epoch's metrics as its run logs them: without the volume-level scores (`val_volume/*`) unless
    `volume_metrics` (`tracking.volume_metrics`)."""
    return metrics if volume_metrics else {key: value for key, value in metrics.items()
                                           if not key.startswith("val_volume/")}


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
    config_record: str = "",
    volume_metrics: bool = True,
) -> FitResult:
    """Fine-tune `model` (a `Classifier`) and return the best epoch's validation scores.

    `train_set` / `val_set` yield `{"x", "y"}` samples; `val_set.participant_ids(indices)` maps rows to
    participants, whose averaged logits give the reported (participant-level) figures. One objective
    (`objective_metric` in `objective_direction`) picks the best epoch, writes `run_dir/checkpoint/best.pt` and
    `run_dir/best/` (the best epoch's predictions and metrics), drives early stopping and is what `reporter`
    receives. `run_dir/last.pt` is written every epoch; `resume=True` continues from it and ends as an
    uninterrupted run would, or, when it says the run already ended, returns that outcome without training.
    `unfreeze_epoch=None` never unfreezes the encoder (a probe run); stop rules count only epochs from
    `unfreeze_epoch` on (from 0 for a probe run). `frozen_features` (`octft.features.frozen.FrozenFeatures`):
    while the encoder is frozen, the head trains and is evaluated on these stored encoder outputs (same rows,
    order and batches) with no encoder pass; of those epochs only the last (before unfreezing, or where the run
    ends) writes `last.pt`, and with it their best epoch's `best.pt`. `num_workers` threads gather batches
    ahead of the step. `micro_batch_rows`: rows per device per micro-batch (None: the runtime's choice).
    `config_record`: the text that rebuilds this model (the resolved config), kept inside every `best.pt`, so a
    checkpoint never depends on a file beside it that a later run may rewrite. `volume_metrics=False` leaves the
    volume-level scores (`val_volume/*`) out of the logged epochs (`logged_metrics`).
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
    hosts = (runtime.process_index, runtime.process_count)
    # Refused here, before anything compiles, when the devices cannot share the effective batch evenly.
    layout = runtime.batch_layout(batch_size, accumulation_steps, micro_batch_rows)
    step_rows = layout.effective_batch_size  # rows per optimizer step (global, all devices and hosts)
    steps_per_epoch = math.ceil(len(train_set) / step_rows)
    head_schedule = {"total_steps": steps_per_epoch * epochs, "warmup_steps": int(round(warmup_epochs * steps_per_epoch)),
                     "min_ratio": min_lr_ratio}
    schedules = {"head": head_schedule, "encoder": {**head_schedule, "start_step": counted_from * steps_per_epoch}}

    compiles_before = runtime.compile_stats()  # a warm trial runner runs many fits: count only this one's
    model = runtime.to_device(model)
    optimizer = make_optimizer(model, lr_head=lr_head, lr_encoder=lr_encoder, weight_decay=weight_decay, betas=betas)
    loss_fn = _loss_fn(runtime, num_classes, class_weights, label_smoothing)
    val_participants = val_set.participant_ids(range(len(val_set)))
    val_targets = np.asarray([int(val_set[i]["y"]) for i in range(len(val_set))]) if len(val_set) else np.zeros(0, int)
    best = BestCheckpoint(run_dir, model, runtime, val_targets, val_participants, class_names, config_record)
    state = LoopState(best_value=-math.inf if maximize else math.inf)
    if resume and (run_dir / "last.pt").is_file():
        state = _resume(run_dir, model, optimizer, objective_metric)
        if state.status in ENDED:
            return state.result()

    for epoch in range(state.epoch + 1, epochs):
        started = time.perf_counter()
        encoder_trainable = unfreeze_epoch is not None and epoch >= unfreeze_epoch
        on_features = frozen_features is not None and not encoder_trainable
        set_encoder_trainable(model, encoder_trainable)
        if runtime.name == "xla":
            init_optimizer_state(optimizer, runtime)  # before seeding: its sync would move XLA's random state
        # Every random draw of an epoch derives from (seed, epoch): a resumed run replays it exactly.
        torch.manual_seed(seed * 100_003 + epoch)
        runtime.manual_seed(seed * 100_003 + epoch)
        model.head.train(True)
        # A frozen encoder's output is the stored feature row: the head alone steps on it, batch for batch.
        step_model = model.head if on_features else model
        train_rows, val_rows = (frozen_features.train, frozen_features.val) if on_features else (train_set, val_set)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()

        with runtime.small_steps() if on_features else contextlib.nullcontext():
            batches = Batches(train_rows, step_rows, order, hosts, num_workers, micro_batches=layout.accumulation_steps)
            loss_sum, weight_sum, factors = _train_epoch(step_model, batches, optimizer, loss_fn, runtime, clip_norm,
                                                         first_step=epoch * steps_per_epoch, schedules=schedules)
            train_seconds = time.perf_counter() - started
            val_batches = Batches(val_rows, layout.eval_batch_size, range(len(val_set)), hosts, num_workers)
            val_logits = _validation_logits(step_model, val_batches, runtime, len(val_set), num_classes)
            # The epoch's one host-device sync point: the logits and the training loss in one transfer (on a head
            # over stored features, a transfer costs more than the epoch's compute).
            fetched = runtime.to_host(torch.cat([val_logits.flatten(), (loss_sum / weight_sum.clamp_min(1.0)).reshape(1)]))
            train_loss, logits = float(fetched[-1]), fetched[:-1].reshape(len(val_set), num_classes)
            check_finite(train_loss, epoch, run_dir)
            # Inside the one-thread block too: its val/loss is torch on a few rows, which a thread pool woken for it
            # (two processes on two cores) made 30 times slower.
            metrics = evaluate_logits(logits, val_targets, val_participants, class_names)
        check_objective(objective_metric, metrics)
        compiles = _compiles_since(compiles_before, runtime.compile_stats())
        metrics.update({
            "train/loss": train_loss,
            "lr/head": lr_head * factors["head"],
            "lr/encoder": lr_encoder * factors["encoder"],
            "train/encoder_trainable": float(encoder_trainable),
            "train/on_features": float(on_features),
            "perf/samples_per_second": steps_per_epoch * step_rows / max(train_seconds, 1e-9),
            "perf/epoch_seconds": time.perf_counter() - started,
            "xla/compiles": compiles["compiles"],
            "xla/compile_seconds": compiles["compile_seconds"],
        })
        value = metrics[objective_metric]
        tracker.log_metrics(logged_metrics(metrics, volume_metrics), step=epoch)
        state.history.append({"epoch": epoch, **{key: metrics[key] for key in (
            "train/loss", "val/loss", "val/balanced_accuracy", objective_metric, "perf/epoch_seconds")}})
        _print_epoch(epoch, metrics, "trainable" if encoder_trainable else "frozen (features)" if on_features else "frozen")

        # NaN never improves (a validation class gone missing makes AUC NaN).
        if value > state.best_value if maximize else value < state.best_value:
            state.best_value, state.best_epoch, state.best_metrics, state.bad_epochs = value, epoch, metrics, 0
            # On stored features the encoder has not moved: best.pt waits for the phase's last checkpoint.
            best.improved(epoch, metrics, logits, hold=on_features)
        elif epoch >= counted_from:
            state.bad_epochs += 1
        state.epoch = epoch

        # Decided before last.pt is written, so that last.pt records how the run ended. Host 0's decision
        # (pruned, early-stopped, completed or go on) is broadcast, so every host stops at the same epoch.
        ending = runtime.broadcast_object(run_ending(
            reporter.report(epoch, value, metrics), state, epoch, epochs, early_stopping_patience,
            f"{objective_metric} ({objective_direction})", unfreeze_epoch))
        if ending is not None:
            state.status, state.stop_reason = ending
        # On stored features, only the phase's last epoch is checkpointed (the run ends there, or the encoder
        # unfreezes next): a resumed run replays the others exactly, in less time than the writes would take.
        if not on_features or state.status in ENDED or epoch + 1 == unfreeze_epoch:
            best.write_held()
            save_checkpoint(runtime, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "loop_state": state.to_json()}, run_dir / "last.pt")
        if state.status in ENDED:
            break
    if state.status == "running":  # resumed after the last epoch had run but before the status was written
        state.status = "completed"
    return state.result(_compiles_since(compiles_before, runtime.compile_stats()))


def _loss_fn(runtime: Runtime, num_classes: int, class_weights: torch.Tensor | None, label_smoothing: float):
    # Values that vary between trials enter the graphs as device data, never as constants (and class weights are
    # always a tensor): a later trial with other values and the same shapes compiles nothing.
    weight = (class_weights if class_weights is not None else torch.ones(num_classes)).to(runtime.device)
    smoothing = torch.tensor([float(label_smoothing)]).to(runtime.device)  # (1,): see set_lr for why not 0-dim

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return row_losses(logits, targets, class_weights=weight, label_smoothing=smoothing)

    return loss_fn


def _train_epoch(step_model, batches: Batches, optimizer, loss_fn, runtime: Runtime, clip_norm: float | None, *,
                 first_step: int, schedules: dict[str, dict]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One epoch of optimizer steps: (summed weighted loss, summed weight) as device tensors, and the last step's
    learning-rate factor of each group (`schedules`: head, encoder). One micro-batch per graph execution: one graph for a step's other micro-batches
    (backward only) and one for its last (backward and update), whatever the accumulation count."""
    # Sums start as zeros moved to the device (made there, each would be a graph of its own to compile).
    loss_sum, weight_sum = runtime.put([torch.zeros(()), torch.zeros(())])
    factors = {name: lr_factor(first_step, **schedule) for name, schedule in schedules.items()}
    for index, batch in enumerate(runtime.device_loader(batches)):
        out = backward_step(step_model, batch, loss_fn=loss_fn, runtime=runtime)
        loss_sum = loss_sum + out["loss_sum"]
        weight_sum = weight_sum + out["weight_sum"]
        if (index + 1) % batches.micro_batches == 0:
            step = first_step + index // batches.micro_batches
            factors = {name: lr_factor(step, **schedule) for name, schedule in schedules.items()}
            set_lr(optimizer, factors, runtime.device)
            optimizer_step(step_model, optimizer, clip_norm=clip_norm)
    return loss_sum, weight_sum, factors


def _validation_logits(step_model, batches: Batches, runtime: Runtime, rows: int, num_classes: int) -> torch.Tensor:
    """Every validation row's logits, placed on the device by row (each row exactly once)."""
    logits = runtime.put([torch.zeros(rows, num_classes)])[0]
    for batch in runtime.device_loader(batches):
        out = eval_step(step_model, batch, runtime=runtime)
        logits = logits + place_rows(out["logits"], batch["row"], batch["w"], rows)
    return logits


def run_ending(prune_reason: str | None, state: LoopState, epoch: int, epochs: int, patience: int | None,
            objective: str, unfreeze_epoch: int | None) -> tuple[str, str | None] | None:
    """How the run ends after `epoch`: pruned, early-stopped, completed, or None to go on."""
    if prune_reason is not None:
        return "pruned", prune_reason
    if patience is not None and state.bad_epochs >= patience:
        counted = f" (counted from the unfreeze epoch {unfreeze_epoch})" if unfreeze_epoch else ""
        return "early_stopped", f"no improvement of {objective} for {patience} epochs with a trainable encoder{counted}"
    if epoch == epochs - 1:
        return "completed", None
    return None


def _resume(run_dir: Path, model, optimizer, objective_metric: str) -> LoopState:
    """The loop state of `run_dir/last.pt`, with the model and optimizer loaded from it (unless the run ended)."""
    saved = load_state(run_dir / "last.pt", required=("model", "optimizer", "loop_state"))
    try:
        state = LoopState.from_json(saved["loop_state"])
        if state.status in ENDED:
            print(f"{run_dir} already ended ({state.status}" + (f": {state.stop_reason}" if state.stop_reason else "")
                  + f") after epoch {state.epoch}; best {objective_metric} {state.best_value:.4f} at epoch "
                  f"{state.best_epoch}; nothing to resume", flush=True)
            return state
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, TypeError, KeyError) as error:  # shapes, groups, text of another run
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        raise CheckpointError(
            f"{run_dir / 'last.pt'} does not fit this experiment ({type(error).__name__}: {detail}); resume with the "
            "config that wrote it, or start without --resume"
        ) from None
    print(f"resumed from {run_dir / 'last.pt'} after epoch {state.epoch}", flush=True)
    return state


class BestCheckpoint:
    """`checkpoint/best.pt` and `best/` of the best epoch so far. An improvement on stored features is held (the
    head's weights copied to the host) and written with the phase's last checkpoint: the encoder has not moved."""

    def __init__(self, run_dir: Path, model, runtime: Runtime, targets: np.ndarray, participants: list[str],
                 class_names: Sequence[str], config_record: str) -> None:
        self.run_dir, self.model, self.runtime = run_dir, model, runtime
        self.config_record = config_record
        self.targets, self.participants, self.class_names = targets, participants, class_names
        self.held: dict | None = None

    def improved(self, epoch: int, metrics: dict[str, float], logits: np.ndarray, *, hold: bool,
                 head: dict[str, torch.Tensor] | None = None) -> None:
        """`head`: the head's weights now, when the model's own head module does not hold them (a stacked head)."""
        if hold:
            # Copied to the host: a copy on an XLA device would be one more graph to compile.
            head = {name: value.detach().cpu().clone() for name, value in (head or self.model.head.state_dict()).items()}
            self.held = {"epoch": epoch, "metrics": metrics, "logits": logits, "head": head}
        else:
            self.held = None
            self._write(epoch, metrics, logits)

    def write_held(self) -> None:
        if self.held is not None:
            self._write(**self.held)
            self.held = None

    def _write(self, epoch: int, metrics: dict[str, float], logits: np.ndarray, head: dict | None = None) -> None:
        model_state = self.model.state_dict()
        if head is not None:
            model_state.update({f"head.{name}": value for name, value in head.items()})
        save_checkpoint(self.runtime, {"model": model_state, "epoch": epoch, "metrics": json.dumps(metrics),
                                        "config": self.config_record},
                         self.run_dir / "checkpoint" / "best.pt")
        if self.runtime.is_main:
            write_best_artifacts(self.run_dir, logits, self.targets, self.participants, self.class_names, metrics)


def save_checkpoint(runtime: Runtime, state: dict, path: Path) -> None:
    try:
        runtime.save(state, path)
    except DiskFullError as error:  # the write was atomic: what `path` held before is still there
        kept = "the previous one is kept" if path.is_file() else "none was written"
        raise DiskFullError(f"{error} (the folder: output_dir, or --run-dir); {kept}") from None


def check_finite(train_loss: float, epoch: int, run_dir: Path) -> None:
    if math.isfinite(train_loss):
        return
    kept = (f"the last good checkpoint ({run_dir / 'last.pt'}) is kept" if (run_dir / "last.pt").is_file()
            else "no checkpoint was written before it")
    raise TrainingError(f"training loss is {train_loss} at epoch {epoch}: lower optim.lr_head / optim.lr_encoder or "
                        f"check the data; {kept}")


def check_objective(objective_metric: str, metrics: dict[str, float]) -> None:
    if objective_metric not in metrics:
        raise TrainingError(
            f"objective metric {objective_metric!r} is not a validation metric of this run; set "
            f"train.objective.metric to one of: {', '.join(sorted(key for key in metrics if key.startswith('val/')))}"
        )


def _print_epoch(epoch: int, metrics: dict[str, float], encoder: str) -> None:
    # In a sweep this is the trial's trial.log (its runner's output); `octft sweep launch --verbose` echoes it.
    print(epoch_line(epoch, metrics, encoder), flush=True)


def _compiles_since(before: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    return {key: now.get(key, 0) - before.get(key, 0) for key in ("compiles", "compile_seconds")}


def evaluate_logits(
    logits: np.ndarray,
    targets: np.ndarray,
    participant_ids: Sequence[str],
    class_names: Sequence[str],
) -> dict[str, float]:
    """Validation scores: `val/*` at participant level (the reported figures), `val_volume/*` per volume.

    `val/loss` is the plain cross-entropy (no class weights, no label smoothing) over the participants' averaged
    logits, whatever the run trains with: one scale for every trial, so a study that samples the loss's weights or
    smoothing can still rank its trials by `val/loss`. (`train/loss` is the loss the run trains with.)
    """
    metrics: dict[str, float] = {}
    with warnings.catch_warnings():
        # An absent class makes AUC NaN by design; the NaN is logged, the warning would repeat every epoch.
        warnings.simplefilter("ignore")
        volume_confusion = confusion_matrix(targets, logits.argmax(axis=1), len(class_names))
        volume = classification_metrics(volume_confusion, probs=softmax(logits), targets=targets, class_names=class_names)
        ids, mean_logits, participant_targets = aggregate_by_participant(participant_ids, logits, targets)
        predictions = mean_logits.argmax(axis=1)
        participant_confusion = confusion_matrix(participant_targets, predictions, len(class_names))
        participant = classification_metrics(
            participant_confusion, probs=softmax(mean_logits), targets=participant_targets, class_names=class_names
        )
    metrics["val/loss"] = mean_loss(torch.from_numpy(mean_logits).float(), torch.from_numpy(participant_targets).long())
    metrics.update({f"val/{k}": v for k, v in participant.items()})
    metrics["val/auc_macro"] = participant["auc_macro"]
    metrics.update({f"val_volume/{k}": v for k, v in volume.items()})
    metrics["val/participants"] = float(len(ids))
    # Said in the metrics themselves: a mean over fewer classes must not pass for one over all of them.
    metrics["val/classes_present"] = float(len(np.unique(participant_targets)))
    return metrics


def write_best_artifacts(run_dir: Path, logits, targets, participant_ids, class_names, metrics) -> None:
    """`best/val_predictions.csv` (one row per participant) and `best/metrics.json` of the best epoch."""
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
