"""A uint8 batch crosses to XLA devices as uint8 and trains exactly as its float32 clips do.

XLA:CPU SPMD over 4 devices (input sharding by the device loader, gradient accumulation in an XLA while
loop, eval): the encoder's one conversion (`input_as_float`) runs on the device. SPMD is a once-per-process
switch, so the run happens in a subprocess running this file as a script, which prints JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/steps.py: a whole batch as one step
from steps import train_step  # noqa: E402


def train_and_evaluate(dtype: str) -> dict:
    from octft.config import load_experiment
    from octft.train.loop import make_optimizer, set_lr
    from octft.train.setup import build_model
    from octft.train.runtime import make_runtime
    from octft.train.step import eval_step

    runtime = make_runtime("xla")
    cfg = load_experiment(REPO / "experiments" / "demo.yaml", [
        "data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32", "model.head_dropout=0"])
    torch.manual_seed(0)
    model = runtime.to_device(build_model(cfg, 4)[0])
    optimizer = make_optimizer(model, lr_head=1e-3, lr_encoder=1e-4, weight_decay=0.05, betas=(0.9, 0.999))
    raw = torch.randint(0, 256, (8, 1, 4, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    batch = {"x": raw if dtype == "uint8" else raw.float() / 255, "y": torch.arange(8) % 4, "w": torch.ones(8)}
    figures, dtypes = [], []
    for device_batch in runtime.device_loader([batch, batch]):
        dtypes.append(str(device_batch["x"].dtype))
        set_lr(optimizer, 1.0, runtime.device)
        out = train_step(model, device_batch, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), optimizer=optimizer,
                         accumulation_steps=2, clip_norm=1.0, runtime=runtime)
        logits = eval_step(model, device_batch, runtime=runtime)["logits"]
        figures += [float(runtime.to_host(out["loss_sum"])), *runtime.to_host(logits).ravel().tolist()]
    return {"figures": figures, "dtypes": dtypes, "devices": runtime.num_devices}


@pytest.mark.integration
def test_a_uint8_batch_trains_on_xla_spmd_as_its_float32_clips_do():
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")
    runs = {}
    for dtype in ("uint8", "float32"):
        completed = subprocess.run([sys.executable, __file__, dtype], env=env, capture_output=True, text=True,
                                   timeout=600, cwd=REPO)
        assert completed.returncode == 0, completed.stderr[-4000:]
        runs[dtype] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert runs["uint8"]["devices"] == 4
    assert runs["uint8"]["dtypes"] == ["torch.uint8"] * 2  # on the device still uint8: converted by the model
    np.testing.assert_allclose(runs["uint8"]["figures"], runs["float32"]["figures"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    print(json.dumps(train_and_evaluate(sys.argv[1])))
