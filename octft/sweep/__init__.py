"""Optuna sweeps over experiment configs, one module per step a trial takes:

- `spec`, `space`: a sweep file (base experiment, fixed keys, search space, sampler, pruner) and its space;
- `plan`: the launch plan, resolved once per launch, the only thing workers and runners read configuration from;
- `launch`: `octft sweep launch`; `study`: a study in shared storage, its budget, dead trials and their retry;
- `worker`: the one worker loop every trial goes through; `runners`: where trials train (warm process, fresh
  process, in-process); `trial`: one trial as a runner runs it (exactly its replay command);
- `records`: the typed records a study keeps; `pruners`: the collapse-aware pruner; `tracking`: the MLflow side;
- `status`: `octft sweep status` / `show`; `warmstart`: `--enqueue-from`; `storage`: Optuna's storage and lock.
- `write_behind`: the helper process that writes a stacked probe pass's MLflow runs and Optuna epochs.

This package's `__init__` imports nothing: `octft sweep status` must not import torch or MLflow.
"""
