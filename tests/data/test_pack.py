"""Packs: rows written once, checked at write and at open, gathered by index by several readers at once."""

from __future__ import annotations

import itertools
import multiprocessing
import threading

import numpy as np
import pytest

from octft.data.pack import open_pack, pack_key, prefetch, write_pack

META = {"kind": "test", "spec": {"frames": 2}, "dtype": "float16"}


def rows(count: int, seed: int = 0) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    return [generator.standard_normal((2, 3, 4)).astype(np.float16) for _ in range(count)]


def ids(count: int) -> list[str]:
    return [f"file:///data/{index}.dcm|100|{index}" for index in range(count)]


def test_written_rows_are_gathered_in_the_order_asked(tmp_path):
    data = rows(10)
    pack = write_pack(tmp_path, META, ids(10), iter(data), row_shape=(2, 3, 4), dtype="float16")
    batch = pack.gather([7, 3, 3, 0])
    assert batch.dtype == np.float16 and batch.shape == (4, 2, 3, 4)
    for got, index in zip(batch, [7, 3, 3, 0]):
        np.testing.assert_array_equal(got, data[index])
    reopened = open_pack(tmp_path, META, ids(10))
    np.testing.assert_array_equal(reopened.gather(range(10)), np.stack(data))


def test_another_setting_or_row_list_is_another_pack(tmp_path):
    write_pack(tmp_path, META, ids(4), iter(rows(4)), row_shape=(2, 3, 4), dtype="float16")
    assert open_pack(tmp_path, META | {"dtype": "float32"}, ids(4)) is None
    assert open_pack(tmp_path, META, ids(3)) is None
    assert open_pack(tmp_path, META, list(reversed(ids(4)))) is None
    assert pack_key(META, ids(4)) != pack_key(META, ids(3))


@pytest.mark.parametrize("damage", ["flip", "truncate", "record", "no-data"])
def test_a_damaged_pack_is_detected_at_open_and_removed(tmp_path, damage):
    pack = write_pack(tmp_path, META, ids(6), iter(rows(6)), row_shape=(2, 3, 4), dtype="float16")
    data_path, record_path = pack.path / "data.npy", pack.path / "record.json"
    del pack
    raw = data_path.read_bytes()
    if damage == "flip":
        data_path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0xFF]) + raw[-4:])
    elif damage == "truncate":
        data_path.write_bytes(raw[:-40])
    elif damage == "record":
        record_path.write_text("{not json")
    else:
        data_path.unlink()
    assert open_pack(tmp_path, META, ids(6)) is None
    assert not data_path.parent.exists()  # removed, for the next writer


def test_rows_that_do_not_match_their_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="3 rows for 4 row ids"):
        write_pack(tmp_path, META, ids(4), iter(rows(3)), row_shape=(2, 3, 4), dtype="float16")
    assert open_pack(tmp_path, META, ids(4)) is None


def test_concurrent_writers_of_one_pack_leave_one_whole_pack(tmp_path):
    data = rows(20)
    errors = []

    def write():
        try:
            write_pack(tmp_path, META, ids(20), iter(data), row_shape=(2, 3, 4), dtype="float16")
        except BaseException as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    pack = open_pack(tmp_path, META, ids(20))
    np.testing.assert_array_equal(pack.gather(range(20)), np.stack(data))
    assert sorted(path.name for path in pack.path.iterdir()) == ["data.npy", "record.json"]


def _read_in_another_process(root: str, indices: list[int]) -> bytes:
    pack = open_pack(root, META, ids(12))
    return pack.gather(indices).tobytes()


def test_several_processes_read_one_pack_at_once(tmp_path):
    data = rows(12)
    write_pack(tmp_path, META, ids(12), iter(data), row_shape=(2, 3, 4), dtype="float16")
    orders = [[0, 5, 11], [11, 10, 9, 8], [3]]
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_read_in_another_process, [(str(tmp_path), order) for order in orders])
    for order, raw in zip(orders, results):
        assert raw == np.stack([data[index] for index in order]).tobytes()


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_prefetch_keeps_order_and_raises_where_the_work_failed(workers):
    assert list(prefetch(lambda n: n * n, iter(range(50)), workers=workers)) == [n * n for n in range(50)]

    def gather(n):
        if n == 2:
            raise OSError("disk gone")
        return n

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(gather, range(10), workers=workers):
            seen.append(item)
    assert seen == [0, 1]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_prefetch_works_ahead_only_a_bounded_window_and_stops_when_the_consumer_does(workers):
    started = []

    def work(n):
        started.append(n)
        return n

    iterator = prefetch(work, itertools.count(), workers=workers)
    assert [next(iterator) for _ in range(3)] == [0, 1, 2]
    iterator.close()  # joins the threads: nothing is started after this
    count = len(started)
    assert count <= 3 + 2 * workers
    threading.Event().wait(0.1)
    assert len(started) == count


def test_threads_gather_one_pack_at_once(tmp_path):
    data = rows(30)
    pack = write_pack(tmp_path, META, ids(30), iter(data), row_shape=(2, 3, 4), dtype="float16")
    batches = [[index, (index * 7) % 30, 29 - index] for index in range(30)]
    for got, indices in zip(prefetch(pack.gather, batches, workers=3), batches):
        np.testing.assert_array_equal(got, np.stack([data[index] for index in indices]))


def test_a_uint8_pack_refuses_float_rows_it_would_truncate(tmp_path):
    with pytest.raises(ValueError, match="row 0 is float16, which a uint8 pack cannot hold without rounding"):
        write_pack(tmp_path, META, ids(2), iter(rows(2)), row_shape=(2, 3, 4), dtype="uint8")
    clips = [np.full((2, 3, 4), value, dtype=np.uint8) for value in (0, 255)]
    pack = write_pack(tmp_path, META | {"dtype": "uint8"}, ids(2), iter(clips), row_shape=(2, 3, 4), dtype="uint8")
    assert pack.gather([1, 0]).dtype == np.uint8 and pack.gather([1])[0, 0, 0, 0] == 255
