"""`octft predict`: the champion from the MLflow registry on synthetic DICOMs, checked against the model run directly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from octft.cli import main
from octft.config import load_experiment
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.preprocess import Preprocessing, preprocess
from octft.data.readers import read_volume
from octft.data.synth import synthesize
from octft.registry.inference import output_columns, participant_of
from octft.registry.model import MODEL_ARTIFACT, save_pyfunc_model
from octft.registry.predict import predict
from octft.track.mlflow_store import MlflowStore
from octft.train.metrics import softmax
from octft.train.recipe import train
from octft.train.setup import build_model
from octft.train.runtime import load_state

MODEL_NAME = "octft-predict-test"


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """One real training run, its checkpoint registered as models:/octft-predict-test@champion."""
    root = tmp_path_factory.mktemp("predict")
    synthesize(root / "data", participants=48, frames=4, height=32, width=32)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_experiment("experiments/demo.yaml", [
        f"data.uri={root / 'data'}", f"data.cache_dir={root / 'cache'}", "model.size=vit_micro",
        "data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32", "train.epochs=2",
        "runtime.kind=cpu", f"tracking.tracking_uri={tracking_uri}", "tracking.experiment=predict-test",
        f"output_dir={root / 'runs'}",
    ])
    trained = train(cfg, run_dir=root / "runs" / "trial", progress=False)
    # What promotion does after scoring: the checkpoint as an MLflow pyfunc Model, logged and registered.
    save_pyfunc_model(trained.run_dir / "checkpoint", root / "model")
    MlflowClient(tracking_uri).log_artifacts(trained.run_id, str(root / "model"), MODEL_ARTIFACT)
    MlflowStore(tracking_uri).register(trained.run_id, MODEL_ARTIFACT, MODEL_NAME, "champion")
    return root, trained, tracking_uri


def _direct_logits(checkpoint: Path, files: list[Path]) -> np.ndarray:
    """The trained model's logits computed by hand: config -> model -> weights -> read -> preprocess -> forward."""
    cfg = load_experiment(checkpoint / "config.yaml")
    cfg.model.checkpoint = None
    model, _ = build_model(cfg, len(CLASS_SHORT_NAMES))
    model.load_state_dict(load_state(checkpoint / "best.pt")["model"])
    model.eval()
    spec = Preprocessing(**cfg.data.preprocess.model_dump())
    clips = np.stack([preprocess(read_volume(file).array, spec) for file in files])
    with torch.no_grad():
        return model(torch.from_numpy(clips).unsqueeze(1)).double().numpy()


def _probabilities(row: dict) -> list[float]:
    return [row[f"prob_{name}"] for name in CLASS_SHORT_NAMES]


def test_predict_with_the_champion_equals_the_model_run_directly(champion, capsys):
    root, trained, tracking_uri = champion
    participant_folders = sorted((root / "data" / "retinal_oct" / "structural_oct").glob("*/*"))
    folder = next(f for f in participant_folders if len(list(f.glob("*_macula_*.dcm"))) >= 2
                  and list(f.glob("*_optic_disc_*.dcm")))
    single = next(f for f in participant_folders if f.name != folder.name)
    single_file = sorted(single.glob("*_macula_*.dcm"))[0]

    assert main(["predict", "--model", f"models:/{MODEL_NAME}@champion", str(folder), str(single_file),
                 "--tracking-uri", tracking_uri, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    # Every file has its row, in the pyfunc's columns; the optic-disc volumes of a macula model are not classified.
    every = sorted(folder.glob("*.dcm")) + [single_file]
    assert [row["path"] for row in result["volumes"]] == [str(file) for file in every]
    assert all(list(row) == output_columns() for row in result["volumes"])
    disc = [row for row in result["volumes"] if "_optic_disc_" in row["path"]]
    assert disc and all(row["error"] == "outside the model's training selection: region 'optic_disc' not in ['macula']"
                        and row["prob_healthy"] is None for row in disc)
    assert result["skipped"] == {"region 'optic_disc' not in ['macula']": len(disc)}
    assert f"{len(disc)} outside the training selection" in captured.err

    files = [file for file in every if "_optic_disc_" not in file.name]
    volumes = [row for row in result["volumes"] if row["error"] == ""]
    logits = _direct_logits(trained.run_dir / "checkpoint", files)
    expected = softmax(logits)
    for row, probabilities in zip(volumes, expected, strict=True):
        assert sum(_probabilities(row)) == pytest.approx(1.0)
        np.testing.assert_allclose(_probabilities(row), probabilities, atol=1e-5)
        assert row["predicted_class"] == CLASS_SHORT_NAMES[int(probabilities.argmax())]
    assert {row["participant_id"] for row in volumes} == {folder.name, single.name}

    # Participants: the softmax of the mean logits of their volumes, in order of first appearance.
    assert [p["participant_id"] for p in result["participants"]] == [folder.name, single.name]
    first = result["participants"][0]
    assert first["volumes"] == len(files) - 1
    np.testing.assert_allclose(_probabilities(first), softmax(logits[:-1].mean(axis=0, keepdims=True))[0], atol=1e-5)
    assert sum(_probabilities(first)) == pytest.approx(1.0)

    # The plain-text table, and a plain checkpoint folder instead of a models:/ URI, say the same.
    assert main(["predict", "--model", str(trained.run_dir / "checkpoint"), str(single_file)]) == 0
    text = capsys.readouterr().out
    assert single.name in text and f"{expected[-1].max():.4f}" in text

    # --all-volumes classifies the optic-disc volumes too.
    assert main(["predict", "--model", str(trained.run_dir / "checkpoint"), str(folder), "--json", "--all-volumes"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] == {} and all(row["error"] == "" for row in result["volumes"])


def test_participant_comes_from_metadata_then_folder_then_the_file(champion, tmp_path, capsys):
    root, trained, _ = champion
    volume = np.random.default_rng(0).integers(0, 255, (4, 32, 32)).astype(np.uint8)
    (tmp_path / "sub-1234").mkdir()
    np.save(tmp_path / "sub-1234" / "scan.npy", volume)
    (tmp_path / "misc").mkdir()
    np.save(tmp_path / "misc" / "scan.npy", volume)
    (tmp_path / "misc" / "broken.dcm").write_bytes(b"not a dicom at all")

    result = predict(str(trained.run_dir / "checkpoint"), [tmp_path])
    classified = result.classified()
    by_file = {Path(path).relative_to(tmp_path).as_posix(): participant_id
               for path, participant_id in zip(classified["path"], classified["participant_id"])}
    assert by_file == {"misc/scan.npy": str(tmp_path / "misc" / "scan.npy"), "sub-1234/scan.npy": "1234"}
    assert [Path(file).name for file, _ in result.failed] == ["broken.dcm"]
    assert participant_of(Path("/x/folder/a.dcm"), {"participant_id": "01001"}) == "1001"

    # The CLI still prints what it could predict, names the unreadable file, and exits non-zero.
    assert main(["predict", "--model", str(trained.run_dir / "checkpoint"), str(tmp_path / "misc")]) == 1
    captured = capsys.readouterr()
    assert "broken.dcm" in captured.err and "scan.npy" in captured.out


def test_an_unknown_model_says_what_to_do(champion, capsys):
    _, _, tracking_uri = champion
    assert main(["predict", "--model", "models:/no-such-model@champion", "x.dcm", "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err
    assert "models:/no-such-model@champion" in err and "octft promote" in err
    assert main(["predict", "--model", "no/such/folder", "x.dcm"]) == 2
    assert "neither a models:/<name>@<alias> URI nor a model folder" in capsys.readouterr().err


def test_a_mistyped_sqlite_store_is_refused_and_not_created(tmp_path, capsys):
    missing = tmp_path / "no-such-dir" / "mlflow.db"
    assert main(["predict", "--model", f"models:/{MODEL_NAME}@champion", "x.dcm", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no such database file {missing}" in capsys.readouterr().err
    assert not (tmp_path / "no-such-dir").exists()


def _fresh_env(tracking_uri: str) -> dict[str, str]:
    # The environment's own bin first, as in an activated venv: `mlflow models serve` runs its `uvicorn`.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(Path.cwd()), PATH=path)


def _some_dicoms(root: Path) -> list[Path]:
    """Three macula volumes: what the champion was trained on (data.selection.regions)."""
    return sorted((root / "data" / "retinal_oct" / "structural_oct").rglob("*_macula_*.dcm"))[:3]


def test_the_champion_loads_as_an_mlflow_pyfunc_in_a_fresh_process(champion, tmp_path):
    root, trained, tracking_uri = champion
    files = _some_dicoms(root)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom at all")
    paths = [str(file) for file in files] + [str(broken), str(tmp_path / "missing.dcm")]
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL_NAME}@champion')\n"
        "table = model.predict(pd.DataFrame({'path': json.loads(sys.argv[1])}))\n"
        "print(table.to_json(orient='records'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(paths)], capture_output=True, text=True,
                          env=_fresh_env(tracking_uri), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["path"] for row in rows] == paths and list(rows[0]) == output_columns()

    expected = softmax(_direct_logits(trained.run_dir / "checkpoint", files))
    for row, probabilities in zip(rows, expected):
        np.testing.assert_allclose([row[f"prob_{name}"] for name in CLASS_SHORT_NAMES], probabilities, atol=1e-5)
        assert row["predicted_class"] == CLASS_SHORT_NAMES[int(probabilities.argmax())] and row["error"] == ""
        assert row["participant_id"] == participant_of(Path(row["path"]), read_volume(row["path"]).meta)
    # An unreadable or missing volume says why in its own row; the batch still answers.
    assert all(row["error"] and row["predicted_class"] == "" and row["prob_healthy"] is None for row in rows[-2:])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.integration
def test_mlflow_models_serve_answers_invocations_like_octft_predict(champion, capsys, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("the README's request to the server is a curl command")
    root, _, tracking_uri = champion
    files = _some_dicoms(root)[:2]
    port = _free_port()
    log = tmp_path / "serve.log"  # a file, not a pipe: an unread pipe fills with the server's logs and stalls it
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env=_fresh_env(tracking_uri), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 420  # a bound for a busy machine, not a speed check
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"mlflow models serve did not answer /ping: {log.read_text()[-2000:]}"
                time.sleep(1)
        body = json.dumps({"dataframe_records": [{"path": str(file)} for file in files] + [{"path": "/nowhere.dcm"}]})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        answer = urllib.request.urlopen(request, timeout=120).read().decode()
        # The README's request: the file itself, base64 in a JSON string, streamed to curl.
        readme = (f"{{ printf '{{\"dataframe_records\": [{{\"id\": \"scan-1\", \"volume\": \"'; base64 -w0 {files[0]}; "
                  "printf '\"}]}'; } | curl -s --fail-with-body "
                  f"127.0.0.1:{port}/invocations -H 'Content-Type: application/json' --data-binary @-")
        sent = subprocess.run(["bash", "-c", readme], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    rows = _strict_json(answer)["predictions"]
    assert len(rows) == 3 and rows[-1]["error"] and rows[-1]["prob_healthy"] is None and not rows[0]["error"]
    [by_bytes] = _strict_json(sent.stdout)["predictions"]
    assert by_bytes["id"] == "scan-1" and by_bytes["path"] == "" and by_bytes["error"] == ""

    assert main(["predict", "--model", f"models:/{MODEL_NAME}@champion", *map(str, files),
                 "--tracking-uri", tracking_uri, "--json"]) == 0
    local = json.loads(capsys.readouterr().out)["volumes"]
    assert [list(row) for row in rows] == [list(entry) for entry in local] + [list(rows[-1])]
    for row, entry in zip([*rows[:2], by_bytes], [*local, local[0]], strict=True):
        assert row["predicted_class"] == entry["predicted_class"]
        np.testing.assert_allclose(_probabilities(row), _probabilities(entry), atol=1e-6)
    assert [row["path"] for row in rows[:2]] == [entry["path"] for entry in local]


def _strict_json(text: str):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""
    def refuse(constant: str):
        raise AssertionError(f"{constant} in the answer: not strict JSON")
    return json.loads(text, parse_constant=refuse)
