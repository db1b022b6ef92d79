"""What a run is built from, and what a warm runner keeps of it between runs (`RunCache`): one audit and cache check
per data setting, one encoder build (and the same head draws) per encoder setting."""

from __future__ import annotations

import pytest
import torch

import octft.data.prepare
from octft.config import load_experiment
from octft.train.setup import RunCache, build_model
from sweeps import REPO, experiment_overrides

DEMO = REPO / "experiments" / "demo.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from octft.data.synth import synthesize

    root = tmp_path_factory.mktemp("setup")
    synthesize(root / "data", participants=48, seed=0, frames=4, height=32, width=32)
    return root


def test_runs_with_the_same_data_settings_share_one_audit_and_cache_check(tmp_path, data_dir):
    overrides = experiment_overrides(data_dir, tmp_path)
    cache = RunCache()
    first = cache.data(load_experiment(DEMO, overrides).data, progress=False)
    again = cache.data(load_experiment(DEMO, [*overrides, "optim.lr_head=0.01"]).data, progress=False)
    assert again is first  # another run's params, the same data: nothing audited or checked again
    assert len(first.prepared.volumes) == len(first.report.volumes) > 0
    other = cache.data(load_experiment(DEMO, [*overrides, "data.guards.min_per_class=2"]).data, progress=False)
    assert other is not first  # other data settings: audited again (its cache entries are all reused)
    assert other.prepared.report.reused == len(other.prepared.volumes) and other.prepared.report.built == 0


def test_a_complete_cache_is_checked_without_starting_a_process_pool(tmp_path, data_dir, monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool started to find that nothing needs building")

    overrides = [*experiment_overrides(data_dir, tmp_path), "data.download.workers=2"]
    RunCache().data(load_experiment(DEMO, overrides).data, progress=False)  # builds what is missing
    monkeypatch.setattr(octft.data.prepare, "ProcessPoolExecutor", no_pool)
    setup = RunCache().data(load_experiment(DEMO, overrides).data, progress=False)
    assert setup.prepared.report.reused == len(setup.prepared.volumes) > 0


def test_a_cached_encoder_gives_the_model_a_fresh_build_gives(tmp_path, data_dir):
    cfg = load_experiment(DEMO, experiment_overrides(data_dir, tmp_path))
    torch.manual_seed(cfg.train.seed)
    fresh, _ = build_model(cfg)
    cache = RunCache()
    for trains_encoder in (True, False, True):
        cached, _ = cache.model(cfg, trains_encoder=trains_encoder)
        for (name, value), (_, expected) in zip(cached.state_dict().items(), fresh.state_dict().items()):
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    # A run that trains its encoder gets its own copy: training it never changes the next run's start.
    first, _ = cache.model(cfg, trains_encoder=True)
    second, _ = cache.model(cfg, trains_encoder=True)
    assert first.encoder is not second.encoder
    with torch.no_grad():
        next(first.encoder.parameters()).add_(1.0)
    assert not torch.equal(next(first.encoder.parameters()), next(second.encoder.parameters()))
    # Runs that never train their encoder on the CPU (probe heads) share the one built: none can change it.
    other = load_experiment(DEMO, [*experiment_overrides(data_dir, tmp_path), "model.head=linear"])
    assert other.runtime.kind == "cpu"
    assert cache.model(other, trains_encoder=False)[0].encoder is cache.model(cfg, trains_encoder=False)[0].encoder
