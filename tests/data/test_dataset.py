"""Training samples through the cache and packs: an entry damaged after the build is rebuilt, never read as
valid; a pack's dtype follows the sources (uint8 only for 8-bit ones) and reaches the model unconverted."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from octft.config import ConfigError, load_experiment_dict
from octft.data.audit import audit_dataset
from octft.data.cache import VolumeCache
from octft.data.dataset import prepare_volumes, resolve_pack_dtype
from octft.data.samples import VolumeDataset
from octft.data.preprocess import Preprocessing
from octft.data.synth import synthesize
from octft.errors import UsageError
from octft.models.encoder import input_as_float


def test_a_cache_entry_damaged_after_the_build_is_rebuilt_from_the_source(tmp_path):
    synthesize(tmp_path / "data", participants=24, seed=1, frames=4, height=32, width=32)
    report = audit_dataset(str(tmp_path / "data"))
    prepared = prepare_volumes(str(tmp_path / "data"), report.volumes, cache_dir=str(tmp_path / "cache"),
                               frames=4, height=16, width=16, workers=1, progress=False, pack_dtype="float16")
    sid = prepared.volumes[prepared.volumes.split == "train"].source_id.iloc[0]
    before = prepared.cache.get(sid).copy()

    data_path, _ = prepared.cache.entry_paths(sid)
    raw = bytearray(data_path.read_bytes())
    raw[-8:] = b"\xff" * 8  # flip the tail of the stored array
    data_path.write_bytes(bytes(raw))

    # The split's pack is written from the entries: the damaged one is rebuilt from the DICOM on the way.
    train = prepared.dataset("train")
    assert len(train) == int((prepared.volumes.split == "train").sum()) > 0
    assert train.volumes.source_id.iloc[0] == sid
    assert train[0]["x"].shape == (1, 4, 16, 16)
    np.testing.assert_array_equal(train[0]["x"].numpy()[0], before)
    assert prepared.cache.get(sid) is not None

    # Without a way back to the source, a damaged entry is an error naming it, not silently wrong data.
    data_path.write_bytes(bytes(raw))
    bare = VolumeDataset(train.volumes, prepared.cache)
    with pytest.raises(FileNotFoundError, match=re.escape(sid)):
        bare[0]


def test_a_split_reads_from_its_pack_and_a_damaged_pack_is_rewritten(tmp_path):
    synthesize(tmp_path / "data", participants=24, seed=1, frames=4, height=32, width=32)
    report = audit_dataset(str(tmp_path / "data"))
    prepared = prepare_volumes(str(tmp_path / "data"), report.volumes, cache_dir=str(tmp_path / "cache"),
                               frames=4, height=16, width=16, workers=1, progress=False, pack_dtype="float32")
    val = prepared.dataset("val")
    per_entry = np.stack([prepared.cache.get(sid) for sid in val.volumes.source_id])
    x, y = val.gather(list(range(len(val)))[::-1])
    assert x.shape == (len(val), 1, 4, 16, 16) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy()[::-1, 0], per_entry)
    np.testing.assert_array_equal(y.numpy()[::-1], val.labels)

    # One byte of the pack flipped: detected when the pack is opened, and the pack written again.
    data_path = val.pack.path / "data.npy"
    del val
    raw = bytearray(data_path.read_bytes())
    raw[-3] ^= 0xFF
    data_path.write_bytes(bytes(raw))
    prepared.packs.clear()  # as a new process opening the cache
    again = prepared.dataset("val")
    np.testing.assert_array_equal(again.gather(range(len(again)))[0].numpy()[:, 0], per_entry)


def prepared_8_bit(tmp_path, **settings):
    """The synthetic data (8-bit DICOMs, as AI-READI's) prepared at 4 x 16 x 16."""
    if not (tmp_path / "data").exists():
        synthesize(tmp_path / "data", participants=24, seed=1, frames=4, height=32, width=32)
    report = audit_dataset(str(tmp_path / "data"))
    return prepare_volumes(str(tmp_path / "data"), report.volumes, cache_dir=str(tmp_path / "cache"), frames=4,
                           height=16, width=16, workers=1, progress=False, **settings)


def test_auto_packs_8_bit_sources_as_uint8_that_the_model_reads_as_the_float_clips(tmp_path):
    prepared = prepared_8_bit(tmp_path)
    val = prepared.dataset("val")
    assert {prepared.cache.source_dtype(sid) for sid in val.volumes.source_id} == {"uint8"}
    x, _ = val.gather(range(len(val)))
    assert x.dtype == torch.uint8  # leaves the host as stored: a quarter of float32's bytes
    entries = np.stack([prepared.cache.get(sid) for sid in val.volumes.source_id])
    # float16 entries rounded to 256 levels: half a level off at most, plus float16's own rounding.
    np.testing.assert_allclose(input_as_float(x).numpy()[:, 0], entries, rtol=0, atol=0.5 / 255 + 1e-3)


def test_auto_keeps_the_cache_dtype_for_zscore_wider_or_unknown_sources(tmp_path):
    assert prepared_8_bit(tmp_path, intensity="zscore").dataset("val").gather([0])[0].dtype == torch.float16
    assert prepared_8_bit(tmp_path, dtype="float32").dataset("val").gather([0])[0].dtype == torch.uint8

    cache = VolumeCache(tmp_path / "direct", Preprocessing(frames=2, height=4, width=4))
    clip = np.linspace(0, 1, 32, dtype=np.float32).reshape(2, 4, 4)
    cache.put("eight", clip, source_dtype="uint8")
    cache.put("sixteen", clip, source_dtype="uint16")
    cache.put("unrecorded", clip)  # an entry built before the source dtype was recorded
    assert resolve_pack_dtype("auto", cache, ["eight"]) == "uint8"
    assert resolve_pack_dtype("auto", cache, ["eight", "sixteen"]) == "float16"
    assert resolve_pack_dtype("auto", cache, ["eight", "unrecorded"]) == "float16"
    assert resolve_pack_dtype("float32", cache, ["eight"]) == "float32"
    assert resolve_pack_dtype("uint8", cache, ["sixteen"]) == "uint8"  # explicit: the user's choice


def test_each_pack_dtype_is_its_own_pack(tmp_path):
    folders = {}
    for dtype in ("auto", "uint8", "float16", "float32"):
        val = prepared_8_bit(tmp_path, pack_dtype=dtype).dataset("val")
        folders[dtype] = val.pack.path
        assert val.pack.rows.dtype == np.dtype("uint8" if dtype == "auto" else dtype)
    assert folders["auto"] == folders["uint8"]  # the same bytes under the same key
    assert len({folders[dtype] for dtype in ("uint8", "float16", "float32")}) == 3


def test_uint8_for_zscore_clips_is_refused_with_one_message(tmp_path):
    message = "data.pack_dtype=uint8 cannot hold zscore clips (they are not in [0, 1])"
    with pytest.raises(UsageError, match=re.escape(message)):
        prepared_8_bit(tmp_path, intensity="zscore", pack_dtype="uint8")
    assert not (tmp_path / "cache").exists()  # refused before any work
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment_dict({}, overrides=["data.preprocess.intensity=zscore", "data.pack_dtype=uint8"])


def test_a_run_from_a_uint8_pack_matches_one_from_a_float32_pack_and_converts_only_in_the_model(tmp_path):
    from octft.config import load_experiment
    from octft.data.layout import CLASS_SHORT_NAMES
    from octft.track import NullTracker
    from octft.train.loop import fit
    from octft.train.setup import build_model
    from octft.train.runtime import make_runtime

    synthesize(tmp_path / "data", participants=32, seed=0, frames=4, height=32, width=32)
    report = audit_dataset(str(tmp_path / "data"))
    demo = Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"
    cfg = load_experiment(demo, ["train.epochs=3", "train.unfreeze_epoch=0", "train.batch_size=4",
                                 "train.early_stopping_patience=null", "model.head_dropout=0"])
    histories, seen = {}, {}
    for dtype in ("uint8", "float32"):
        prepared = prepare_volumes(str(tmp_path / "data"), report.volumes, cache_dir=str(tmp_path / "cache"),
                                   frames=4, height=32, width=32, dtype="float32", pack_dtype=dtype,
                                   workers=1, progress=False)
        torch.manual_seed(0)
        model = build_model(cfg, len(CLASS_SHORT_NAMES))[0]
        seen[dtype] = set()
        # What reaches the model from the steps, and what its first layer computes on after the one conversion.
        model.register_forward_pre_hook(lambda module, args, d=dtype: seen[d].add(("model", args[0].dtype)))
        model.encoder.patch_embed.register_forward_pre_hook(
            lambda module, args, d=dtype: seen[d].add(("patch_embed", args[0].dtype)))
        result = fit(model, prepared.dataset("train"), prepared.dataset("val"), runtime=make_runtime("cpu"),
                     tracker=NullTracker(), class_names=CLASS_SHORT_NAMES, epochs=3, batch_size=4,
                     accumulation_steps=1, unfreeze_epoch=0, lr_head=1e-3, lr_encoder=1e-4, seed=0,
                     run_dir=tmp_path / dtype, num_workers=2)
        histories[dtype] = [*result.history, result.best_metrics]
    assert seen["uint8"] == {("model", torch.uint8), ("patch_embed", torch.float32)}
    assert seen["float32"] == {("model", torch.float32), ("patch_embed", torch.float32)}
    for uint8_epoch, float32_epoch in zip(histories["uint8"], histories["float32"], strict=True):
        for name in ("train/loss", "val/loss", "val/balanced_accuracy"):
            assert uint8_epoch[name] == pytest.approx(float32_epoch[name], abs=0.02), name
