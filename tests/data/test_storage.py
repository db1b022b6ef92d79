"""Storage back ends: a real local folder and B2 through b2sdk's own RawSimulator.

The simulator stands in for B2's network (the one thing a test cannot have). Where a test needs
the network to fail, a subclass of RawSimulator below injects b2sdk's own exceptions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator
from b2sdk.v2.exception import B2ConnectionError, ServiceError

from octft.data.storage import (
    B2Storage,
    LocalStorage,
    ObjectInfo,
    Retry,
    Storage,
    StorageError,
    open_storage,
)

BUCKET = "octft-test"


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def sha1_of(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class NoSleep:
    """The clock for retries: records each wait instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class FlakySimulator(RawSimulator):
    """B2's network, failing the first `*_failures` calls with b2sdk's own transient errors.

    Counts calls so that tests can see pagination, retries and cache hits.
    """

    download_failures = 0
    list_failures = 0
    download_error: Exception = B2ConnectionError("connection reset by peer")
    download_barrier: threading.Barrier | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.download_calls = 0
        self.list_calls = 0

    def list_file_names(self, *args, **kwargs):
        self.list_calls += 1
        if self.list_calls <= self.list_failures:
            raise ServiceError("503 service_unavailable")
        return super().list_file_names(*args, **kwargs)

    def download_file_from_url(self, *args, **kwargs):
        self.download_calls += 1
        if self.download_calls <= self.download_failures:
            raise self.download_error
        if self.download_barrier is not None:
            self.download_barrier.wait(timeout=10)  # both downloads are in flight at once
        return super().download_file_from_url(*args, **kwargs)


def simulated_b2(raw_api_class: type[RawSimulator] = FlakySimulator, *, authorize: bool = True):
    """An in-memory B2 account with one bucket: (api, raw simulator, bucket, key id, key)."""
    config = B2HttpApiConfig(_raw_api_class=raw_api_class)
    api = B2Api(InMemoryAccountInfo(), api_config=config)
    raw = api.session.raw_api
    key_id, key = raw.create_account()
    api.authorize_account("production", key_id, key)
    bucket = api.create_bucket(BUCKET, "allPrivate")
    if not authorize:
        # A second client of the same simulated B2, not logged in yet.
        api = B2Api(InMemoryAccountInfo(), api_config=config)
        api.session.raw_api = raw
    return api, raw, bucket, key_id, key


def b2_storage(tmp_path: Path, files: dict[str, bytes], *, prefix: str = "release", **kwargs):
    api, raw, bucket, _, _ = simulated_b2()
    for key, data in files.items():
        bucket.upload_bytes(data, f"{prefix}/{key}" if prefix else key)
    kwargs.setdefault("retry", Retry(attempts=4, base_delay_s=0.01, sleep=NoSleep()))
    storage = B2Storage(api, BUCKET, prefix, cache_dir=tmp_path / "cache", **kwargs)
    return storage, raw, bucket


# ---------------------------------------------------------------------------------------------
# Local folder

# Names chosen so that sorting by folder name differs from sorting by key ('-' < '.' < '/').
TRICKY = {
    "a-b": b"1",
    "a.txt": b"22",
    "a/x": b"333",
    "B/y.dcm": b"4444",
    "deep/1/2/3.dcm": b"55555",
    "participants.tsv": b"id\n",
}


def test_local_lists_nested_keys_sorted_with_sizes(tmp_path):
    write_tree(tmp_path, TRICKY)
    # A leftover of our own downloads is never an object.
    (tmp_path / "deep" / ".3.dcm.123-abcd.partial").write_bytes(b"half")

    listed = list(LocalStorage(tmp_path).list())

    assert [info.key for info in listed] == sorted(TRICKY)
    # The version is what changes with the file: its modification time.
    versions = [str((tmp_path / key).stat().st_mtime_ns) for key in sorted(TRICKY)]
    assert listed == [ObjectInfo(key, len(TRICKY[key]), None, version) for key, version in zip(sorted(TRICKY), versions)]


def test_local_walk_order_equals_sorted_keys_on_many_names(tmp_path):
    names = ["a", "a-", "a.", "a0", "A", "_", "z~", "é"]
    files = {f"{d1}/{d2}/{f}": b"x" for d1 in names for d2 in names[:4] for f in ("f", "f.dcm", "f-1")}
    files.update({name: b"y" for name in ("a-.dcm", "a.0", "a0.dcm", "a/f-0")})
    write_tree(tmp_path, files)

    assert [info.key for info in LocalStorage(tmp_path).list()] == sorted(files)


def test_local_prefix_filtering(tmp_path):
    files = {
        "participants.tsv": b"p",
        "retinal_oct/manifest.tsv": b"m",
        "retinal_oct/structural_oct/topcon_maestro2/1001/a.dcm": b"aa",
        "retinal_oct/structural_oct/topcon_triton/1002/b.dcm": b"bbb",
        "retinal_oct/structural_oct/zeiss_cirrus/1003/c.dcm": b"cccc",
        "retinal_octx/other.txt": b"o",
    }
    write_tree(tmp_path, files)
    storage = LocalStorage(tmp_path)

    def keys(prefix):
        return [info.key for info in storage.list(prefix)]

    assert keys("retinal_oct/structural_oct/topcon") == [
        "retinal_oct/structural_oct/topcon_maestro2/1001/a.dcm",
        "retinal_oct/structural_oct/topcon_triton/1002/b.dcm",
    ]
    assert keys("retinal_oct/") == sorted(k for k in files if k.startswith("retinal_oct/"))
    # A plain string prefix, as in B2: "retinal_oct" also matches "retinal_octx/".
    assert keys("retinal_oct") == sorted(k for k in files if k.startswith("retinal_oct"))
    assert keys("participants.tsv") == ["participants.tsv"]
    assert keys("no_such_folder/") == []


def test_local_follows_links_inside_the_root_refuses_the_rest_and_survives_loops(tmp_path, caplog):
    outside = tmp_path / "outside"
    write_tree(outside, {"vol.dcm": b"volume", "sub/frame.dcm": b"frame"})
    root = tmp_path / "root"
    write_tree(root, {"real.dcm": b"r", "inner/kept.dcm": b"kept"})
    (root / "linked.dcm").symlink_to(outside / "vol.dcm")
    (root / "linked_dir").symlink_to(outside / "sub")
    (root / "alias.dcm").symlink_to(root / "inner" / "kept.dcm")  # links within the root keep working
    (root / "alias_dir").symlink_to(root / "inner")
    (root / "loop").symlink_to(root)
    (root / "broken.dcm").symlink_to(tmp_path / "missing.dcm")
    os.mkfifo(root / "pipe.dcm")
    storage = LocalStorage(root)

    refused: list[tuple[str, str]] = []
    listed = list(storage.list(refused=refused))

    assert [(info.key, info.size) for info in listed] == [
        ("alias.dcm", 4), ("alias_dir/kept.dcm", 4), ("inner/kept.dcm", 4), ("real.dcm", 1),
    ]
    reasons = dict(refused)
    assert sorted(reasons) == ["broken.dcm", "linked.dcm", "linked_dir/", "loop/", "pipe.dcm"]
    assert "outside the data root" in reasons["linked.dcm"] and "outside the data root" in reasons["linked_dir/"]
    assert "broken link" in reasons["broken.dcm"] and "loop" in reasons["loop/"] and "FIFO" in reasons["pipe.dcm"]
    # Asked for by key, a link out of the root is refused too; without `refused`, a listing logs what it skips.
    with pytest.raises(PermissionError, match="outside the data root"):
        storage.read_bytes("linked.dcm")
    assert storage.read_bytes("alias.dcm") == b"kept"
    with caplog.at_level(logging.WARNING):
        assert [info.key for info in storage.list()] == [info.key for info in listed]
    assert "linked.dcm" in caplog.text and "pipe.dcm" in caplog.text


def test_local_missing_root_names_it(tmp_path):
    missing = tmp_path / "not_mounted"
    with pytest.raises(FileNotFoundError, match="not_mounted"):
        open_storage(missing)
    with pytest.raises(FileNotFoundError, match="not_mounted"):
        open_storage(missing.as_uri())


def test_local_file_uri_and_plain_path_agree(tmp_path):
    write_tree(tmp_path / "my release", TRICKY)
    by_path = open_storage(str(tmp_path / "my release"))
    by_uri = open_storage((tmp_path / "my release").as_uri())  # percent-encoded space

    assert isinstance(by_uri, LocalStorage) and isinstance(by_uri, Storage)
    assert by_uri.uri == by_path.uri == (tmp_path / "my release").as_uri()
    assert list(by_uri.list()) == list(by_path.list())


def test_local_read_exists_sha1_and_bad_keys(tmp_path):
    write_tree(tmp_path, TRICKY)
    storage = LocalStorage(tmp_path)

    assert storage.read_bytes("deep/1/2/3.dcm") == b"55555"
    assert storage.local_path("a/x") == tmp_path / "a" / "x"
    assert storage.sha1("a.txt") == sha1_of(b"22")
    assert storage.exists("a-b") and not storage.exists("a-c") and not storage.exists("a")
    with pytest.raises(FileNotFoundError, match="'a-c'"):
        storage.read_bytes("a-c")
    for bad in ("../etc/passwd", "/abs", "a//x", ""):
        with pytest.raises(ValueError, match="is not a relative"):
            storage.read_bytes(bad)


def test_invalid_uris_name_the_uri_and_the_accepted_forms():
    bad_uris = ("s3://bucket/x", "https://example.com/data", "", "b2://", "file://host/data", "file:relative")
    for uri in bad_uris:
        with pytest.raises(ValueError) as info:
            open_storage(uri)
        message = str(info.value)
        assert repr(uri) in message and "b2://bucket/prefix" in message and "file:///" in message


# ---------------------------------------------------------------------------------------------
# B2 through the simulator


def test_b2_listing_follows_every_page_once(tmp_path):
    folder = "retinal_oct/structural_oct/topcon_maestro2"
    files = {f"{folder}/{1000 + i}/v.dcm": bytes([i]) * (i + 1) for i in range(23)}
    files["participants.tsv"] = b"participant_id\n1001\n"
    storage, raw, bucket = b2_storage(tmp_path, files, page_size=4)
    # Outside the storage's prefix, hidden, or an older version: none of these are objects.
    bucket.upload_bytes(b"elsewhere", "other/x.dcm")
    bucket.upload_bytes(b"gone", "release/hidden.dcm")
    bucket.hide_file("release/hidden.dcm")
    bucket.upload_bytes(b"old", "release/participants.tsv.bak")
    bucket.upload_bytes(b"new!", "release/participants.tsv.bak")
    files["participants.tsv.bak"] = b"new!"

    listed = list(storage.list())

    assert [info.key for info in listed] == sorted(files)
    assert [(info.key, info.size, info.sha1) for info in listed] == [
        (key, len(files[key]), sha1_of(files[key])) for key in sorted(files)
    ]
    # Each upload has its own file id: the re-uploaded name is a new version.
    versions = {info.key: info.version for info in listed}
    assert len(set(versions.values())) == len(files) and all(versions.values())
    assert raw.list_calls >= len(files) // 4  # it really went through many pages

    topcon = list(storage.list("retinal_oct/structural_oct/topcon_maestro2/101"))
    assert [info.key for info in topcon] == sorted(k for k in files if "/101" in k)


def test_b2_read_bytes_and_verified_cache(tmp_path):
    files = {"retinal_oct/manifest.tsv": b"manifest", "vol/a.dcm": b"A" * 5000}
    storage, raw, _ = b2_storage(tmp_path, files)

    assert storage.read_bytes("retinal_oct/manifest.tsv") == b"manifest"
    path = storage.local_path("vol/a.dcm")
    assert path == tmp_path / "cache" / BUCKET / "release" / "vol" / "a.dcm"
    assert path.read_bytes() == files["vol/a.dcm"]
    downloads = raw.download_calls

    # A complete entry is reused without touching the network, even by a fresh storage.
    again = B2Storage(storage._api, BUCKET, "release", cache_dir=tmp_path / "cache")
    assert again.local_path("vol/a.dcm") == path
    assert raw.download_calls == downloads
    assert again.sha1("vol/a.dcm") == sha1_of(files["vol/a.dcm"])
    assert again.exists("vol/a.dcm") and not again.exists("vol/b.dcm")
    assert not list(path.parent.glob("*.partial")) and not list(path.parent.glob(".*.partial"))
    with pytest.raises(FileNotFoundError, match="vol/b.dcm"):
        again.local_path("vol/b.dcm")


def test_b2_cache_heals_truncated_corrupt_and_partial_entries(tmp_path):
    data = bytes(range(256)) * 40
    files = {"v/a.dcm": data, "v/b.dcm": data[::-1], "v/c.dcm": data[1:] + b"!"}
    storage, raw, _ = b2_storage(tmp_path, files)
    folder = tmp_path / "cache" / BUCKET / "release" / "v"
    folder.mkdir(parents=True)
    # A killed download left a half-written partial an hour ago, and a truncated final file.
    stale = folder / ".a.dcm.999-dead.partial"
    stale.write_bytes(data[:100])
    old = time.time() - 7200
    os.utime(stale, (old, old))
    live = folder / ".a.dcm.4242-beef.partial"  # another process's download in flight
    live.write_bytes(data[:10])
    (folder / "a.dcm").write_bytes(data[:1000])
    # Right size, wrong bytes, no stamp.
    (folder / "b.dcm").write_bytes(bytes(len(data)))
    # Verified once, then changed in place: its stamp no longer describes it.
    assert storage.local_path("v/c.dcm").read_bytes() == data[1:] + b"!"
    corrupted = bytearray((folder / "c.dcm").read_bytes())
    corrupted[0] ^= 0xFF
    (folder / "c.dcm").write_bytes(bytes(corrupted))
    os.utime(folder / "c.dcm", ns=(1, 1))

    assert storage.local_path("v/a.dcm").read_bytes() == data
    assert storage.local_path("v/b.dcm").read_bytes() == data[::-1]
    assert storage.local_path("v/c.dcm").read_bytes() == data[1:] + b"!"
    assert not stale.exists()
    assert live.read_bytes() == data[:10]  # never touched: it may still be written
    assert raw.download_calls == 4


def test_b2_object_replaced_after_listing_is_fetched_fresh(tmp_path):
    storage, _, bucket = b2_storage(tmp_path, {"labels.tsv": b"old labels"})
    assert [info.sha1 for info in storage.list()] == [sha1_of(b"old labels")]
    bucket.upload_bytes(b"new labels!", "release/labels.tsv")

    assert storage.local_path("labels.tsv").read_bytes() == b"new labels!"
    assert storage.sha1("labels.tsv") == sha1_of(b"new labels!")


def test_b2_transient_errors_are_retried_with_backoff(tmp_path):
    class Flaky(FlakySimulator):
        download_failures = 2
        list_failures = 1

    api, raw, bucket, _, _ = simulated_b2(Flaky)
    bucket.upload_bytes(b"volume bytes", "release/v.dcm")
    sleep = NoSleep()
    retry = Retry(attempts=3, base_delay_s=0.01, sleep=sleep)
    storage = B2Storage(api, BUCKET, "release", cache_dir=tmp_path, retry=retry)

    assert [info.key for info in storage.list()] == ["v.dcm"]
    assert sleep.waits == [0.01]
    assert storage.local_path("v.dcm").read_bytes() == b"volume bytes"
    assert raw.download_calls == 3
    assert sleep.waits == [0.01, 0.01, 0.02]  # exponential: base, then twice base


def test_b2_gives_up_after_the_configured_attempts(tmp_path):
    class Down(FlakySimulator):
        download_failures = 10**6

    api, raw, bucket, _, _ = simulated_b2(Down)
    bucket.upload_bytes(b"x", "release/v.dcm")
    sleep = NoSleep()
    retry = Retry(attempts=4, base_delay_s=0.5, max_delay_s=1.5, sleep=sleep)
    storage = B2Storage(api, BUCKET, "release", cache_dir=tmp_path, retry=retry)

    with pytest.raises(StorageError, match=r"b2://octft-test/release/v\.dcm.*4 attempts"):
        storage.local_path("v.dcm")
    assert raw.download_calls == 4
    assert sleep.waits == [0.5, 1.0, 1.5]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial left behind


def test_b2_permanent_errors_fail_at_once(tmp_path):
    storage, raw, _ = b2_storage(tmp_path, {"v.dcm": b"x"})
    sleep = storage.retry.sleep

    with pytest.raises(FileNotFoundError, match=r"'missing\.dcm' in b2://octft-test/release"):
        storage.read_bytes("missing.dcm")
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        B2Storage(storage._api, "no-such-bucket", cache_dir=tmp_path)
    assert sleep.waits == []


def test_b2_listing_sha1_forms(tmp_path):
    data = {"small.dcm": b"small", "large.dcm": b"large" * 100, "large_with_info.dcm": b"L" * 300}

    class LargeFileListing(FlakySimulator):
        # As B2 lists them: large files have no content SHA-1 (the uploader may have put one
        # in the file info), and some uploads are unverified.
        def list_file_names(self, *args, **kwargs):
            page = super().list_file_names(*args, **kwargs)
            for entry in page["files"]:
                name = entry["fileName"]
                if name.endswith("large.dcm"):
                    entry["contentSha1"], entry["fileInfo"] = "none", {}
                elif name.endswith("large_with_info.dcm"):
                    entry["contentSha1"] = "none"
                    entry["fileInfo"] = {"large_file_sha1": sha1_of(data["large_with_info.dcm"])}
                else:
                    entry["contentSha1"] = "unverified:" + entry["contentSha1"]
            return page

    api, raw, bucket, _, _ = simulated_b2(LargeFileListing)
    for key, content in data.items():
        bucket.upload_bytes(content, f"release/{key}")
    storage = B2Storage(api, BUCKET, "release", cache_dir=tmp_path)

    assert {info.key: info.sha1 for info in storage.list()} == {
        "large.dcm": None,
        "large_with_info.dcm": sha1_of(data["large_with_info.dcm"]),
        "small.dcm": sha1_of(b"small"),
    }
    assert raw.download_calls == 0
    assert storage.sha1("large.dcm") == sha1_of(data["large.dcm"])  # downloaded and hashed
    assert raw.download_calls == 1
    # With no SHA-1 to compare, the size alone tells a truncated entry from a whole one.
    cached = storage.cache_path("large.dcm")
    cached.write_bytes(data["large.dcm"][:-1])
    assert storage.local_path("large.dcm").read_bytes() == data["large.dcm"]
    assert raw.download_calls == 2


def test_b2_concurrent_downloads_of_one_key_do_not_corrupt(tmp_path):
    class Together(FlakySimulator):
        download_barrier = threading.Barrier(2)

    api, raw, bucket, _, _ = simulated_b2(Together)
    data = os.urandom(300_000)
    bucket.upload_bytes(data, "release/v.dcm")
    storages = [B2Storage(api, BUCKET, "release", cache_dir=tmp_path) for _ in range(2)]
    results, errors = [], []

    def fetch(storage):
        try:
            results.append(storage.local_path("v.dcm").read_bytes())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(storage,)) for storage in storages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == [] and results == [data, data]
    assert raw.download_calls == 2
    assert [p.name for p in (tmp_path / BUCKET / "release").iterdir()] == ["v.dcm"]


# ---------------------------------------------------------------------------------------------
# Credentials


SECRET = "K005-very-secret-application-key"


def test_b2_auth_failure_never_shows_the_key(tmp_path, monkeypatch, caplog):
    api, _, _, key_id, _ = simulated_b2(authorize=False)
    monkeypatch.setenv("B2_APPLICATION_KEY_ID", key_id)
    monkeypatch.setenv("B2_APPLICATION_KEY", SECRET)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(PermissionError) as info:
        open_storage(f"b2://{BUCKET}/release", b2_api=api, cache_dir=tmp_path)

    assert "B2_APPLICATION_KEY_ID" in str(info.value)
    for text in (str(info.value), repr(info.value), caplog.text):
        assert SECRET not in text
    assert info.value.__cause__ is None


def test_b2_env_credentials_open_storage_without_leaking(tmp_path, monkeypatch, caplog):
    api, _, bucket, key_id, key = simulated_b2(authorize=False)
    bucket.upload_bytes(b"v", "release/v.dcm")
    monkeypatch.setenv("B2_APPLICATION_KEY_ID", key_id)
    monkeypatch.setenv("B2_APPLICATION_KEY", key)
    caplog.set_level(logging.DEBUG)

    storage = open_storage(f"b2://{BUCKET}/release", b2_api=api, cache_dir=tmp_path)

    assert isinstance(storage, B2Storage) and isinstance(storage, Storage)
    assert storage.read_bytes("v.dcm") == b"v"
    assert storage.uri == f"b2://{BUCKET}/release"
    assert repr(storage) == f"B2Storage('b2://{BUCKET}/release')"
    assert key not in caplog.text


def test_b2_missing_credentials_say_what_to_set(monkeypatch):
    api, *_ = simulated_b2(authorize=False)
    monkeypatch.delenv("B2_APPLICATION_KEY_ID", raising=False)
    monkeypatch.setenv("B2_APPLICATION_KEY", SECRET)

    with pytest.raises(StorageError, match="set B2_APPLICATION_KEY_ID in the environment") as info:
        open_storage(f"b2://{BUCKET}", b2_api=api)
    assert SECRET not in str(info.value)
