"""Training from a bucket, end to end, and streaming preparation on a bounded disk.

B2 is b2sdk's own RawSimulator, in this process: a synthetic release is uploaded to a simulated
bucket, and every `b2://` storage the code opens uses that client (`use_b2_api`), exactly as a real
run uses the client it authorised from the environment. Downloads run on threads, so the simulator
is reached as a real bucket would be; decoding runs wherever `stream_prepare` puts it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator, b2_url_decode

from octft.cli import main
from octft.data.audit import audit_dataset
from octft.data.dataset import prepare_volumes, source_id
from octft.data.storage import use_b2_api
from octft.data.synth import synthesize

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
DEMO_SWEEP = REPO / "sweeps" / "demo.yaml"
BUCKET = "octft-prepare"
PREFIX = "aireadi"
URI = f"b2://{BUCKET}/{PREFIX}"
SMALL = ("data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32")


class CountingSimulator(RawSimulator):
    """B2's network, recording volume downloads (DICOM keys; the audit reads the .tsv files) and
    measuring the download folder at each one.

    `interrupt_after`: the download after that many raises KeyboardInterrupt, as a Ctrl-C would.
    """

    watch: Path | None = None
    interrupt_after: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.downloads: list[str] = []
        self.high_water_bytes = 0
        self.lock = threading.Lock()

    def download_file_from_url(self, account_auth_token_or_none, url, *args, **kwargs):
        key = b2_url_decode(self.DOWNLOAD_URL_MATCHER.match(url).groupdict()["file_name"]).removeprefix(PREFIX + "/")
        with self.lock:
            if key.endswith(".dcm"):
                self._record(key)
        return super().download_file_from_url(account_auth_token_or_none, url, *args, **kwargs)

    def _record(self, key: str) -> None:
        if self.interrupt_after is not None and len(self.downloads) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.downloads.append(key)
        if self.watch is not None and self.watch.exists():
            used = sum(_size(path) for path in self.watch.rglob("*") if ".verified" not in path.parts)
            self.high_water_bytes = max(self.high_water_bytes, used)


def _size(path: Path) -> int:
    """Bytes in `path`; 0 for a folder or a file that went between listing and stat (another
    download thread renames its partial when it finishes)."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """48 participants, 4 B-scans of 32 x 32, on local disk (to upload)."""
    root = tmp_path_factory.mktemp("release")
    synthesize(root, participants=48, seed=0, frames=4, height=32, width=32)
    return root


def upload(release: Path) -> tuple[B2Api, CountingSimulator, object]:
    """A simulated account holding `release` under `PREFIX`, made this process's B2 client."""
    api = B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(_raw_api_class=CountingSimulator))
    raw = api.session.raw_api
    key_id, key = raw.create_account()
    api.authorize_account("production", key_id, key)
    bucket = api.create_bucket(BUCKET, "allPrivate")
    for path in sorted(release.rglob("*")):
        if path.is_file():
            bucket.upload_bytes(path.read_bytes(), f"{PREFIX}/{path.relative_to(release).as_posix()}")
    use_b2_api(api)
    return api, raw, bucket


@pytest.fixture
def bucket(release, tmp_path):
    api, raw, bucket = upload(release)
    raw.watch = tmp_path / "downloads"
    yield raw, bucket
    use_b2_api(None)


def prepare(tmp_path: Path, **settings):
    report = audit_dataset(URI)
    settings = {"cache_dir": str(tmp_path / "cache"), "frames": 4, "height": 16, "width": 16, "workers": 1,
                "download_dir": str(tmp_path / "downloads"), "progress": False} | settings
    return report, prepare_volumes(URI, report.volumes, **settings)


def raw_files(downloads: Path) -> list[Path]:
    """Downloaded copies under `downloads`, not their verification stamps (under `.verified/`)."""
    if not downloads.exists():
        return []
    return [item for item in downloads.rglob("*") if item.is_file() and ".verified" not in item.parts]


# ------------------------------------------------------------------------------------------ end to end


def test_a_run_trains_from_a_bucket_to_a_finished_mlflow_run(bucket, tmp_path):
    from mlflow.tracking import MlflowClient

    raw, _ = bucket
    run_dir = tmp_path / "runs" / "run"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Two workers: downloads on two threads, in this process (a b2sdk client cannot be pickled).
    code = main(["train", str(DEMO), f"data.uri={URI}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.download.dir={tmp_path / 'downloads'}", "data.download.workers=2", *SMALL,
                 "runtime.kind=cpu", "train.epochs=2", f"output_dir={run_dir.parent}", "--run-dir", str(run_dir),
                 "--tracking-uri", tracking])
    assert code == 0
    run = MlflowClient(tracking).get_run(json.loads((run_dir / "run.json").read_text())["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["octft.cache_failed"] == "0"
    assert int(run.data.tags["octft.train_volumes"]) > 0 and int(run.data.tags["octft.val_volumes"]) > 0
    assert len(MlflowClient(tracking).get_metric_history(run.info.run_id, "val/balanced_accuracy")) == 2
    # Every selected volume was downloaded once, and no raw download is left on disk.
    assert len(raw.downloads) == len(set(raw.downloads)) == len(audit_dataset(URI).volumes)
    assert raw_files(tmp_path / "downloads") == []


def test_a_sweep_trial_trains_from_a_bucket(bucket, tmp_path):
    """One trial of the demo sweep through the whole launch, its runner in this process: a runner process could not
    reach this process's simulated bucket (a real bucket it reaches with the key in its environment)."""
    from optuna.trial import TrialState

    from octft.sweep.launch import launch
    from octft.sweep.records import trial_record
    from octft.sweep.storage import open_existing_study
    from octft.track.mlflow_store import MlflowStore

    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"mlflow.tracking_uri={tracking_uri}", "study_name=from-b2", "fixed.train.epochs=2",
                 "space.train.unfreeze_epoch.high=1",  # below the epochs
                 f"data.uri={URI}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.download.dir={tmp_path / 'downloads'}", "data.download.workers=1", *SMALL,
                 "runtime.kind=cpu", f"output_dir={tmp_path / 'runs'}"]
    result = launch(DEMO_SWEEP, n_trials=1, storage=storage, overrides=overrides, runner="in_process")

    assert result.worker_exit_codes == [0]
    (trial,) = open_existing_study("from-b2", storage).trials
    record = trial_record(trial)
    assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED), record.fail_reason
    assert record.outcome.epochs_run >= 1
    run = MlflowStore(tracking_uri).run(record.mlflow_run_id)
    assert run.status == ("FINISHED" if trial.state == TrialState.COMPLETE else "KILLED")
    assert run.tags["octft.cache_failed"] == "0"


# ------------------------------------------------------------------------------------------ bounded disk


def test_a_budget_smaller_than_the_raw_data_still_prepares_everything(bucket, tmp_path):
    raw, _ = bucket
    report = audit_dataset(URI)
    raw_bytes = int(report.volumes["size"].sum())
    largest = int(report.volumes["size"].max())
    budget = 2.5 * largest  # two kept files fit, the third evicts the oldest
    # Decoding in two processes: only paths travel to them, never the storage.
    _, prepared = prepare(tmp_path, keep=True, budget_gb=budget / 1e9, workers=2, decode="processes")

    assert prepared.report.built == len(report.volumes) and not prepared.report.failed
    kept = raw_files(tmp_path / "downloads")
    assert 1 <= len(kept) <= 2
    assert sum(path.stat().st_size for path in kept) <= budget < raw_bytes
    # What the disk held at any download: the kept files plus the ones in flight (2 workers).
    assert raw.high_water_bytes <= budget + 2 * largest
    # Every entry reads back whole.
    for sid in prepared.volumes.source_id:
        assert prepared.cache.get(sid) is not None


def test_without_keep_no_raw_file_outlives_its_preparation(bucket, tmp_path):
    raw, _ = bucket
    report, prepared = prepare(tmp_path, keep=False)
    assert prepared.report.built == len(report.volumes)
    assert raw_files(tmp_path / "downloads") == []
    # One worker: never more than the one file being prepared on disk.
    assert raw.high_water_bytes <= int(report.volumes["size"].max())


def test_an_entry_rebuilt_during_training_keeps_its_download_when_keep_is_set(bucket, tmp_path):
    raw, _ = bucket
    budget = 10e6  # room for every raw file of this tiny release
    report, prepared = prepare(tmp_path, keep=True, budget_gb=budget / 1e9)
    kept = {path.name for path in raw_files(tmp_path / "downloads")}
    assert len(kept) == len(report.volumes)
    # Lose one train entry and one kept raw file after the build: opening the split rebuilds the entry
    # from the bucket, and with keep the fresh download stays (before: it was always deleted).
    lost = prepared.volumes[prepared.volumes.split == "train"].iloc[0]
    for path in prepared.cache.root.rglob("*"):
        if path.is_file() and path.suffix in (".npy", ".json") and "packs" not in path.parts:
            record = path.with_suffix(".json")
            if record.exists() and lost.source_id in record.read_text():
                path.unlink()
    (victim,) = [path for path in raw_files(tmp_path / "downloads") if path.name == Path(lost.key).name]
    victim.unlink()
    downloads_before = len(raw.downloads)
    prepared.dataset("train")
    assert raw.downloads[downloads_before:] == [lost.key]
    assert Path(lost.key).name in {path.name for path in raw_files(tmp_path / "downloads")}


def test_an_interrupted_preparation_resumes_without_fetching_prepared_volumes(bucket, tmp_path):
    raw, _ = bucket
    raw.interrupt_after = 5
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path)
    first = list(raw.downloads)
    assert len(first) == 5

    raw.interrupt_after = None
    report, prepared = prepare(tmp_path)
    second = raw.downloads[len(first):]
    assert prepared.report.reused == 5  # one worker: each volume prepared before the next is fetched
    assert prepared.report.built + prepared.report.reused == len(report.volumes)
    assert len(second) == prepared.report.built == len(report.volumes) - prepared.report.reused
    # Nothing prepared the first time was fetched again.
    assert not set(first) & set(second)


def test_the_plan_refuses_when_free_disk_cannot_hold_the_prepared_cache(bucket, tmp_path, capsys):
    raw, _ = bucket
    # 4096 B-scans of 4096 x 4096 in float16: 137 GB per volume, terabytes for the release.
    code = main(["data", "cache", "--config", str(DEMO), f"data.uri={URI}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.download.dir={tmp_path / 'downloads'}", "data.preprocess.frames=4096",
                 "data.preprocess.height=4096", "data.preprocess.width=4096"])
    captured = capsys.readouterr()
    assert code == 2
    error = [line for line in captured.err.splitlines() if line.startswith("octft:")][0]
    assert "GB are free" in error and "What would fit" in error and "data.preprocess.frames=" in error
    assert "data.selection" in error
    assert "does NOT fit" in captured.out and "fetch" in captured.out
    assert raw.downloads == []  # refused before fetching anything


def test_the_plan_counts_files_bytes_and_the_prepared_size(bucket, tmp_path, capsys):
    report = audit_dataset(URI)
    code = main(["data", "cache", "--config", str(DEMO), f"data.uri={URI}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.download.dir={tmp_path / 'downloads'}", *SMALL, "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0
    files = len(report.volumes)
    gigabytes = report.volumes["size"].sum() / 1e9
    assert f"fetch {files} files, {gigabytes:.2f} GB" in out
    assert f"built {files}, reused 0, failed 0" in out


def test_hosts_preparing_shares_of_one_cache_together_prepare_each_volume_once(bucket, tmp_path):
    raw, _ = bucket
    report = audit_dataset(URI)
    builds = [prepare(tmp_path, share=(index, 3))[1].report for index in range(3)]
    assert sum(build.built for build in builds) == len(report.volumes)
    assert len(raw.downloads) == len(set(raw.downloads)) == len(report.volumes)
    _, whole = prepare(tmp_path)
    assert whole.report.reused == len(report.volumes) and whole.report.built == 0


# ------------------------------------------------------------------------------------------ identity


def same_size_other_pixels(dicom: bytes) -> bytes:
    """The same DICOM with its last 4 KiB (pixel data) reversed: other content, the same size."""
    return dicom[:-4096] + dicom[-4096:][::-1]


def test_a_b2_object_replaced_with_same_sized_content_is_prepared_again(release, bucket, tmp_path):
    raw, b2_bucket = bucket
    report, first = prepare(tmp_path)
    key = report.volumes.key.iloc[0]
    # Other pixels of the same size under the same name: a new upload (a new file id).
    b2_bucket.upload_bytes(same_size_other_pixels((release / key).read_bytes()), f"{PREFIX}/{key}")
    downloads_before = len(raw.downloads)
    _, second = prepare(tmp_path)
    assert second.report.built == 1 and second.report.reused == len(report.volumes) - 1
    assert raw.downloads[downloads_before:] == [key]
    old, new = first.volumes.source_id.iloc[0], second.volumes.source_id.iloc[0]
    assert old != new
    assert not np.array_equal(first.cache.get(old), second.cache.get(new))


@pytest.mark.parametrize("hashed", [True, False], ids=["sha1-known", "sha1-unknown"])
def test_a_local_file_overwritten_with_same_sized_content_is_prepared_again(release, tmp_path, hashed):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(release, data)
    settings = {"cache_dir": str(tmp_path / "cache"), "frames": 4, "height": 16, "width": 16, "workers": 1,
                "progress": False}

    def audited():
        volumes = audit_dataset(str(data)).volumes
        # The audit hashes only files whose sizes collide; the others have NaN in the sha1 column.
        return volumes if hashed else volumes.assign(sha1=np.nan)

    volumes = audited()
    first = prepare_volumes(str(data), volumes, **settings)
    assert all("nan" not in sid.lower().split("|") for sid in first.volumes.source_id)

    target = data / volumes.key.iloc[0]
    size = target.stat().st_size
    target.write_bytes(same_size_other_pixels(target.read_bytes()))
    assert target.stat().st_size == size
    second = prepare_volumes(str(data), audited(), **settings)
    assert second.report.built == 1 and second.report.reused == len(volumes) - 1
    assert not np.array_equal(first.cache.get(first.volumes.source_id.iloc[0]),
                              second.cache.get(second.volumes.source_id.iloc[0]))


def test_a_source_identity_never_holds_an_unknown_value():
    assert source_id("b2://b/p", "a.dcm", 12, "4_zfile", float("nan")) == "b2://b/p/a.dcm|12|4_zfile"
    assert source_id("file:///d", "a.dcm", 12, 1700000000123, "abc") == "file:///d/a.dcm|12|1700000000123|abc"
    for unknown in (None, float("nan"), "", "  "):
        with pytest.raises(ValueError, match="no version"):
            source_id("file:///d", "a.dcm", 12, unknown)
