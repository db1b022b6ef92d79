"""The second adversarial pass: inputs that grow, escape or mislead are refused with one line, or answered per row.

Aliased YAML, seeds and warm-ups no run can use, links out of the data root, headers declaring gigabytes, volumes
with no image, FIFOs, and the paths a served model is sent.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import torch

from octft.config import ConfigError, load_experiment, parse_override, save_resolved
from octft.data.readers import MAX_DECLARED_BYTES, read_volume
from octft.data.volume import OctReadError
from octft.registry.inference import NO_PATH, PREDICT_ROOT_ENV, UNREADABLE_PATH
from octft.registry.model import CHECKPOINT_KEY, OctVolumeClassifier
from octft.report.study import load_definition
from octft.train.setup import build_model

from .conftest import DEMO, SMALL, one_error_line, run_cli, run_subprocess

ADDRESS_SPACE = 3 << 30  # a child that tried to expand or inflate gigabytes fails with MemoryError, not the machine


def _limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def laughs(path: Path, head: str) -> Path:
    """Nine levels of ten aliases: 10**9 strings once expanded, from 600 bytes."""
    lines = [head, "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]" for level in range(1, 9)]
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1024
    return path


# --------------------------------------------------------------------------- 1. YAML that grows when expanded
@pytest.mark.parametrize("command", ["experiment", "sweep"])
def test_nested_yaml_aliases_are_refused_before_they_expand(command, release, tmp_path):
    if command == "experiment":
        args = ["data", "audit", "--data", release, "--config", laughs(tmp_path / "laughs.yaml", "name: laughs")]
    else:
        args = ["sweep", "status", laughs(tmp_path / "laughs.yaml", f"base: {DEMO}")]
    started = time.monotonic()
    finished = run_subprocess(*args, timeout=120, preexec_fn=_limited_memory)
    errors = [line for line in finished.stderr.splitlines() if line.startswith("octft: error:")]
    assert finished.returncode == 2 and len(errors) == 1, finished.stderr[-2000:]
    assert "laughs.yaml: line 2: the YAML anchor &l0" in errors[0] and "write the values out" in errors[0], errors
    assert "Traceback" not in finished.stderr and time.monotonic() - started < 60


def test_aliases_are_refused_in_overrides_and_the_report_definition_and_deep_nesting_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="the YAML anchor &a"):
        parse_override("train.seed=[&a [1, 1], *a, *a]")
    definition = tmp_path / "report.yaml"
    definition.write_text("figures: &f [{id: class_f1}]\nagain: *f\n")
    with pytest.raises(ConfigError, match="report.yaml: line 1: the YAML anchor &f"):
        load_definition(definition)
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    line = one_error_line(capsys, "train", deep)
    assert "deep.yaml: YAML nested too deeply" in line, line


# --------------------------------------------------------------------------- 2-3. values no run can use
def train_args(release: Path, tmp_path: Path, *overrides: str) -> list:
    return ["train", DEMO, f"data.uri={release}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL, "runtime.kind=cpu",
            f"output_dir={tmp_path}", *overrides, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.mark.parametrize("override", ["train.seed=-1", "train.seed=1e20", "train.seed=4294967296", "data.split.seed=-1"])
def test_a_seed_no_generator_takes_is_refused_at_config_load(override, release, tmp_path, capsys):
    line = one_error_line(capsys, *train_args(release, tmp_path, override))
    key = override.split("=")[0]
    assert f"{key}:" in line and "a seed is an integer from 0 to 4294967295" in line, line
    assert not (tmp_path / "cache").exists()  # refused before the audit and the cache
    assert load_experiment(DEMO, ["train.seed=4294967295", "train.seed=4.0e9"]).train.seed == 4_000_000_000


def test_a_warmup_longer_than_the_run_is_refused_naming_both_keys(release, tmp_path, capsys):
    line = one_error_line(capsys, *train_args(release, tmp_path, "train.epochs=4", "optim.warmup_epochs=4.5"))
    assert "optim.warmup_epochs (4.5) is longer than the run, train.epochs (4)" in line, line
    assert not (tmp_path / "cache").exists()
    assert load_experiment(DEMO, ["train.epochs=4", "optim.warmup_epochs=4"]).optim.warmup_epochs == 4


# --------------------------------------------------------------------------- 4. links out of the data root
def audit_json(capsys, data: Path, out: Path) -> dict:
    code, _ = run_cli(capsys, "data", "audit", "--data", data, "--json", out)
    assert code == 0
    return json.loads(out.read_text())


def printed(capsys, *args) -> tuple[int, str]:
    """Exit code and standard output of `octft ARGS`."""
    from octft.cli import main

    capsys.readouterr()
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().out


def test_links_out_of_the_data_root_are_refused_and_reported_not_found(release, tmp_path, capsys):
    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    before = audit_json(capsys, copy, tmp_path / "before.json")

    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    some_scan = sorted(copy.rglob("*.dcm"))[0]
    shutil.copy(some_scan, outside / "secret.dcm")
    shutil.copy(some_scan, outside / "folder" / "other.dcm")
    participant = some_scan.parent
    (participant / "1001_linked_oct_l_macula.dcm").symlink_to(outside / "secret.dcm")
    (participant / "linked_folder").symlink_to(outside / "folder")
    os.mkfifo(participant / "1001_pipe_oct_r_macula.dcm")

    after = audit_json(capsys, copy, tmp_path / "after.json")
    assert after["files"]["found"] == before["files"]["found"] and after["files"]["refused"] == 3
    prefix = participant.relative_to(copy).as_posix()
    refused = {entry["key"]: entry["reason"] for entry in after["refused"]}
    assert set(refused) == {f"{prefix}/1001_linked_oct_l_macula.dcm", f"{prefix}/linked_folder/",
                            f"{prefix}/1001_pipe_oct_r_macula.dcm"}, refused
    assert "outside the data root" in refused[f"{prefix}/linked_folder/"]
    assert "FIFO" in refused[f"{prefix}/1001_pipe_oct_r_macula.dcm"]
    listed = {row["key"] for row in after["unparsed"] + after["excluded"]} | {row["key"] for row in after["unlabeled"]}
    assert not any("linked" in key or "pipe" in key for key in listed)
    code, report = printed(capsys, "data", "audit", "--data", copy)
    assert code == 0 and "(and 3 refused, not read: see below)" in report and "refused (3):" in report, report
    assert f"1001_linked_oct_l_macula.dcm: a link to {outside / 'secret.dcm'}, outside the data root" in report


# --------------------------------------------------------------------------- 5. headers declaring gigabytes
def nifti_declaring(path: Path, shape: tuple[int, ...], dtype=np.uint32, inflated_mib: int = 8) -> Path:
    """A .nii.gz whose header declares `shape` while its stream holds `inflated_mib` MiB of zeros."""
    header = nibabel.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=9) as file:
        file.write(header.binaryblock + bytes(4))
        for _ in range(inflated_mib):
            file.write(bytes(1 << 20))
    return path


@pytest.fixture()
def model_folder(tmp_path) -> Path:
    """A checkpoint folder `octft predict --model` takes: an untrained tiny model's best.pt, its config in it and beside."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    config = load_experiment(DEMO, [*SMALL, "runtime.kind=cpu"])
    torch.manual_seed(0)
    model, _ = build_model(config, 4)
    torch.save({"model": model.state_dict(), "config": json.dumps(config.model_dump(mode="json"))}, folder / "best.pt")
    save_resolved(config, folder / "config.yaml")
    return folder


def served(model_folder: Path) -> OctVolumeClassifier:
    """The champion's pyfunc as `mlflow models serve` loads it, over the checkpoint folder."""
    from mlflow.pyfunc import PythonModelContext

    model = OctVolumeClassifier()
    model.load_context(PythonModelContext(artifacts={CHECKPOINT_KEY: str(model_folder)}, model_config={}))
    return model


def test_a_nifti_declaring_gigabytes_is_refused_from_its_header(model_folder, tmp_path, capsys, monkeypatch):
    bomb = nifti_declaring(tmp_path / "scan.nii.gz", (1024, 1024, 1020))  # 4 GiB declared, 8 MiB inflated
    assert bomb.stat().st_size < 1 << 20
    finished = run_subprocess("data", "inspect", bomb, timeout=120, preexec_fn=_limited_memory)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    assert f"scan.nii.gz: its header declares 4278190432 bytes of pixels, more than any OCT volume holds " \
           f"({MAX_DECLARED_BYTES} at most)" in finished.stderr, finished.stderr

    code, out = printed(capsys, "predict", "--model", model_folder, bomb, "--json")
    [failed] = json.loads(out)["volumes"]
    assert code != 0 and failed["path"] == str(bomb) and failed["error"].startswith("its header declares"), failed
    # The served model answers with a row: the reason inside its root, the one answer without it.
    monkeypatch.setenv(PREDICT_ROOT_ENV, str(tmp_path))
    row = served(model_folder).predict(None, pd.DataFrame({"path": [str(bomb)]})).iloc[0]
    assert "its header declares" in row["error"] and row["prob_healthy"] is None


def test_the_declared_bound_stops_compressed_dicom_frames_and_npz_members_before_decoding(tmp_path):
    archive = tmp_path / "scan.npz"
    np.savez_compressed(archive, volume=np.zeros((8, 8, 8), np.uint8))
    assert read_volume(archive).shape == (8, 8, 8)
    # The zip directory declares what a member inflates to (zipfile inflates no further): 3.75 GiB here.
    data = bytearray(archive.read_bytes())
    directory = data.index(b"PK\x01\x02")
    data[directory + 24:directory + 28] = (0xF000_0000).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(OctReadError, match="its header declares 4026531840 bytes of pixels"):
        read_volume(archive)

    # An RLE frame of 65535 x 65535 declared in a 1 KB file: refused before the decoder allocates 4 GiB.
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    forged = dicom(tmp_path / "forged.dcm", np.zeros((1, 8, 8)))
    from pydicom import dcmread

    dataset = dcmread(forged)
    dataset.file_meta.TransferSyntaxUID = RLELossless
    dataset.Rows = dataset.Columns = 65535
    dataset.PixelData = encapsulate([bytes(64)])
    dataset.save_as(forged, enforce_file_format=True)
    with pytest.raises(OctReadError, match="its header declares 4294836225 bytes of pixels"):
        read_volume(forged)


# --------------------------------------------------------------------------- 6. volumes with no image
def dicom(path: Path, array: np.ndarray) -> Path:
    """An 8-bit multi-frame DICOM, frames x rows x columns."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.PatientID, dataset.Modality = "1001", "OPT"
    dataset.NumberOfFrames, dataset.Rows, dataset.Columns = array.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit, dataset.PixelRepresentation = 7, 0
    dataset.PixelData = array.astype(np.uint8).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_constant_and_tiny_volumes_get_an_error_not_a_confident_class(model_folder, tmp_path, capsys, monkeypatch):
    scans = tmp_path / "scans"
    scans.mkdir()
    good = dicom(scans / "good.dcm", np.random.default_rng(0).integers(0, 255, (4, 32, 32)))
    zeros = dicom(scans / "zeros.dcm", np.zeros((4, 32, 32)))
    grey = dicom(scans / "grey.dcm", np.full((4, 32, 32), 90))
    dot = dicom(scans / "dot.dcm", np.array([[[7]]]))
    sliver = dicom(scans / "sliver.dcm", np.random.default_rng(1).integers(0, 255, (4, 4, 512)))

    code, out = printed(capsys, "predict", "--model", model_folder, good, zeros, grey, dot, sliver, "--json")
    result = json.loads(out)
    assert code != 0 and [row["path"] for row in result["volumes"] if not row["error"]] == [str(good)]
    reasons = {Path(row["path"]).name: row["error"] for row in result["volumes"] if row["error"]}
    assert reasons == {
        "zeros.dcm": "a constant volume (every pixel is 0): no image to classify",
        "grey.dcm": "a constant volume (every pixel is 90): no image to classify",
        "dot.dcm": "too small to classify: B-scans of 1 x 1 pixels (at least 8 x 8)",
        "sliver.dcm": "too small to classify: B-scans of 4 x 512 pixels (at least 8 x 8)",
    }

    monkeypatch.setenv(PREDICT_ROOT_ENV, str(scans))
    table = served(model_folder).predict(None, pd.DataFrame({"path": ["good.dcm", "zeros.dcm", "dot.dcm"]}))
    assert table["error"].tolist()[0] == "" and table["predicted_class"].tolist()[0]
    assert table["error"].tolist()[1:] == [reasons["zeros.dcm"], reasons["dot.dcm"]]
    assert table.iloc[1:][[c for c in table.columns if c.startswith("prob_")]].isna().all().all()
    assert table["predicted_class"].tolist()[1:] == ["", ""]


# --------------------------------------------------------------------------- 7. FIFOs are not "not found"
@pytest.mark.parametrize("place", ["experiment", "labels", "sweep"])
def test_a_fifo_given_as_an_input_file_is_named_as_a_fifo(place, release, tmp_path):
    fifo = tmp_path / "input.yaml"
    os.mkfifo(fifo)
    args = {"experiment": ["data", "audit", "--data", release, "--config", fifo],
            "labels": ["data", "audit", "--data", release, "--labels", fifo],
            "sweep": ["sweep", "status", fifo]}[place]
    # In a child: were the FIFO opened blocking, the timeout would end the test rather than hang it.
    finished = run_subprocess(*args, timeout=120)
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert f"{fifo}: is a FIFO (named pipe), not a regular file" in finished.stderr, finished.stderr


def test_predict_names_a_fifo_on_the_command_line_as_not_a_regular_file(model_folder, tmp_path, capsys):
    fifo = tmp_path / "scan.dcm"
    os.mkfifo(fifo)
    code, lines = run_cli(capsys, "predict", "--model", model_folder, fifo)
    assert code == 2 and any("is a FIFO (named pipe), not a regular file" in line for line in lines), lines


# --------------------------------------------------------------------------- 8. what a served model reads
def test_the_served_model_reads_only_under_its_root_and_answers_every_unusable_path_alike(
        model_folder, tmp_path, monkeypatch):
    root, outside = tmp_path / "served", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    volume = np.random.default_rng(0).integers(0, 255, (4, 32, 32))
    dicom(root / "sub" / "inside.dcm", volume)
    secret = dicom(outside / "secret.dcm", volume)  # readable, valid, and outside: must look like a missing file
    (root / "link.dcm").symlink_to(secret)
    (root / "notes.dcm").write_text("not a volume")
    os.mkfifo(root / "pipe.dcm")
    monkeypatch.setenv(PREDICT_ROOT_ENV, str(root))
    model = served(model_folder)

    unusable = [str(secret), "../outside/secret.dcm", "sub/../../outside/secret.dcm", "link.dcm", "missing.dcm",
                "/nonexistent/x.dcm", "/etc/passwd", "pipe.dcm", "sub", "a\0b.dcm"]
    paths = ["sub/inside.dcm", str(root / "sub" / "inside.dcm"), *unusable, "notes.dcm", None, math.nan, ""]
    table = model.predict(None, pd.DataFrame({"path": paths}))

    assert table["path"].tolist() == [*paths[:-3], "", "", ""]  # as given; never "None" or "nan"
    assert table["error"].tolist()[:2] == ["", ""] and table["prob_healthy"].iloc[0] == table["prob_healthy"].iloc[1]
    assert table["error"].tolist()[2:2 + len(unusable)] == [UNREADABLE_PATH] * len(unusable)
    assert "not DICOM, NIfTI or NumPy" in table["error"].iloc[2 + len(unusable)]  # inside the root: the reason
    assert table["error"].tolist()[-3:] == [NO_PATH] * 3
    assert table.iloc[2:][[c for c in table.columns if c.startswith("prob_")]].isna().all().all()

    # Without a root (a model loaded in one's own session) paths are read as given, and every failure, whether the
    # file is missing or only not a volume, gets the same answer: nothing tells a client which files exist.
    monkeypatch.delenv(PREDICT_ROOT_ENV)
    table = model.predict(None, pd.DataFrame({"path": [str(secret), "/etc/passwd", "/nonexistent/x.dcm", str(root / "pipe.dcm")]}))
    assert table["error"].tolist() == ["", UNREADABLE_PATH, UNREADABLE_PATH, UNREADABLE_PATH]


