"""The champion leaves this checkout (issue 22, point 2): a check by hand, minutes long, not part of the suite.

1. a fresh virtual environment made by uv from nothing but the model's requirements.txt (octft is not in it) loads
   `models:/NAME@champion` with pickle refused (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false) and predicts;
2. the README's serve command, run as printed through `bash -c` from the checkout with `.venv` not activated
   (`mlflow models serve --env-manager uv`, which builds its own environment from the same file), answers
   /invocations with the same rows.

    .venv/bin/python benchmarks/check_portable_champion.py          # a tiny champion trained here, in a temp folder
    .venv/bin/python benchmarks/check_portable_champion.py --tracking-uri sqlite:///demo/mlflow.db \\
        --model models:/octft-demo@champion                          # the demo's champion, after `make demo`

uv's cache makes the installs quick when the versions are the project's locked ones (torch from PyPI is the CUDA
build: several GB the first time). Each step prints its time; the exit status is 0 when both hold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from octft.config import load_experiment
from octft.data.synth import synthesize
from octft.registry.model import MODEL_ARTIFACT, log_trial_model
from octft.stores import sqlite_path
from octft.track.mlflow_store import MlflowStore
from octft.train.recipe import train

REPO = Path(__file__).resolve().parents[1]
# The README's serve command, with the tracking URI, model and port as the only blanks (the README prints the demo's).
README_SERVE = ('PATH="$HOME/.local/bin:$PATH" MLFLOW_TRACKING_URI={tracking_uri} .venv/bin/mlflow models serve '
                '-m {model} --env-manager uv --host 127.0.0.1 --port {port}')
LOAD_AND_PREDICT = """
import importlib.util, json, sys
assert importlib.util.find_spec("octft") is None, "octft is importable in the fresh environment"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
table = model.predict(pd.DataFrame({"path": json.loads(sys.argv[2])}))
print(json.dumps({"octft": sys.modules["octft"].__file__, "rows": json.loads(table.to_json(orient="records"))}))
"""


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(started: float, what: str = "") -> None:
    print(f"   {what}({time.perf_counter() - started:.1f} s)", flush=True)


def uv_binary() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(found).is_file():
        raise SystemExit("uv is not installed (make install puts it in ~/.local/bin)")
    return found


def tiny_champion(root: Path) -> tuple[str, str, list[Path]]:
    """A micro-encoder run on a tiny synthetic release, its LoggedModel registered as octft-portable@champion."""
    synthesize(root / "data", participants=48, frames=4, height=32, width=32)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_experiment(REPO / "experiments" / "demo.yaml", [
        f"data.uri={root / 'data'}", f"data.cache_dir={root / 'cache'}", "model.size=vit_micro",
        "data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32", "train.epochs=2",
        "runtime.kind=cpu", f"tracking.tracking_uri={tracking_uri}", "tracking.experiment=portable-check",
        f"output_dir={root / 'runs'}", f"features.dir={root / 'features'}"])
    trained = train(cfg, run_dir=root / "runs" / "trial", progress=False)
    store = MlflowStore(tracking_uri)
    model = log_trial_model(store, trained.run_id, trained.run_dir / "checkpoint", trained.best_metrics,
                            step=trained.best_epoch)
    store.register_logged_model(model, "octft-portable", "champion")
    return tracking_uri, "models:/octft-portable@champion", scans(root / "data")


def scans(data: Path) -> list[Path]:
    return sorted((data / "retinal_oct" / "structural_oct").rglob("*.dcm"))[:3]


def absolute_uri(tracking_uri: str) -> str:
    """A sqlite URI relative to the checkout made absolute: the fresh environment runs in another folder."""
    path = sqlite_path(tracking_uri)
    return f"sqlite:///{(REPO / path).resolve()}" if path is not None and not path.is_absolute() else tracking_uri


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fresh_environment(folder: Path, model_dir: Path) -> Path:
    """`uv venv` with the model's Python version, then `uv pip install -r requirements.txt`: nothing else."""
    python = yaml.safe_load((model_dir / "python_env.yaml").read_text())["python"]
    uv = uv_binary()
    started = step(f"fresh environment: uv venv --python {python}; uv pip install -r requirements.txt")
    subprocess.run([uv, "venv", str(folder), "--python", python, "--quiet"], check=True)
    subprocess.run([uv, "pip", "install", "--python", str(folder / "bin" / "python"), "--quiet", "-r",
                    str(model_dir / "requirements.txt")], check=True)
    done(started, f"{folder}: ")
    return folder / "bin" / "python"


def load_and_predict(python: Path, tracking_uri: str, model: str, paths: list[str], cwd: Path) -> list[dict]:
    started = step(f"{model} in the fresh environment, MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "MLFLOW_", "VIRTUAL_ENV"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    result = subprocess.run([str(python), "-I", "-c", LOAD_AND_PREDICT, model, json.dumps(paths)], env=env, cwd=cwd,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the fresh environment could not load or run the model:\n{result.stderr[-4000:]}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"   octft came from the model: {answer['octft']}")
    done(started)
    return answer["rows"]


def serve(tracking_uri: str, model: str, paths: list[str], log: Path) -> list[dict]:
    port = free_port()
    command = README_SERVE.format(tracking_uri=tracking_uri, model=model, port=port)
    started = step(f"the README's serve command, from {REPO}:\n   {command}")
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(entry for entry in env.get("PATH", "").split(os.pathsep)
                                  if Path(entry).resolve() != (REPO / ".venv" / "bin").resolve())
    with log.open("w") as sink:  # a file, not a pipe: an unread pipe fills with the server's logs and stalls it
        server = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 1800  # the first start builds the environment: minutes
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise SystemExit(f"no answer on /ping in 30 min:\n{log.read_text()[-4000:]}") from None
                time.sleep(2)
        done(started, "answers /ping ")
        body = json.dumps({"dataframe_records": [{"path": path} for path in paths]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        answer = json.loads(urllib.request.urlopen(request, timeout=300).read())
        done(started, "/invocations answered ")
        return answer["predictions"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def same_rows(first: list[dict], second: list[dict]) -> bool:
    """The same classes, errors and probabilities (to 1e-5; JSON gives a NaN as null) row by row."""
    def key(row: dict) -> tuple:
        probabilities = [value for name, value in sorted(row.items()) if name.startswith("prob_")]
        return (row["path"], row["predicted_class"] or "", row["error"] or "",
                *(None if value is None or value != value else round(value, 5) for value in probabilities))
    return [key(row) for row in first] == [key(row) for row in second]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="the store holding the champion (default: a tiny one made here)")
    parser.add_argument("--model", default="models:/octft-demo@champion")
    parser.add_argument("--inputs", nargs="*", type=Path, help="volumes to predict (default: synthetic DICOMs)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (the fresh environment)")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="octft-portable-"))
    try:
        if args.tracking_uri is None:
            started = step(f"a tiny champion in {scratch}")
            tracking_uri, model, inputs = tiny_champion(scratch / "made")
            done(started)
        else:
            tracking_uri, model = absolute_uri(args.tracking_uri), args.model
            if not args.inputs:
                synthesize(scratch / "data", participants=8, frames=4, height=32, width=32)
            inputs = scans(scratch / "data")
        inputs = args.inputs or inputs
        paths = [str(path) for path in inputs] + [str(scratch / "missing.dcm")]

        store = MlflowStore(tracking_uri, must_exist=True)
        version = store.model_version(model)
        model_dir = store.download(version.run_id, version.artifact_path or MODEL_ARTIFACT, scratch / "download")
        print(f"\n{model}: version {version.version}, LoggedModel {version.model_id}, run {version.run_id}")
        print("requirements.txt:\n   " + "\n   ".join((model_dir / "requirements.txt").read_text().split()))

        python = fresh_environment(scratch / "venv", model_dir)
        loaded = load_and_predict(python, tracking_uri, model, paths, scratch)
        served = serve(tracking_uri, model, paths, scratch / "serve.log")
        for row in served:
            print(f"   {row['path']}: {row['predicted_class'] or '-'} {row['error'][:60]}")
        problems = []
        if any(row["error"] for row in loaded[:-1]) or not loaded[-1]["error"]:
            problems.append("the fresh environment's rows have errors where volumes were readable")
        if not same_rows(loaded, served):
            problems.append("the served rows differ from the fresh environment's")
        print("\n" + ("\n".join(problems) if problems else "portable: both hold"))
        return 1 if problems else 0
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
