"""Hostile and mistaken inputs: each fails with one `octft: error:` line and exit 2, never a traceback or a hang."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import stat
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from octft.config import load_experiment, save_resolved
from octft.data.readers import read_volume
from octft.data.volume import OctReadError

from .conftest import DEMO, REPO, SMALL, one_error_line, run_cli, run_subprocess


def float_dicom(path: Path, array: np.ndarray) -> Path:
    """A float32 DICOM (Float Pixel Data), frames x rows x columns."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom import Dataset

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.PatientID = "1001"
    dataset.Modality = "OPT"
    dataset.Rows, dataset.Columns = array.shape[1:]
    dataset.NumberOfFrames = array.shape[0]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 32
    dataset.FloatPixelData = array.astype("<f4").tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


class _RunsCode:
    """Unpickling this would run a shell command: what a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoint(path: Path) -> Path:
    torch.save({"model": _RunsCode(path.with_name("payload-ran"))}, path)
    return path


# --------------------------------------------------------------------------- wrong paths, wrong kinds of file
@pytest.mark.parametrize(
    "args, named",
    [
        (["data", "audit", "--data", "/etc/passwd"], "/etc/passwd is not a folder"),
        (["data", "audit", "--data", "{tmp}/absent"], "absent does not exist"),
        (["data", "audit", "--data", "ftp://host/x"], "unsupported storage URI"),
        (["data", "audit", "--data", "{release}", "--labels", "{tmp}/absent.tsv"], "absent.tsv: labels file not found"),
        (["data", "audit", "--data", "{release}", "--config", "{tmp}/absent.yaml"], "absent.yaml: no such experiment file"),
        (["data", "audit", "--data", "{release}", "--config", "/dev/zero"], "/dev/zero"),
        (["data", "audit", "--data", "{release}", "--json", "/proc/octft/audit.json"], "--json /proc/octft/audit.json"),
        (["data", "inspect", "{tmp}/absent.dcm"], "absent.dcm: file not found"),
        (["data", "inspect", "{tmp}"], "is a directory"),
        (["train", "{tmp}/absent.yaml"], "absent.yaml: no such experiment file"),
        (["sweep", "status", "{tmp}/absent.yaml"], "absent.yaml: no such sweep file"),
        (["sweep", "show", str(REPO / "sweeps" / "demo.yaml"), "--trial", "0", "--storage", "sqlite:///{tmp}/absent.db"],
         "no such database file"),
        (["predict", "--model", "{tmp}/absent", "{tmp}/x.dcm"], "neither a models:/"),
        (["checkpoint", "inspect", "{tmp}/absent.pt", "--config", str(DEMO)], "absent.pt: no such checkpoint file"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value[:2]),
)
def test_wrong_path_is_one_line(args, named, release, tmp_path, capsys):
    args = [arg.format(tmp=tmp_path, release=release) for arg in args]
    line = one_error_line(capsys, *args)
    assert named.format(tmp=tmp_path) in line, line


def test_read_only_commands_create_no_database(tmp_path, capsys):
    absent = tmp_path / "typo" / "optuna.db"
    one_error_line(capsys, "sweep", "status", REPO / "sweeps" / "demo.yaml", "--storage", f"sqlite:///{absent}")
    assert not absent.exists() and not absent.parent.exists()


def test_inspect_of_a_device_is_refused_without_reading_it(capsys):
    line = one_error_line(capsys, "data", "inspect", "/dev/zero")
    assert "/dev/zero: is a character device, not a regular file" in line


def test_inspect_of_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "scan.dcm"
    os.mkfifo(fifo)
    # In a child process: were the reader to open the FIFO blocking, the timeout would end the test, not CI.
    finished = run_subprocess("data", "inspect", fifo, timeout=120)
    assert finished.returncode == 2, finished.stderr
    assert "is a FIFO (named pipe), not a regular file" in finished.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("inner", ["zeros", "npy-header-then-zeros"])
def test_gzip_bomb_is_refused_within_bounded_memory(inner, tmp_path):
    """1 MB of gzip inflating to 1 GiB: refused after at most what its content declares (here ~1 MiB)."""
    head = b""
    if inner != "zeros":
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((4, 8, 8), np.uint8))
        head = buffer.getvalue()
    bomb = tmp_path / "scan.npy.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as file:
        file.write(head)
        chunk = bytes(1 << 20)
        for _ in range(1024):
            file.write(chunk)
    assert bomb.stat().st_size < 2 << 20
    message, grown_mib = read_in_child(bomb)
    assert "scan.npy.gz" in message and ("gzip bomb" in message or "not DICOM, NIfTI or NumPy" in message), message
    assert grown_mib < 64, f"peak memory grew {grown_mib} MiB reading a 1 MB file"


def test_deflated_dicom_bomb_is_refused_within_bounded_memory(tmp_path):
    """Deflated Explicit VR: 1 MB inflating to 1 GiB of Pixel Data declared as 2 frames of 8 x 8."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    honest = deflated_dicom(tmp_path / "honest.dcm")
    assert read_volume(honest).shape == (2, 8, 8)  # a well-formed deflated file still reads

    bomb = tmp_path / "bomb.dcm"
    data = honest.read_bytes()
    start = 144 + int.from_bytes(data[140:144], "little")  # the deflated data set starts after the file meta
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, small_image_dataset())
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with bomb.open("wb") as file:
        file.write(data[:start])
        file.write(compressor.compress(header.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00" + (1 << 30).to_bytes(4, "little")))
        chunk = bytes(1 << 20)
        for _ in range(1024):
            file.write(compressor.compress(chunk))
        file.write(compressor.flush())
    assert bomb.stat().st_size < 2 << 20
    message, grown_mib = read_in_child(bomb)
    assert "bomb.dcm: deflated data set inflates past" in message, message
    assert grown_mib < 64, f"peak memory grew {grown_mib} MiB reading a 1 MB file"


def small_image_dataset():
    from pydicom import Dataset

    dataset = Dataset()
    dataset.PatientID, dataset.Modality = "1001", "OPT"
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = 8, 8, 2
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit, dataset.PixelRepresentation = 7, 0
    return dataset


def deflated_dicom(path: Path) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    dataset = small_image_dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.PixelData = bytes(range(128))
    dataset.save_as(path, enforce_file_format=True)
    return path


def read_in_child(path: Path) -> tuple[str, int]:
    """(the OctReadError's message, MiB the peak memory grew) of reading `path` in a fresh process."""
    import subprocess
    import sys

    script = (
        "import resource\n"
        "from octft.data.readers import read_volume\n"
        "from octft.data.volume import OctReadError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    read_volume({str(path)!r})\n"
        "except OctReadError as error:\n"
        "    print(error)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    message, grown_mib = finished.stdout.strip().splitlines()
    return message, int(grown_mib)


def test_non_finite_dicom_is_refused_by_inspect_and_counted_by_verify(release, tmp_path, capsys):
    volume = np.ones((4, 32, 32), np.float32)
    volume[1, 2, 3] = np.nan
    volume[2, 0, 0] = np.inf
    alone = float_dicom(tmp_path / "nan.dcm", volume)
    line = one_error_line(capsys, "data", "inspect", alone)
    assert "2 of 4096 pixel values are NaN or infinite" in line
    with pytest.raises(OctReadError):
        read_volume(alone)

    # Inside a release: the audit with --verify counts it as unparsed, naming the file and the reason.
    import json
    import shutil

    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    victim = sorted(copy.rglob("*.dcm"))[0]
    float_dicom(victim, volume)
    code, _ = run_cli(capsys, "data", "audit", "--data", copy, "--verify", "--json", tmp_path / "audit.json",
                      "--allow", "classes_in_train", "--allow", "classes_in_val", "--allow", "classes_in_test",
                      "--allow", "match_rate")
    report = json.loads((tmp_path / "audit.json").read_text())
    unparsed = {entry["key"]: entry["reason"] for entry in report["unparsed"]}
    key = victim.relative_to(copy).as_posix()
    assert "NaN or infinite" in unparsed[key], unparsed


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture()
def model_folder(tmp_path) -> Path:
    """A checkpoint folder as `octft predict --model` takes it: config.yaml and (here: no) best.pt."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_resolved(load_experiment(DEMO, [*SMALL, "runtime.kind=cpu"]), folder / "config.yaml")
    return folder


@pytest.mark.parametrize("content", ["junk", "hostile", "not-a-dict", "other-model"])
def test_predict_with_a_bad_best_pt_is_one_line_and_runs_no_code(content, model_folder, release, capsys):
    best = model_folder / "best.pt"
    if content == "junk":
        best.write_bytes(b"PK\x03\x04 this is not a zip" + bytes(100))
    elif content == "hostile":
        hostile_checkpoint(best)
    elif content == "not-a-dict":
        torch.save(torch.zeros(3), best)
    else:
        torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, best)
    scan = next(release.rglob("*.dcm"))
    line = one_error_line(capsys, "predict", "--model", model_folder, scan)
    assert "best.pt" in line, line
    assert not (model_folder / "payload-ran").exists()
    if content == "hostile":
        assert "unsupported global posix.system" in line.lower(), line


@pytest.mark.parametrize("content", ["junk", "hostile"])
def test_resume_from_a_bad_last_pt_is_one_line_and_runs_no_code(content, release, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    last = run_dir / "last.pt"
    if content == "junk":
        last.write_bytes(pickle.dumps("a string, not a checkpoint")[:-3])
    else:
        hostile_checkpoint(last)
    line = one_error_line(
        capsys, "train", DEMO, f"data.uri={release}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL,
        "runtime.kind=cpu", f"output_dir={tmp_path}", "--run-dir", run_dir, "--resume",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert f"{last}: not an octft checkpoint" in line, line
    assert not (run_dir / "payload-ran").exists()
