"""What the served model takes and gives: a path or the volume's own bytes (base64 DICOM or NIfTI) per row, one
table for `octft predict`, the pyfunc and the server, strict JSON, and the training selection applied to it.

The model is an untrained tiny classifier (its classes mean nothing): these tests check the plumbing, the files
are real DICOM and NIfTI written here, and the server is MLflow's own scoring app, called in-process.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import gzip
import io
import json
from pathlib import Path

import mlflow
import nibabel
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.pyfunc import scoring_server
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from octft.cli import main
from octft.config import load_experiment, save_resolved
from octft.registry.inference import (
    NO_PATH,
    OUTSIDE_SELECTION,
    PREDICT_ROOT_ENV,
    UNREADABLE_PATH,
    classify_paths,
    load_checkpoint_folder,
    output_columns,
    serve_frame,
)
from octft.registry.model import save_pyfunc_model
from octft.registry.predict import predict, summary
from octft.train.setup import build_model

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"
SMALL = ("data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32", "runtime.kind=cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint folder of an untrained tiny model trained, by its config, on left macula volumes."""
    folder = tmp_path_factory.mktemp("inference") / "checkpoint"
    folder.mkdir()
    config = load_experiment(DEMO, [*SMALL, "data.selection.regions=[macula]", "data.selection.lateralities=[L]"])
    torch.manual_seed(0)
    model, _ = build_model(config, 4)
    torch.save({"model": model.state_dict(), "config": json.dumps(config.model_dump(mode="json"))}, folder / "best.pt")
    save_resolved(config, folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_checkpoint_folder(checkpoint, source="test")


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (4, 32, 32)).astype(np.uint8)


def dicom_bytes(array: np.ndarray, *, laterality: str = "L", region: str | None = "Macula",
                manufacturer: str = "Topcon", model: str = "Maestro2", participant: str = "1001") -> bytes:
    """A multi-frame 8-bit Ophthalmic Tomography DICOM, with the tags the selection reads."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.preamble = b"\0" * 128
    dataset.PatientID, dataset.Modality = participant, "OPT"
    dataset.Manufacturer, dataset.ManufacturerModelName = manufacturer, model
    dataset.ImageLaterality = laterality
    if region is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-AA621", "SRT", region
        dataset.AnatomicRegionSequence = [code]
    dataset.NumberOfFrames, dataset.Rows, dataset.Columns = array.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit, dataset.PixelRepresentation = 7, 0
    dataset.PixelData = array.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def nifti_bytes(array: np.ndarray) -> bytes:
    """A NIfTI-1 file of `array` (frames, height, width), stored (columns, rows, B-scans) as OCT NIfTI files are."""
    return nibabel.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.eye(4)).to_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def strict_json(text: str):
    """JSON as any strict parser reads it: NaN and Infinity are not JSON."""
    def refuse(constant: str):
        raise AssertionError(f"{constant} in the JSON: not strict JSON")
    return json.loads(text, parse_constant=refuse)


def probabilities(table: pd.DataFrame) -> np.ndarray:
    return table[[column for column in table.columns if column.startswith("prob_")]].to_numpy(dtype=np.float64)


def test_a_volume_sent_as_base64_is_classified_as_the_same_file_by_path(loaded, tmp_path):
    array = volume()
    files = {"scan.dcm": dicom_bytes(array), "scan.nii": nifti_bytes(array)}
    files["scan.nii.gz"] = gzip.compress(files["scan.nii"])
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    by_path = classify_paths(loaded, [str(tmp_path / name) for name in files])
    assert (by_path["error"] == "").all(), by_path["error"].tolist()

    frame = pd.DataFrame({"id": list(files), "volume": [b64(data) for data in files.values()]})
    served = serve_frame(loaded, frame)
    assert list(served.columns) == list(by_path.columns) == output_columns()
    assert served["id"].tolist() == list(files) and served["path"].tolist() == ["", "", ""]
    assert (served["error"] == "").all(), served["error"].tolist()
    np.testing.assert_allclose(probabilities(served), probabilities(by_path), atol=1e-6)
    assert served["predicted_class"].tolist() == by_path["predicted_class"].tolist()
    # Participants: the DICOM names one; bytes without metadata name none (no file, no folder to fall back on).
    assert served["participant_id"].tolist() == ["1001", "", ""]
    # MIME-wrapped base64 (76 characters a line, as `base64` and Python's encodebytes write it) reads the same.
    wrapped = serve_frame(loaded, pd.DataFrame({"volume": [base64.encodebytes(files["scan.dcm"]).decode()]}))
    np.testing.assert_allclose(probabilities(wrapped), probabilities(served)[:1], atol=1e-6)


def test_each_bad_row_gets_its_own_error_and_the_batch_still_answers(loaded, tmp_path):
    good = b64(dicom_bytes(volume()))
    (tmp_path / "scan.dcm").write_bytes(dicom_bytes(volume()))
    rows = [
        {"id": "good", "volume": good},
        {"id": "not base64", "volume": "this is not base64!"},
        {"id": "not a volume", "volume": b64(b"hello, world: no volume here")},
        {"id": "empty", "volume": ""},
        {"id": "too large", "volume": b64(bytes(20000))},
        {"id": "both", "volume": good, "path": str(tmp_path / "scan.dcm")},
        {"id": "neither"},
        {"id": 7, "volume": good},
    ]
    table = serve_frame(loaded, pd.DataFrame(rows), max_volume_bytes=10000)
    errors = dict(zip(table["id"], table["error"]))
    assert errors["good"] == "" and errors[7] == "" and table["predicted_class"].iloc[0]
    assert errors["not base64"].startswith("volume is not base64")
    assert "not DICOM, NIfTI or NumPy" in errors["not a volume"]
    assert errors["empty"] == NO_PATH  # an empty cell is no value, like a null
    assert errors["too large"].startswith("volume holds 26668 characters of base64, more than 13513 (a file of 10000")
    assert errors["both"] == "give a path or a volume, not both"
    assert errors["neither"] == NO_PATH
    failed = table[table["error"] != ""]
    assert failed[[c for c in table.columns if c.startswith("prob_")]].isna().all().all()
    assert (failed["predicted_class"] == "").all()

    with pytest.raises(ValueError, match="give a column 'path'"):
        serve_frame(loaded, pd.DataFrame({"file": ["scan.dcm"]}))


def test_the_training_selection_is_checked_from_the_path_then_the_files_tags(loaded, tmp_path, monkeypatch):
    # The model was trained on left macula volumes (data.selection: regions [macula], lateralities [L]).
    device_folder = tmp_path / "topcon_maestro2" / "1001"
    device_folder.mkdir(parents=True)
    names = {
        "1001_maestro2_macula_oct_l.dcm": dicom_bytes(volume()),
        "1001_maestro2_optic_disc_oct_l.dcm": dicom_bytes(volume()),  # the name says so; its tag says macula
        "1001_maestro2_macula_oct_r.dcm": dicom_bytes(volume(), laterality="R"),
        "scan.dcm": dicom_bytes(volume(), region="Optic nerve head"),  # only its tag says so
        "scan.npy": None,  # says nothing: classified
    }
    for name, data in names.items():
        if data is None:
            np.save(device_folder / name, volume())
        else:
            (device_folder / name).write_bytes(data)
    table = classify_paths(loaded, [str(device_folder / name) for name in names])
    assert table["error"].tolist() == [
        "",
        f"{OUTSIDE_SELECTION}region 'optic_disc' not in ['macula']",
        f"{OUTSIDE_SELECTION}laterality 'R' not in ['L']",
        f"{OUTSIDE_SELECTION}region 'optic_disc' not in ['macula']",
        "",
    ]
    assert table["predicted_class"].tolist()[1:4] == ["", "", ""]
    everything = classify_paths(loaded, [str(device_folder / name) for name in names], select=False)
    assert (everything["error"] == "").all()

    # The served model: the same rule for bytes (their tags) and for paths under its root.
    monkeypatch.setenv(PREDICT_ROOT_ENV, str(tmp_path))
    frame = pd.DataFrame([
        {"id": "right eye", "volume": b64(dicom_bytes(volume(), laterality="R"))},
        {"id": "disc", "volume": b64(dicom_bytes(volume(), region="Optic Disc"))},
        {"id": "macula", "volume": b64(dicom_bytes(volume()))},
        {"id": "by path", "path": "topcon_maestro2/1001/1001_maestro2_optic_disc_oct_l.dcm"},
    ])
    served = serve_frame(loaded, frame)
    assert served["error"].tolist() == [f"{OUTSIDE_SELECTION}laterality 'R' not in ['L']",
                                        f"{OUTSIDE_SELECTION}region 'optic_disc' not in ['macula']", "",
                                        f"{OUTSIDE_SELECTION}region 'optic_disc' not in ['macula']"]
    # A device the config does not name: counted with the file's own words.
    trained_on_triton = load_checkpoint_folder(_retrained(tmp_path, "data.selection.devices=[topcon_triton]"),
                                               source="triton")
    served = serve_frame(trained_on_triton, pd.DataFrame({"volume": [
        b64(dicom_bytes(volume(), manufacturer="Topcon Healthcare", model="DRI OCT Triton")),
        b64(dicom_bytes(volume(), manufacturer="Carl Zeiss Meditec", model="Cirrus HD-OCT 5000")),
    ]}))
    assert served["error"].tolist() == [
        "", f"{OUTSIDE_SELECTION}device 'zeiss_cirrus' not in ['topcon_triton']"]
    monkeypatch.delenv(PREDICT_ROOT_ENV)
    # Without a root, a path's reasons are withheld: they would tell a client what the server's files are.
    served = serve_frame(loaded, frame.iloc[3:])
    assert served["error"].tolist() == [UNREADABLE_PATH]


def _retrained(tmp_path: Path, *overrides: str) -> Path:
    folder = tmp_path / "other-checkpoint"
    folder.mkdir()
    config = load_experiment(DEMO, [*SMALL, *overrides])
    model, _ = build_model(config, 4)
    torch.save({"model": model.state_dict(), "config": json.dumps(config.model_dump(mode="json"))}, folder / "best.pt")
    save_resolved(config, folder / "config.yaml")
    return folder


def _post(app, path: str, body: bytes) -> tuple[int, str]:
    """One HTTP request through the ASGI app MLflow serves (what uvicorn does for `mlflow models serve`)."""
    async def call() -> tuple[int, str]:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        status, chunks = [], []

        async def receive():
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 5001)}
        await app(scope, receive, send)
        return status[0], b"".join(chunks).decode()

    return asyncio.run(call())


def test_mlflows_scoring_server_answers_base64_volumes_in_strict_json(checkpoint, loaded, tmp_path):
    folder = save_pyfunc_model(checkpoint, tmp_path / "model")
    app = scoring_server.init(mlflow.pyfunc.load_model(str(folder)))
    array = volume(3)
    records = [
        {"id": "dicom", "volume": b64(dicom_bytes(array))},
        {"id": "nifti", "volume": b64(nifti_bytes(array))},
        {"id": "junk", "volume": "!!"},
        {"id": "right eye", "volume": b64(dicom_bytes(array, laterality="R"))},
        {"path": "/nowhere/scan.dcm"},
    ]
    status, text = _post(app, "/invocations", json.dumps({"dataframe_records": records}).encode())
    assert status == 200, text[:2000]
    rows = strict_json(text)["predictions"]
    assert [list(row) for row in rows] == [output_columns()] * len(records)
    assert [row["id"] for row in rows] == ["dicom", "nifti", "junk", "right eye", None]
    assert rows[0]["error"] == rows[1]["error"] == "" and rows[0]["predicted_class"] == rows[1]["predicted_class"]
    assert abs(rows[0]["prob_healthy"] - rows[1]["prob_healthy"]) < 1e-6
    assert sum(rows[0][f"prob_{name}"] for name in loaded.class_names) == pytest.approx(1.0)
    assert rows[2]["error"].startswith("volume is not base64") and rows[2]["prob_healthy"] is None
    assert rows[3]["error"].startswith(OUTSIDE_SELECTION) and rows[3]["prob_insulin"] is None
    assert rows[4]["error"] == UNREADABLE_PATH and rows[4]["path"] == "/nowhere/scan.dcm"

    # The same rows, in the same columns, from `octft predict` and from the pyfunc in this process.
    in_process = mlflow.pyfunc.load_model(str(folder)).predict(pd.DataFrame(records[:2]))
    assert list(in_process.columns) == output_columns()
    assert in_process["prob_healthy"].tolist() == [rows[0]["prob_healthy"], rows[1]["prob_healthy"]]


def test_predict_writes_the_pyfunc_columns_to_csv_and_counts_what_it_skipped(checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans" / "topcon_maestro2" / "1001"
    scans.mkdir(parents=True)
    for name, laterality, region, seed in [("1001_maestro2_macula_oct_l.dcm", "L", "Macula", 0),
                                           ("1001_maestro2_macula_oct_r.dcm", "R", "Macula", 1),
                                           ("1001_maestro2_disc_oct_l.dcm", "L", "Optic Disc", 2),
                                           ("1001_maestro2_disc_oct_r.dcm", "R", "Optic Disc", 3)]:
        (scans / name).write_bytes(dicom_bytes(volume(seed), laterality=laterality, region=region))
    (scans / "broken.dcm").write_bytes(b"not a dicom")
    out = tmp_path / "out" / "predictions.csv"

    assert main(["predict", "--model", str(checkpoint), str(tmp_path / "scans"), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == output_columns() and len(rows) == 5
    assert sorted(Path(row["path"]).name for row in rows) == sorted(p.name for p in scans.iterdir())
    errors = {Path(row["path"]).name: row["error"] for row in rows}
    assert errors["1001_maestro2_macula_oct_l.dcm"] == ""
    assert errors["1001_maestro2_disc_oct_l.dcm"] == f"{OUTSIDE_SELECTION}region 'optic_disc' not in ['macula']"
    assert errors["1001_maestro2_disc_oct_r.dcm"] == f"{OUTSIDE_SELECTION}region 'optic_disc' not in ['macula']"
    assert errors["1001_maestro2_macula_oct_r.dcm"] == f"{OUTSIDE_SELECTION}laterality 'R' not in ['L']"
    assert "not DICOM, NIfTI or NumPy" in errors["broken.dcm"]
    assert [p.name for p in out.parent.iterdir()] == ["predictions.csv"]  # no temporary left beside it
    # The CSV replaces the per-volume table on stdout; the summary counts what was skipped, by reason.
    assert "1001_maestro2_macula_oct_l.dcm" not in captured.out
    assert "1 classified, 3 outside the training selection, 1 failed, of 5 files" in captured.out
    assert "2 skipped: region 'optic_disc' not in ['macula']" in captured.out
    assert "1 skipped: laterality 'R' not in ['L']" in captured.out and "--all-volumes" in captured.out
    assert "could not read" in captured.err and "broken.dcm" in captured.err and f"wrote {out}" in captured.err

    # --json: the same rows (the pyfunc's columns) and the counts; --all-volumes classifies every volume.
    assert main(["predict", "--model", str(checkpoint), str(scans), "--json", "--all-volumes"]) == 1
    result = strict_json(capsys.readouterr().out)
    assert all(list(row) == output_columns() for row in result["volumes"])
    assert [row["error"] == "" for row in result["volumes"]].count(True) == 4 and result["skipped"] == {}
    assert result["selection"] is None
    assert result["participants"][0]["participant_id"] == "1001" and result["participants"][0]["volumes"] == 4


def test_predict_shows_progress_on_stderr_when_asked(checkpoint, tmp_path, capsys):
    for seed in range(3):
        np.save(tmp_path / f"scan{seed}.npy", volume(seed))
    result = predict(str(checkpoint), [tmp_path], progress=True)
    assert "predict: 100%" in capsys.readouterr().err and summary(result).startswith("3 classified")
    predict(str(checkpoint), [tmp_path])
    assert capsys.readouterr().err == ""
