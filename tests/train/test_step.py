"""Optimizer steps (`backward_step` per micro-batch, then `optimizer_step`; `tests/steps.py` does a whole batch) and
`eval_step`: eager unit tests, and XLA:CPU runs in subprocesses.

SPMD is a once-per-process switch, so each XLA configuration runs this file as a script
(`python tests/train/test_step.py '<json config>'`), which prints its results as JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from octft.data.batches import place_rows
from octft.train.runtime import make_runtime
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/steps.py: a whole batch as one step
from steps import train_step  # noqa: E402
from octft.train.step import eval_step

NUM_CLASSES = 4
SHAPE = (1, 4, 8, 8)  # (C, T, H, W)


def tiny_model(seed: int = 0) -> nn.Sequential:
    """A Conv3d "encoder" and a Linear "head" (index 0 and 2)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, kernel_size=2, stride=2), nn.Flatten(), nn.Linear(4 * 2 * 4 * 4, NUM_CLASSES))


def make_batch(rows: int, seed: int, padded: int = 0) -> dict[str, torch.Tensor]:
    """`rows` rows of which the last `padded` have weight 0 (their x and y are junk on purpose)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.ones(rows)
    if padded:
        w[-padded:] = 0
    return {
        "x": torch.randn(rows, *SHAPE, generator=generator),
        "y": torch.randint(0, NUM_CLASSES, (rows,), generator=generator),
        "w": w,
    }


def loss_fn() -> nn.Module:
    return nn.CrossEntropyLoss(reduction="none")


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def run_training(config: dict) -> dict:
    """Train a tiny model on one runtime; return losses per step, final parameters and compile counts.

    config: kind, num_devices, optimizer ("sgd"/"adamw"), accumulation_steps, steps, rows,
    padded, and optionally frozen_steps (encoder frozen for the first steps, then unfrozen).
    """
    runtime = make_runtime(config["kind"], num_devices=config.get("num_devices"))
    model = runtime.to_device(tiny_model())
    if config["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    batches = [make_batch(config["rows"], seed=step, padded=config.get("padded", 0)) for step in range(config["steps"])]
    losses: list[float] = []
    frozen_steps = config.get("frozen_steps", 0)
    step = 0
    for batch in runtime.device_loader(batches):
        model[0].requires_grad_(step >= frozen_steps)
        out = train_step(
            model,
            batch,
            loss_fn=loss_fn(),
            optimizer=optimizer,
            accumulation_steps=config["accumulation_steps"],
            clip_norm=config.get("clip_norm"),
            runtime=runtime,
        )
        scheduler.step()
        runtime.step_closure(
            lambda loss_sum, weight_sum: losses.append(float(runtime.to_host(loss_sum) / runtime.to_host(weight_sum))),
            out["loss_sum"],
            out["weight_sum"],
        )
        step += 1
    runtime.sync()
    return {
        "losses": losses,
        "parameters": {name: runtime.to_host(value).tolist() for name, value in model.state_dict().items()},
        "stats": runtime.compile_stats(),
    }


def run_epochs(config: dict) -> dict:
    """Epochs of train steps (encoder frozen in epoch 0, unfrozen after) and eval steps.

    Returns compile stats after `epochs_a` epochs and again after `epochs_b` epochs in total.
    """
    runtime = make_runtime("xla", num_devices=config["num_devices"])
    model = runtime.to_device(tiny_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100, eta_min=1e-5)
    train_batches = [make_batch(16, seed=step, padded=3 * (step == 2)) for step in range(3)]
    eval_batches = [{**make_batch(8, seed=100 + step, padded=5 * (step == 1)), "row": torch.arange(8) + 8 * step}
                    for step in range(2)]
    train_loader = runtime.device_loader(train_batches)
    eval_loader = runtime.device_loader(eval_batches)
    snapshots = {}
    evaluated_rows = 0

    for epoch in range(config["epochs_b"]):
        model[0].requires_grad_(epoch > 0)
        model.train()
        for batch in train_loader:
            train_step(model, batch, loss_fn=loss_fn(), optimizer=optimizer, accumulation_steps=2, clip_norm=1.0,
                       runtime=runtime)
            scheduler.step()
        # As the training loop evaluates: every row's logits placed by row on the device, fetched once an epoch.
        logits = runtime.put([torch.zeros(16, NUM_CLASSES)])[0]
        for batch in eval_loader:
            logits = logits + place_rows(eval_step(model, batch, runtime=runtime)["logits"], batch["row"], batch["w"], 16)
        evaluated_rows += int((np.abs(runtime.to_host(logits)).sum(axis=1) > 0).sum())
        if epoch + 1 == config["epochs_a"]:
            snapshots["a"] = runtime.compile_stats()
    snapshots["b"] = runtime.compile_stats()
    snapshots["evaluated_rows"] = evaluated_rows
    return snapshots


def run_first_steps(config: dict) -> dict:
    """Four AdamW steps, capturable as `make_optimizer` makes it on XLA, its state made up front by
    `init_optimizer_state` or not (then by the first step); the compile count after each step."""
    from octft.train.loop import init_optimizer_state

    runtime = make_runtime("xla", num_devices=config["num_devices"])
    model = runtime.to_device(tiny_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, foreach=False, capturable=True)
    if config["init_state"]:
        init_optimizer_state(optimizer, runtime)
    compiles = []
    for batch in runtime.device_loader([make_batch(16, seed=step) for step in range(4)]):
        train_step(model, batch, loss_fn=loss_fn(), optimizer=optimizer, runtime=runtime)
        runtime.sync()
        compiles.append(runtime.compile_stats()["compiles"])
    return {"compiles": compiles,
            "parameters": {name: runtime.to_host(value).tolist() for name, value in model.state_dict().items()}}


def start_subprocess(task: str, config: dict) -> subprocess.Popen:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")
    return subprocess.Popen(
        [sys.executable, __file__, task, json.dumps(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_of(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_train_step_decreases_the_loss():
    runtime = make_runtime("cpu")
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = make_batch(16, seed=0)
    losses = []
    for _ in range(20):
        out = train_step(model, batch, loss_fn=loss_fn(), optimizer=optimizer, accumulation_steps=1, clip_norm=None,
                         runtime=runtime)
        losses.append(float(out["loss_sum"] / out["weight_sum"]))
    assert losses[-1] < 0.5 * losses[0]
    # The step leaves the gradients zero, allocated for the next step's micro-batches to add to.
    assert all(torch.count_nonzero(parameter.grad) == 0 for parameter in model.parameters())


@pytest.mark.parametrize("accumulation_steps", [2, 4])
def test_accumulation_equals_one_step_on_the_whole_batch(accumulation_steps):
    runtime = make_runtime("cpu")
    batch = make_batch(16, seed=1)
    results = []
    for steps in (1, accumulation_steps):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        out = train_step(model, batch, loss_fn=loss_fn(), optimizer=optimizer, accumulation_steps=steps,
                         clip_norm=None, runtime=runtime)
        results.append((out, parameters_of(model)))
    (whole, whole_parameters), (accumulated, accumulated_parameters) = results
    torch.testing.assert_close(accumulated["loss_sum"], whole["loss_sum"], atol=0, rtol=1e-6)
    assert float(accumulated["weight_sum"]) == 16
    for name, value in whole_parameters.items():
        assert not torch.equal(value, tiny_model().state_dict()[name])  # the step did move it
        torch.testing.assert_close(accumulated_parameters[name], value, atol=1e-6, rtol=0)


def test_padded_rows_change_nothing():
    runtime = make_runtime("cpu")
    real = make_batch(12, seed=2)
    padded = make_batch(16, seed=3, padded=4)  # rows 12..15 are junk with weight 0
    padded["x"][:12], padded["y"][:12] = real["x"], real["y"]
    padded["y"][-1] = -100  # even an out-of-range label on a padded row is harmless
    results = []
    for batch, steps in ((real, 1), (padded, 4)):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        out = train_step(model, batch, loss_fn=loss_fn(), optimizer=optimizer, accumulation_steps=steps,
                         clip_norm=1.0, runtime=runtime)
        results.append((out, parameters_of(model)))
    (real_out, real_parameters), (padded_out, padded_parameters) = results
    assert float(padded_out["weight_sum"]) == 12
    torch.testing.assert_close(padded_out["loss_sum"], real_out["loss_sum"], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_out["grad_norm"], real_out["grad_norm"], atol=1e-6, rtol=0)
    for name, value in real_parameters.items():
        torch.testing.assert_close(padded_parameters[name], value, atol=1e-6, rtol=0)


def test_clipping_bounds_the_update_and_reports_the_norm():
    runtime = make_runtime("cpu")
    batch = make_batch(8, seed=4)
    updates = {}
    for clip_norm in (None, 1e-3):
        model = tiny_model()
        before = parameters_of(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        out = train_step(model, batch, loss_fn=loss_fn(), optimizer=optimizer, clip_norm=clip_norm, runtime=runtime)
        after = parameters_of(model)
        updates[clip_norm] = math.sqrt(sum(float((after[name] - before[name]).square().sum()) for name in before))
        if clip_norm is not None:
            assert float(out["grad_norm"]) == pytest.approx(updates[None], rel=1e-4)
    assert updates[1e-3] == pytest.approx(1e-3, rel=1e-3)  # SGD with lr 1: update norm = clipped grad norm


def test_frozen_encoder_is_not_updated():
    runtime = make_runtime("cpu")
    model = tiny_model()
    model[0].requires_grad_(False)
    before = parameters_of(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_step(model, make_batch(8, seed=5), loss_fn=loss_fn(), optimizer=optimizer, accumulation_steps=2,
               clip_norm=1.0, runtime=runtime)
    after = parameters_of(model)
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert not torch.equal(after["2.weight"], before["2.weight"])


def test_batch_that_does_not_split_is_refused():
    runtime = make_runtime("cpu")
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"batch of 10 rows.*accumulation_steps=4"):
        train_step(model, make_batch(10, seed=0), loss_fn=loss_fn(), optimizer=optimizer, accumulation_steps=4,
                   runtime=runtime)


def test_eval_step_gives_every_rows_logits_in_eval_mode_and_keeps_modes():
    model = tiny_model()
    model.train()
    model[0].eval()  # a frozen encoder kept in eval mode must stay so
    batch = make_batch(16, seed=6, padded=5)
    out = eval_step(model, batch)
    assert out["logits"].shape == (16, NUM_CLASSES) and not out["logits"].requires_grad
    model.eval()
    torch.testing.assert_close(out["logits"], model(batch["x"]).detach())
    model.train()
    model[0].eval()
    eval_step(model, batch)
    assert model.training and not model[0].training and model[2].training


def test_eager_bf16_autocast_runs_the_model_in_bf16():
    runtime = make_runtime("cpu", precision="bf16")
    model = tiny_model()
    out = eval_step(model, make_batch(4, seed=7), runtime=runtime)
    exact = eval_step(model, make_batch(4, seed=7))
    assert out["logits"].dtype == torch.float32
    assert not torch.equal(out["logits"], exact["logits"])  # bf16 rounding shows
    torch.testing.assert_close(out["logits"], exact["logits"], atol=0.05, rtol=0.05)


CONFIGS = [
    {"optimizer": "sgd", "accumulation_steps": 2, "steps": 4, "rows": 16, "padded": 3},
    {"optimizer": "adamw", "accumulation_steps": 1, "steps": 4, "rows": 8, "frozen_steps": 2, "clip_norm": 0.5},
]


@pytest.mark.integration
def test_xla_spmd_on_four_devices_matches_one_device_and_eager():
    runs = [start_subprocess("train", {"configs": CONFIGS, "kind": "xla", "num_devices": n}) for n in (4, 1)]
    spmd, single = (result_of(run) for run in runs)
    eager = [run_training(dict(config, kind="cpu")) for config in CONFIGS]
    for config, four, one, cpu in zip(CONFIGS, spmd, single, eager):
        assert len(four["losses"]) == config["steps"]
        np.testing.assert_allclose(four["losses"], one["losses"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(four["losses"], cpu["losses"], atol=1e-5, rtol=0)
        tolerance = 1e-6 if config["optimizer"] == "sgd" else 1e-5
        for name, value in one["parameters"].items():
            np.testing.assert_allclose(four["parameters"][name], value, atol=tolerance, rtol=0, err_msg=name)
            np.testing.assert_allclose(cpu["parameters"][name], value, atol=1e-4, rtol=0, err_msg=name)
        assert four["stats"]["fallback_ops"] == 0


@pytest.mark.integration
def test_xla_compiles_are_bounded_across_epochs_freeze_and_eval():
    snapshots = result_of(start_subprocess("epochs", {"num_devices": 4, "epochs_a": 2, "epochs_b": 6}))
    after_two, after_six = snapshots["a"], snapshots["b"]
    print("compiles after 2 epochs:", after_two, "after 6:", after_six)
    assert after_six["compiles"] == after_two["compiles"] <= 8
    assert after_six["fallback_ops"] == 0
    # 6 epochs x 11 real eval rows, every one evaluated once.
    assert snapshots["evaluated_rows"] == 6 * 11


@pytest.mark.integration
def test_optimizer_state_made_up_front_makes_the_first_step_the_steady_step():
    runs = [start_subprocess("first_steps", {"num_devices": 4, "init_state": init}) for init in (True, False)]
    made, lazy = (result_of(run) for run in runs)
    print("compiles after each step, state made up front:", made["compiles"], "by the first step:", lazy["compiles"])
    # The first step compiles the one train graph every later step runs; a first step that makes the state
    # traces a graph of its own, and the second step compiles the steady one.
    assert made["compiles"][0] == made["compiles"][-1]
    assert lazy["compiles"][1] > lazy["compiles"][0]
    for name, value in lazy["parameters"].items():  # the same AdamW either way
        np.testing.assert_allclose(made["parameters"][name], value, atol=1e-6, rtol=0, err_msg=name)


if __name__ == "__main__":
    task, config = sys.argv[1], json.loads(sys.argv[2])
    if task == "first_steps":
        result = run_first_steps(config)
    elif task == "train":
        result = [
            run_training(dict(each, kind=config["kind"], num_devices=config["num_devices"]))
            for each in config["configs"]
        ]
    else:
        result = run_epochs(config)
    print(json.dumps(result))
