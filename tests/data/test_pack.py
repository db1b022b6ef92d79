"""Packs: rows written once, checked at write and at open, gathered by index by several readers at once."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

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


def test_prefetch_keeps_order_and_raises_where_the_producer_failed():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(failing(), depth=2):
            seen.append(item)
    assert seen == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    produced = []

    def endless():
        index = 0
        while True:
            produced.append(index)
            yield index
            index += 1

    iterator = prefetch(endless(), depth=2)
    assert [next(iterator) for _ in range(3)] == [0, 1, 2]
    iterator.close()
    count = len(produced)
    threading.Event().wait(0.1)
    assert len(produced) <= count + 1
